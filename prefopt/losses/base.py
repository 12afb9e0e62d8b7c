"""The loss contract: what a loss declares, receives and returns."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from enum import Enum, IntEnum
from typing import ClassVar

import pydantic
import torch
import torch.nn.functional as F


class Reference(IntEnum):
    """What a loss needs from the reference model; the engine runs the cheapest mode that serves it."""

    NONE = 0  # reference-free: the reference model is never loaded
    LOGPS = 1  # summed reference log-probs of each completion: can come from the on-disk cache
    TOKEN_KL = 2  # per-token KL(ref || policy) over the vocabulary: needs a live reference


class Feature(str, Enum):
    """A quantity a loss can read. The engine computes exactly the union of what the configured losses declare.

    Per-pair features are ``(B,)`` tensors on :class:`LossInputs`; per-token ones are
    :class:`Tokens` (every completion token of the batch, packed).
    """

    POLICY_LOGPS = "policy_logps"  # policy_chosen_logps / policy_rejected_logps: always provided
    LENGTHS = "lengths"  # chosen_tokens / rejected_tokens: completion token counts
    REF_LOGPS = "ref_logps"  # ref_chosen_logps / ref_rejected_logps: summed reference log-probs (cacheable)
    KL = "kl"  # chosen_kl / rejected_kl: summed per-token KL(ref || policy) (live reference)
    POLICY_TOKEN_LOGPS = "policy_token_logps"  # per-token policy log-probs of the completion tokens
    REF_TOKEN_LOGPS = "ref_token_logps"  # per-token reference log-probs (cacheable)
    TOKEN_KL = "token_kl"  # per-token KL(ref || policy) over the vocabulary (live reference)
    TOKEN_ENTROPY = "token_entropy"  # per-token entropy of the policy's next-token distribution
    TOKEN_LOGSUMSQ = "token_logsumsq"  # per-token log(sum_v p_v^2) of the policy (WPO's normaliser)
    MISMATCHED_LOGPS = "mismatched_logps"  # mismatched_logps / ref_mismatched_logps: each prompt with another example's completion (KTO)

    def __str__(self) -> str:
        return self.value


Needs = frozenset  # a frozenset of Feature

# What the v1 ``reference`` declaration means in features.
LEGACY_NEEDS: dict[Reference, frozenset[Feature]] = {
    Reference.NONE: frozenset({Feature.POLICY_LOGPS, Feature.LENGTHS}),
    Reference.LOGPS: frozenset({Feature.POLICY_LOGPS, Feature.LENGTHS, Feature.REF_LOGPS}),
    Reference.TOKEN_KL: frozenset({Feature.POLICY_LOGPS, Feature.LENGTHS, Feature.REF_LOGPS, Feature.KL}),
}
_LIVE = {Feature.KL, Feature.TOKEN_KL}  # over the reference's vocabulary: no cache can hold them
_REFERENCE = {Feature.REF_LOGPS, Feature.REF_TOKEN_LOGPS, Feature.MISMATCHED_LOGPS} | _LIVE
# The data a loss can take (``Loss.takes``): see prefopt.data.examples.
DATA_KINDS = ("pairs", "rankings", "labelled")
TOKEN_FEATURES = (Feature.POLICY_TOKEN_LOGPS, Feature.REF_TOKEN_LOGPS, Feature.TOKEN_KL, Feature.TOKEN_ENTROPY, Feature.TOKEN_LOGSUMSQ)


def as_needs(value: Reference | Iterable[Feature | str]) -> frozenset[Feature]:
    """A loss's declaration as a set of features (a v1 :class:`Reference` maps through ``LEGACY_NEEDS``)."""
    if isinstance(value, Reference):
        return LEGACY_NEEDS[value]
    if isinstance(value, str):
        raise TypeError(f"needs must be a set of features, got the string {value!r}")
    try:
        return frozenset(Feature(v) for v in value) | {Feature.POLICY_LOGPS}
    except ValueError as exc:
        raise ValueError(f"{exc}; known features: {', '.join(f.value for f in Feature)}") from None


def reference_for(needs: Iterable[Feature]) -> Reference:
    """The reference model a set of features requires: none, log-probs only (cacheable), or live."""
    needs = set(needs)
    if needs & _LIVE:
        return Reference.TOKEN_KL
    return Reference.LOGPS if needs & _REFERENCE else Reference.NONE


@dataclass
class Tokens:
    """Per-token values of every completion token of a batch of ``B`` pairs, packed flat.

    ``values[offsets[s]:offsets[s + 1]]`` is completion ``s``: chosen completions of pairs
    ``0..B-1`` are sequences ``0..B-1``, rejected ones are ``B..2B-1``. This is the layout
    the engine computes in, so reading it costs nothing; :meth:`padded` gives a
    ``(2B, T)`` view with a mask for code that prefers rows.
    """

    values: torch.Tensor  # (N,)
    seq: torch.Tensor  # (N,) sequence index of each token, 0..2B-1
    position: torch.Tensor  # (N,) index of each token within its completion, 0..len-1
    lengths: torch.Tensor  # (2B,) completion lengths (on the values' device)
    offsets: list[int] = field(repr=False)  # host copy of the 2B+1 boundaries

    @classmethod
    def from_lengths(cls, values: torch.Tensor, lengths: Iterable[int]) -> "Tokens":
        """Wrap flat ``values`` cut into completions of the given lengths (chosen ones first)."""
        lengths = [int(n) for n in lengths]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        if values.shape != (offsets[-1],):
            raise ValueError(f"Tokens: values have shape {tuple(values.shape)}, lengths sum to {offsets[-1]}")
        if len(lengths) % 2:
            raise ValueError("Tokens: lengths must list chosen then rejected completions (an even count)")
        dev = values.device
        seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long)).to(dev)
        position = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
        return cls(values, seq, position.to(dev), torch.tensor(lengths, device=dev), offsets)

    @property
    def num_pairs(self) -> int:
        return (len(self.offsets) - 1) // 2

    def like(self, values: torch.Tensor) -> "Tokens":
        """The same layout holding other per-token ``values`` (e.g. weighted log-probs)."""
        return Tokens(values, self.seq, self.position, self.lengths, self.offsets)

    def sum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-completion sums: ``(chosen (B,), rejected (B,))``; deterministic on every device (no atomics).

        Accumulated in float64: a float32 row sum rounds differently with the batch's padded width, so the
        same completion in two batches (the reference cache's and a training step's) would differ in the
        last bits, and policy = reference would not tie exactly.
        """
        dtype = self.values.dtype
        wide = torch.float64 if dtype in (torch.float32, torch.float16, torch.bfloat16) and self.values.device.type != "mps" else dtype
        out = self.like(self.values.to(wide))._rows(0.0).sum(-1).to(dtype)
        return out[: self.num_pairs], out[self.num_pairs :]

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-completion means (an empty completion gives 0)."""
        c, r = self.sum()
        n = self.lengths.to(self.values.dtype).clamp(min=1)
        return c / n[: self.num_pairs], r / n[self.num_pairs :]

    def padded(self, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values (2B, T), mask (2B, T))``: completion ``s`` in row ``s``, left-aligned, ``fill`` after it."""
        out = self._rows(fill)
        mask = torch.zeros(out.shape, dtype=torch.bool, device=self.values.device)
        mask[self.seq, self.position] = True
        return out, mask

    def _rows(self, fill: float) -> torch.Tensor:
        width = max((b - a for a, b in zip(self.offsets[:-1], self.offsets[1:])), default=0)
        return self.values.new_full((2 * self.num_pairs, width), fill).index_put((self.seq, self.position), self.values)


class LossConfig(pydantic.BaseModel):
    """Base of every loss config: unknown keys are rejected and types are strict."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True, frozen=True)


@dataclass
class LossInputs:
    """What a loss reads: per-pair ``(B,)`` tensors and per-token :class:`Tokens`, or per-group ``(B, K)`` tensors.

    Pairs: log-probs are summed over completion tokens; ``*_tokens`` count those tokens;
    ``*_kl`` is the sequential KL, sum over completion positions of KL(ref || policy).
    The ``token_*`` fields hold the same quantities per token (the sums are their
    :meth:`Tokens.sum`).

    Groups (a loss whose ``takes`` has ``rankings`` or ``labelled``): ``B`` prompts with up
    to ``K`` completions each, slot ``k`` of row ``b`` valid where ``completion_mask`` is
    True (valid slots come first; the others hold zeros). ``policy_logps``, ``ref_logps``
    and ``completion_tokens`` are per completion; rankings come best first with their
    ``scores``; labelled completions have ``labels`` (True = desirable);
    ``mismatched_logps`` and ``ref_mismatched_logps`` ``(M,)`` are the summed log-probs of
    another example's completion after a prompt (KTO's reference point; no gradient), for
    every example of the global batch (all processes'; ``M = B`` in one process): read them
    through a batch statistic, never by row (see docs/writing-a-loss.md).
    The pair fields are then ``None``. :meth:`groups` reads either form as groups.

    The engine fills only what the loss declares in ``needs``; everything else is ``None``.
    """

    policy_chosen_logps: torch.Tensor | None = None
    policy_rejected_logps: torch.Tensor | None = None
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    chosen_kl: torch.Tensor | None = None
    rejected_kl: torch.Tensor | None = None
    policy_token_logps: Tokens | None = None
    ref_token_logps: Tokens | None = None
    token_kl: Tokens | None = None
    token_entropy: Tokens | None = None
    token_logsumsq: Tokens | None = None
    policy_logps: torch.Tensor | None = None  # (B, K)
    ref_logps: torch.Tensor | None = None  # (B, K)
    completion_tokens: torch.Tensor | None = None  # (B, K)
    completion_mask: torch.Tensor | None = None  # (B, K) bool
    scores: torch.Tensor | None = None  # (B, K) rankings: higher is better, non-increasing along K
    labels: torch.Tensor | None = None  # (B, K) bool labelled completions: True = desirable
    mismatched_logps: torch.Tensor | None = None  # (M,) the global batch's, see above
    ref_mismatched_logps: torch.Tensor | None = None  # (M,)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not isinstance(value, (torch.Tensor, Tokens)):
                dtype = torch.bool if f.name in ("completion_mask", "labels") else torch.float32
                setattr(self, f.name, torch.as_tensor(value, dtype=dtype))
        if (self.policy_chosen_logps is None) == (self.policy_logps is None):
            raise ValueError("LossInputs: give policy_chosen_logps and policy_rejected_logps (pairs) or policy_logps (groups)")
        if self.policy_logps is not None and self.completion_mask is None:
            self.completion_mask = torch.ones(self.policy_logps.shape, dtype=torch.bool, device=self.policy_logps.device)

    @property
    def num_examples(self) -> int:
        """``B``: pairs, or groups."""
        return int((self.policy_chosen_logps if self.policy_logps is None else self.policy_logps).shape[0])

    def require(self, *names: str) -> list:
        """The named fields, or a ValueError naming the first one missing and the feature that provides it."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            feature = FIELD_FEATURE.get(missing[0])
            hint = f" (declare Feature.{feature.name} in the loss's needs)" if feature else ""
            raise ValueError(f"LossInputs.{missing[0]} is required by this loss but was not provided{hint}")
        return [getattr(self, n) for n in names]

    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Completion token counts clamped to >= 1, so dividing by them never gives NaN."""
        c, r = self.require("chosen_tokens", "rejected_tokens")
        return c.to(self.policy_chosen_logps.dtype).clamp(min=1), r.to(self.policy_rejected_logps.dtype).clamp(min=1)

    def groups(self, reference_free: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(policy (B, K), ref (B, K), mask (B, K))`` of group inputs; pairs read as rankings of two (chosen first).

        The reference is zeros when ``reference_free``.
        """
        if self.policy_logps is None:
            policy = torch.stack([self.policy_chosen_logps, self.policy_rejected_logps], -1)
            ref = None if reference_free else torch.stack(self.require("ref_chosen_logps", "ref_rejected_logps"), -1)
            mask = torch.ones(policy.shape, dtype=torch.bool, device=policy.device)
        else:
            policy, mask = self.policy_logps, self.completion_mask
            ref = None if reference_free else self.require("ref_logps")[0]
        return policy, torch.zeros_like(policy) if ref is None else ref, mask


# Which feature fills each LossInputs field.
FIELD_FEATURE: dict[str, Feature] = {
    "policy_chosen_logps": Feature.POLICY_LOGPS, "policy_rejected_logps": Feature.POLICY_LOGPS,
    "chosen_tokens": Feature.LENGTHS, "rejected_tokens": Feature.LENGTHS,
    "ref_chosen_logps": Feature.REF_LOGPS, "ref_rejected_logps": Feature.REF_LOGPS,
    "chosen_kl": Feature.KL, "rejected_kl": Feature.KL,
    **{f.value: f for f in TOKEN_FEATURES},
    "policy_logps": Feature.POLICY_LOGPS, "ref_logps": Feature.REF_LOGPS, "completion_tokens": Feature.LENGTHS,
    "mismatched_logps": Feature.MISMATCHED_LOGPS, "ref_mismatched_logps": Feature.MISMATCHED_LOGPS,
}


def takes_of(loss: object) -> frozenset[str]:
    """The data kinds a loss (or a weighted combination: what every term takes) trains on."""
    terms = getattr(loss, "terms", None)
    if terms:
        return frozenset.intersection(*(takes_of(t) for _, t in terms))
    return frozenset(getattr(loss, "takes", frozenset({"pairs"})))


def needs_of(loss: object) -> frozenset[Feature]:
    """The features a loss (or a weighted combination) reads, whatever form it declares them in."""
    return as_needs(loss.needs)  # type: ignore[attr-defined]


@dataclass
class LossOutput:
    """A loss's result: the scalar to minimise, one loss per pair, and detached scalar metrics.

    ``counts``: for a metric that is a mean over only some of the batch's examples (KTO's desirable
    completions), how many. The logs then average it over those examples of every forward, step and
    process, as one process would, and leave it out of a row that has none (a ``.../margins`` beside
    counted ``.../chosen`` and ``.../rejected`` is logged as their difference); other metrics are
    averaged over all examples."""

    loss: torch.Tensor
    losses: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)


class Loss:
    """Base class of every preference loss, built-in or from a plugin.

    Subclasses set ``name``, ``Config`` (a :class:`LossConfig`), ``features`` (or
    the legacy ``reference``) and, beyond pairs, ``takes``; declare ``couples_pairs`` if the
    examples of a batch interact; and implement :meth:`forward`. ``DPO(beta=0.2)`` or
    ``DPO(DPO.Config(beta=0.2))`` both build one; call it on :class:`LossInputs`.
    """

    name: ClassVar[str]
    Config: ClassVar[type[LossConfig]] = LossConfig
    reference: ClassVar[Reference] = Reference.LOGPS
    features: ClassVar[frozenset[Feature] | None] = None  # None: the features ``reference`` implies
    examples: ClassVar[tuple[dict, ...]] = ()  # configs worth checking beside the default (kit, `prefopt losses`)
    reduction: ClassVar[str] = "mean"  # how ``loss`` reduces ``losses``: "mean", "sum", or a stated other
    sign_exempt: ClassVar[str | None] = None  # why descending need not favour chosen at the reference point
    takes: ClassVar[frozenset[str]] = frozenset({"pairs"})  # the data it trains on: of "pairs", "rankings", "labelled"
    # True when an example's loss depends on the other examples of its batch (a sort across the
    # batch, a batch-wide normaliser or reference point): the batch must then be computed whole,
    # and the kit checks that the loss ignores the order of the examples instead of checking them
    # one by one. Read it from the configured loss; a loss whose coupling depends on its config
    # overrides it with a property.
    couples_pairs: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("features") is not None:  # keep the v1 ``reference`` in step for code that reads it
            cls.reference = reference_for(as_needs(cls.features))

    def __init__(self, config: LossConfig | None = None, **kwargs: object) -> None:
        self.config = config if config is not None else self.Config(**kwargs)

    @property
    def needs(self) -> frozenset[Feature]:
        """The features this configured loss reads (override when they depend on the config)."""
        return as_needs(self.features) if self.features is not None else LEGACY_NEEDS[self.reference]

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


def ranking_metrics(rewards: torch.Tensor, inputs: LossInputs) -> dict[str, torch.Tensor]:
    """Metrics of ``rewards (B, K)`` over rankings (pairs read as rankings of two), as batch means of detached values.

    ``rewards/accuracies``: the fraction of ordered completion pairs (scores differ) the rewards order
    correctly; ``rewards/top1_accuracy``: the fraction of prompts whose highest reward is on a best-scored
    completion; ``rewards/chosen``, ``rewards/rejected``, ``logps/*``: the best and the worst completion.
    For pairs these equal :func:`reward_metrics`.
    """
    policy, _, mask = inputs.groups(reference_free=True)
    r = rewards.detach()
    k = r.shape[-1]
    scores = inputs.scores if inputs.scores is not None else -torch.arange(k, dtype=r.dtype, device=r.device).expand_as(r)
    ordered = mask[:, :, None] & mask[:, None, :] & (scores[:, :, None] > scores[:, None, :])
    correct = ordered & (r[:, :, None] > r[:, None, :])
    top = torch.where(mask, r, float("-inf")).argmax(-1, keepdim=True)
    top1 = scores.gather(-1, top).squeeze(-1) == scores[:, 0]
    last = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)
    best, worst = r[:, 0], r.gather(-1, last).squeeze(-1)
    return {
        "rewards/chosen": best.mean(),
        "rewards/rejected": worst.mean(),
        "rewards/margins": (best - worst).mean(),
        "rewards/accuracies": correct.sum() / ordered.sum().clamp(min=1),
        "rewards/top1_accuracy": top1.to(r.dtype).mean(),
        "logps/chosen": policy[:, 0].detach().mean(),
        "logps/rejected": policy.detach().gather(-1, last).squeeze(-1).mean(),
    }


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
