"""Output directories: prefopt never moves, empties or writes into a directory it did not create; the lock holds
whatever path leads to the directory; ``validate`` refuses what ``train`` refuses (with the same flags)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine_helpers import small_run, word_rows, word_tokenizer, write_jsonl
from prefopt.cli.commands import main
from prefopt.config import validate
from prefopt.errors import ConfigError
from prefopt.training.preflight import preflight
from prefopt.training.resume import prepare_output

MARKER = ".prefopt-run"  # prefopt.training.resume.MARKER, spelled out: the documented name

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return word_tokenizer(tmp_path_factory.mktemp("guards"))


@pytest.fixture(autouse=True)
def _fast(one_torch_thread, builtins_only, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFOPT_LOCK_DIR", str(tmp_path / "locks"))
    yield


def raw_config(tok: Path, tmp: Path, **overrides) -> dict:
    return small_run(tok, tmp, **overrides)


def write_config(tok: Path, tmp: Path, **overrides) -> Path:
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(raw_config(tok, tmp, **overrides)))
    return path


def tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_overwrite_refuses_a_home_directory_and_validate_says_the_same(tok, tmp_path, capsys):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret")
    (home / ".bashrc").write_text("alias ll='ls -l'\n")
    config = write_config(tok, tmp_path / "proj")
    before, siblings = tree(home), sorted(os.listdir(tmp_path))
    for command in ("train", "validate"):
        assert main([command, str(config), "--set", f"trainer.output_dir={home}", "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert f"trainer.output_dir: {home} was not created by prefopt (it has no {MARKER} file); --overwrite moves aside only" in err
    assert tree(home) == before and sorted(os.listdir(tmp_path)) == siblings  # nothing moved, nothing created


def test_overwrite_moves_an_empty_or_marked_directory_only(tok, tmp_path):
    cfg = validate(raw_config(tok, tmp_path))
    out = Path(cfg.trainer.output_dir)
    prepare_output(cfg, False, False)  # a fresh run: prefopt creates the directory and marks it
    assert [p.name for p in out.iterdir()] == [MARKER]
    (out / "metrics.jsonl").write_text("{}\n")
    prepare_output(cfg, False, True)
    (aside,) = tmp_path.glob("run.old-*")
    assert tree(aside) == sorted([MARKER, "metrics.jsonl"]) and tree(out) == [MARKER]


def test_a_run_that_failed_at_start_can_be_started_again_without_flags(tok, tmp_path, capsys):
    config = write_config(tok, tmp_path)
    train = tmp_path / "train.jsonl"
    good = train.read_text()
    train.write_text(good + '{"prompt": "a row with no completions"}\n')
    assert main(["train", str(config)]) == 2  # a data error after the output directory was prepared
    assert "field 'chosen'" in capsys.readouterr().err and tree(tmp_path / "run") == [MARKER]
    train.write_text(good)
    assert main(["validate", str(config)]) == 0 and main(["train", str(config)]) == 0  # the marker alone is no run
    assert not list(tmp_path.glob("run.old-*")) and (tmp_path / "run" / "summary.json").is_file()


def _hold(path: Path) -> subprocess.Popen:
    holder = ("import sys, time; from prefopt.training.lock import DirectoryLock; DirectoryLock(sys.argv[1]).acquire(); "
              "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_holds_through_a_symlink_and_a_deleted_lock_file(tok, tmp_path):
    from prefopt.training.trainer import train

    real = tmp_path / "D"
    real.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "S").symlink_to(real)
    proc = _hold(real)  # another process trains into D
    try:
        for lock in [*tmp_path.rglob("*.lock"), *tmp_path.rglob("*.holder")]:  # deleted by hand
            lock.unlink()
        cfg = validate(raw_config(tok, tmp_path, **{"trainer.output_dir": str(tmp_path / "runs" / "S")}))
        for kw in ({}, {"resume": True}):
            with pytest.raises(ConfigError, match=r"trainer.output_dir: .*runs/S is in use by "):
                train(cfg, **kw)
        assert os.listdir(real) == []  # nothing written into the directory in use
    finally:
        proc.kill()
        proc.wait()


def test_the_holder_note_never_follows_a_link_or_blocks_on_a_fifo(tmp_path):
    from prefopt.training.lock import DirectoryLock, holder_file

    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious")
    note = holder_file(os.stat(out))
    note.parent.mkdir(parents=True)
    note.with_suffix(f".{os.getpid()}.tmp").symlink_to(victim)  # planted in a shared lock folder
    with DirectoryLock(out):
        assert note.read_text().startswith(f"process {os.getpid()} on ")
    assert victim.read_text() == "precious"
    proc = _hold(out)
    try:
        note.unlink()
        os.mkfifo(note)  # reading it for the refusal's message would block for ever
        with pytest.raises(ConfigError, match=r"is in use by another process"):
            DirectoryLock(out).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_overwrite_protects_inputs_reached_through_symlinks(tok, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    data = write_jsonl(tmp_path / "elsewhere" / "train.jsonl", word_rows(0, 16))
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / "train.jsonl").symlink_to(data)  # the run reads its data through a link inside the output directory
    cfg = validate(raw_config(tok, tmp_path, **{"data.train": str(out / "train.jsonl")}))
    with pytest.raises(ConfigError, match=r"contains data.train .*--overwrite will not move it"):
        prepare_output(cfg, False, True)
    assert (out / "train.jsonl").is_symlink() and not list(tmp_path.glob("run.old-*"))


def test_overwrite_protects_the_chat_template_file(tok, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    config = write_config(tok, tmp_path, **{"data.chat_template": str(out / "t.jinja")})
    for command in ("validate", "train"):  # train read the template after moving it aside, and failed
        assert main([command, str(config), "--overwrite"]) == 2
        assert f"contains data.chat_template ({out / 't.jinja'}); --overwrite will not move it" in capsys.readouterr().err
    assert (out / "t.jinja").is_file() and not list(tmp_path.glob("run.old-*"))


def test_a_name_longer_than_the_filesystem_allows_is_a_clear_error(tok, tmp_path, capsys):
    config = write_config(tok, tmp_path)
    long = tmp_path / ("x" * 300)
    for command in ("validate", "train"):
        assert main([command, str(config), "--set", f"trainer.output_dir={long}"]) == 2
        assert "trainer.output_dir: " in (err := capsys.readouterr().err) and "longer than the filesystem allows" in err
    deep = tmp_path.joinpath(*["d" * 200] * 25)  # no name too long, the whole path over 4096 bytes
    for command in ("validate", "train"):
        assert main([command, str(config), "--set", f"trainer.output_dir={deep}"]) == 2
        assert "is longer than the system allows (PATH_MAX" in capsys.readouterr().err


@pytest.fixture
def mounts(tmp_path):
    """P: a small tmpfs, made read-only, holding P/out: a writable tmpfs mounted on it (a container's /output)."""
    top, out = tmp_path / "P", tmp_path / "P" / "out"
    top.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(top)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("this machine does not allow mounting a tmpfs")
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(out)], check=True)
    subprocess.run(["mount", "-o", "remount,ro", str(top)], check=True)
    yield top, out
    subprocess.run(["umount", "-l", str(out)], check=False)
    subprocess.run(["umount", "-l", str(top)], check=False)


def test_mount_point_and_read_only_parent_get_clear_errors_in_validate_and_train(tok, tmp_path, mounts, capsys):
    from prefopt.training.lock import DirectoryLock

    top, out = mounts
    cfg = validate(raw_config(tok, tmp_path, **{"trainer.output_dir": str(out)}))
    preflight(cfg, hub=False)  # an empty mount point under a read-only parent is a fine output directory
    with DirectoryLock(out):  # and its lock needs nothing written beside it
        pass
    (out / MARKER).write_text("{}")
    (out / "metrics.jsonl").write_text("{}\n")
    config = write_config(tok, tmp_path, **{"trainer.output_dir": str(out)})
    for command in ("validate", "train"):
        assert main([command, str(config), "--overwrite"]) == 2
        assert f"trainer.output_dir: {out} is a mount point; --overwrite cannot move it aside" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [MARKER, "metrics.jsonl"]
    with pytest.raises(ConfigError, match=r"trainer.output_dir: .*/P/new .*Read-only file system"):
        preflight(validate(raw_config(tok, tmp_path, **{"trainer.output_dir": str(top / "new")})), hub=False)
    config = write_config(tok, tmp_path, **{"trainer.output_dir": str(top)})  # a read-only directory: no lock, no run
    for command in ("validate", "train"):
        assert main([command, str(config), "--resume"]) == 2
        assert f"trainer.output_dir: {top} is not writable ({top}: Read-only file system)" in capsys.readouterr().err


# ---------------------------------------------------------------- E: validate refuses what train refuses


@pytest.mark.parametrize("overrides, flags, message", [
    ({"trainer.grad_accum": 8}, [], r"trainer.grad_accum: 8 micro-batches per step, but one epoch holds only 4 \(16 rows"),
    ({"trainer.pad_to_multiple_of": 10**9}, [], r"trainer.pad_to_multiple_of: 1000000000 is longer than any packed row"),
    ({}, ["--resume", "--overwrite"], r"--resume and --overwrite together"),
    ({"data.chat_template": "missing.jinja"}, [], r"data.chat_template: '.*missing.jinja' is neither a Jinja template"),
])
def test_validate_refuses_what_train_refuses(tok, tmp_path, capsys, overrides, flags, message):
    import re

    config = write_config(tok, tmp_path, **overrides)
    for command in ("validate", "train"):
        assert main([command, str(config), *flags]) == 2
        assert re.search(message, capsys.readouterr().err), command
    assert not (tmp_path / "run").exists()


def test_validate_refuses_a_non_empty_output_dir_as_train_does(tok, tmp_path, capsys):
    config = write_config(tok, tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(["validate", str(config)]) == 2
    assert "is not empty; pass --resume to continue that run or --overwrite to replace it" in capsys.readouterr().err
    assert main(["validate", str(config), "--resume"]) == 2  # as train --resume: there is nothing to resume
    assert "--resume: no complete checkpoint in " in capsys.readouterr().err


def test_grad_accum_beyond_the_pairs_of_an_epoch_is_a_config_error_in_train(tok, tmp_path):
    from prefopt.training.trainer import train

    # 16 rows pass the cheap row count of validate (4 micro-batches); the 25% hold-out leaves 12 pairs: 3
    cfg = validate(raw_config(tok, tmp_path, **{"trainer.grad_accum": 4, "data.eval_fraction": 0.25}))
    with pytest.raises(ConfigError, match=r"trainer.grad_accum: 4 micro-batches per step, but one epoch holds only 3 \(12 usable pairs"):
        train(cfg)


@pytest.mark.slow
def test_two_training_processes_racing_on_a_symlinked_output_dir(tok, tmp_path):
    import json

    real = tmp_path / "D"
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "S").symlink_to(real, target_is_directory=True)  # D does not exist yet: both may create it
    config = write_config(tok, tmp_path, **{"trainer.max_steps": 6, "trainer.save_every": 1})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PREFOPT_LOAD_PLUGINS": ""}
    procs = [subprocess.Popen([sys.executable, "-m", "prefopt", "train", str(config), "--set", f"trainer.output_dir={out}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for out in (real, tmp_path / "runs" / "S")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    (loser,) = [err for rc, err in results if rc == 2]
    assert "is in use by process" in loser or "is not empty" in loser  # refused: by the lock, or after the winner finished
    rows = [json.loads(line) for line in (real / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # one run's rows, none interleaved
