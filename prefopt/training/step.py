"""One forward through the loss plugin, one optimiser step, and evaluation.

The engine computes exactly the features the loss declares (see
:class:`prefopt.losses.base.Feature`) and hands them over in the batch's own token
layout. :func:`forward_backward` and :func:`read_flags` are the hot path: they queue the
forwards, backwards and clipping of one optimiser step and read one small flag tensor back
to the host.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from prefopt.data.batching import forward_plans, global_batch, pair_tokens, to_device
from prefopt.data.examples import Group
from prefopt.data.groups import grid_sums, group_tokens, to_grid
from prefopt.losses.base import Feature, LossInputs, LossOutput, Tokens
from prefopt.training import distributed
from prefopt.training.run import Run


@dataclass(frozen=True)
class Plan:
    """What the model must compute for a set of declared features."""

    reference: str  # "none", "logps" or "kl" (live reference only)
    stats: bool  # entropy and log-sum-of-squares of the policy

    @classmethod
    def of(cls, needs: frozenset[Feature], mode: str) -> "Plan":
        """A live reference always gives its log-probs: the ``logratios/*`` metrics read them whatever the loss reads."""
        if mode != "live":
            ref = "none"
        else:
            ref = "kl" if needs & {Feature.KL, Feature.TOKEN_KL} else "logps"
        return cls(ref, bool(needs & {Feature.TOKEN_ENTROPY, Feature.TOKEN_LOGSUMSQ}))


def loss_inputs(out: dict[str, torch.Tensor], batch: dict[str, Any], needs: frozenset[Feature]) -> LossInputs:
    """The declared features of one batch, from the model's flat outputs and the batch's cached reference
    (``ref_tokens``, ``ref_sums`` or ``ref_grid``, see :meth:`prefopt.training.run.Run.make_batch`)."""
    if "group_flat" in batch:
        return group_inputs(out, batch, needs)

    def tokens(values: torch.Tensor) -> Tokens:
        return Tokens(values, batch["token_seq"], batch["token_position"], batch["completion_lengths"], batch["cu_completion"])

    policy = tokens(out["logps"])
    pc, pr = policy.sum()
    inputs = LossInputs(pc, pr)
    if Feature.LENGTHS in needs:
        n = batch["completion_lengths"]
        inputs.chosen_tokens, inputs.rejected_tokens = n[: policy.num_pairs], n[policy.num_pairs :]
    if Feature.POLICY_TOKEN_LOGPS in needs:
        inputs.policy_token_logps = policy
    ref = out.get("ref_logps", batch.get("ref_tokens"))
    ref = tokens(ref) if ref is not None else None
    if Feature.REF_LOGPS in needs:
        if ref is not None:
            inputs.ref_chosen_logps, inputs.ref_rejected_logps = ref.sum()
        elif "ref_sums" in batch:
            inputs.ref_chosen_logps, inputs.ref_rejected_logps = batch["ref_sums"][:, 0], batch["ref_sums"][:, 1]
    if Feature.REF_TOKEN_LOGPS in needs:
        inputs.ref_token_logps = ref
    if "kl" in out:
        kl = tokens(out["kl"])
        if Feature.KL in needs:
            inputs.chosen_kl, inputs.rejected_kl = kl.sum()
        if Feature.TOKEN_KL in needs:
            inputs.token_kl = kl
    if Feature.TOKEN_ENTROPY in needs:
        inputs.token_entropy = tokens(out["entropy"])
    if Feature.TOKEN_LOGSUMSQ in needs:
        inputs.token_logsumsq = tokens(out["logsumsq"])
    return inputs


def group_inputs(out: dict[str, torch.Tensor], batch: dict[str, Any], needs: frozenset[Feature]) -> LossInputs:
    """The group fields of a batch of groups: per-completion sums scattered into ``(B, K)`` (the mismatched
    completion, in the grid's last column, detached: its log-ratio only sets KTO's reference point)."""
    mask = batch["completion_mask"]
    k = mask.shape[1]
    policy = grid_sums(out["logps"], batch)
    inputs = LossInputs(policy_logps=policy[:, :k], completion_mask=mask, scores=batch["scores"], labels=batch["labels"])
    if Feature.LENGTHS in needs:
        inputs.completion_tokens = to_grid(batch["completion_lengths"].float(), batch["group_flat"], batch["group_shape"])[:, :k]
    ref = group_reference(out, batch)
    if ref is not None and needs & {Feature.REF_LOGPS, Feature.MISMATCHED_LOGPS}:
        inputs.ref_logps = ref[:, :k]
    if Feature.MISMATCHED_LOGPS in needs and batch["has_mismatched"]:
        inputs.mismatched_logps, inputs.ref_mismatched_logps = policy[:, -1].detach(), ref[:, -1]
    return inputs


def gather_mismatched(acc: Any, inputs: LossInputs, counts: Sequence[int]) -> None:
    """Replace the mismatched log-probs of this process's forward by those of forward ``i`` on every process, in
    process order (``counts``: each process's examples in it, known on the host): a reference point over the whole
    global batch, as one process computes it. Every process runs the same number of training forwards, so each
    takes part in every gather; values are detached (no gradient crosses processes)."""
    policy, ref = inputs.mismatched_logps, inputs.ref_mismatched_logps
    local = torch.stack([policy.detach().double(), ref.detach().to(policy.device).double()], -1)  # exact for either dtype
    width = max(counts)
    padded = torch.cat([local, local.new_zeros(width - local.shape[0], 2)])  # all_gather takes equal shapes
    every = acc.gather(padded).view(len(counts), width, 2)
    gathered = torch.cat([every[r, :n] for r, n in enumerate(counts)])  # host-known sizes: no read back
    inputs.mismatched_logps, inputs.ref_mismatched_logps = gathered[:, 0].to(policy.dtype), gathered[:, 1].to(ref.dtype)


def example_weight(example: Any) -> int:
    """What an example counts for when a step's forwards are weighted: one pair or ranking, or the labelled
    completions it holds (a loss over labelled completions averages over completions, as TRL's KTO)."""
    return len(example.completions) if isinstance(example, Group) and example.labels is not None else 1


def example_tokens(example: Any, shared: bool, mismatched: bool) -> int:
    """Tokens an example (pair or group) puts in a packed forward."""
    return group_tokens(example, shared, mismatched) if isinstance(example, Group) else pair_tokens(example, shared)


def reference_sums(out: dict[str, torch.Tensor], batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Summed reference log-probs ``(chosen (B,), rejected (B,))`` of a batch: from the live reference's
    forward or the cache; ``None`` when the run has no reference."""
    if "ref_logps" in out:
        tokens = Tokens(out["ref_logps"], batch["token_seq"], batch["token_position"], batch["completion_lengths"], batch["cu_completion"])
        return tokens.sum()
    if "ref_sums" in batch:
        return batch["ref_sums"][:, 0], batch["ref_sums"][:, 1]
    return None


def group_reference(out: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor | None:
    """The ``(B, W)`` grid of summed reference log-probs of a group batch (live or cached); ``None`` without a reference."""
    return grid_sums(out["ref_logps"], batch) if "ref_logps" in out else batch.get("ref_grid")


Metrics = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]  # values, and counts of those over some examples


def group_logratio_metrics(policy: torch.Tensor, ref: torch.Tensor, batch: dict[str, Any]) -> Metrics:
    """``logratios/*`` of groups, from the per-completion grids alone (as :func:`logratio_metrics` for pairs), and the
    counts of those that average only some completions (:class:`prefopt.losses.base.LossOutput` ``counts``).

    Rankings (best first): ``best``, ``worst`` (the lowest-ranked completion), ``margins`` (best minus worst) and
    ``accuracies`` (fraction of rankings whose margin is > 0), means over the batch's rankings. Labelled
    completions: ``desirable`` and ``undesirable``, means over those completions (0 where there are none), counted.
    """
    mask = batch["completion_mask"]
    k = mask.shape[1]
    ratio = policy[:, :k].detach().float() - ref[:, :k].float()
    if batch["labels"] is not None:
        labels = batch["labels"]

        def mean(where: torch.Tensor) -> torch.Tensor:
            return torch.where(where, ratio, 0.0).sum() / where.sum().clamp(min=1)

        desirable, undesirable = mask & labels, mask & ~labels
        return ({"logratios/desirable": mean(desirable), "logratios/undesirable": mean(undesirable)},
                {"logratios/desirable": desirable.sum(), "logratios/undesirable": undesirable.sum()})
    last = (mask.sum(-1, keepdim=True) - 1).clamp(min=0)  # valid slots come first
    best, worst = ratio[:, 0], ratio.gather(-1, last).squeeze(-1)
    margins = best - worst
    return {"logratios/best": best.mean(), "logratios/worst": worst.mean(),
            "logratios/margins": margins.mean(), "logratios/accuracies": (margins > 0).float().mean()}, {}


def logratio_metrics(policy: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``logratios/*``: each completion's summed log-prob under the policy minus under the reference, batch means.

    From the log-probs alone, whatever the loss computes, so a loss cannot report its own success.
    """
    chosen = policy[0].detach().float() - ref[0].float()
    rejected = policy[1].detach().float() - ref[1].float()
    margins = chosen - rejected
    return {"logratios/chosen": chosen.mean(), "logratios/rejected": rejected.mean(),
            "logratios/margins": margins.mean(), "logratios/accuracies": (margins > 0).float().mean()}


def model_inputs(run: Run, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[LossInputs, Metrics]:
    """One forward of a batch: the loss's inputs and the engine's ``logratios/*`` metrics (computed before the
    loss runs: new tensors, so nothing the loss does to its inputs changes them)."""
    batch = to_device(batch, run.accelerator.device)
    plan = Plan.of(run.needs, run.mode)
    with run.accelerator.autocast():
        out = model(batch, reference=plan.reference, stats=plan.stats)
    inputs = loss_inputs(out, batch, run.needs)
    if "group_flat" in batch:
        ref = inputs.ref_logps if inputs.ref_logps is not None else group_reference(out, batch)
        engine = group_logratio_metrics(inputs.policy_logps, ref, batch) if ref is not None else ({}, {})
    else:
        # the loss's own reference sums where it asked for them, so a live reference is not summed twice
        ref = (inputs.ref_chosen_logps, inputs.ref_rejected_logps) if inputs.ref_chosen_logps is not None else reference_sums(out, batch)
        engine = (logratio_metrics((inputs.policy_chosen_logps, inputs.policy_rejected_logps), ref) if ref is not None else {}), {}
    if "gather_counts" in batch and inputs.mismatched_logps is not None:
        gather_mismatched(run.accelerator, inputs, batch["gather_counts"])
    return inputs, engine


def compute_loss(run: Run, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
    """One forward of a batch through the model and the loss plugin, with the engine's ``logratios/*`` metrics."""
    inputs, (metrics, counts) = model_inputs(run, model, batch)
    output = run.loss(inputs)
    output.metrics, output.counts = {**output.metrics, **metrics}, {**output.counts, **counts}
    return output


@dataclass
class StepResult:
    """Device tensors of one optimiser step; nothing here has been read back to the host."""

    metrics: MetricSums
    grad_norm: torch.Tensor
    finite: torch.Tensor


class MetricSums:
    """Metrics summed on the device: each weighted by its forward's share of the examples, or, a metric that averages
    only some of them (``LossOutput.counts``), by its count, with the counts summed beside it."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, metrics: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], weight: float) -> None:
        for key, value in metrics.items():
            count = counts.get(key)
            if count is None:
                self.sums[key] = self.sums.get(key, 0) + value.float() * weight
            else:  # a mean over no examples (0, or 0/0 from a plugin) adds nothing
                count = count.float() * (1.0 if weight else 0.0)
                self.sums[key] = self.sums.get(key, 0) + torch.where(count > 0, value.float() * count, 0.0)
                self.counts[key] = self.counts.get(key, 0) + count

    def merge(self, other: MetricSums) -> None:
        for key, value in other.sums.items():
            self.sums[key] = self.sums.get(key, 0) + value
        for key, value in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + value

    def means(self, acc: Any, total: float | torch.Tensor, extra: torch.Tensor | None = None) -> tuple[dict[str, float], float | None]:
        """Over all processes (one collective, one host read): each metric's sum over ``total`` (the summed weights),
        a counted one's over its count (left out where that is 0); and ``extra`` summed."""
        keys, counted = sorted(self.sums), sorted(self.counts)
        device = acc.device
        local = [self.sums[k].float().reshape(()) for k in keys] + [self.counts[k].reshape(()) for k in counted]
        local += [torch.as_tensor(total, dtype=torch.float32, device=device).reshape(())]
        if extra is not None:
            local.append(extra.float().reshape(()))
        values = acc.reduce(torch.stack([v.to(device) for v in local]), "sum").tolist()
        counts = dict(zip(counted, values[len(keys):len(keys) + len(counted)]))
        whole = values[len(keys) + len(counted)]
        out = {k: (v / counts[k] if k in counts else v / whole) for k, v in zip(keys, values) if counts.get(k, 1) > 0}
        for key in [k for k in out if k.endswith("/margins")]:
            chosen, rejected = key.replace("/margins", "/chosen"), key.replace("/margins", "/rejected")
            if chosen in counts and rejected in counts:  # of counted means, the margin is their difference
                if chosen in out and rejected in out:
                    out[key] = out[chosen] - out[rejected]
                else:
                    del out[key]
        return out, values[-1] if extra is not None else None


def forward_backward(run: Run, model: torch.nn.Module, forwards: Sequence[dict[str, Any]], weights: Sequence[float],
                     params: list[torch.nn.Parameter]) -> StepResult:
    """Forwards and backwards of one optimiser step, then gradient clipping; no host reads.

    Forward ``i`` carries ``weights[i]`` of the step's pairs, so the summed gradient is that
    of the mean loss over all of them (the loss being the mean of its per-pair values).
    Only the last backward synchronises gradients across processes.
    """
    acc = run.accelerator
    sums = MetricSums()
    fsdp = hasattr(model, "set_requires_gradient_sync")  # FSDP2: no no_sync(); say whether to reduce-scatter
    for i, (batch, weight) in enumerate(zip(forwards, weights)):
        last = i == len(forwards) - 1
        if fsdp:
            model.set_requires_gradient_sync(last)
        with acc.no_sync(model) if not last and acc.num_processes > 1 and not fsdp else nullcontext():
            output = compute_loss(run, model, batch)
            acc.backward(output.loss * weight)
        sums.add({"loss": output.loss.detach(), **output.metrics}, output.counts, weight)
    grad_norm = acc.clip_grad_norm_(params, run.config.trainer.max_grad_norm or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm over all shards, as a plain tensor
        grad_norm = grad_norm.full_tensor()
    if not isinstance(grad_norm, torch.Tensor):
        grad_norm = torch.tensor(float(grad_norm), device=acc.device)
    finite = torch.isfinite(sums.sums["loss"]) & torch.isfinite(grad_norm)
    return StepResult(sums, grad_norm.detach().float(), finite)


def read_flags(run: Run, result: StepResult, stop: bool, weights_ok: torch.Tensor | None = None) -> tuple[bool, bool, bool]:
    """``(step finite, a process asked to stop, the previous step left the weights finite)`` on every process:
    the step's one host read."""
    device = result.finite.device
    ok = weights_ok.to(device) if weights_ok is not None else torch.ones((), dtype=torch.bool, device=device)
    # torch.full, not torch.tensor: a host value copied to a CUDA device would block until the queue drains
    flags = torch.stack([(~result.finite).float(), torch.full((), float(stop), device=device), (~ok).float()])
    if run.accelerator.num_processes > 1:
        flags = run.accelerator.reduce(flags, "sum")
    bad, stopping, broken = flags.tolist()
    return bad == 0, stopping > 0, broken == 0


class LogWindow:
    """The steps since the last log row: metrics summed on the device, tokens and padding on the host."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.sums = MetricSums()
        self.steps, self.tokens, self.padding = 0, 0, 0.0

    def add(self, result: StepResult, tokens: int, padding: float) -> None:
        self.sums.merge(result.metrics)
        self.sums.add({"grad_norm": result.grad_norm}, {}, 1.0)
        self.steps += 1
        self.tokens += tokens
        self.padding += padding

    def row(self, run: Run) -> dict[str, Any]:
        """Means over the window's steps and the processes (a counted metric over its examples; ``num_tokens`` summed):
        one collective, one host read; then empty."""
        acc = run.accelerator
        means, tokens = self.sums.means(acc, self.steps, torch.tensor(float(self.tokens), device=acc.device))
        row = {**means, "num_tokens": int(tokens), "padding_fraction": round(self.padding / self.steps, 4)}
        self._reset()
        return row


@torch.no_grad()
def evaluate(run: Run, model: torch.nn.Module) -> dict[str, float]:
    """Loss and reward metrics on the held-out examples (``eval/`` prefixed), averaged over pairs or groups
    (labelled completions: over completions)."""
    pairs, acc = run.eval_pairs, run.accelerator
    if not pairs:
        return {}
    sharded = distributed.sharded(acc)
    model.eval()
    if not sharded:
        model = acc.unwrap_model(model)  # no DDP hooks: processes may run different numbers of forwards
    tc = run.config.trainer
    budget = tc.max_tokens_per_forward
    mismatched = Feature.MISMATCHED_LOGPS in run.needs
    sizes = [example_tokens(p, run.shared, mismatched) for p in pairs] if budget else [0] * len(pairs)
    mine = forward_plans(sizes, tc.batch_size, budget, acc.num_processes, matched=sharded, sliced=True)[acc.process_index]
    if not mine:  # no held-out pair here: one filler forward, for the metric names of the reduction
        mine = [None]
    totals = MetricSums()
    count = torch.zeros((), device=acc.device)
    # lazily, one forward at a time; KTO's held out forwards wait for their global batches' reference points
    forwards = ((b, *model_inputs(run, model, run.make_batch(pairs, b or [0], "eval"))) for b in mine)
    if mismatched:
        forwards = share_mismatched(acc, list(forwards), len(pairs), tc.batch_size)
    for b, inputs, (metrics, counts) in forwards:
        output, n = run.loss(inputs), sum(example_weight(pairs[i]) for i in b) if b else 0
        totals.add({"loss": output.loss.detach(), **output.metrics, **metrics}, {**output.counts, **counts}, n)
        count += n
    model.train()
    means, _ = totals.means(acc, count)
    return {f"eval/{k}": v for k, v in means.items()}


Staged = list[tuple[list[int] | None, LossInputs, Metrics]]


def share_mismatched(acc: Any, staged: Staged, n: int, batch_size: int) -> Staged:
    """Give each held-out forward the mismatched log-probs of its whole global batch (``batch_size`` times the
    processes, see :func:`prefopt.data.batching.global_batch`), as one process with that batch computes them: one
    collective per evaluation, so processes may run different numbers of forwards."""
    device = acc.device
    values = torch.zeros(n, 2, dtype=torch.float64, device=device)
    for b, inputs, _ in staged:
        if b:
            values[b] = torch.stack([inputs.mismatched_logps.double(), inputs.ref_mismatched_logps.to(device).double()], -1)
    if acc.num_processes > 1:
        values = acc.reduce(values, "sum")  # each example is evaluated on exactly one process
    for b, inputs, _ in staged:
        rows = global_batch((b or [0])[0], batch_size, acc.num_processes, n)
        policy, ref = inputs.mismatched_logps, inputs.ref_mismatched_logps
        inputs.mismatched_logps = values[rows.start : rows.stop, 0].to(policy.dtype)
        inputs.ref_mismatched_logps = values[rows.start : rows.stop, 1].to(ref.device, ref.dtype)
    return staged
