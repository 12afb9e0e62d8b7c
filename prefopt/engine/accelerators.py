"""Optional accelerators of the policy, off by default until the GPU benchmark shows they help.

- ``trainer.compile``: regional ``torch.compile`` of each decoder layer (one compiled
  region reused by every layer). Packed widths and sequence counts become dynamic after
  one recompile (see :mod:`prefopt.engine.attention`). Every compilation is counted and logged;
  a recompile says which shape or value caused it.
- ``trainer.liger``: Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (``prefopt[liger]``).
  Not its fused cross-entropy: prefopt computes log-probs itself (``prefopt.engine.logprobs``).
"""
from __future__ import annotations

import importlib.util
import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from prefopt.errors import ConfigError

log = logging.getLogger("prefopt")
COMPILES: Counter[str] = Counter()  # "graphs" compiled, of which "recompiles"


def apply(policy: nn.Module, trainer: Any, device: torch.device) -> nn.Module:
    """The policy with the accelerators ``trainer`` (a ``TrainerConfig``) turns on; unchanged when none is."""
    if trainer.liger:
        use_liger(policy, device)
    if trainer.compile:
        compile_layers(policy)
    return policy


def check(device: torch.device, *, liger: bool) -> None:
    """Fail before any expensive work when an accelerator the config asks for cannot run here."""
    if not liger:
        return
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("trainer.liger: needs the liger-kernel package (pip install 'prefopt[liger]')")
    if torch.device(device).type != "cuda":
        raise ConfigError(f"trainer.liger: Liger's kernels are Triton kernels and need a CUDA device, not {torch.device(device).type}; "
                          "set trainer.liger: false")


def _base(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the ``ModuleList`` of ``config.num_hidden_layers`` blocks."""
    base = _base(model)
    n = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"trainer.compile: no list of {n} decoder layers found in {type(base).__name__}")


def _on_compile_end(args: Any) -> None:
    parts = str(args.compile_id).split("/")  # "frame/attempt"; attempt > 0 is a recompile of that frame
    COMPILES["graphs"] += 1
    if len(parts) >= 2 and parts[-1].isdigit() and int(parts[-1]) > 0:
        COMPILES["recompiles"] += 1
    log.info("torch.compile: compiled graph %s (%d so far, %d of them recompiles)", args.compile_id, COMPILES["graphs"], COMPILES["recompiles"])


def compile_layers(model: nn.Module, backend: str = "inductor") -> int:
    """Compile each decoder layer in place (``dynamic=None``: a shape that changes is made dynamic
    after its first recompile, so packed widths do not each compile again); returns the number of layers."""
    from torch._dynamo.callback import callback_handler, on_compile_end

    if _on_compile_end not in getattr(callback_handler, "end_callbacks", ()):  # once (torch._dynamo.reset() clears it)
        on_compile_end(_on_compile_end)
        torch._logging.set_logs(recompiles=True)  # the reason of each recompile, through torch's own logging
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend)
    log.info("torch.compile: %d decoder layers (regional, backend %s); compilations are logged", len(layers), backend)
    return len(layers)


def use_liger(model: nn.Module, device: torch.device) -> None:
    """Swap the model's RMSNorm, RoPE and SwiGLU for Liger's kernels (a clear error where they cannot run).

    Liger patches RoPE in the model's transformers module, so a reference of the same
    architecture in this process uses it too.
    """
    check(device, liger=True)
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    base = _base(model)
    model_type = getattr(base.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(f"trainer.liger: liger-kernel has no kernels for model type {model_type!r}")
    _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    log.info("liger: RMSNorm, RoPE and SwiGLU kernels on the %s policy", model_type)
