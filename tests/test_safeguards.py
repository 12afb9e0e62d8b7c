"""Runs that would lose work or end silently wrong are refused with a clear message."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from prefopt.config import validate
from prefopt.errors import ConfigError, PluginError
from prefopt.health import TrainingError, check_engine_logps
from prefopt.losses.base import LossOutput
from prefopt.losses.dpo import DPO

WORDS = "the cat dog sat ran on a mat log good bad happy sad big small red blue green".split()


def _rows(seed: int, n: int = 16) -> list[dict]:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": text(3, 6), "chosen": text(2, 4), "rejected": text(2, 4)} for _ in range(n)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    from prefopt.tiny import build_tokenizer

    d = tmp_path_factory.mktemp("safe")
    texts = [r[k] for r in _rows(0) for k in ("prompt", "chosen", "rejected")]
    build_tokenizer(texts, 300).save_pretrained(d / "tok")
    return d / "tok"


def raw_config(tok: Path, tmp: Path, **overrides) -> dict:
    """A tiny fp32 CPU run as a raw mapping; ``overrides`` are dotted paths."""
    from prefopt.tiny import model_config

    tmp.mkdir(parents=True, exist_ok=True)
    train = tmp / "train.jsonl"
    if not train.exists():
        _write(train, _rows(0))
    raw = {
        "model": {"config": model_config("llama", 300, 32, 1, 2, max_position=64), "tokenizer": str(tok)},
        "data": {"train": str(train), "max_length": 48},
        "loss": {"name": "dpo", "beta": 0.1},
        "reference": {"cache_dir": str(tmp / "cache")},
        "trainer": {"output_dir": str(tmp / "run"), "batch_size": 4, "max_steps": 3, "lr": 1e-3, "schedule": "constant"},
    }
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


def config(tok: Path, tmp: Path, **overrides):
    return validate(raw_config(tok, tmp, **overrides))


@pytest.fixture(autouse=True)
def _fast(one_torch_thread, builtins_only):
    yield


# ---------------------------------------------------------------- 5, 8: resume


def test_resume_refuses_changed_training_data(tok, tmp_path):
    from prefopt.trainer import train

    train(config(tok, tmp_path, **{"trainer.save_every": 1, "trainer.max_steps": 2}))
    rows = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in _rows(0)]
    _write(tmp_path / "train.jsonl", rows)
    with pytest.raises(ConfigError, match=r"--resume: the training data changed since the checkpoint \(data.train: .*train.jsonl\)"):
        train(config(tok, tmp_path, **{"trainer.save_every": 1, "trainer.max_steps": 3}), resume=True)
    _write(tmp_path / "train.jsonl", _rows(0))  # restored: resumes
    assert train(config(tok, tmp_path, **{"trainer.save_every": 1, "trainer.max_steps": 3}), resume=True)["steps"] == 3


def test_resume_refuses_a_changed_schedule_length(tok, tmp_path):
    from prefopt.trainer import train

    base = {"trainer.save_every": 1, "trainer.max_steps": 2, "trainer.schedule": "linear"}
    train(config(tok, tmp_path, **base))
    with pytest.raises(ConfigError, match=r"give 3 steps but the run was started with 2; its linear learning-rate schedule"):
        train(config(tok, tmp_path, **{**base, "trainer.max_steps": 3}), resume=True)


# ---------------------------------------------------------------- 6: broken final models


def test_run_that_skips_most_steps_fails_and_saves_no_model(tok, tmp_path):
    from prefopt.trainer import train

    cfg = config(tok, tmp_path, **{"trainer.lr": 1e30, "trainer.max_steps": 4})
    with pytest.raises(TrainingError, match=r"3 of 4 steps were skipped .*the final model was not saved"):
        train(cfg)
    out = Path(cfg.trainer.output_dir)
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    assert (out / "checkpoints" / "step-0000004").is_dir()  # the work is kept

    beta = config(tok, tmp_path / "b", **{"loss.beta": 1e30, "trainer.max_steps": 2})
    with pytest.raises(TrainingError, match=r"2 of 2 steps were skipped"):
        train(beta)


def test_step_that_makes_weights_nonfinite_stops_the_run(tok, tmp_path):
    from prefopt.trainer import train

    cfg = config(tok, tmp_path)
    cfg.trainer.lr = float("inf")  # past validation, which refuses it (see test_validate_*)
    with pytest.raises(TrainingError, match=r"step 1 made the weights non-finite \(\d+ tensors, e.g. "):
        train(cfg)
    assert not (Path(cfg.trainer.output_dir) / "model.safetensors").exists()


def test_summary_counts_applied_and_skipped_steps(tok, tmp_path, monkeypatch):
    from prefopt.trainer import format_summary, train

    original = DPO.forward
    calls = []

    def forward(self, inputs):
        calls.append(1)
        out = original(self, inputs)
        return LossOutput(out.loss * float("nan"), out.losses, out.metrics) if len(calls) == 2 else out

    monkeypatch.setattr(DPO, "forward", forward)
    summary = train(config(tok, tmp_path))
    assert (summary["steps_applied"], summary["steps_skipped"]) == (2, 1)
    assert "trained 3 steps (2 applied, 1 skipped)" in format_summary(summary)


# ---------------------------------------------------------------- 7: engine log-probs


def test_engine_logprob_check_compares_by_value():
    labels = torch.tensor([[-100, 5, 6, -100]])
    same = torch.tensor([[-1.0, -2.0, 0.0]])
    check_engine_logps(lambda b: same, lambda b: same.clone(), {"labels": labels})
    off = same + torch.tensor([[0.0, 0.5, 0.0]])
    with pytest.raises(ConfigError, match=r"differ from the model's own forward by up to 0.5 "):
        check_engine_logps(lambda b: same, lambda b: off, {"labels": labels})
    masked = same + torch.tensor([[0.0, 0.0, 9.0]])  # a difference at a masked position does not count
    check_engine_logps(lambda b: same, lambda b: masked, {"labels": labels})


def test_model_with_scaled_logits_is_refused_at_start(tok, tmp_path):
    from prefopt.run import setup
    from prefopt.tiny import model_config

    mc = {**model_config("llama", 300, 32, 1, 2, max_position=64), "model_type": "granite", "logits_scaling": 4.0}
    cfg = config(tok, tmp_path, **{"model.config": mc})
    with pytest.raises(ConfigError, match=r"model: the engine's per-token log-probs differ from the model's own forward by up to"):
        setup(cfg)
    assert not (tmp_path / "cache").exists()  # refused before the reference cache is computed
    mc["logits_scaling"] = 1.0
    setup(config(tok, tmp_path / "ok", **{"model.config": mc}))  # the same model without the scale passes


def test_lora_on_the_output_head_is_refused(tok, tmp_path):
    pytest.importorskip("peft")
    from prefopt.run import setup

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
    ],
)
def test_malformed_loss_output_names_the_loss_and_package(tok, tmp_path, monkeypatch, bad, message):
    from prefopt.trainer import train

    original = DPO.forward
    monkeypatch.setattr(DPO, "forward", lambda self, inputs: bad(original(self, inputs)))
    with pytest.raises(PluginError, match=r"loss 'dpo' \(prefopt [^)]*\) " + message):
        train(config(tok, tmp_path, **{"trainer.max_steps": 1}))
