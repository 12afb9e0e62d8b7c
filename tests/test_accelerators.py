"""Optional accelerators: regional torch.compile keeps the log-probs; Liger fails clearly where it cannot run."""
from __future__ import annotations

import time

import pytest
import torch
from engine_helpers import make_config, write_assets

from prefopt import accelerators
from prefopt.config import validate
from prefopt.errors import ConfigError
from prefopt.run import setup


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
