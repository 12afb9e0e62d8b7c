"""End-to-end training on tiny Llama- and GPT-2-shaped models built from configs, in-process."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine_helpers import (
    assert_rows_close,
    assert_weights_close,
    eval_rows,
    final_weights,
    make_config,
    read_metrics,
    train_raw,
    write_assets,
)
from prefopt.config import validate
from prefopt.errors import ConfigError

LN2 = math.log(2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("assets"), n_train=96, n_eval=24)


def _cache_files(out: Path) -> list[Path]:
    cache = out / "cache"
    return sorted(cache.glob("*.safetensors")) if cache.exists() else []


_runs: dict[str, tuple[dict, dict]] = {}


@pytest.fixture(scope="module")
def dpo_run(assets, tmp_path_factory):
    """One DPO run on the Llama shape with held-out data, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("dpo")
    raw = make_config(assets, out, max_steps=8, data__eval=assets["eval"], reference__batch_size=32)
    return raw, train_raw(raw), out


# --- each built-in loss moves the right way, with the reference mode chosen from what it declares ---

DPO = {"name": "dpo", "beta": 0.1}
CASES = {
    "llama-ipo": ("llama", {"name": "ipo", "tau": 0.1}, "cache"),
    "llama-tdpo1": ("llama", {"name": "tdpo", "variant": "tdpo1", "beta": 0.1}, "live"),
    "llama-sft": ("llama", {"name": "sft"}, "none"),
    "llama-dpo+sft": ("llama", [{"name": "dpo", "beta": 0.1}, {"name": "sft", "weight": 0.2}], "cache"),
    "llama-dpo-reference-free": ("llama", {"name": "dpo", "beta": 0.1, "reference_free": True}, "none"),
    "gpt2-dpo": ("gpt2", DPO, "cache"),
    "gpt2-tdpo1": ("gpt2", {"name": "tdpo", "variant": "tdpo1", "beta": 0.1}, "live"),
}


def _check_dpo_like(rows: list[dict]) -> None:
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-5)  # policy == reference at the first step
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["loss"] < LN2 - 0.15
    assert sum(r["rewards/accuracies"] for r in rows[-3:]) / 3 > 0.8  # accuracy on the training pairs
    assert rows[-1]["rewards/margins"] > 0.3


def test_dpo_llama_learns_the_easy_preference(dpo_run):
    raw, summary, out = dpo_run
    assert summary["reference"] == "cache" and summary["steps"] == 8 and summary["bad_steps"] == 0
    rows = read_metrics(raw["trainer"]["output_dir"])
    assert [r["step"] for r in rows] == list(range(1, 9))
    _check_dpo_like(rows)
    for r in rows:
        assert r["num_tokens"] > 0 and 0 <= r["padding_fraction"] < 0.5 and math.isfinite(r["grad_norm"])
        assert r["lr"] == pytest.approx(3e-3)
    # held-out pairs: exactly ln 2 before training, clearly better after
    before, after = summary["before"], summary["after"]
    assert before["eval/loss"] == pytest.approx(LN2, abs=1e-5)
    assert before["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert after["eval/loss"] < LN2 - 0.15 and after["eval/rewards/accuracies"] > 0.8
    assert [r["step"] for r in eval_rows(raw["trainer"]["output_dir"])] == [0, 8]
    assert len(_cache_files(out)) == 2  # one cache for train, one for eval


@pytest.mark.parametrize("case", list(CASES))
def test_builtin_losses_move_the_right_way(case, assets, tmp_path):
    arch, loss, mode = CASES[case]
    raw = make_config(assets, tmp_path, arch=arch, loss=loss, max_steps=8, reference__batch_size=32)
    summary = train_raw(raw)
    assert summary["reference"] == mode
    rows = read_metrics(raw["trainer"]["output_dir"])
    assert len(rows) == 8 and all(math.isfinite(r["loss"]) for r in rows)
    name = case.split("-", 1)[1]
    if name in ("dpo", "tdpo1", "dpo-reference-free"):
        if name == "dpo-reference-free":  # the reference is uniform: the first loss is not ln 2
            assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"] + 0.3
            assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
        else:
            _check_dpo_like(rows)
        if name == "tdpo1":
            assert rows[0]["kl/chosen"] == pytest.approx(0.0, abs=1e-5)
            assert all(r["kl/chosen"] >= -1e-6 and r["kl/rejected"] >= -1e-6 for r in rows)
            assert rows[-1]["kl/rejected"] > 0
    elif name == "ipo":
        assert rows[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, abs=1e-3)  # zero margin at the start
        assert rows[-1]["loss"] < 0.9 * rows[0]["loss"]
        assert rows[-1]["rewards/margins"] > 0
    elif name == "sft":
        assert all(r["loss"] == pytest.approx(r["nll/chosen"], rel=1e-6) for r in rows)
        assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    elif name == "dpo+sft":
        for r in rows:
            assert r["loss"] == pytest.approx(r["loss/dpo"] + 0.2 * r["loss/sft"], abs=1e-5)
        assert rows[0]["loss/dpo"] == pytest.approx(LN2, abs=1e-5)
        assert rows[-1]["loss/dpo"] < LN2 - 0.1 and rows[-1]["loss/sft"] < rows[0]["loss/sft"]
    if mode == "none":
        assert _cache_files(tmp_path) == []
    elif mode == "cache":
        assert len(_cache_files(tmp_path)) == 1  # train only: this run has no held-out data


def _plan(run):
    from prefopt.losses.base import needs_of
    from prefopt.training.step import Plan

    return Plan.of(needs_of(run.loss), run.mode)


def test_reference_mode_none_never_loads_a_reference(assets, tmp_path):
    from prefopt.training.trainer import setup

    # a reference that does not exist: it would fail to load if anything tried
    raw = make_config(assets, tmp_path, loss={"name": "sft"}, model__reference=str(tmp_path / "missing-model"))
    run = setup(validate(raw))
    assert run.mode == "none" and run.model.reference is None and run.caches == {} and _plan(run).reference == "none"
    assert not (tmp_path / "cache").exists()

    live = setup(validate(make_config(assets, tmp_path, loss={"name": "tdpo", "variant": "tdpo1"})))
    assert live.mode == "live" and live.model.reference is not None and _plan(live).reference == "kl"
    assert not any(p.requires_grad for p in live.model.reference.parameters())
    assert not (tmp_path / "cache").exists()

    with pytest.raises(ConfigError, match="reference.mode"):
        setup(validate(make_config(assets, tmp_path, loss={"name": "tdpo", "variant": "tdpo1"}, reference__mode="cache")))


def test_cache_and_live_reference_give_the_same_losses(dpo_run, assets, tmp_path):
    raw_cache, _, _ = dpo_run
    raw = make_config(assets, tmp_path, max_steps=4, reference__mode="live")
    assert train_raw(raw)["reference"] == "live"
    assert _cache_files(tmp_path) == []
    live, cached = read_metrics(raw["trainer"]["output_dir"]), read_metrics(raw_cache["trainer"]["output_dir"])[:4]
    assert_rows_close(cached, live, ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "grad_norm"))


def test_gradient_accumulation_equals_the_larger_batch(assets, tmp_path):
    common = dict(max_steps=3, group_by_length=False, reference__batch_size=32, max_grad_norm=None)
    big = make_config(assets, tmp_path / "big", batch_size=8, grad_accum=1, **common)
    small = make_config(assets, tmp_path / "small", batch_size=4, grad_accum=2, **common)
    train_raw(big)
    train_raw(small)
    rows_big, rows_small = read_metrics(big["trainer"]["output_dir"]), read_metrics(small["trainer"]["output_dir"])
    assert_rows_close(rows_small, rows_big, ("loss", "rewards/margins", "rewards/accuracies", "grad_norm"))
    for a, b in zip(rows_big, rows_small, strict=True):
        assert a["num_tokens"] >= b["num_tokens"]  # same pairs; the two halves are padded separately
    assert rows_big[-1]["loss"] < rows_big[0]["loss"]
    assert_weights_close(final_weights(big["trainer"]["output_dir"]), final_weights(small["trainer"]["output_dir"]))


def test_resume_after_a_crash_continues_the_same_run(assets, tmp_path, monkeypatch):
    import prefopt.training.trainer as trainer

    common = dict(max_steps=6, save_every=2, schedule="linear", warmup_steps=2, reference__batch_size=32)
    whole = make_config(assets, tmp_path / "whole", **common)
    train_raw(whole)

    broken = make_config(assets, tmp_path / "broken", **common)
    real, calls = trainer.forward_backward, {"n": 0}

    def crash_on_fifth_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "forward_backward", crash_on_fifth_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_raw(broken)
    monkeypatch.setattr(trainer, "forward_backward", real)
    out = Path(broken["trainer"]["output_dir"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")) == ["step-0000002", "step-0000004"]
    assert not (out / "model.safetensors").exists()

    with pytest.raises(ConfigError, match="--resume"):
        train_raw(broken)  # a non-empty output_dir is refused without --resume / --overwrite
    summary = train_raw(broken, resume=True)
    assert summary["steps"] == 6
    rows_whole, rows_resumed = read_metrics(whole["trainer"]["output_dir"]), read_metrics(out)
    assert [r["step"] for r in rows_resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rows_whole, rows_resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    # linear warmup over 2 steps, then linear decay to 0 at step 6
    assert [r["lr"] for r in rows_resumed] == pytest.approx([3e-3 * f for f in (0.5, 1, 0.75, 0.5, 0.25, 0)], abs=1e-12)
    assert_weights_close(final_weights(whole["trainer"]["output_dir"]), final_weights(out), atol=1e-6, rtol=1e-5)


def test_final_model_and_tokenizer_are_saved(dpo_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw, summary, _ = dpo_run
    out = Path(raw["trainer"]["output_dir"])
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.hidden_size == 32
    saved = load_file(str(out / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == raw["model"]["config"]["vocab_size"] and tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 2
    assert json.loads((out / "summary.json").read_text())["steps"] == 8
    assert (out / "checkpoints" / "step-0000008" / "model.safetensors").exists()


def test_non_empty_output_dir_is_refused(assets, tmp_path):
    raw = make_config(assets, tmp_path)
    run_dir = Path(raw["trainer"]["output_dir"])
    run_dir.mkdir(parents=True)
    (run_dir / "something.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty.*--resume.*--overwrite"):
        train_raw(raw)
    assert (run_dir / "something.txt").read_text() == "keep me"


def test_bf16_runs_on_cpu_with_finite_losses(assets, tmp_path):
    raw = make_config(assets, tmp_path, max_steps=3, precision="bf16", reference__batch_size=32, warmup_steps=2)
    summary = train_raw(raw)
    rows = read_metrics(raw["trainer"]["output_dir"])
    assert [r["lr"] for r in rows] == pytest.approx([1.5e-3, 3e-3, 3e-3])  # constant schedule after a linear warmup
    assert summary["steps"] == 3 and summary["bad_steps"] == 0
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(LN2, abs=0.05)
    # the trained weights stay fp32 (autocast, not a bf16 model)
    assert all(t.dtype == torch.float32 for t in final_weights(raw["trainer"]["output_dir"]).values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_fp16_without_cuda_is_a_clear_config_error(assets, tmp_path):
    raw = make_config(assets, tmp_path, precision="fp16")
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        train_raw(raw)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_cuda(assets, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    raw = make_config(assets, tmp_path, max_steps=4, precision=precision, reference__batch_size=32)
    summary = train_raw(raw)
    rows = read_metrics(raw["trainer"]["output_dir"])
    assert summary["steps"] == 4 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(LN2, abs=0.05)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(t.dtype == torch.float32 for t in final_weights(raw["trainer"]["output_dir"]).values())


def test_validate_names_bad_fields_by_path(assets, tmp_path, capsys):
    import yaml

    from prefopt.cli.commands import main

    raw = make_config(assets, tmp_path)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(good), "--set", "loss.beta=0.2"]) == 0
    assert "valid" in capsys.readouterr().out

    raw["loss"] = {"name": "dpo", "beta": -1}
    raw["trainer"]["batch_size"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "loss.beta" in err and "trainer.batch_size" in err
    assert main(["validate", str(good), "--set", "loss.label_smoothing=0.7"]) == 2
    assert "loss.label_smoothing" in capsys.readouterr().err


def test_precompute_ref_fills_the_cache_that_training_then_reuses(assets, tmp_path, caplog, capsys):
    import yaml

    from prefopt.cli.commands import main

    raw = make_config(assets, tmp_path, max_steps=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["precompute-ref", str(path)]) == 0
    cache = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(cache) == 1  # train only: this config has no held-out data
    stamp = cache[0].stat().st_mtime_ns
    with caplog.at_level("INFO", logger="prefopt"):
        assert main(["train", str(path)]) == 0
    assert "reference cache (train): reusing" in caplog.text
    assert sorted((tmp_path / "cache").glob("*.safetensors")) == cache and cache[0].stat().st_mtime_ns == stamp
    capsys.readouterr()
    assert main(["precompute-ref", str(path), "--set", "loss.reference_free=true"]) == 2
    assert "only 'cache' has anything to precompute" in capsys.readouterr().err
