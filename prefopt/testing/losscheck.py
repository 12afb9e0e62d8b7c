"""Synthetic inputs holding exactly a loss's declared features, and the quick check run before training.

:func:`synthetic_inputs` builds :class:`LossInputs` from a small case: per-token values
cut into completions of varied lengths (a zero-length one included), whose sums are
the per-pair fields. Only the declared features are filled; the result records which
fields the loss reads, so a read of an undeclared one is reported by name.
:func:`smoke_test` is what ``prefopt validate`` and ``prefopt train`` run on each
configured loss, every case, before any model is loaded. :mod:`prefopt.testing` builds on both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from prefopt.errors import PrefoptError
from prefopt.losses.base import FIELD_FEATURE, Feature, LossInputs, LossOutput, Tokens, as_needs, takes_of


class LossCheckError(PrefoptError):
    """A configured loss failed on synthetic inputs; the message names the loss and its package."""


class TrackedInputs(LossInputs):
    """:class:`LossInputs` that remembers which fields were read (``reads``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "reads", None)
        super().__post_init__()
        object.__setattr__(self, "reads", set())

    def __getattribute__(self, name: str) -> Any:
        if name in FIELD_FEATURE:
            reads = object.__getattribute__(self, "reads")
            if reads is not None:
                reads.add(name)
        return object.__getattribute__(self, name)

    def missing(self) -> list[str]:
        """Fields the loss read that its declaration left ``None``."""
        return sorted(n for n in object.__getattribute__(self, "reads") if object.__getattribute__(self, n) is None)


@dataclass(frozen=True)
class Case:
    """Per-completion values, chosen completions of pairs ``0..B-1`` then rejected ones (``2B`` each).

    ``policy``, ``ref`` and ``kl`` are sums over the completion; ``entropy`` and ``logsumsq``
    are per-token levels. Per-token values vary along the completion around ``sum / length``.
    """

    lengths: tuple[int, ...]
    policy: tuple[float, ...]
    ref: tuple[float, ...]
    kl: tuple[float, ...]
    entropy: tuple[float, ...]
    logsumsq: tuple[float, ...]

    @property
    def num_pairs(self) -> int:
        return len(self.lengths) // 2

    def at_reference(self) -> "Case":
        """The same completions with the policy equal to the reference (zero KL)."""
        return Case(self.lengths, self.ref, self.ref, (0.0,) * len(self.kl), self.entropy, self.logsumsq)

    def perturbed(self, pair: int) -> "Case":
        """Every value of pair ``pair`` changed, its lengths too; the other pairs untouched."""
        b = self.num_pairs
        lengths = list(self.lengths)
        lengths[pair] += 2
        lengths[b + pair] += 1

        def shift(values: tuple[float, ...], dc: float, dr: float) -> tuple[float, ...]:
            out = list(values)
            out[pair] += dc
            out[b + pair] += dr
            return tuple(out)

        return Case(tuple(lengths), shift(self.policy, -1.5, 2.25), shift(self.ref, 0.75, -0.5), shift(self.kl, 0.5, 0.25),
                    shift(self.entropy, 0.3, -0.2), shift(self.logsumsq, -0.25, 0.15))


def _case(chosen: tuple, rejected: tuple, policy: tuple, ref: tuple, kl: tuple) -> Case:
    n = len(chosen)
    entropy = tuple(1.5 + 0.25 * (s % 5) for s in range(2 * n))
    logsumsq = tuple(-0.5 - 0.3 * (s % 4) for s in range(2 * n))
    return Case(chosen + rejected, policy, ref, kl, entropy, logsumsq)


CASES: dict[str, Case] = {
    "ordinary": _case(
        (6, 15, 3, 40), (7, 12, 5, 38),
        policy=(-12.0, -30.5, -7.25, -50.0, -14.0, -28.0, -9.5, -49.0),
        ref=(-13.0, -30.0, -8.0, -50.5, -13.5, -29.0, -9.0, -48.0),
        kl=(0.5, 1.25, 0.0, 3.0, 0.75, 1.0, 0.25, 2.5),
    ),
    "extreme log-ratio (+-1e4)": _case(
        (1, 1, 2000, 1), (1, 1, 1, 2000),
        policy=(-1e-6, -1e4, -1e4, -1e-6, -1e4, -1e-6, -1e4, -1e-6),
        ref=(-1e4, -1e-6, -1e-6, -1e4, -1e-6, -1e4, -1e-6, -1e4),
        kl=(0.0, 1e4, 0.0, 1e4, 1e4, 0.0, 1e4, 0.0),
    ),
    "zero-token completion": _case(
        (0, 0, 2), (0, 1, 0),
        policy=(0.0, 0.0, -3.0, 0.0, -2.0, 0.0),
        ref=(0.0, 0.0, -2.5, 0.0, -2.5, 0.0),
        kl=(0.0, 0.0, 0.1, 0.0, 0.1, 0.0),
    ),
}


def _spread(totals: tuple[float, ...], lengths: tuple[int, ...], mean: bool = False) -> torch.Tensor:
    """Flat per-token values: completion ``s`` gets ``totals[s]`` split unevenly over its tokens (sums exact up to rounding)."""
    parts = []
    for s, (total, n) in enumerate(zip(totals, lengths)):
        if n == 0:
            continue
        w = torch.tensor([1 + 0.5 * math.cos(1.3 * k + s) for k in range(n)], dtype=torch.float64)
        parts.append(total * w if mean else total * w / w.sum())
    return torch.cat(parts).float() if parts else torch.zeros(0)


@dataclass
class Synthetic:
    """Inputs of one case and the leaves gradients reach: per-token values of each quantity."""

    inputs: TrackedInputs
    leaves: dict[str, torch.Tensor]  # "policy", "ref", "kl", ... -> (N,) leaf
    lengths: tuple[int, ...]

    def per_completion(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``grad`` averaged per completion, ``(chosen (B,), rejected (B,))``: the derivative
        along raising the completion's summed log-prob by 1, spread evenly over its tokens."""
        return Tokens.from_lengths(grad, self.lengths).mean()


def synthetic_inputs(case: Case, needs: frozenset[Feature]) -> Synthetic:
    """Inputs with exactly the ``needs`` features of ``case``; per-pair sums are the token sums."""
    lengths = case.lengths
    b = case.num_pairs
    leaves: dict[str, torch.Tensor] = {}

    def tokens(key: str, totals: tuple[float, ...], mean: bool = False) -> Tokens:
        if key not in leaves:
            leaves[key] = _spread(totals, lengths, mean).requires_grad_(True)
        return Tokens.from_lengths(leaves[key], lengths)

    fields: dict[str, Any] = {}
    fields["policy_chosen_logps"], fields["policy_rejected_logps"] = tokens("policy", case.policy).sum()
    if Feature.LENGTHS in needs:
        n = torch.tensor(lengths, dtype=torch.long)
        fields["chosen_tokens"], fields["rejected_tokens"] = n[:b], n[b:]
    if Feature.REF_LOGPS in needs:
        fields["ref_chosen_logps"], fields["ref_rejected_logps"] = tokens("ref", case.ref).sum()
    if Feature.KL in needs:
        fields["chosen_kl"], fields["rejected_kl"] = tokens("kl", case.kl).sum()
    per_token = {
        Feature.POLICY_TOKEN_LOGPS: ("policy", case.policy, False),
        Feature.REF_TOKEN_LOGPS: ("ref", case.ref, False),
        Feature.TOKEN_KL: ("kl", case.kl, False),
        Feature.TOKEN_ENTROPY: ("entropy", case.entropy, True),
        Feature.TOKEN_LOGSUMSQ: ("logsumsq", case.logsumsq, True),
    }
    for feature, (key, totals, mean) in per_token.items():
        if feature in needs:
            fields[feature.value] = tokens(key, totals, mean)
    return Synthetic(TrackedInputs(**fields), leaves, lengths)


@dataclass(frozen=True)
class GroupCase:
    """``B`` prompts with up to ``K`` completions: per-completion sums, rows padded after their last completion."""

    counts: tuple[int, ...]  # completions per prompt
    policy: tuple[tuple[float, ...], ...]  # (B, K)
    ref: tuple[tuple[float, ...], ...]
    tokens: tuple[tuple[int, ...], ...]
    scores: tuple[tuple[float, ...], ...] | None = None  # rankings, best first
    labels: tuple[tuple[bool, ...], ...] | None = None  # labelled completions
    mismatched: tuple[float, ...] = ()
    ref_mismatched: tuple[float, ...] = ()

    @property
    def num_pairs(self) -> int:
        return len(self.counts)

    def at_reference(self) -> "GroupCase":
        return GroupCase(self.counts, self.ref, self.ref, self.tokens, self.scores, self.labels, self.ref_mismatched, self.ref_mismatched)

    def perturbed(self, b: int) -> "GroupCase":
        """Every value of prompt ``b`` changed; the others untouched."""
        bump = lambda rows, d: tuple(tuple(v + d for v in r) if i == b else r for i, r in enumerate(rows))  # noqa: E731
        one = lambda xs, d: tuple(v + d if i == b else v for i, v in enumerate(xs))  # noqa: E731
        return GroupCase(self.counts, bump(self.policy, -1.25), bump(self.ref, 0.5), self.tokens, self.scores, self.labels,
                         one(self.mismatched, 0.75), one(self.ref_mismatched, -0.25))


_POLICY = ((-12.0, -14.0, -9.5, -20.0), (-30.5, -28.0, 0.0, 0.0), (-7.25, -9.5, -8.0, 0.0))
_REF = ((-13.0, -13.5, -9.0, -19.0), (-30.0, -29.0, 0.0, 0.0), (-8.0, -9.0, -8.5, 0.0))
_TOKENS = ((6, 7, 3, 9), (15, 12, 0, 0), (3, 5, 4, 0))
GROUP_CASES: dict[str, dict[str, GroupCase]] = {
    "rankings": {
        "ragged K (4, 2, 3)": GroupCase((4, 2, 3), _POLICY, _REF, _TOKENS,
                                        scores=((4.0, 3.0, 3.0, 1.0), (2.0, 1.0, 0.0, 0.0), (9.0, 5.0, 1.0, 0.0))),
        "extreme log-ratio (+-1e4)": GroupCase((3, 2), ((-1e-6, -1e4, -1e4), (-1e4, -1e-6, 0.0)), ((-1e4, -1e-6, -1e-6), (-1e-6, -1e4, 0.0)),
                                               ((1, 2000, 1), (2, 1, 0)), scores=((3.0, 2.0, 1.0), (1.0, 0.0, 0.0))),
    },
    "labelled": {
        "one completion each": GroupCase((1,) * 4, ((-12.0,), (-30.5,), (-7.25,), (-50.0,)), ((-13.0,), (-30.0,), (-8.0,), (-50.5,)),
                                         ((6,), (15,), (3,), (40,)), labels=((True,), (False,), (True,), (False,)),
                                         mismatched=(-20.0, -25.0, -31.0, -9.0), ref_mismatched=(-21.0, -24.0, -30.5, -9.5)),
        "extreme log-ratio (+-1e4)": GroupCase((1, 1), ((-1e-6,), (-1e4,)), ((-1e4,), (-1e-6,)), ((1,), (2000,)),
                                               labels=((False,), (True,)), mismatched=(-1e4, -1e-6), ref_mismatched=(-1e-6, -1e4)),
    },
}


@dataclass
class GroupSynthetic:
    """Group inputs of one case and the ``(B, K)`` (or ``(B,)``) leaves gradients reach."""

    inputs: TrackedInputs
    leaves: dict[str, torch.Tensor]


def synthetic_group_inputs(case: GroupCase, needs: frozenset[Feature]) -> GroupSynthetic:
    """Group inputs with exactly the ``needs`` features of ``case``."""
    leaf = lambda rows: torch.tensor(rows, dtype=torch.float32).requires_grad_(True)  # noqa: E731
    leaves = {"policy": leaf(case.policy)}
    k = leaves["policy"].shape[1]
    mask = torch.arange(k)[None, :] < torch.tensor(case.counts)[:, None]
    fields: dict[str, Any] = {"policy_logps": leaves["policy"], "completion_mask": mask}
    if case.scores is not None:
        fields["scores"] = torch.tensor(case.scores)
    if case.labels is not None:
        fields["labels"] = torch.tensor(case.labels)
    if Feature.LENGTHS in needs:
        fields["completion_tokens"] = torch.tensor(case.tokens)
    if Feature.REF_LOGPS in needs:
        fields["ref_logps"] = leaves["ref"] = leaf(case.ref)
    if Feature.MISMATCHED_LOGPS in needs:
        fields["mismatched_logps"] = torch.tensor(case.mismatched)  # computed without gradient, as TRL does
        fields["ref_mismatched_logps"] = torch.tensor(case.ref_mismatched)
    return GroupSynthetic(TrackedInputs(**fields), leaves)


def run_on_groups(loss: Any, case: GroupCase, needs: frozenset[Feature]) -> tuple[GroupSynthetic, LossOutput]:
    """Run ``loss`` on group ``case``; a failure raises ``AssertionError`` naming undeclared inputs it read."""
    return _call(loss, synthetic_group_inputs(case, needs), case.num_pairs, "per-example")


def _call(loss: Any, syn: Any, b: int, what: str) -> tuple[Any, LossOutput]:
    try:
        out = loss(syn.inputs)
    except Exception as exc:  # noqa: BLE001 - any failure here is the loss's
        raise AssertionError(f"{type(exc).__name__}: {exc}{missing_hint(syn.inputs)}") from None
    _check_output(out, b, what)
    return syn, out


def _check_output(out: Any, b: int, what: str = "per-pair") -> None:
    if not isinstance(out, LossOutput):
        raise AssertionError(f"must return a LossOutput, got {type(out).__name__}")
    if not (isinstance(out.losses, torch.Tensor) and tuple(out.losses.shape) == (b,)):
        raise AssertionError(f"{what} losses must have shape ({b},), got {shape(out.losses)}")
    if not (isinstance(out.loss, torch.Tensor) and out.loss.ndim == 0):
        raise AssertionError(f"loss must be a scalar tensor, got {shape(out.loss)}")
    if not (bool(torch.isfinite(out.loss)) and bool(torch.isfinite(out.losses).all())):
        raise AssertionError(f"non-finite loss: {what} losses {out.losses.tolist()}")


def missing_hint(inputs: TrackedInputs) -> str:
    """`` (it read LossInputs.x, ...)`` naming undeclared fields the loss read, or ``""``."""
    missing = inputs.missing()
    if not missing:
        return ""
    feats = sorted({FIELD_FEATURE[n].name for n in missing})
    return (f" (it read LossInputs.{', LossInputs.'.join(missing)}, which its needs do not declare: "
            f"add Feature.{', Feature.'.join(feats)} to its features)")


def run_on(loss: Any, case: Case, needs: frozenset[Feature]) -> tuple[Synthetic, LossOutput]:
    """Run ``loss`` on ``case``; a failure raises ``AssertionError`` naming undeclared inputs it read."""
    return _call(loss, synthetic_inputs(case, needs), case.num_pairs, "per-pair")


def shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _package(loss: Any) -> str:
    from prefopt.plugins.registry import get_registry

    entry = get_registry().losses.get(getattr(loss, "name", ""))
    if entry is not None and entry.cls is type(loss):
        return f"{entry.dist} {entry.version}"
    return type(loss).__module__.split(".")[0]


def smoke_test(loss: Any) -> None:
    """Run each term of a configured loss on every case of :data:`CASES` (ordinary inputs, extreme log-ratios,
    an empty completion), inputs holding exactly its declared features, forward and backward.

    Raises :class:`LossCheckError` naming the loss, its package and the case when the loss reads
    an input it did not declare, returns wrong shapes, non-finite values or a loss without a
    gradient, gives non-finite gradients, or fails.
    """
    terms = [term for _, term in loss.terms] if hasattr(loss, "terms") else [loss]
    for term in terms:
        where = f"loss {term.name!r} ({_package(term)})"
        try:
            needs = as_needs(term.needs)
        except (TypeError, ValueError) as exc:
            raise LossCheckError(f"{where}: invalid needs: {exc}") from None
        if "pairs" in takes_of(term):
            kind, cases, run = "pairs", CASES, run_on
        else:
            kind = "rankings" if "rankings" in takes_of(term) else "labelled"
            cases, run = GROUP_CASES[kind], run_on_groups
        for name, case in cases.items():
            try:
                _forward_backward(*run(term, case, needs))
            except AssertionError as exc:
                raise LossCheckError(f"{where} failed on synthetic inputs, case {name!r}{'' if kind == 'pairs' else ' on ' + kind}: {exc}") from None


def _forward_backward(syn: Any, out: Any) -> None:
    """The loss has a gradient, and backward gives finite gradients of every input."""
    if not out.loss.requires_grad:
        raise AssertionError("the loss has no gradient (it does not depend on the policy log-probs, or was detached)")
    try:
        out.loss.backward()
    except Exception as exc:  # noqa: BLE001 - any failure here is the loss's
        raise AssertionError(f"backward failed: {type(exc).__name__}: {exc}") from None
    for key, leaf in syn.leaves.items():
        if leaf.grad is not None and not bool(torch.isfinite(leaf.grad).all()):
            raise AssertionError(f"non-finite gradient of the {key} inputs")


def needs_by_config(cls: type) -> tuple[list[tuple[dict, frozenset[Feature]]], bool]:
    """``([(config, needs)], depends)``: the needs of the default config (when valid) and of each of
    ``cls.examples``, and whether the class computes its needs from the config (overrides ``needs``)."""
    from prefopt.losses.base import Loss

    depends = getattr(cls, "needs", None) is not Loss.needs
    if not depends:  # declared on the class: the same for every config
        try:
            return [({}, as_needs(Loss.needs.fget(cls.__new__(cls))))], False
        except (TypeError, ValueError, KeyError):  # an invalid declaration: listed without needs
            return [], False
    rows = []
    for example in (None, *cls.examples):
        try:
            loss = cls(cls.Config(**(example or {})))
            rows.append((dict(example or {}), as_needs(loss.needs)))
        except Exception:  # noqa: BLE001 - an invalid default (a required field) is simply not shown
            continue
    return rows, True
