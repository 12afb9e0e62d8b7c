"""Helpers for testing losses, in this repository and in plugin packages.

``registered(MyLoss)`` makes a loss selectable by name for the duration of a
``with`` block, without installing anything. ``check_loss(MyLoss)`` runs a loss
class through the contract every loss must honour and raises ``AssertionError``
with a message per broken rule.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pydantic
import torch

from prefopt import plugins, registry
from prefopt.hookspecs import hookimpl
from prefopt.losses.base import Loss, LossConfig, LossInputs, Reference

# Metrics every preference loss (one that reads the rejected completion) must report.
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")

_counter = itertools.count()


class _TestPlugin:
    def __init__(self, classes: tuple[type[Loss], ...]) -> None:
        self.classes = classes

    @hookimpl
    def register_losses(self) -> list[type]:
        return list(self.classes)


@contextmanager
def registered(*loss_classes: type[Loss]) -> Iterator[None]:
    """Register ``loss_classes`` as a plugin inside the block; unregister on exit."""
    pm = plugins.get_plugin_manager()
    plugin = _TestPlugin(loss_classes)
    pm.register(plugin, name=f"prefopt.testing-{next(_counter)}")
    registry.reset()
    try:
        yield
    finally:
        pm.unregister(plugin)
        registry.reset()


def check_loss(loss_cls: type[Loss], config: LossConfig | Mapping[str, Any] | None = None) -> None:
    """Check that ``loss_cls`` honours the loss contract; raise ``AssertionError`` if not.

    Checked: the class is registrable (a ``Loss`` with a name and a pydantic
    ``Config``); the config rejects unknown keys and documents every field; the
    default config (or ``config``) is valid; loss and gradients are finite on
    ordinary inputs, on extreme log-ratios (+-1e4) and on zero-token completions;
    per-pair losses have shape ``(B,)`` and the loss is a scalar; metrics are
    finite detached scalars, including the reward metrics for any loss that reads
    the rejected completion; and the loss runs on exactly the inputs its ``needs``
    declares (no reference log-probs for ``NONE``, no KL unless ``TOKEN_KL``) and
    uses what it declares.
    """
    try:
        registry._check_class(loss_cls)
    except TypeError as exc:
        raise AssertionError(f"not a registrable loss: {exc}") from None
    where = f"{loss_cls.__name__} ({loss_cls.name!r})"
    cfg_cls = loss_cls.Config
    _expect(cfg_cls.model_config.get("extra") == "forbid", f"{where}: {cfg_cls.__name__} must forbid unknown keys (subclass prefopt.LossConfig)")
    undocumented = [n for n, f in cfg_cls.model_fields.items() if not (f.description or "").strip()]
    _expect(not undocumented, f"{where}: config fields without a description: {', '.join(undocumented)} (use Field(..., description=...))")

    try:
        cfg = cfg_cls(**config) if isinstance(config, Mapping) else config if config is not None else cfg_cls()
    except pydantic.ValidationError as exc:
        what = "the given config" if config is not None else "the default config (pass config= if a field is required)"
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise AssertionError(f"{where}: {what} is invalid: {problems}") from None
    _expect(isinstance(cfg, cfg_cls), f"{where}: config must be a {cfg_cls.__name__}, got {type(cfg).__name__}")
    loss = loss_cls(cfg)
    needs = loss.needs
    _expect(isinstance(needs, Reference), f"{where}: needs must be a prefopt.Reference, got {needs!r}")

    for case, values in _CASES.items():
        inputs, leaves = _inputs(values, needs)
        try:
            out = loss(inputs)
        except Exception as exc:  # noqa: BLE001 - any failure here is a contract failure
            hint = ""
            if needs < Reference.TOKEN_KL:
                hint = f" (it declares needs={needs.name}; inputs beyond that are None)"
            raise AssertionError(f"{where}: failed on {case} inputs{hint}: {type(exc).__name__}: {exc}") from None
        batch = values["policy_chosen_logps"].shape[0]
        _expect(isinstance(out.losses, torch.Tensor) and tuple(out.losses.shape) == (batch,), f"{where}: per-pair losses must have shape ({batch},), got {_shape(out.losses)}")
        _expect(isinstance(out.loss, torch.Tensor) and out.loss.ndim == 0, f"{where}: loss must be a scalar tensor, got {_shape(out.loss)}")
        _expect(bool(torch.isfinite(out.loss)) and bool(torch.isfinite(out.losses).all()), f"{where}: non-finite loss on {case} inputs: {out.losses.tolist()}")
        _expect(out.loss.requires_grad, f"{where}: the loss does not depend on the policy log-probs (no gradient)")
        out.loss.backward()
        for name, leaf in leaves.items():
            if leaf.grad is not None:
                _expect(bool(torch.isfinite(leaf.grad).all()), f"{where}: non-finite gradient of {name} on {case} inputs: {leaf.grad.tolist()}")
        _check_metrics(where, out.metrics, case)
        preference = leaves["policy_rejected_logps"].grad is not None
        if preference:
            missing = [m for m in REWARD_METRICS if m not in out.metrics]
            _expect(not missing, f"{where}: a preference loss must report the metrics {', '.join(missing)}")
        declared = {Reference.LOGPS: ("ref_chosen_logps", "ref_rejected_logps"), Reference.TOKEN_KL: ("chosen_kl", "rejected_kl")}.get(needs)
        if declared is not None and needs == Reference.LOGPS:
            _expect(any(leaves[n].grad is not None for n in declared), f"{where}: declares needs=LOGPS but its loss does not use the reference log-probs; declare Reference.NONE")
        if declared is not None and needs == Reference.TOKEN_KL:
            _expect(any(leaves[n].grad is not None for n in declared), f"{where}: declares needs=TOKEN_KL but its loss does not use chosen_kl or rejected_kl; declare LOGPS or NONE")


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_metrics(where: str, metrics: object, case: str) -> None:
    _expect(isinstance(metrics, dict), f"{where}: metrics must be a dict, got {type(metrics).__name__}")
    for key, value in metrics.items():  # type: ignore[union-attr]
        _expect(isinstance(key, str), f"{where}: metric names must be strings, got {key!r}")
        if isinstance(value, torch.Tensor):
            _expect(value.numel() == 1 and value.ndim == 0, f"{where}: metric {key!r} must be a scalar, got shape {tuple(value.shape)}")
            _expect(not value.requires_grad, f"{where}: metric {key!r} must be detached")
            value = value.item()
        _expect(isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: metric {key!r} must be a number, got {type(value).__name__}")
        _expect(torch.isfinite(torch.tensor(float(value))).item(), f"{where}: metric {key!r} is not finite on {case} inputs: {value}")


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# Each case: per-pair values of every field; _inputs keeps only what a loss declares.
_CASES: dict[str, dict[str, torch.Tensor]] = {
    "ordinary": {
        "policy_chosen_logps": _t(-12.0, -30.5, -7.25, -50.0),
        "policy_rejected_logps": _t(-14.0, -28.0, -9.5, -49.0),
        "chosen_tokens": _t(6, 15, 3, 40),
        "rejected_tokens": _t(7, 12, 5, 38),
        "ref_chosen_logps": _t(-13.0, -30.0, -8.0, -50.5),
        "ref_rejected_logps": _t(-13.5, -29.0, -9.0, -48.0),
        "chosen_kl": _t(0.5, 1.25, 0.0, 3.0),
        "rejected_kl": _t(0.75, 1.0, 0.25, 2.5),
    },
    "extreme log-ratio (+-1e4)": {
        "policy_chosen_logps": _t(-1e-6, -1e4, -1e4, -1e-6),
        "policy_rejected_logps": _t(-1e4, -1e-6, -1e4, -1e-6),
        "chosen_tokens": _t(1, 1, 2000, 1),
        "rejected_tokens": _t(1, 1, 1, 2000),
        "ref_chosen_logps": _t(-1e4, -1e-6, -1e-6, -1e4),
        "ref_rejected_logps": _t(-1e-6, -1e4, -1e-6, -1e4),
        "chosen_kl": _t(0.0, 1e4, 0.0, 1e4),
        "rejected_kl": _t(1e4, 0.0, 1e4, 0.0),
    },
    "zero-token completion": {
        "policy_chosen_logps": _t(0.0, 0.0, -3.0),
        "policy_rejected_logps": _t(0.0, -2.0, 0.0),
        "chosen_tokens": _t(0, 0, 2),
        "rejected_tokens": _t(0, 1, 0),
        "ref_chosen_logps": _t(0.0, 0.0, -2.5),
        "ref_rejected_logps": _t(0.0, -2.5, 0.0),
        "chosen_kl": _t(0.0, 0.0, 0.1),
        "rejected_kl": _t(0.0, 0.1, 0.0),
    },
}

_POLICY = ("policy_chosen_logps", "policy_rejected_logps", "chosen_tokens", "rejected_tokens")
_BY_NEED = {
    Reference.NONE: _POLICY,
    Reference.LOGPS: _POLICY + ("ref_chosen_logps", "ref_rejected_logps"),
    Reference.TOKEN_KL: _POLICY + ("ref_chosen_logps", "ref_rejected_logps", "chosen_kl", "rejected_kl"),
}


def _inputs(values: dict[str, torch.Tensor], needs: Reference) -> tuple[LossInputs, dict[str, torch.Tensor]]:
    """LossInputs with only the fields ``needs`` declares; float fields are grad-tracking leaves."""
    kept, leaves = {}, {}
    for name in _BY_NEED[needs]:
        value = values[name].clone()
        if not name.endswith("_tokens"):
            value.requires_grad_(True)
            leaves[name] = value
        kept[name] = value
    return LossInputs(**kept), leaves
