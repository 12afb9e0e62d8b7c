"""TRL's own ``DPOTrainer`` loss on given log-probs, for parity tests of losses that carry TRL's names.

:func:`trl_loss` evaluates ``DPOTrainer._compute_loss`` of the installed TRL (1.16) for any
``loss_type`` and ``f_divergence_type`` on per-sequence log-probs and completion lengths;
:func:`assert_matches_trl` compares a prefopt loss with it on :func:`trl_inputs`, losses
and gradients; :func:`trl_dpo_loss` evaluates ``sigmoid`` on per-token values (WPO, LD-DPO). All
run TRL's code itself, with its model replaced by an object returning the given log-probs
and its trainer by the attributes that method reads; nothing of the loss math is copied.
TRL is imported when called (``pytest.importorskip("trl")`` in tests that use them).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import textwrap
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from prefopt.losses.base import LossInputs, Tokens

# TRL 1.16's DPOConfig.loss_type values.
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The loss types DPOTrainer.__init__ accepts with another f_divergence_type than reverse_kl.
F_DIVERGENCE_LOSS_TYPES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
# Loss types whose per-sequence losses TRL computes across the batch: no loss per pair.
COUPLED_LOSS_TYPES = frozenset({"aot", "aot_unpaired", "sft"})
_SETTINGS = {"beta": 0.1, "label_smoothing": 0.0, "discopop_tau": 0.05, "f_divergence_type": "reverse_kl",
             "f_alpha_divergence_coef": 0.5}


@dataclass
class TRLLoss:
    """TRL's batch loss, and each pair's loss computed alone (``None`` for a coupled loss type)."""

    loss: torch.Tensor
    losses: torch.Tensor | None


def trl_loss(inputs: LossInputs, loss_type: str = "sigmoid", *, per_pair: bool = True, **settings: Any) -> TRLLoss:
    """TRL 1.16's ``DPOTrainer`` loss for ``loss_type`` on ``inputs``, differentiable in its tensors.

    ``inputs`` needs the policy and reference log-probs and ``chosen_tokens`` /
    ``rejected_tokens``; ``settings`` are DPOConfig's ``beta``, ``label_smoothing``,
    ``discopop_tau``, ``f_divergence_type`` and ``f_alpha_divergence_coef``. Computed in the
    inputs' dtype: in float64 TRL's ``alpha_divergence``, which only knows 16- and 32-bit
    floats, runs with ``torch.float64`` added to its clamp table (see :func:`_compute_loss`).
    ``per_pair`` also evaluates each pair alone, as a batch of one.
    """
    unknown = set(settings) - set(_SETTINGS)
    if unknown or loss_type not in TRL_LOSS_TYPES:
        raise TypeError(f"trl_loss: unknown loss type {loss_type!r} or settings {sorted(unknown)}; "
                        f"loss types: {', '.join(TRL_LOSS_TYPES)}; settings: {', '.join(_SETTINGS)}")
    settings = {**_SETTINGS, **settings}
    if settings["f_divergence_type"] != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(f"TRL refuses f_divergence_type={settings['f_divergence_type']!r} with loss_type={loss_type!r}")
    fields = inputs.require("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                            "chosen_tokens", "rejected_tokens")
    loss = _sequence_loss(*fields, loss_type=loss_type, settings=settings)
    if not per_pair or loss_type in COUPLED_LOSS_TYPES:
        return TRLLoss(loss, None)
    pairs = [_sequence_loss(*(f[i : i + 1] for f in fields), loss_type=loss_type, settings=settings) for i in range(len(fields[0]))]
    return TRLLoss(loss, torch.stack(pairs))


def trl_inputs(num_pairs: int = 8, *, seed: int = 0, extreme: bool = True) -> LossInputs:
    """Random float64 inputs for :func:`assert_matches_trl`: varied lengths, an empty chosen and an
    empty rejected completion, and (``extreme``) log-ratios of +-1e4 and +-60 on a third of the pairs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (2, num_pairs), generator=g)
    lengths[0, 0] = lengths[1, 1] = 0
    ref = -lengths * torch.rand(2, num_pairs, generator=g, dtype=torch.float64) * 3
    ratio = torch.randn(2, num_pairs, generator=g, dtype=torch.float64) * 4
    if extreme:
        big = torch.tensor([1e4, -1e4, 60.0, -60.0], dtype=torch.float64)
        picks = torch.randint(0, 4, (2, num_pairs), generator=g)
        ratio = torch.where(torch.arange(num_pairs) % 3 == 2, big[picks], ratio)
    policy = torch.where(lengths > 0, ref + ratio, torch.zeros_like(ref))  # an empty completion has log-prob 0
    return LossInputs(policy_chosen_logps=policy[0], policy_rejected_logps=policy[1], ref_chosen_logps=ref[0],
                      ref_rejected_logps=ref[1], chosen_tokens=lengths[0], rejected_tokens=lengths[1])


_LOGPS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def assert_matches_trl(loss: Callable[[LossInputs], Any], loss_type: str, inputs: LossInputs | None = None, *,
                       tol: float = 1e-9, **settings: Any) -> int:
    """Check a prefopt loss against TRL's ``loss_type`` (with DPOConfig ``settings``); return the pairs compared.

    On ``inputs`` (default :func:`trl_inputs`), the loss, each pair's loss and the gradients
    with respect to every log-prob must equal TRL's within ``tol`` (relative and absolute)
    wherever TRL's value is finite; where it is not (TRL overflows), ours must still be finite.
    A coupled loss type (``aot``, ``aot_unpaired``, ``sft``) is compared on the batch.
    """
    inputs = inputs if inputs is not None else trl_inputs()
    leaves = {k: getattr(inputs, k).detach().clone().requires_grad_() for k in _LOGPS}
    lengths = {"chosen_tokens": inputs.chosen_tokens, "rejected_tokens": inputs.rejected_tokens}
    ours = loss(LossInputs(**leaves, **lengths))
    theirs = trl_loss(LossInputs(**leaves, **lengths), loss_type, **settings)
    where = f"{loss!r} vs TRL's {loss_type!r} with {settings}"
    if not bool(torch.isfinite(ours.losses).all()):
        raise AssertionError(f"{where}: non-finite losses {ours.losses.tolist()}")
    if theirs.losses is None:
        if not bool(torch.isfinite(theirs.loss)):
            return 0
        _close(ours.loss, theirs.loss, tol, f"{where}: loss")
        mine, trl = ours.loss, theirs.loss
        compared = len(ours.losses)
    else:
        finite = torch.isfinite(theirs.losses)
        _close(ours.losses[finite], theirs.losses[finite], tol, f"{where}: per-pair losses")
        if bool(finite.all()):
            _close(ours.loss, theirs.loss, tol, f"{where}: loss")
        mine, trl = ours.losses[finite].sum(), theirs.losses[finite].sum()  # pairs are independent: per-pair gradients
        compared = int(finite.sum())
    grads = torch.autograd.grad(mine, list(leaves.values()), allow_unused=True, retain_graph=True)
    trl_grads = torch.autograd.grad(trl, list(leaves.values()), allow_unused=True)
    for key, g, t in zip(leaves, grads, trl_grads):
        zero = torch.zeros_like(leaves[key])
        g, t = zero if g is None else g, zero if t is None else t
        if not bool(torch.isfinite(g).all()):
            raise AssertionError(f"{where}: non-finite gradient with respect to {key}: {g.tolist()}")
        finite = torch.isfinite(t)  # TRL's backward can give inf * 0 where its loss is finite
        _close(g[finite], t[finite], tol, f"{where}: gradient with respect to {key}")
    return compared


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    try:
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)
    except AssertionError as exc:
        raise AssertionError(f"{what} differ: {exc}") from None


def _sequence_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, nc: torch.Tensor,
                   nr: torch.Tensor, *, loss_type: str, settings: dict[str, Any]) -> torch.Tensor:
    """One call of TRL's loss: each completion's log-prob sits at its first position, the reference is precomputed."""
    logps = torch.cat([pc, pr])
    lengths = torch.cat([nc, nr]).long()
    rows, width = len(logps), max(int(lengths.max()), 1)
    mask = (torch.arange(width) < lengths[:, None]).long()
    completion_mask = torch.cat([torch.zeros(rows, 1, dtype=torch.long), mask], dim=1)  # a one-token prompt first
    per_token = torch.cat([logps[:, None], logps.new_zeros(rows, width - 1)], dim=1)  # TRL sums every position
    model = _Head(per_token)
    trainer = _trainer(model, None, loss_types=[loss_type], precompute_ref_logps=True, **settings)
    batch = _batch(completion_mask, ref_chosen_logps=rc, ref_rejected_logps=rr)
    with _default_dtype(logps.dtype):
        return _compute_loss(logps.dtype)(trainer, model, batch, False)


def trl_dpo_loss(policy: Tokens, ref: Tokens, beta: float, *, logsumsq: Tokens | None = None,
                 ld_alpha: float | None = None) -> torch.Tensor:
    """TRL's own ``DPOTrainer`` loss (``loss_type="sigmoid"``) on these per-token log-probs, for parity tests.

    Runs TRL's loss computation with the per-token outputs of its model replaced by
    ``policy`` (differentiable), ``ref`` and ``logsumsq`` (which turns on TRL's
    ``use_weighting``, WPO); ``ld_alpha`` is TRL's LD-DPO option. Each completion sits
    after a one-token prompt, so positions line up as in a real batch. Requires ``trl``.
    """
    values, mask = policy.padded()
    completion_mask = torch.cat([torch.zeros(len(values), 1, dtype=torch.long), mask.long()], dim=1)  # prompt token first
    model = _Head(values, logsumsq.padded()[0] if logsumsq is not None else None)
    trainer = _trainer(model, _Head(ref.padded()[0].detach()), loss_types=["sigmoid"], beta=beta, ld_alpha=ld_alpha,
                       use_weighting=logsumsq is not None)
    with _default_dtype(values.dtype):
        return _compute_loss(values.dtype)(trainer, model, _batch(completion_mask), False)


class _Head(torch.nn.Module):
    """Stands in for a model called with ``fused_lm_head=True``: returns the given per-token log-probs."""

    is_gradient_checkpointing = False

    def __init__(self, logps: torch.Tensor, logsumsq: torch.Tensor | None = None) -> None:
        super().__init__()
        self.logps, self.logsumsq = logps, logsumsq

    def forward(self, **_: Any) -> SimpleNamespace:
        zeros = torch.zeros_like(self.logps.detach())
        return SimpleNamespace(log_probs=self.logps, log_sum_sq_probs=self.logsumsq if self.logsumsq is not None else zeros,
                               entropy=zeros, mean_logits=zeros, is_top1=torch.zeros(zeros.shape, dtype=torch.bool), aux_loss=None)


def _trainer(model: _Head, ref_model: _Head | None, **settings: Any) -> SimpleNamespace:
    """The attributes of a DPOTrainer that ``_compute_loss`` reads, for one process."""
    identity = lambda x: x  # noqa: E731 - one process: gathering is the identity
    defaults = {**_SETTINGS, "ld_alpha": None, "use_weighting": False, "precompute_ref_logps": False}
    settings = {**defaults, **settings}
    return SimpleNamespace(
        model=model, ref_model=ref_model, accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=settings.pop("discopop_tau")),
        aux_loss_enabled=False, loss_weights=[1.0], _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        **settings,
    )


def _batch(completion_mask: torch.Tensor, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    ones = torch.ones(completion_mask.shape, dtype=torch.long)
    return {"input_ids": ones, "attention_mask": ones, "completion_mask": completion_mask, **extra}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Constants TRL builds with ``torch.tensor(x)`` (EXO's epsilon) take the inputs' precision."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype in (torch.float32, torch.float64) else previous)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# TRL 1.16 computes alpha_divergence's exp() in float32 and looks the clamp up in a table
# without float64 (a KeyError). For float64 inputs, these two edits alone let it run in float64.
_FLOAT64_EDITS = (
    ("torch.float32: 80.0}", "torch.float32: 80.0, torch.float64: 80.0}"),
    ("t_chosen_float = torch.clamp(t_chosen.float(),", "t_chosen_float = torch.clamp(t_chosen.double(),"),
    ("t_rejected_float = torch.clamp(t_rejected.float(),", "t_rejected_float = torch.clamp(t_rejected.double(),"),
)


def _compute_loss(dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """TRL's ``DPOTrainer._compute_loss``; for float64, its source with ``_FLOAT64_EDITS`` applied."""
    from trl.trainer.dpo_trainer import DPOTrainer

    return _compute_loss_float64() if dtype == torch.float64 else DPOTrainer._compute_loss


@functools.cache
def _compute_loss_float64() -> Callable[..., torch.Tensor]:
    from trl.trainer import dpo_trainer

    source = textwrap.dedent(inspect.getsource(dpo_trainer.DPOTrainer._compute_loss))
    for old, new in _FLOAT64_EDITS:
        if source.count(old) != 1:
            raise RuntimeError(f"TRL's DPOTrainer._compute_loss no longer contains {old!r}; this helper knows TRL 1.16")
        source = source.replace(old, new)
    namespace = dict(vars(dpo_trainer))  # the module's globals, copied: TRL itself is left unchanged
    exec(compile(source, dpo_trainer.__file__, "exec"), namespace)  # noqa: S102 - TRL's own source, two literals edited
    return namespace["_compute_loss"]


def trl_kto_loss(policy: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, mismatched: torch.Tensor,
                 ref_mismatched: torch.Tensor, beta: float = 0.1, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's own ``KTOTrainer`` loss (``loss_type="kto"``) on these summed log-probs, one completion per example,
    and the metrics it logs. ``policy`` may require grad; the reference values are TRL's precomputed ones
    (``ref_logps``, ``ref_KL_logps``); ``mismatched`` are the policy's ``KL_logps``. Requires ``trl``."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.kto_trainer import KTOTrainer

    n = policy.shape[0]
    zeros = torch.zeros(n, 1, dtype=policy.dtype)
    model = lambda **_: SimpleNamespace(log_probs=policy[:, None], entropy=zeros, mean_logits=zeros)  # noqa: E731
    identity = lambda x: x  # noqa: E731 - one process: gathering is the identity
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity),
        calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=beta, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1, _compute_kl_logps=lambda model, batch: mismatched,
    )
    inputs = {"input_ids": torch.ones(n, 2, dtype=torch.long), "attention_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_mask": torch.tensor([[0, 1]] * n), "label": labels.to(torch.bool), "ref_logps": ref, "ref_KL_logps": ref_mismatched}
    loss = KTOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}
