"""Checkpoints are never lost to a kill or a full disk, and ``--resume`` refuses, before loading anything, what breaks the run.

Kills are real: ``PREFOPT_CRASH_AT=NAME`` makes a ``python -m prefopt`` process SIGKILL itself at a named point
between the checkpoint's rename steps. Full disks are real: a small tmpfs (skipped where mounting is not allowed).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from engine_helpers import small_run, word_tokenizer
from prefopt.config import validate
from prefopt.errors import ConfigError, PrefoptError
from prefopt.training import checkpoint as ckpt
from prefopt.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return word_tokenizer(tmp_path_factory.mktemp("guards"))


@pytest.fixture(autouse=True)
def _fast(one_torch_thread, builtins_only, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFOPT_LOCK_DIR", str(tmp_path / "locks"))
    yield


def raw_config(tok: Path, tmp: Path, **overrides) -> dict:
    return small_run(tok, tmp, **{"trainer.max_steps": 3, "trainer.save_every": 1, "trainer.keep_checkpoints": 5, **overrides})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- B: a complete checkpoint is never lost


@pytest.mark.slow
def test_kill_between_the_checkpoint_renames_loses_nothing(tok, tmp_path):
    raw = raw_config(tok, tmp_path)
    train(validate(raw))
    out = Path(raw["trainer"]["output_dir"])
    root, expected = out / "checkpoints", weights(out / "model.safetensors")
    for f in ("model.safetensors", "summary.json"):
        (out / f).unlink()
    data = bytearray((root / "step-0000003" / "model.safetensors").read_bytes())
    data[-20] ^= 0xFF  # step 3 damaged: --resume falls back to step 2, redoes step 3 and must replace it
    (root / "step-0000003" / "model.safetensors").write_bytes(bytes(data))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PREFOPT_CRASH_AT": "checkpoint:old-set-aside",
           "PREFOPT_LOAD_PLUGINS": ""}
    proc = subprocess.run([sys.executable, "-m", "prefopt", "train", str(config), "--resume"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (root / "step-0000003").exists()  # killed between setting the old copy aside and renaming the new one in
    assert ckpt.is_complete(root / ".step-0000003.tmp")
    summary = train(validate(raw), resume=True)  # the complete temporary is promoted, never deleted
    assert summary["steps"] == 3 and same(weights(out / "model.safetensors"), expected)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001", "step-0000002", "step-0000003"]


def test_a_complete_temporary_is_promoted_when_it_is_the_only_checkpoint(tok, tmp_path):
    raw = raw_config(tok, tmp_path, **{"trainer.max_steps": 2, "trainer.keep_checkpoints": 1})
    train(validate(raw))
    out = Path(raw["trainer"]["output_dir"])
    root, expected = out / "checkpoints", weights(out / "model.safetensors")
    for f in ("model.safetensors", "summary.json"):
        (out / f).unlink()
    os.replace(root / "step-0000002", root / ".step-0000002.tmp")  # what a kill after the old copy went left
    (root / ".step-0000009.tmp").mkdir()  # and an incomplete one
    (root / ".step-0000009.tmp" / "model.safetensors").write_bytes(b"partial")
    assert train(validate(raw), resume=True)["steps"] == 2
    assert same(weights(out / "model.safetensors"), expected)
    assert [p.name for p in root.iterdir()] == ["step-0000002"]


def test_every_file_a_checkpoint_names_must_be_a_regular_file_inside_it(tok, tmp_path):
    raw = raw_config(tok, tmp_path, **{"trainer.max_steps": 1})
    train(validate(raw))
    path = Path(raw["trainer"]["output_dir"]) / "checkpoints" / "step-0000001"
    outside = tmp_path / "outside.safetensors"
    shutil.copy(path / "model.safetensors", outside)
    (path / "model.safetensors").unlink()
    (path / "model.safetensors").symlink_to(outside)  # same bytes, same checksum, but not the checkpoint's own file
    with pytest.raises(ckpt.CheckpointError, match=r"'model.safetensors' is not a regular file inside the checkpoint"):
        ckpt.verify(path)
    (path / "model.safetensors").unlink()
    shutil.copy(outside, path / "model.safetensors")
    sums = json.loads((path / "checksums.json").read_text())
    (path / "checksums.json").write_text(json.dumps({**sums, "../../outside.safetensors": sums["model.safetensors"]}))
    with pytest.raises(ckpt.CheckpointError, match=r"'../../outside.safetensors' is not a regular file inside"):
        ckpt.verify(path)


def test_checksums_json_and_the_checkpoint_itself_must_be_real_not_links(tok, tmp_path):
    raw = raw_config(tok, tmp_path, **{"trainer.max_steps": 2})
    train(validate(raw))
    root = Path(raw["trainer"]["output_dir"]) / "checkpoints"
    path = root / "step-0000002"
    sums = path / "checksums.json"
    os.replace(sums, tmp_path / "sums.json")
    sums.symlink_to(tmp_path / "sums.json")  # the right checksums, read through a link
    with pytest.raises(ckpt.CheckpointError, match=r"checksums.json is not a regular file of at most 1 MiB inside"):
        ckpt.verify(path)
    sums.unlink()
    os.mkfifo(sums)  # reading it would block --resume (and validate --resume) for ever
    with pytest.raises(ckpt.CheckpointError, match=r"checksums.json is not a regular file"):
        ckpt.verify(path)
    sums.unlink()
    os.replace(tmp_path / "sums.json", sums)
    ckpt.verify(path)
    os.replace(path, tmp_path / "elsewhere")
    path.symlink_to(tmp_path / "elsewhere")  # a complete checkpoint, but outside the run
    assert ckpt.latest_valid(root) == root / "step-0000001"
    with pytest.raises(ckpt.CheckpointError, match=r"is a symbolic link, not a directory prefopt wrote"):
        ckpt.verify(path)


def test_a_synced_reference_is_read_only_when_its_checksum_is_listed(tok, tmp_path):
    sync = {"reference.sync": {"every": 1, "mix": 0.5}, "trainer.max_steps": 2}
    raw = raw_config(tok, tmp_path, **sync)
    train(validate(raw))
    out = Path(raw["trainer"]["output_dir"])
    path = out / "checkpoints" / "step-0000002"
    (out / "summary.json").unlink()
    sums = json.loads((path / "checksums.json").read_text())
    del sums["reference.safetensors"]  # an unlisted file is never verified: here a link to weights outside the run
    (path / "checksums.json").write_text(json.dumps(sums))
    os.replace(path / "reference.safetensors", tmp_path / "outside.safetensors")
    (path / "reference.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(ckpt.CheckpointError, match=r"reference.safetensors is not listed in its checksums.json"):
        train(validate(raw), resume=True)


def test_stale_cache_temporaries_are_removed_and_a_live_writers_kept(tmp_path):
    import fcntl

    code = ("import sys, torch; from pathlib import Path; from prefopt.engine.reference import save_cache; "
            "save_cache(Path(sys.argv[1]) / 'k.safetensors', 'k', torch.zeros(4, 2))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFOPT_CRASH_AT": "atomic_write:written"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    (stale,) = tmp_path.glob(".k.safetensors.*.tmp")  # the writer was killed with its temporary complete on disk
    live = tmp_path / ".k.safetensors.live.tmp"
    live.write_bytes(b"being written")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer still at work
    try:
        from prefopt.engine.reference import load_cache, save_cache

        save_cache(tmp_path / "k.safetensors", "k", torch.ones(4, 2))
        assert not stale.exists() and live.exists()
        assert torch.equal(load_cache(tmp_path / "k.safetensors", "k", 4).sums, torch.ones(4, 2))
    finally:
        os.close(fd)


# ---------------------------------------------------------------- C: a real full disk


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of ``size`` bytes at a fresh folder; unmounted at the end."""
    mounted = []

    def mount(size: int) -> Path:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            pytest.skip("this machine does not allow mounting a tmpfs")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_full_disk_while_writing_checkpoint_model_or_cache_says_so_and_leaves_no_partial(tok, tmp_path, small_disk):
    from prefopt.engine.attention import standard
    from prefopt.engine.reference import save_cache
    from prefopt.training.run import setup

    cfg = validate(raw_config(tok, tmp_path, **{"trainer.max_steps": 1}))
    run = setup(cfg)
    policy = run.model.policy
    optimizer = torch.optim.AdamW(policy.parameters())
    with standard(policy):
        policy(torch.tensor([[3, 4]])).logits.sum().backward()
    optimizer.step()  # AdamW moments exist: optimizer.pt is twice the weights
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    size = sum(p.numel() * 4 for p in policy.parameters())
    for where, disk in (("model.safetensors", small_disk(size // 2)), ("optimizer.pt", small_disk(size + 64 * 1024))):
        with pytest.raises(ckpt.CheckpointError, match=r"checkpoint step 1: no space left on the device holding .*needs about [\d.]+ MiB"):
            ckpt.save_checkpoint(disk / "checkpoints", 1, policy, optimizer, scheduler, {"step": 1}, 2)
        assert list((disk / "checkpoints").iterdir()) == [], where  # the partial checkpoint is gone
    disk = small_disk(size // 2)
    with pytest.raises(PrefoptError, match=r"final model: no space left on the device holding .*it needs about [\d.]+ MiB"):
        ckpt.save_final_model(disk, policy, run.tokenizer, None, {"steps": 1})
    assert os.listdir(disk) == []
    disk = small_disk(64 * 1024)
    with pytest.raises(PrefoptError, match=r"reference cache: no space left on the device holding .*it needs about [\d.]+ MiB"):
        save_cache(disk / "k.safetensors", "k", torch.zeros(100_000, 2))
    assert os.listdir(disk) == []


def test_resuming_a_finished_but_unsaved_run_needs_no_second_checkpoint(tok, tmp_path, small_disk):
    raw = raw_config(tok, tmp_path, **{"trainer.max_steps": 2, "trainer.save_every": None})
    train(validate(raw))  # on the ordinary disk, to measure what the run writes
    out = Path(raw["trainer"]["output_dir"])
    used = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    one_checkpoint = sum(p.stat().st_size for p in (out / "checkpoints").rglob("*") if p.is_file())
    model = (out / "model.safetensors").stat().st_size
    assert model < one_checkpoint // 2
    disk = small_disk(used + one_checkpoint // 2 + 64 * 1024)  # room for the run, not for a second checkpoint
    raw["trainer"]["output_dir"] = str(disk / "run")
    train(validate(raw))
    for f in ("model.safetensors", "summary.json"):
        (disk / "run" / f).unlink()  # killed while saving the final model
    assert train(validate(raw), resume=True)["steps"] == 2
    assert (disk / "run" / "summary.json").exists()


# ---------------------------------------------------------------- D: resume refuses before loading anything


@pytest.fixture
def saved_model(tmp_path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from prefopt.testing.tiny import model_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**model_config("llama", 300, 32, 1, 2, max_position=64))).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_resume_refuses_changed_versions_weights_and_process_count_before_loading(tok, tmp_path, saved_model, monkeypatch, capsys):
    from prefopt.training import distributed, resume, trainer

    raw = raw_config(tok, tmp_path, **{"trainer.max_steps": 2, "model.config": None, "model.name_or_path": str(saved_model)})
    train(validate(raw))
    (Path(raw["trainer"]["output_dir"]) / "summary.json").unlink()  # not finished: resumable
    monkeypatch.setattr(trainer, "Trainer", lambda *a: pytest.fail("loaded data or models before refusing"))
    real_versions = resume.versions
    monkeypatch.setattr(resume, "versions", lambda c: {**real_versions(c), "loss dpo (prefopt)": "9.9"})
    with pytest.raises(ConfigError, match=r"--resume: .* was written with other versions \(loss dpo \(prefopt\) \S+ -> 9.9\)"):
        train(validate(raw), resume=True)
    from prefopt.cli.commands import main

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "run.yaml"), "--resume"]) == 2  # validate --resume refuses the same
    assert "was written with other versions (loss dpo (prefopt)" in capsys.readouterr().err
    monkeypatch.setattr(resume, "versions", real_versions)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match=r"--resume: the run was trained with number of processes 1, this launch has 2"):
        train(validate(raw), resume=True)
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    with torch.no_grad():
        from transformers import AutoModelForCausalLM

        other = AutoModelForCausalLM.from_pretrained(saved_model)
        next(other.parameters()).add_(1.0)
        other.save_pretrained(saved_model)  # other weights at the same path
    with pytest.raises(ConfigError, match=r"--resume: the weights at model.name_or_path changed since .*step-0000002 was written"):
        train(validate(raw), resume=True)


def test_resume_from_another_working_directory(tok, tmp_path, monkeypatch):
    from prefopt.cli.commands import main

    proj = tmp_path / "proj"
    raw = raw_config(tok, proj, **{"trainer.max_steps": 1, "data.train": "train.jsonl", "trainer.output_dir": "run"})
    (proj / "run.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(proj)
    assert main(["train", "run.yaml"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["train", "proj/run.yaml", "--resume", "--set", "trainer.max_steps=2"]) == 0
    rows = [json.loads(line) for line in (proj / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


def test_a_moved_project_resumes_when_its_files_are_the_same(tok, tmp_path, saved_model, caplog, capsys):
    """Every path in the config changes with the project's place; the data's token ids and the weight files' fingerprints
    decide. The model is a local directory inside the project."""
    from prefopt.cli.commands import main

    proj = tmp_path / "proj"
    raw = raw_config(tok, proj, **{"trainer.max_steps": 1, "data.train": "train.jsonl", "trainer.output_dir": "run",
                                   "model.config": None, "model.name_or_path": "model", "model.tokenizer": "tok"})
    shutil.copytree(saved_model, proj / "model")
    shutil.copytree(tok, proj / "tok")
    (proj / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(proj / "run.yaml")]) == 0
    moved = tmp_path / "moved"
    proj.rename(moved)
    resume = ["train", str(moved / "run.yaml"), "--resume", "--set", "trainer.max_steps=2"]
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        assert main(resume) == 0
    assert "data.train, model.name_or_path, model.tokenizer moved since the checkpoint" in caplog.text
    rows = [json.loads(line) for line in (moved / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]

    other = tmp_path / "other"  # a copy with other files at the same places is refused
    shutil.copytree(moved, other)
    lines = (moved / "train.jsonl").read_text().splitlines()
    (other / "train.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same rows, another order
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(moved / "model")
        next(model.parameters()).add_(1.0)
        model.save_pretrained(other / "model")
    resume = ["train", str(other / "run.yaml"), "--resume", "--set", "trainer.max_steps=3"]
    capsys.readouterr()
    assert main(resume) == 2
    assert "the weights at model.name_or_path changed" in capsys.readouterr().err
    shutil.rmtree(other / "model")
    shutil.copytree(moved / "model", other / "model")
    assert main(resume) == 2
    assert "the training data changed since the checkpoint" in capsys.readouterr().err


def test_resuming_a_finished_run_says_so_and_changes_nothing(tok, tmp_path, caplog):
    raw = raw_config(tok, tmp_path, **{"trainer.max_steps": 2})
    first = train(validate(raw))
    out = Path(raw["trainer"]["output_dir"])
    before = snapshot(out)
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        again = train(validate(raw), resume=True)
    assert "already finished at step 2" in caplog.text and again["already_finished"]
    assert again["seconds"] == first["seconds"] and snapshot(out) == before


def test_dropout_is_forced_to_zero_with_a_logged_note(tok, tmp_path, caplog):
    from prefopt.engine.attention import standard
    from prefopt.training.run import setup

    raw = raw_config(tok, tmp_path, **{"model.config.attention_dropout": 0.3, "model.lora": {"r": 2, "lora_dropout": 0.2,
                                                                                               "target_modules": ["q_proj"]}})
    with caplog.at_level(logging.INFO, logger="prefopt"):
        run = setup(validate(raw))
    assert "dropout: set to 0 (Dropout(p=0.2), attention_dropout=0.3)" in caplog.text
    policy = run.model.policy.train()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with standard(policy):
        assert torch.equal(policy(ids).logits, policy(ids).logits)  # train mode, yet deterministic
