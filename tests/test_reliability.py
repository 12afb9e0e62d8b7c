"""Reliability of training runs: non-finite steps, checkpoints, the reference cache, resume, safety, plugins."""
from __future__ import annotations

import importlib
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_helpers import set_dotted, word_rows, write_jsonl, write_plugin_dist
from prefopt.atomic import atomic_write
from prefopt.config import validate
from prefopt.engine import reference as ref
from prefopt.errors import ConfigError
from prefopt.losses.base import LossOutput
from prefopt.losses.dpo import DPO
from prefopt.plugins import manager as plugins
from prefopt.training import checkpoint as ckpt
from prefopt.training.resume import prepare_output as _prepare_output
from prefopt.training.trainer import TrainingError, setup, train

ROOT = Path(__file__).resolve().parents[1]
def _rows(seed: int, n: int = 24) -> list[dict]:
    return word_rows(seed, n)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from prefopt.testing.tiny import build_tokenizer

    d = tmp_path_factory.mktemp("rel")
    rows = _rows(0)
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "other.jsonl", _rows(1))
    texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    build_tokenizer(texts, 300).save_pretrained(d / "tok")
    build_tokenizer(texts, 290).save_pretrained(d / "tok2")
    return d


def make_config(project: Path, out: Path, **overrides):
    """A tiny fp32 CPU run; ``overrides`` are dotted paths, e.g. ``{"trainer.lr": 1e-3}``."""
    from prefopt.testing.tiny import model_config

    raw = {
        "model": {"config": model_config("llama", 300, 32, 1, 2, max_position=128), "tokenizer": str(project / "tok")},
        "data": {"train": str(project / "train.jsonl"), "max_length": 64},
        "loss": {"name": "dpo", "beta": 0.1},
        "reference": {"cache_dir": str(out / "cache")},
        "trainer": {"output_dir": str(out / "run"), "batch_size": 4, "max_steps": 4, "lr": 1e-3, "schedule": "constant"},
    }
    return validate(set_dotted(raw, overrides))


def _metrics(config) -> list[dict]:
    return [json.loads(l) for l in (Path(config.trainer.output_dir) / "metrics.jsonl").read_text().splitlines()]


def _nan_on(monkeypatch, calls: set[int] | None) -> list[int]:
    """Make DPO return a NaN loss on the given call numbers (1-based; ``None``: every call)."""
    seen: list[int] = []
    original = DPO.forward

    def forward(self, inputs):
        if type(inputs).__name__ == "TrackedInputs":  # the check on synthetic inputs before training
            return original(self, inputs)
        seen.append(len(seen) + 1)
        out = original(self, inputs)
        if calls is None or seen[-1] in calls:
            return LossOutput(out.loss * float("nan"), out.losses, out.metrics)
        return out

    monkeypatch.setattr(DPO, "forward", forward)
    return seen


# ---------------------------------------------------------------- numerics


def test_nonfinite_step_is_skipped_counted_and_leaves_optimiser_untouched(project, tmp_path, monkeypatch):
    config = make_config(project, tmp_path, **{"trainer.save_every": 1, "trainer.keep_checkpoints": 10})
    _nan_on(monkeypatch, {3})
    summary = train(config)
    assert summary["steps"] == 4 and summary["bad_steps"] == 1
    root = Path(config.trainer.output_dir) / "checkpoints"
    w2, w3, w4 = (load_file(str(root / f"step-000000{s}" / "model.safetensors")) for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # step 3 changed no weight
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)  # step 4 trained again
    o2, o3 = (torch.load(root / f"step-000000{s}" / "optimizer.pt", weights_only=True) for s in (2, 3))
    assert o2["scheduler"] == o3["scheduler"]
    for pid, st in o2["optimizer"]["state"].items():
        for name, value in st.items():
            assert torch.equal(value, o3["optimizer"]["state"][pid][name]), (pid, name)
    rows = {r["step"]: r for r in _metrics(config)}
    assert [rows[s]["bad_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert rows[3]["loss"] is None  # a NaN is written as null: metrics.jsonl stays strict JSON
    assert json.loads((root / "step-0000004" / "state.json").read_text())["bad_steps"] == 1


def test_too_many_nonfinite_steps_stop_the_run_with_a_clear_error(project, tmp_path, monkeypatch):
    config = make_config(project, tmp_path, **{"trainer.max_bad_steps": 2, "trainer.max_steps": 10})
    seen = _nan_on(monkeypatch, None)
    with pytest.raises(TrainingError, match=r"3 steps had a non-finite loss or gradient \(trainer.max_bad_steps = 2\)"):
        train(config)
    assert len(seen) == 3
    assert [r["bad_steps"] for r in _metrics(config)] == [1, 2, 3]
    assert [p.name for p in ckpt.list_checkpoints(Path(config.trainer.output_dir) / "checkpoints")] == ["step-0000003"]


# ---------------------------------------------------------------- checkpoints


def _flip(path: Path, at: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checkpoints_pruned_corruption_refused_and_resume_falls_back(project, tmp_path, caplog):
    config = make_config(project, tmp_path, **{"trainer.save_every": 1, "trainer.keep_checkpoints": 2, "trainer.max_steps": 3})
    train(config)
    root = Path(config.trainer.output_dir) / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-0000002", "step-0000003"]  # keep last 2
    assert not list(root.glob(".*"))  # no temporary directories left

    _flip(root / "step-0000003" / "model.safetensors")
    with pytest.raises(ckpt.CheckpointError, match=r"step-0000003: model.safetensors is truncated or corrupted"):
        ckpt.verify(root / "step-0000003")
    with caplog.at_level(logging.INFO, logger="prefopt"):
        assert ckpt.latest_valid(root) == root / "step-0000002"
    assert "step-0000003: model.safetensors is truncated or corrupted (checksum mismatch); refusing it" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.load_checkpoint(root / "step-0000003", None, None, None)

    # a half-written checkpoint (killed while saving) is never listed; one without checksums is refused
    (root / ".step-0000004.tmp").mkdir()
    (root / "step-0000001").mkdir()
    (root / "step-0000001" / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest_valid(root) == root / "step-0000002"

    caplog.clear()
    resumed = make_config(project, tmp_path, **{"trainer.save_every": 1, "trainer.keep_checkpoints": 2, "trainer.max_steps": 4})
    with caplog.at_level(logging.INFO, logger="prefopt"):
        summary = train(resumed, resume=True)
    assert summary["steps"] == 4
    assert f"resuming from {root / 'step-0000002'} (step 2)" in caplog.text
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-0000003", "step-0000004"]
    assert not list(root.glob(".*"))  # the stale temporary directory was cleaned
    ckpt.verify(root / "step-0000003")  # rewritten by the resumed run

    for p in ckpt.list_checkpoints(root):
        (p / "state.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match=r"--resume: no complete checkpoint in"):
        train(resumed, resume=True)


def test_resume_refuses_breaking_config_changes_and_allows_others(project, tmp_path):
    config = make_config(project, tmp_path, **{"trainer.save_every": 1, "trainer.max_steps": 2})
    train(config)
    changed = make_config(project, tmp_path, **{"trainer.max_steps": 2, "loss.beta": 0.2, "trainer.lr": 1e-4, "data.max_length": 32})
    with pytest.raises(ConfigError) as err:
        train(changed, resume=True)
    assert str(err.value) == "--resume: the config changed in ways that break the run: data.max_length, loss, trainer.lr"
    allowed = make_config(project, tmp_path, **{"trainer.save_every": 3, "trainer.max_steps": 3, "trainer.log_every": 2})
    assert train(allowed, resume=True)["steps"] == 3


def test_output_dir_is_never_overwritten_without_a_flag(project, tmp_path, monkeypatch):
    config = make_config(project, tmp_path)
    out = Path(config.trainer.output_dir)
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match=r"is not empty; pass --resume to continue that run or --overwrite to replace it"):
        _prepare_output(config, resume=False, overwrite=False)
    assert (out / "keep.txt").read_text() == "precious"
    _prepare_output(config, resume=True, overwrite=False)
    assert (out / "keep.txt").exists()
    with pytest.raises(ConfigError, match=r"was not created by prefopt \(it has no \.prefopt-run file\)"):
        _prepare_output(config, resume=False, overwrite=True)  # keep.txt is not prefopt's to move
    (out / ".prefopt-run").write_text("{}")
    _prepare_output(config, resume=False, overwrite=True)
    assert [p.name for p in out.iterdir()] == [".prefopt-run"]
    monkeypatch.chdir(out)  # --overwrite never deletes the working directory (or one containing it)
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="contains the working directory"):
        _prepare_output(config, resume=False, overwrite=True)
    assert (out / "keep.txt").exists()


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def failing(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


# ---------------------------------------------------------------- reference cache


def test_reference_cache_corruption_and_staleness_are_detected(tmp_path, caplog):
    values = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    path = tmp_path / "k1.safetensors"
    ref.save_cache(path, "k1", values)
    assert torch.equal(ref.load_cache(path, "k1", 6).sums, values)

    cases = {
        "truncated": (lambda: path.write_bytes(path.read_bytes()[:-7]), "k1", 6, r"is unreadable \(.+\)"),
        "corrupted": (lambda: _flip(path, -3), "k1", 6, r"fails its checksum \(corrupted\)"),
        "other key": (lambda: None, "k2", 6, r"is stale \(fingerprint or size differs\)"),
        "other size": (lambda: None, "k1", 7, r"is stale \(fingerprint or size differs\)"),
    }
    for name, (damage, key, n, message) in cases.items():
        ref.save_cache(path, "k1", values)
        damage()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="prefopt"):
            assert ref.load_cache(path, key, n) is None, name
        assert re.search(re.escape(f"reference cache {path} ") + message + "; recomputing it", caplog.text), name


def test_cache_key_changes_with_weights_tokenizer_data_and_settings():
    base = ref.cache_parts("w", "t", "d", {"precision": "fp32", "max_length": 64, "max_prompt_length": None})
    key = ref.cache_key(**base)
    for field, value in (("weights", "w2"), ("tokenizer", "t2"), ("data", "d2"), ("settings", {**base["settings"], "max_length": 32})):
        assert ref.cache_key(**{**base, field: value}) != key, field
    assert ref.cache_key(**dict(base)) == key


def test_changed_inputs_recompute_the_cache_and_the_log_says_why(project, tmp_path, caplog):
    def run(**overrides) -> tuple[Path, str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="prefopt"):
            r = setup(make_config(project, tmp_path, **overrides))
        return r, caplog.text

    first, log = run()
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1 and "none at" in log and "computing it" in log
    again, log = run()
    assert "reference cache (train): reusing" in log
    assert torch.equal(first.caches["train"].sums, again.caches["train"].sums)

    expected = {
        "trainer.seed": "differs in: reference weights",  # another initialisation of the (reference) policy
        "model.tokenizer": "differs in: tokenizer, data (token ids)",
        "data.train": "differs in: data (token ids)",
        "data.max_length": "differs in: settings (max_length)",
    }
    values = {"trainer.seed": 1, "model.tokenizer": str(project / "tok2"), "data.train": str(project / "other.jsonl"), "data.max_length": 48}
    for field, why in expected.items():
        _, log = run(**{field: values[field]})
        assert "reference cache (train): wrote" in log, field
        assert re.search(r"the most similar cache here, \w+\.safetensors, " + re.escape(why) + "; computing a new one", log), (field, log)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 5

    # a corrupted cache file is recomputed, never used
    _flip(files[0], -3)
    fixed, log = run()
    assert "fails its checksum (corrupted); recomputing it" in log and "reference cache (train): wrote" in log
    assert torch.equal(fixed.caches["train"].sums, first.caches["train"].sums)
    assert ref.load_cache(files[0], files[0].stem, len(first.train_pairs)) is not None


# ---------------------------------------------------------------- safety


def test_trust_remote_code_is_off_by_default_and_passed_through(project, tmp_path, monkeypatch):
    from prefopt.engine import modeling

    seen = []

    class Stop(Exception):
        pass

    def fake(name, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise Stop

    monkeypatch.setattr(modeling.AutoTokenizer, "from_pretrained", fake)
    monkeypatch.setattr(modeling.AutoModelForCausalLM, "from_pretrained", fake)
    for trust in (None, True):
        raw = {"model": {"name_or_path": str(tmp_path)}, "data": {"train": "x.jsonl"}}
        if trust is not None:
            raw["model"]["trust_remote_code"] = trust
        cfg = validate(raw)
        assert cfg.model.trust_remote_code is bool(trust)
        for load in (modeling.load_tokenizer, modeling.load_model):
            with pytest.raises(Stop):
                load(cfg.model)
    assert seen == [False, False, True, True]


def test_code_base_loads_yaml_safely_and_torch_with_weights_only():
    unsafe = []
    for path in sorted((ROOT / "prefopt").rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"\byaml\.(load|load_all|unsafe_load|full_load)\(([^\n]*)", text):
            if m.group(1) in ("unsafe_load", "full_load") or "Loader=_Loader" not in m.group(2) and "SafeLoader" not in m.group(2):
                unsafe.append(f"{path.name}: {m.group(0)}")
        for m in re.finditer(r"\btorch\.load\(([^\n]*)", text):
            if "weights_only=True" not in m.group(1):
                unsafe.append(f"{path.name}: {m.group(0)}")
        if "pickle.load" in text or "trust_remote_code=True" in text:
            unsafe.append(f"{path.name}: pickle.load or trust_remote_code=True")
    assert unsafe == []
    import yaml

    from prefopt.config import _Loader, parse_yaml

    assert issubclass(_Loader, yaml.SafeLoader)
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_yaml("!!python/object/apply:os.system ['true']")


# ---------------------------------------------------------------- plugins


GOOD = '''
from prefopt.plugins.hookspecs import hookimpl
from prefopt.losses.dpo import DPO

class Good(DPO):
    name = "good_loss"

@hookimpl
def register_losses():
    return [Good]
'''
RAISES = "raise ImportError('boom: missing dependency frobnicate')\n"
BROKEN = '''
from prefopt.plugins.hookspecs import hookimpl

class NotALoss:
    name = "broken_loss"

@hookimpl
def register_losses():
    return [NotALoss]
'''


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    write_plugin_dist(site, "good-loss", {"rel_good_plugin": GOOD}, {"good_loss": "rel_good_plugin"})
    write_plugin_dist(site, "raises-loss", {"rel_raising_plugin": RAISES}, {"raises_loss": "rel_raising_plugin"})
    write_plugin_dist(site, "broken-loss", {"rel_broken_plugin": BROKEN}, {"broken_loss": "rel_broken_plugin"})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PREFOPT_LOAD_PLUGINS", "good_loss,raises_loss,broken_loss")
    importlib.invalidate_caches()
    plugins.reset()
    yield site
    plugins.reset()


def test_broken_plugins_are_flagged_not_fatal(fake_plugins, capsys):
    from prefopt.cli.commands import main
    from prefopt.plugins.registry import build_loss

    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^dpo  \(prefopt ", out, re.M) and re.search(r"^good_loss  \(good-loss 1.0;", out, re.M)
    assert "BROKEN raises_loss (raises-loss 1.0): plugin 'raises_loss' from distribution raises-loss 1.0 (rel_raising_plugin) failed to load: ImportError: boom: missing dependency frobnicate" in out
    assert "BROKEN broken_loss (broken-loss 1.0):" in out and "registered a broken loss" in out and "is not a prefopt.Loss subclass" in out

    assert main(["losses", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {"dpo", "good_loss"} <= {r["name"] for r in listing["losses"]}
    assert sorted(b["plugin"] for b in listing["broken"]) == ["broken_loss", "raises_loss"]

    with pytest.raises(ConfigError, match=r"loss.name: loss 'raises_loss' is unavailable: .*boom: missing dependency frobnicate"):
        build_loss({"name": "raises_loss"})
    with pytest.raises(ConfigError, match=r"loss.name: loss 'broken_loss' is unavailable: .*is not a prefopt.Loss subclass"):
        build_loss({"name": "broken_loss"})
    assert build_loss({"name": "good_loss", "beta": 0.3}).config.beta == 0.3
