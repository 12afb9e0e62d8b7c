"""Runs that would lose work or end silently wrong are refused with a clear message."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from engine_helpers import set_dotted, word_rows, write_jsonl, write_plugin_dist
from prefopt.config import validate
from prefopt.errors import ConfigError, PluginError
from prefopt.losses.base import LossOutput
from prefopt.losses.dpo import DPO
from prefopt.training.health import TrainingError, check_engine_logps
from prefopt.training.resume import MARKER


def _rows(seed: int, n: int = 16) -> list[dict]:
    return word_rows(seed, n, prompt=(3, 6), completion=(2, 4))


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    from prefopt.testing.tiny import build_tokenizer

    d = tmp_path_factory.mktemp("safe")
    texts = [r[k] for r in _rows(0) for k in ("prompt", "chosen", "rejected")]
    build_tokenizer(texts, 300).save_pretrained(d / "tok")
    return d / "tok"


def raw_config(tok: Path, tmp: Path, **overrides) -> dict:
    """A tiny fp32 CPU run as a raw mapping; ``overrides`` are dotted paths."""
    from prefopt.testing.tiny import model_config

    tmp.mkdir(parents=True, exist_ok=True)
    train = tmp / "train.jsonl"
    if not train.exists():
        write_jsonl(train, _rows(0))
    raw = {
        "model": {"config": model_config("llama", 300, 32, 1, 2, max_position=64), "tokenizer": str(tok)},
        "data": {"train": str(train), "max_length": 48},
        "loss": {"name": "dpo", "beta": 0.1},
        "reference": {"cache_dir": str(tmp / "cache")},
        "trainer": {"output_dir": str(tmp / "run"), "batch_size": 4, "max_steps": 3, "lr": 1e-3, "schedule": "constant"},
    }
    return set_dotted(raw, overrides)


def config(tok: Path, tmp: Path, **overrides):
    return validate(raw_config(tok, tmp, **overrides))


@pytest.fixture(autouse=True)
def _fast(one_torch_thread, builtins_only):
    yield


# ---------------------------------------------------------------- 5, 8: resume


def test_resume_refuses_changed_training_data(tok, tmp_path):
    from prefopt.training.trainer import train

    train(config(tok, tmp_path, **{"trainer.save_every": 1, "trainer.max_steps": 2}))
    rows = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in _rows(0)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ConfigError, match=r"--resume: the training data changed since the checkpoint \(data.train: .*train.jsonl\)"):
        train(config(tok, tmp_path, **{"trainer.save_every": 1, "trainer.max_steps": 3}), resume=True)
    write_jsonl(tmp_path / "train.jsonl", _rows(0))  # restored: resumes
    assert train(config(tok, tmp_path, **{"trainer.save_every": 1, "trainer.max_steps": 3}), resume=True)["steps"] == 3


def test_resume_refuses_a_changed_schedule_length(tok, tmp_path):
    from prefopt.training.trainer import train

    base = {"trainer.save_every": 1, "trainer.max_steps": 2, "trainer.schedule": "linear"}
    train(config(tok, tmp_path, **base))
    with pytest.raises(ConfigError, match=r"give 3 steps but the run was started with 2; its linear learning-rate schedule"):
        train(config(tok, tmp_path, **{**base, "trainer.max_steps": 3}), resume=True)


def test_a_changed_length_is_refused_before_loading_and_for_a_warmup_ratio(tok, tmp_path, monkeypatch):
    from prefopt.training import trainer
    from prefopt.training.trainer import train

    runs = {"cosine": {"trainer.schedule": "cosine"}, "ratio": {"trainer.warmup_ratio": 0.5},
            "steps": {"trainer.warmup_steps": 1}}  # the last: constant after one warm-up step, whatever the length
    for name, extra in runs.items():
        train(config(tok, tmp_path / name, **{"trainer.save_every": 1, "trainer.max_steps": 2, **extra}))
        (tmp_path / name / "run" / "summary.json").unlink()  # not finished
    with monkeypatch.context() as m:
        m.setattr(trainer, "Trainer", lambda *a: pytest.fail("loaded data or models before refusing"))
        for name, fixed in (("cosine", "its cosine learning-rate schedule is"), ("ratio", r"its warm-up \(trainer.warmup_ratio\) is")):
            with pytest.raises(ConfigError, match=rf"give 3 steps but the run was started with 2; {fixed} fixed by that length"):
                train(config(tok, tmp_path / name, **{"trainer.save_every": 1, "trainer.max_steps": 3, **runs[name]}), resume=True)
    resumed = train(config(tok, tmp_path / "steps", **{"trainer.save_every": 1, "trainer.max_steps": 3, **runs["steps"]}), resume=True)
    assert resumed["steps"] == 3


# ---------------------------------------------------------------- 6: broken final models


def test_run_that_skips_most_steps_fails_and_saves_no_model(tok, tmp_path):
    from prefopt.training.trainer import train

    cfg = config(tok, tmp_path, **{"trainer.lr": 1e30, "trainer.max_steps": 4})
    with pytest.raises(TrainingError, match=r"3 of 4 steps were skipped .*the final model was not saved"):
        train(cfg)
    out = Path(cfg.trainer.output_dir)
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    assert (out / "checkpoints" / "step-0000004").is_dir()  # the work is kept

    beta = config(tok, tmp_path / "b", **{"loss.beta": 1e30, "trainer.max_steps": 2})
    with pytest.raises(TrainingError, match=r"2 of 2 steps were skipped"):
        train(beta)


def test_a_model_with_finite_weights_but_a_nonfinite_loss_is_not_saved(tok, tmp_path):
    """Huge steps after a warm-up: only half the steps are skipped and every weight is finite, but the model is broken."""
    from prefopt.training.trainer import train

    eval_rows = tmp_path / "eval.jsonl"
    write_jsonl(eval_rows, _rows(1, 4))
    for name, extra in (("held-out", {"data.eval": str(eval_rows)}), ("last", {})):
        cfg = config(tok, tmp_path / name, **{"trainer.lr": 1e30, "trainer.warmup_steps": 1, "trainer.max_steps": 4,
                                              "trainer.schedule": "cosine", **extra})
        with pytest.raises(TrainingError, match=rf"the trained model gives a non-finite loss on the {name}.*final model was not saved"):
            train(cfg)
        out = Path(cfg.trainer.output_dir)
        assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
        assert (out / "checkpoints" / "step-0000004").is_dir()


def test_step_that_makes_weights_nonfinite_stops_the_run(tok, tmp_path):
    from prefopt.training.trainer import train

    cfg = config(tok, tmp_path)
    cfg.trainer.lr = float("inf")  # past validation, which refuses it (see test_validate_*)
    with pytest.raises(TrainingError, match=r"step 1 made the weights non-finite \(\d+ tensors, e.g. "):
        train(cfg)
    assert not (Path(cfg.trainer.output_dir) / "model.safetensors").exists()


def test_final_weights_are_checked_by_value():
    from prefopt.training.health import check_final_weights

    layer = torch.nn.Linear(2, 2)
    check_final_weights(layer)
    with torch.no_grad():
        layer.bias[1] = float("inf")
    with pytest.raises(TrainingError, match=r"the trained weights are not finite \(1 tensors, e.g. bias\)"):
        check_final_weights(layer)


def test_summary_counts_applied_and_skipped_steps(tok, tmp_path, monkeypatch):
    from prefopt.testing.losscheck import CASES
    from prefopt.training.trainer import format_summary, train

    original = DPO.forward
    calls = []

    def forward(self, inputs):
        calls.append(1)
        out = original(self, inputs)
        # the pre-training check calls the loss once per case first; then the second training step is NaN
        return LossOutput(out.loss * float("nan"), out.losses, out.metrics) if len(calls) == len(CASES) + 2 else out

    monkeypatch.setattr(DPO, "forward", forward)
    summary = train(config(tok, tmp_path))
    assert (summary["steps_applied"], summary["steps_skipped"]) == (2, 1)
    assert "trained 3 steps (2 applied, 1 skipped)" in format_summary(summary)


# ---------------------------------------------------------------- 7: engine log-probs


def test_engine_logprob_check_compares_by_value():
    same = torch.tensor([-1.0, -2.0, -0.5])
    assert check_engine_logps(lambda: same, lambda: same.clone()) == 0.0
    off = same + torch.tensor([0.0, 0.5, 0.0])
    with pytest.raises(ConfigError, match=r"differ from the model's own forward by up to 0.5 "):
        check_engine_logps(lambda: same, lambda: off)
    with pytest.raises(ConfigError, match=r"differ from the model's own forward by up to nan"):
        check_engine_logps(lambda: same, lambda: same * float("nan"))
    with pytest.raises(ConfigError, match=r"gives \(3,\) completion log-probs, the model's own forward \(2,\)"):
        check_engine_logps(lambda: same, lambda: same[:2])


def test_start_up_check_runs_on_the_two_shortest_pairs():
    """It runs on the host before training: the shortest pairs keep that cheap for a large model."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoModelForCausalLM

    from prefopt.data.batching import pack
    from prefopt.testing.tiny import model_config
    from prefopt.training.health import check_start
    from prefopt.training.run import use_packed_attention

    torch.manual_seed(0)
    params = model_config("llama", 50, 16, 1, 2, max_position=64)
    policy = AutoModelForCausalLM.from_config(AutoConfig.for_model(params.pop("model_type"), **params))
    use_packed_attention(policy)
    pair = lambda n: SimpleNamespace(prompt_ids=[3, 4], chosen_ids=list(range(5, 5 + n)), rejected_ids=[7] * n)  # noqa: E731
    pairs = [pair(n) for n in (9, 4, 12, 2, 6)]
    seen = []

    def make_batch(ps, idx):
        seen.append(list(idx))
        return pack([ps[i] for i in idx], list(idx), 0)

    assert check_start(policy, make_batch, pairs, 512) < 1e-4
    assert seen == [[1, 3]]


def test_model_with_scaled_logits_is_refused_at_start(tok, tmp_path):
    from prefopt.testing.tiny import model_config
    from prefopt.training.run import setup

    mc = {**model_config("llama", 300, 32, 1, 2, max_position=64), "model_type": "granite", "logits_scaling": 4.0}
    cfg = config(tok, tmp_path, **{"model.config": mc})
    with pytest.raises(ConfigError, match=r"model: the engine's per-token log-probs differ from the model's own forward by up to"):
        setup(cfg)
    assert not (tmp_path / "cache").exists()  # refused before the reference cache is computed
    mc["logits_scaling"] = 1.0
    setup(config(tok, tmp_path / "ok", **{"model.config": mc}))  # the same model without the scale passes


def test_lora_on_the_output_head_is_refused(tok, tmp_path):
    pytest.importorskip("peft")
    from prefopt.training.run import setup

    cfg = config(tok, tmp_path, **{"model.lora": {"r": 2, "target_modules": ["q_proj", "lm_head"]}, "reference.mode": "live"})
    with pytest.raises(ConfigError, match=r"model.lora: the output head is a .*Linear, not a plain Linear.*Remove the output head"):
        setup(cfg)


# ---------------------------------------------------------------- 11: malformed loss outputs


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda out: LossOutput(out.losses, out.losses, out.metrics), r"returned loss of shape \(4,\).*expected a scalar float tensor"),
        (lambda out: out.loss, r"returned Tensor, expected a prefopt.LossOutput"),
        (lambda out: None.loss, r"raised AttributeError: 'NoneType' object has no attribute 'loss'"),
        (lambda out: LossOutput(out.loss, out.losses, out.metrics, {"rewards/best": out.loss.detach()}),
         r"returned counts for 'rewards/best', which are not among its metrics"),
    ],
)
def test_malformed_loss_output_names_the_loss_and_package(tok, tmp_path, monkeypatch, bad, message):
    from prefopt.training.trainer import train

    original = DPO.forward

    def forward(self, inputs):  # right on the synthetic inputs of the check before training, wrong in training
        out = original(self, inputs)
        return out if type(inputs).__name__ == "TrackedInputs" else bad(out)

    monkeypatch.setattr(DPO, "forward", forward)
    with pytest.raises(PluginError, match=r"loss 'dpo' \(prefopt [^)]*\) " + message):
        train(config(tok, tmp_path, **{"trainer.max_steps": 1}))


# ---------------------------------------------------------------- 1, 2: the output directory


def _prep(cfg, **kw):
    from prefopt.training.resume import prepare_output

    return prepare_output(cfg, kw.get("resume", False), kw.get("overwrite", True), kw.get("protect", ()))


def test_overwrite_never_moves_a_directory_holding_config_data_cache_or_model(tok, tmp_path):
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    write_jsonl(proj / "data" / "train.jsonl", _rows(0))
    (proj / "run.yaml").write_text("x")
    (proj / "model").mkdir()
    base = raw_config(tok, tmp_path, **{"data.train": str(proj / "data" / "train.jsonl"), "trainer.output_dir": str(proj)})
    with pytest.raises(ConfigError, match=r"contains data.train .*--overwrite will not move it"):
        _prep(validate(base))
    other = raw_config(tok, tmp_path, **{"trainer.output_dir": str(proj)})
    with pytest.raises(ConfigError, match=r"contains the config file .*run.yaml"):
        _prep(validate(other), protect=[str(proj / "run.yaml")])
    (proj / "cache").mkdir()
    with pytest.raises(ConfigError, match=r"contains reference.cache_dir"):
        _prep(validate({**other, "reference": {"cache_dir": str(proj / "cache")}}))
    with pytest.raises(ConfigError, match=r"contains model.tokenizer"):
        cfg = validate(other)
        cfg.model.tokenizer = str(proj / "model")
        _prep(cfg)
    assert sorted(p.name for p in proj.iterdir()) == ["cache", "data", "model", "run.yaml"]  # nothing moved or deleted


def test_train_overwrite_on_the_project_directory_touches_nothing(tok, tmp_path, monkeypatch, capsys):
    import yaml

    from prefopt.cli.commands import main

    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    write_jsonl(proj / "data" / "train.jsonl", _rows(0))
    raw = raw_config(tok, tmp_path, **{"data.train": "data/train.jsonl", "trainer.output_dir": "."})  # relative to run.yaml: proj itself
    (proj / "run.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "proj/run.yaml", "--overwrite"]) == 2
    assert re.search(r"trainer.output_dir: \S*/proj contains ", capsys.readouterr().err)
    assert sorted(str(p.relative_to(proj)) for p in proj.rglob("*")) == ["data", "data/train.jsonl", "run.yaml"]


def test_overwrite_moves_the_old_output_aside(tok, tmp_path):
    cfg = config(tok, tmp_path)
    out = Path(cfg.trainer.output_dir)
    out.mkdir()
    (out / MARKER).write_text("{}")  # a directory prefopt created
    (out / "metrics.jsonl").write_text("old\n")
    _prep(cfg)
    assert out.is_dir() and [p.name for p in out.iterdir()] == [MARKER]  # a fresh run directory
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert (aside / "metrics.jsonl").read_text() == "old\n"


def test_a_directory_in_use_is_refused_naming_the_process(tok, tmp_path):
    import os
    import subprocess
    import sys

    from prefopt.training.trainer import train

    cfg = config(tok, tmp_path)
    holder = "import sys, time; from prefopt.training.lock import DirectoryLock; l = DirectoryLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", holder, cfg.trainer.output_dir], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert proc.stdout.readline().strip() == "held"
        for kw in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(ConfigError, match=rf"trainer.output_dir: .* is in use by process {proc.pid} on "):
                train(cfg, **kw)
    finally:
        proc.kill()
        proc.wait()
    assert train(cfg)["steps"] == 3  # released when the holder died


# ---------------------------------------------------------------- 3, 4: checkpoints


def test_pruning_keeps_the_newest_verified_checkpoint(tok, tmp_path):
    from prefopt.training import checkpoint as ckpt
    from prefopt.training.trainer import train

    cfg = config(tok, tmp_path, **{"trainer.save_every": 1, "trainer.keep_checkpoints": 2, "trainer.max_steps": 3})
    train(cfg)
    root = Path(cfg.trainer.output_dir) / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-0000002", "step-0000003"]
    bad = root / "step-0000009"  # a corrupt checkpoint newer than the good ones
    bad.mkdir()
    (bad / "checksums.json").write_text("{\"model.safetensors\": \"0\"}")
    (bad / "model.safetensors").write_text("garbage")
    ckpt.prune(root, 1, None)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-0000003", "step-0000009"]
    assert ckpt.latest_valid(root).name == "step-0000003"


def test_disk_full_while_saving_says_so_removes_the_partial_and_resume_starts(tok, tmp_path, monkeypatch):
    import errno

    from prefopt.training import checkpoint as ckpt
    from prefopt.training.trainer import train

    cfg = config(tok, tmp_path, **{"trainer.save_every": 1, "trainer.max_steps": 2})
    real = ckpt.save_file

    def full(tensors, path):
        if "0000002" in path:
            Path(path).write_bytes(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint step 2: no space left on the device holding .*needs about [\d.]+ MiB and [\d.]+ MiB are free"):
        train(cfg)
    root = Path(cfg.trainer.output_dir) / "checkpoints"
    assert not list(root.glob(".step-*")) and [p.name for p in ckpt.list_checkpoints(root)] == ["step-0000001"]
    monkeypatch.setattr(ckpt, "save_file", real)
    stale = root / ".step-0000005.tmp"  # as left by a kill -9 during a save
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    removed = []
    monkeypatch.setattr(ckpt, "recover_temporaries", lambda r, f=ckpt.recover_temporaries: (removed.append(any(r.glob(".step-*"))), f(r)))
    assert train(cfg, resume=True)["steps"] == 2
    assert removed[0] is True and not stale.exists()  # cleaned at start, before anything else


# ---------------------------------------------------------------- validate checks what train will


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.train": "missing/data/train.jsonl"}, r"data.train: \S*missing/data/train.jsonl does not exist"),
        ({"model.tokenizer": "./no/such/model"}, r"model.tokenizer: \S*no/such/model does not exist"),
        ({"trainer.seed": -1}, r"trainer.seed: Input should be greater than or equal to 0"),
        ({"trainer.epochs": float("inf")}, r"trainer.epochs: Input should be a finite number"),
        ({"trainer.lr": float("inf")}, r"trainer.lr: Input should be a finite number"),
        ({"trainer.adam_betas": [2, 3]}, r"trainer.adam_betas: Value error, each AdamW beta must be in \[0, 1\)"),
        ({"trainer.report_to": ["tensorbord"]}, r"trainer.report_to: Value error, unknown tracker 'tensorbord'.*did you mean 'tensorboard'"),
        ({"trainer.lerning_rate": 1e-3}, r"trainer.lerning_rate: Extra inputs are not permitted \(got 0.001\); did you mean 'lr'\?"),
        ({"trainer.learning_rate": 1e-3}, r"did you mean 'lr'\?"),
    ],
)
def test_validate_refuses_what_train_would_fail_on(tok, tmp_path, overrides, message):
    import yaml

    from prefopt.cli.commands import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw_config(tok, tmp_path, **overrides)))
    with pytest.raises(ConfigError, match=message):
        from prefopt.config import load_config
        from prefopt.training.preflight import preflight

        preflight(load_config(path))
    assert main(["validate", str(path)]) == 2


def test_validate_checks_paths_devices_weights_and_writability(tok, tmp_path, monkeypatch):
    from prefopt.training.preflight import preflight
    from prefopt.training.trainer import train

    (tmp_path / "afile").write_text("x")
    model_dir = tmp_path / "config-only"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    cases = [
        ({"trainer.output_dir": str(tmp_path / "afile")}, r"trainer.output_dir: .*afile is a file, not a directory"),
        ({"reference.cache_dir": str(tmp_path / "afile" / "sub")}, r"reference.cache_dir: .* cannot be created: .*afile is a file"),
        ({"trainer.precision": "fp16"}, r"trainer.precision: fp16 needs a CUDA device"),
        ({"model": {"name_or_path": str(model_dir), "tokenizer": str(tok)}}, r"model.name_or_path: .*has a config.json but no weights.*set model.init: random"),
    ]
    if Path("/proc").is_dir():  # a directory even root cannot write into
        cases.append(({"trainer.output_dir": "/proc/prefopt-test/run"}, r"trainer.output_dir: /proc/prefopt-test/run is not writable"))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for overrides, message in cases:
        cfg = config(tok, tmp_path, **overrides)
        with pytest.raises(ConfigError, match=message):
            preflight(cfg)
        with pytest.raises(ConfigError, match=message):  # train refuses before any work
            train(cfg)
        assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    opted = config(tok, tmp_path, **{"model": {"name_or_path": str(model_dir), "tokenizer": str(tok), "init": "random"}})
    preflight(opted)


def test_unreachable_hub_names_fail_fast_with_one_line(tok, tmp_path, monkeypatch):
    import time

    from prefopt.training import preflight as pf

    def unreachable(self, *a, **k):
        raise ConnectionError("Failed to resolve 'huggingface.co'\nlong traceback text")

    monkeypatch.setattr("huggingface_hub.HfApi.repo_info", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = config(tok, tmp_path, **{"data.train": "someone/some-dataset"})
    started = time.time()
    with pytest.raises(ConfigError) as err:
        pf.preflight(cfg)
    assert time.time() - started < 5
    line = str(err.value).splitlines()[1].strip()
    assert line.startswith("data.train: cannot reach the Hugging Face Hub for dataset 'someone/some-dataset' (Failed to resolve 'huggingface.co')")
    assert "point data.train at a local copy" in line and "HF_HUB_OFFLINE=1" in line
    from prefopt.training.trainer import train

    with pytest.raises(ConfigError, match=r"data.train: cannot reach the Hugging Face Hub"):
        train(cfg)  # before any work: no output directory is left behind
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"data.train: someone/some-dataset is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        pf.preflight(cfg)


def test_yaml_alias_bombs_and_huge_values_are_refused_quickly(tmp_path):
    import time

    from prefopt.config import load_config
    from prefopt.config import validate as _validate

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert len(bomb.read_bytes()) < 700
    started = time.time()
    with pytest.raises(ConfigError, match=r"bomb.yaml: the YAML expands to more than 100000 values"):
        load_config(bomb)
    many = tmp_path / "many.yaml"
    many.write_text("a: &a 1\nb: [" + ",".join(["*a"] * 200) + "]\n")
    with pytest.raises(ConfigError, match=r"many.yaml: invalid YAML: more than 100 aliases"):
        load_config(many)
    assert time.time() - started < 5
    with pytest.raises(ConfigError) as err:
        _validate({"model": {"name_or_path": "m"}, "data": {"train": "t"}, "trainer": {"seed": "x" * 100_000}})
    assert len(str(err.value)) < 400


def test_yaml_syntax_error_names_the_file(tmp_path):
    from prefopt.config import load_config

    path = tmp_path / "broken.yaml"
    path.write_text("model: {name_or_path: x\ndata: [\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: invalid YAML") and "<unicode string>" not in str(err.value)
    assert f"in {path}, line 1, column 8" in str(err.value)


def test_switching_loss_by_set_says_what_it_keeps_and_drops(tok, tmp_path, caplog, monkeypatch):
    import yaml

    from prefopt.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw_config(tok, tmp_path, **{"loss": {"name": "dpo", "beta": 0.1, "label_smoothing": 0.1}})))
    with caplog.at_level("WARNING", logger="prefopt"):
        cfg = load_config(path, ["loss.name=ipo"])
    assert cfg.loss == {"name": "ipo"}
    assert "--set loss.name=ipo: drops beta=0.1, label_smoothing=0.1 (not ipo parameters)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="prefopt"):
        cfg = load_config(path, ["loss.name=tdpo", "loss.variant=tdpo1"])
    assert cfg.loss == {"name": "tdpo", "beta": 0.1, "variant": "tdpo1"}
    assert "--set loss.name=tdpo: keeps beta=0.1 from the dpo config (check the values suit tdpo; its defaults: beta=0.1)" in caplog.text
    assert "drops label_smoothing=0.1 (not tdpo parameters)" in caplog.text


# ---------------------------------------------------------------- 10: plugins that exit or break


GOOD_LOSS = '''
from prefopt.plugins.hookspecs import hookimpl
from prefopt.losses.dpo import DPO
from prefopt.training.resume import MARKER

class Good(DPO):
    name = "mixed_good"

@hookimpl
def register_losses():
    return [Good]
'''
NOT_A_LOSS = '''
from prefopt.plugins.hookspecs import hookimpl

@hookimpl
def register_losses():
    return [object]
'''


def test_plugin_calling_sys_exit_or_registering_junk_is_flagged(tmp_path, monkeypatch, capsys):
    import importlib

    from prefopt.cli.commands import main
    from prefopt.plugins import manager as plugins

    site = tmp_path / "site"
    site.mkdir()
    write_plugin_dist(site, "exits-loss", {"sg_exits": "import sys\nsys.exit('no GPU here')\n"})
    write_plugin_dist(site, "mixed-loss", {"sg_mixed_good": GOOD_LOSS, "sg_mixed_junk": NOT_A_LOSS})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PREFOPT_LOAD_PLUGINS", "exits-loss,mixed-loss")
    importlib.invalidate_caches()
    plugins.reset()
    try:
        assert main(["losses"]) == 0
        out = capsys.readouterr().out
        assert "BROKEN sg_exits (exits-loss 1.0): plugin 'sg_exits' from distribution exits-loss 1.0 (sg_exits) failed to load: SystemExit: no GPU here" in out
        assert "mixed_good  (mixed-loss 1.0;" in out
        assert main(["plugins"]) == 0
        out = capsys.readouterr().out
        assert "exits-loss 1.0 [sg_exits]: FAILED: " in out
        assert "mixed-loss 1.0 [sg_mixed_good]: mixed_good\n" in out
        assert re.search(r"^mixed-loss 1.0 \[sg_mixed_junk\]: FAILED: .*registered a broken loss", out, re.M)
    finally:
        plugins.reset()
