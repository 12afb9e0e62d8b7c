"""model.dtype and trainer.master_weights: what the weights are held in, what AdamW updates, and what that costs.

AdamW moves each weight by about ``lr`` per step. A bf16 weight near 0.02 can only change by its spacing,
2**-8 * 0.0156 = 6.1e-5, so an update of 5e-7 (a DPO learning rate) is rounded away: pure bf16 training
at that rate leaves the weights where they were, and fp32 masters are what make it train."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from hub_assets import build_hub_assets
from prefopt.config import validate
from prefopt.errors import ConfigError


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return build_hub_assets(tmp_path_factory.mktemp("hub"))


def _raw(hub, out, **model) -> dict:
    return {"model": {"name_or_path": str(hub["model"]), **model},
            "data": {"train": str(hub["dataset"]), "max_length": 128, "max_rows": 16},
            "reference": {"mode": "live"},
            "trainer": {"output_dir": str(out), "batch_size": 8, "max_steps": 2, "lr": 5e-7, "schedule": "constant",
                        "precision": "bf16", "group_by_length": False}}


def _changed(hub, out) -> dict[str, float]:
    """Per weight matrix, the fraction of entries the run changed (against the bf16-rounded start)."""
    start = {k: v.to(torch.bfloat16).float() for k, v in load_file(str(hub["model"] / "model.safetensors")).items()}
    end = load_file(str(out / "model.safetensors"))
    return {k: (end[k].float() != start[k]).float().mean().item() for k in start if start[k].dim() == 2}


@pytest.mark.slow
def test_bf16_weights_train_at_a_dpo_learning_rate_only_with_fp32_masters(hub, tmp_path, one_torch_thread):
    from prefopt.training.trainer import train

    for masters in ("fp32", "none"):
        raw = _raw(hub, tmp_path / masters, dtype="bf16")
        raw["trainer"]["master_weights"] = masters
        train(validate(raw))
    saved = {m: load_file(str(tmp_path / m / "model.safetensors")) for m in ("fp32", "none")}
    assert {v.dtype for v in saved["fp32"].values()} == {torch.float32}
    assert {v.dtype for v in saved["none"].values()} == {torch.bfloat16}
    masters, pure = _changed(hub, tmp_path / "fp32"), _changed(hub, tmp_path / "none")
    # fp32 masters: every entry with a gradient moves (the embeddings of unseen tokens have none)
    assert min(v for k, v in masters.items() if "embed" not in k) > 0.95
    # pure bf16: only entries within ~lr * 2**8 of zero can change at all
    assert max(pure.values()) < 0.05 and sum(pure.values()) / len(pure) < 0.02  # measured: 0.9% on average


def test_lora_on_a_bf16_base_matches_an_fp32_base_within_bf16_rounding_in_half_the_memory(hub, tmp_path, one_torch_thread):
    from prefopt.cli import memory
    from prefopt.training.run import setup

    out, held = {}, {}
    lora = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    for dtype in ("fp32", "bf16"):
        raw = _raw(hub, tmp_path / dtype, dtype=dtype, lora=lora)
        raw["trainer"]["precision"] = "fp32"  # the bf16 run computes in bf16 because its weights are bf16
        run = setup(validate(raw))
        trainable = [p for p in run.model.parameters() if p.requires_grad]
        assert {p.dtype for p in trainable} == {torch.float32}  # the adapters train in fp32 either way
        assert {p.dtype for p in run.model.parameters() if not p.requires_grad} == {getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])}
        held[dtype] = memory.measure(run.model, torch.optim.AdamW(trainable))
        with torch.no_grad():
            out[dtype] = run.model(run.make_batch(run.train_pairs, list(range(16))), reference="logps")
    # the frozen base (the reference too: the adapter disabled) in exactly half the bytes; the adapters the same
    assert held["bf16"]["reference"] * 2 == held["fp32"]["reference"] > 0
    assert held["bf16"]["weights"] == held["fp32"]["weights"] > 0
    for key in ("logps", "ref_logps"):
        diff = (out["bf16"][key] - out["fp32"][key]).abs().max().item()
        # within bf16's relative spacing (2**-8) at the size of the log-probs, and not equal: bf16 was used
        assert 0 < diff < 2**-8 * out["fp32"][key].abs().max().item(), key
    torch.testing.assert_close(out["bf16"]["logps"], out["bf16"]["ref_logps"], rtol=0, atol=0)  # zero-initialised adapter


def test_full_fine_tune_in_bf16_holds_fp32_masters_by_default(hub, tmp_path, one_torch_thread, caplog):
    import logging

    from prefopt.training.run import setup

    with caplog.at_level(logging.INFO, logger="prefopt"):
        run = setup(validate(_raw(hub, tmp_path, dtype="bf16")))
    assert {p.dtype for p in run.model.policy.parameters()} == {torch.float32}
    start = load_file(str(hub["model"] / "model.safetensors"))
    got = dict(run.model.policy.named_parameters())
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(got[name], start[name].to(torch.bfloat16).float())  # read in bf16, held exactly in fp32
    assert any("read in bf16, held and updated by AdamW in fp32" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("change, message", [
    ({"model.dtype": "fp16", "trainer.master_weights": "none"}, "fp16 weights cannot be trained without fp32 masters"),
    ({"model.dtype": "bf16", "trainer.master_weights": "none", "trainer.precision": "fp16"}, "loss scaling needs fp32 gradients"),
])
def test_pure_half_precision_that_cannot_train_is_refused(hub, tmp_path, change, message):
    from engine_helpers import set_dotted

    with pytest.raises(ConfigError, match=message):
        validate(set_dotted(_raw(hub, tmp_path), change))


def test_the_start_up_check_on_bf16_weights_still_refuses_scaled_logits(hub, tmp_path, one_torch_thread):
    """In bf16 the start-up comparison of packed and unpacked forwards allows bf16 rounding, not a logit transform."""
    from transformers import AutoTokenizer

    from prefopt.testing.tiny import model_config
    from prefopt.training.run import setup

    vocab = len(AutoTokenizer.from_pretrained(hub["model"]))
    for scale, refused in ((1.0, False), (4.0, True)):
        raw = _raw(hub, tmp_path / str(scale), dtype="bf16")
        raw["trainer"]["master_weights"] = "none"
        raw["model"] = {"config": {**model_config("llama", vocab, 32, 2, 4, max_position=128), "model_type": "granite",
                                   "logits_scaling": scale}, "tokenizer": str(hub["model"]), "dtype": "bf16"}
        if refused:
            with pytest.raises(ConfigError, match=r"model: the engine's per-token log-probs differ from the model's own forward"):
                setup(validate(raw))
        else:
            assert {p.dtype for p in setup(validate(raw)).model.policy.parameters()} == {torch.bfloat16}
