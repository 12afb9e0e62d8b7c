"""Optional accelerators: regional torch.compile keeps the log-probs; Liger fails clearly where it cannot run."""
from __future__ import annotations

import time

import pytest
import torch

from engine_helpers import make_config, write_assets
from prefopt.config import validate
from prefopt.engine import accelerators
from prefopt.errors import ConfigError
from prefopt.training.run import setup


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("assets"), n_train=16, n_eval=0)


def _logps(raw: dict) -> tuple[torch.Tensor, object]:
    run = setup(validate(raw, "test"))
    batch = run.make_batch(run.train_pairs, list(range(8)))
    with torch.no_grad():
        return run.model(batch)["logps"], run


def test_accelerators_are_off_by_default(assets, tmp_path):
    cfg = validate(make_config(assets, tmp_path), "test")
    assert cfg.trainer.compile is False and cfg.trainer.liger is False


def test_compiled_decoder_layers_give_the_same_logps(assets, tmp_path, monkeypatch):
    plain, _ = _logps(make_config(assets, tmp_path / "a", reference__mode="live"))
    # The eager backend runs dynamo's capture (what compiles per shape) without a C++ toolchain.
    monkeypatch.setattr(accelerators, "compile_layers", lambda m, backend="eager", f=accelerators.compile_layers: f(m, backend))
    t0 = time.perf_counter()
    compiled, run = _logps(make_config(assets, tmp_path / "b", reference__mode="live", compile=True))
    if time.perf_counter() - t0 > 120:
        pytest.skip("torch.compile took over two minutes on this machine")
    layers = accelerators.decoder_layers(run.model.policy)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert accelerators.COMPILES["graphs"] >= 1
    torch.testing.assert_close(compiled, plain, atol=1e-5, rtol=1e-5)


def test_liger_without_cuda_or_package_is_a_clear_config_error(assets, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: Liger may run here")
    with pytest.raises(ConfigError, match="trainer.liger"):
        setup(validate(make_config(assets, tmp_path, reference__mode="live", liger=True), "test"))


@pytest.mark.parametrize("shared", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["unshared", "shared-prompts"])
@pytest.mark.parametrize("kernel", ["varlen", "sdpa"])
def test_compiled_layers_stop_recompiling_once_packed_shapes_are_dynamic(kernel, shared):
    """New row widths and sequence counts (every batch, with packing and a token budget) cost one recompile,
    not one each: nothing batch-specific reaches a compiled layer as a Python value. ``aot_eager`` traces
    the kernels' fake implementations as inductor would; the varlen op runs on CPU kernels (tests/varlen_cpu.py).
    With shared prompts, the gathered key pieces vary in length too."""
    from test_packing import _model, _pairs

    import varlen_cpu
    from prefopt.data.batching import pack
    from prefopt.engine.modeling import PreferenceModel
    from prefopt.training.run import use_packed_attention

    varlen_cpu.register()
    torch._dynamo.reset()
    policy = _model("qwen2", kv_heads=2)
    use_packed_attention(policy)
    batches = [pack(pairs, range(len(pairs)), 2, share_prompt=shared) for pairs in (_pairs(2 + i % 5, 64, seed=i) for i in range(12))]
    assert len({b["input_ids"].shape[1] for b in batches}) >= 6 and len({len(b["cu_host"]) for b in batches}) >= 4

    def run(model: PreferenceModel) -> list[torch.Tensor]:
        out = []
        for b in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kernel == "varlen"):  # FlashAttention: bf16 only
                logps = model(b)["logps"]
            logps.sum().backward()
            out.append(logps.detach())
            if len(out) == 2:
                settled = accelerators.COMPILES["graphs"]
        assert accelerators.COMPILES["graphs"] == settled, "recompiled after the shapes became dynamic"
        return out

    eager = run(PreferenceModel(policy, kernel=kernel))
    before = accelerators.COMPILES["graphs"]
    accelerators.compile_layers(policy, backend="aot_eager")
    compiled = run(PreferenceModel(policy, kernel=kernel))
    assert accelerators.COMPILES["graphs"] > before
    tol = 5e-3 if kernel == "varlen" else 1e-5  # bf16: the traced graph may round intermediates differently
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    torch._dynamo.reset()
