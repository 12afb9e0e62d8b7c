"""Interrupted runs, with real ``python -m prefopt train`` subprocesses.

A run is stopped at a known point: the test installs (through the ordinary
entry-point mechanism) a loss plugin, ``gated_dpo``, that computes exactly DPO
but, after ``hold_after`` calls in a process, writes ``GATE/waiting`` and waits
until ``GATE/open`` exists. With ``save_every: 2`` and ``hold_after: 5`` the
victim has written the checkpoints of steps 2 and 4 and finished step 5 when it
blocks inside step 6, so a ``kill -9`` there loses a finished but unsaved step.

Every run is fp32 on CPU with ``OMP_NUM_THREADS=1``; a resumed run must end
with weights exactly equal (``torch.equal``) to those of a run never interrupted.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from engine_helpers import write_plugin_dist

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY, HOLD_AFTER = 12, 2, 5
WAIT = 300  # seconds: generous upper bounds only, never asserted as timings

PLUGIN = '''
import time
from pathlib import Path

from prefopt.plugins.hookspecs import hookimpl
from prefopt.losses.dpo import DPO, DPOConfig


class GatedConfig(DPOConfig):
    gate: str
    hold_after: int = 5


class GatedDPO(DPO):
    """DPO that, after `hold_after` calls on batches, waits for GATE/open (a test hook)."""

    name = "gated_dpo"
    Config = GatedConfig
    calls = 0

    def forward(self, inputs):
        if type(inputs).__name__ == "TrackedInputs":  # the check on synthetic inputs before training
            return super().forward(inputs)
        type(self).calls += 1
        gate = Path(self.config.gate)
        if type(self).calls > self.config.hold_after and not (gate / "open").exists():
            (gate / "waiting").write_text(str(type(self).calls))
            deadline = time.time() + 300
            while not (gate / "open").exists() and time.time() < deadline:
                time.sleep(0.05)
        return super().forward(inputs)


@hookimpl
def register_losses():
    return [GatedDPO]
'''


def _write_data(d: Path) -> None:
    from prefopt.testing.tiny import build_tokenizer

    rng = random.Random(0)
    words = "the cat dog sat ran on a mat log good bad happy sad big small red blue green".split()

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    rows = [{"prompt": text(3, 8), "chosen": text(2, 6), "rejected": "not " + text(2, 6)} for _ in range(48)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = build_tokenizer([r[k] for r in rows for k in ("prompt", "chosen", "rejected")], 128)
    tok.save_pretrained(d / "tok")
    (d / "vocab").write_text(str(len(tok)))


class Project:
    """Shared data, tokenizer and plugin; one directory (config, gate, output) per run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.site = root / "site"
        write_plugin_dist(self.site, "gated-loss", {"gated_loss": PLUGIN}, {"gated": "gated_loss"})
        _write_data(root)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), str(self.site)]), "PREFOPT_LOAD_PLUGINS": "gated"}

    def config(self, name: str, gate_open: bool) -> Path:
        from prefopt.testing.tiny import model_config

        d = self.root / name
        (d / "gate").mkdir(parents=True)
        if gate_open:
            (d / "gate" / "open").write_text("")
        vocab = int((self.root / "vocab").read_text())
        cfg = {
            "model": {"config": model_config("llama", vocab, 32, 2, 2, max_position=128), "tokenizer": str(self.root / "tok")},
            "data": {"train": str(self.root / "train.jsonl"), "max_length": 64},
            "loss": {"name": "gated_dpo", "beta": 0.1, "gate": str(d / "gate"), "hold_after": HOLD_AFTER},
            "reference": {"cache_dir": str(d / "cache")},
            "trainer": {"output_dir": str(d / "out"), "batch_size": 4, "max_steps": STEPS, "save_every": SAVE_EVERY,
                        "keep_checkpoints": 3, "lr": 1e-3, "schedule": "linear", "warmup_steps": 2, "precision": "fp32"},
        }
        path = d / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def start(self, cfg: Path, *extra: str) -> subprocess.Popen:
        """``python -m prefopt train CFG ...``, its output going to a file beside the config (never a full pipe)."""
        log = cfg.parent / f"log{len(list(cfg.parent.glob('log*.txt')))}.txt"
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "prefopt", "train", str(cfg), *extra], cwd=ROOT, env=self.env,
                                    stdout=f, stderr=subprocess.STDOUT)
        proc.log = log  # type: ignore[attr-defined]
        return proc


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    proc.wait(timeout=WAIT)
    return proc.returncode, proc.log.read_text()  # type: ignore[attr-defined]


def _wait_blocked(proc: subprocess.Popen, cfg: Path) -> None:
    """Wait until the run blocks inside step HOLD_AFTER + 1 (after its checkpoints of steps 2 and 4)."""
    waiting = cfg.parent / "gate" / "waiting"
    deadline = time.time() + WAIT
    while not waiting.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before blocking (exit {proc.returncode}):\n{proc.log.read_text()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the run never reached the gate")
        time.sleep(0.05)


def _checkpoints(cfg: Path) -> list[str]:
    root = cfg.parent / "out" / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _weights(cfg: Path) -> dict[str, torch.Tensor]:
    return load_file(str(cfg.parent / "out" / "model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    return Project(tmp_path_factory.mktemp("interrupt"))


@pytest.fixture(scope="module")
def runs(project: Project):
    """The uninterrupted reference run and the three victims, all started at once (they overlap)."""
    procs = {}
    for name in ("reference", "kill9", "SIGTERM", "SIGINT"):
        cfg = project.config(name, gate_open=name == "reference")
        procs[name] = (cfg, project.start(cfg))
    yield procs
    for _, proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def reference(runs) -> dict[str, torch.Tensor]:
    cfg, proc = runs["reference"]
    code, out = _finish(proc)
    assert code == 0, out
    return _weights(cfg)


def test_kill9_mid_run_then_resume_gives_identical_weights(project, runs, reference):
    cfg, victim = runs["kill9"]
    _wait_blocked(victim, cfg)
    victim.kill()  # SIGKILL: no handler runs, nothing is flushed
    victim.wait(timeout=WAIT)
    assert victim.returncode == -signal.SIGKILL
    assert _checkpoints(cfg) == ["step-0000002", "step-0000004"]
    assert not (cfg.parent / "out" / "model.safetensors").exists()

    (cfg.parent / "gate" / "open").write_text("")
    code, out = _finish(project.start(cfg, "--resume"))
    assert code == 0, out
    assert "resuming from" in out and "(step 4)" in out
    _assert_same(_weights(cfg), reference)
    summary = json.loads((cfg.parent / "out" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["bad_steps"] == 0
    # step 5 ran twice (before the kill and after the resume); metrics keep one row per step
    steps = [json.loads(l)["step"] for l in (cfg.parent / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


def test_sigterm_and_sigint_write_checkpoint_exit_130_and_resume(project, runs, reference):
    resumed = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        cfg, victim = runs[sig.name]
        _wait_blocked(victim, cfg)
        victim.send_signal(sig)
        (cfg.parent / "gate" / "open").write_text("")  # let the step in progress finish
        code, out = _finish(victim)
        assert code == 130, out
        assert "interrupt received" in out
        assert f"resume with: prefopt train {cfg} --resume" in out
        # the step in progress (HOLD_AFTER + 1) completed and was checkpointed; no final model yet
        assert _checkpoints(cfg)[-1] == f"step-{HOLD_AFTER + 1:07d}"
        assert not (cfg.parent / "out" / "model.safetensors").exists()
        resumed[sig.name] = (cfg, project.start(cfg, "--resume"))
    for name, (cfg, proc) in resumed.items():
        code, out = _finish(proc)
        assert code == 0, f"{name}: {out}"
        assert f"(step {HOLD_AFTER + 1})" in out
        _assert_same(_weights(cfg), reference)
