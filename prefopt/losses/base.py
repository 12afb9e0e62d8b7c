"""The loss contract: what a loss declares, receives and returns."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import ClassVar

import pydantic
import torch
import torch.nn.functional as F


class Reference(IntEnum):
    """What a loss needs from the reference model; the engine runs the cheapest mode that serves it."""

    NONE = 0  # reference-free: the reference model is never loaded
    LOGPS = 1  # summed reference log-probs of each completion: can come from the on-disk cache
    TOKEN_KL = 2  # per-token KL(ref || policy) over the vocabulary: needs a live reference


class LossConfig(pydantic.BaseModel):
    """Base of every loss config: unknown keys are rejected and types are strict."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True, frozen=True)


@dataclass
class LossInputs:
    """Per-pair quantities (shape ``(B,)``) a loss reads; unused ones stay ``None``.

    Log-probs are summed over completion tokens; ``*_tokens`` count those tokens;
    ``*_kl`` is the sequential KL, sum over completion positions of KL(ref || policy).
    """

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    chosen_kl: torch.Tensor | None = None
    rejected_kl: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not isinstance(value, torch.Tensor):
                setattr(self, f.name, torch.as_tensor(value, dtype=torch.float32))

    def require(self, *names: str) -> list[torch.Tensor]:
        """The named fields, or a ValueError naming the first one missing."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"LossInputs.{missing[0]} is required by this loss but was not provided")
        return [getattr(self, n) for n in names]

    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Completion token counts clamped to >= 1, so dividing by them never gives NaN."""
        c, r = self.require("chosen_tokens", "rejected_tokens")
        return c.to(self.policy_chosen_logps.dtype).clamp(min=1), r.to(self.policy_rejected_logps.dtype).clamp(min=1)


@dataclass
class LossOutput:
    """A loss's result: the scalar to minimise, one loss per pair, and detached scalar metrics."""

    loss: torch.Tensor
    losses: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Loss:
    """Base class of every preference loss, built-in or from a plugin.

    Subclasses set ``name``, ``Config`` (a :class:`LossConfig`) and ``reference``,
    and implement :meth:`forward`. ``DPO(beta=0.2)`` or ``DPO(DPO.Config(beta=0.2))``
    both build one; call it on :class:`LossInputs`.
    """

    name: ClassVar[str]
    Config: ClassVar[type[LossConfig]] = LossConfig
    reference: ClassVar[Reference] = Reference.LOGPS

    def __init__(self, config: LossConfig | None = None, **kwargs: object) -> None:
        self.config = config if config is not None else self.Config(**kwargs)

    @property
    def needs(self) -> Reference:
        """What this configured loss needs from the reference model (may depend on config)."""
        return self.reference

    def __call__(self, inputs: LossInputs) -> LossOutput:
        return self.forward(inputs)

    def forward(self, inputs: LossInputs) -> LossOutput:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def ref_logps(inputs: LossInputs, reference_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of chosen and rejected; zeros (a uniform reference) when reference-free."""
    if reference_free:
        zero = torch.zeros_like(inputs.policy_chosen_logps)
        return zero, zero
    return tuple(inputs.require("ref_chosen_logps", "ref_rejected_logps"))  # type: ignore[return-value]


def log_ratios(inputs: LossInputs, reference_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pc - rc, pr - rr)``: each completion's log-ratio to the reference, its implicit reward over beta."""
    rc, rr = ref_logps(inputs, reference_free)
    return inputs.policy_chosen_logps - rc, inputs.policy_rejected_logps - rr


def preference_loss(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """``-logsigmoid(logits)``, conservatively smoothed: the Bradley-Terry loss shared by DPO and kin."""
    if label_smoothing == 0.0:
        return -F.logsigmoid(logits)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, inputs: LossInputs) -> dict[str, torch.Tensor]:
    """The metrics users know from TRL, as batch means of detached values."""
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/margins": (c - r).mean(),
        "rewards/accuracies": (c > r).float().mean(),
        "logps/chosen": inputs.policy_chosen_logps.detach().mean(),
        "logps/rejected": inputs.policy_rejected_logps.detach().mean(),
    }
