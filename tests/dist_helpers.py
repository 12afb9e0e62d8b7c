"""Starting several CPU processes for the distributed tests: a free port, a clean environment, a process group killed on timeout."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    """This checkout on the path, one thread per process, and no CUDA device, so processes run on CPU over gloo anywhere."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    env.update(extra)
    return env


def torchrun(nproc: int, *args: str) -> list[str]:
    """``torchrun --nproc_per_node nproc -m prefopt args...`` with a static rendezvous on a free local port
    (--standalone's c10d rendezvous can hang at exit)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "prefopt", *args]


def torchrun_script(nproc: int, script: Path, text: str, *args: str) -> list[str]:
    """Write ``text`` to ``script`` and return the torchrun command that runs it in ``nproc`` processes."""
    script.write_text(text)
    return torchrun(nproc)[:-2] + [str(script), *args]  # the script in place of "-m prefopt"


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it. torchrun starts each worker in a session of its own,
    so killing the launcher's process group alone would leave the workers running."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in children:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launch(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout the launcher and all its workers are killed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def train_one_process(raw: dict) -> dict:
    """Train ``raw`` (a run-config mapping) in this process with one thread, as each launched process runs."""
    import torch

    from engine_helpers import train_raw

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_raw(raw)
    finally:
        torch.set_num_threads(before)
