"""Helpers for testing losses, in this repository and in plugin packages.

``registered(MyLoss)`` makes a loss selectable by name for the duration of a
``with`` block, without installing anything. ``check_loss(MyLoss)`` runs a loss
class through the contract every loss must honour, its math included, and raises
``AssertionError`` with a message per broken rule. TRL's own losses, for parity
tests, are in :mod:`prefopt.testing.trl`.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pydantic
import torch

from prefopt.engine.syncs import SyncCounter
from prefopt.losses.base import FIELD_FEATURE, Feature, Loss, LossConfig, as_needs, takes_of
from prefopt.plugins import manager as plugins
from prefopt.plugins import registry
from prefopt.plugins.hookspecs import hookimpl
from prefopt.testing.losscheck import (
    CASES,
    GROUP_CASES,
    Case,
    Synthetic,
    run_on,
    run_on_groups,
    shape,
    synthetic_group_inputs,
    synthetic_inputs,
)

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


ConfigLike = LossConfig | Mapping[str, Any] | None


def check_loss(loss_cls: type[Loss], config: ConfigLike = None, *, configs: Sequence[ConfigLike] | None = None) -> None:
    """Check that ``loss_cls`` honours the loss contract; raise ``AssertionError`` if not.

    The class must be registrable and its config must forbid unknown keys, document
    every field and bound every numeric one. Then, for each config (``configs``, or ``config``, or the default plus
    the class's ``examples``), on synthetic inputs holding exactly the declared features:
    loss and gradients are finite on ordinary inputs, on extreme log-ratios (+-1e4) and
    on zero-token completions; ``losses`` is ``(B,)`` and ``loss`` its mean (or what
    ``reduction`` states); metrics are finite detached scalars, with the reward metrics
    for a loss that reads the rejected completion; every declared feature is read and
    no undeclared one; forward and backward read nothing back to the host (a GPU sync);
    per-pair losses depend only on their own pair (or, for a loss that declares
    ``couples_pairs``, the loss not on the order of the pairs); and at the
    reference point a step down the loss raises each chosen log-ratio and lowers each
    rejected one (unless ``sign_exempt`` gives the reason it need not).
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
    unbounded = unbounded_fields(cfg_cls)
    _expect(not unbounded, f"{where}: numeric config fields without a bound: {', '.join(unbounded)}; declare the values that make "
            "sense, e.g. Field(0.1, gt=0) for a beta, so a wrong sign is refused before training (ge=-math.inf if every value does)")
    _expect(isinstance(loss_cls.reduction, str) and bool(loss_cls.reduction.strip()), f"{where}: reduction must be 'mean', 'sum' or a description of another")
    exempt = loss_cls.sign_exempt
    _expect(exempt is None or (isinstance(exempt, str) and bool(exempt.strip())), f"{where}: sign_exempt must be None or the reason, a non-empty string")
    for cfg, label in _configs(loss_cls, config, configs, where):
        _check_configured(loss_cls(cfg), label)


def unbounded_fields(cfg_cls: type[pydantic.BaseModel]) -> list[str]:
    """Names of the config's int and float fields (optional ones too) that declare no ``gt``/``ge``/``lt``/``le``."""
    from prefopt.plugins.registry import bounds

    numeric = {int, float}
    out = []
    for name, finfo in cfg_cls.model_fields.items():
        kinds = set(getattr(finfo.annotation, "__args__", ())) or {finfo.annotation}
        if kinds & numeric and not bounds(finfo):
            out.append(name)
    return out


def _configs(loss_cls: type[Loss], config: ConfigLike, configs: Sequence[ConfigLike] | None, where: str) -> list[tuple[LossConfig, str]]:
    """Each config to check, built and labelled; the default is skipped when invalid and examples exist."""
    if configs is not None:
        wanted, given = list(configs), True
    elif config is not None:
        wanted, given = [config], True
    else:
        wanted, given = [None, *loss_cls.examples], False
    out = []
    for item in wanted:
        try:
            cfg = loss_cls.Config(**item) if isinstance(item, Mapping) else item if item is not None else loss_cls.Config()
        except pydantic.ValidationError as exc:
            if item is None and loss_cls.examples:
                continue
            what = "the given config" if given else "the default config (pass config= if a field is required)"
            if item is not None and not given:
                what = f"the example config {dict(item)!r}"
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise AssertionError(f"{where}: {what} is invalid: {problems}") from None
        _expect(isinstance(cfg, loss_cls.Config), f"{where}: config must be a {loss_cls.Config.__name__}, got {type(cfg).__name__}")
        label = where if item is None else f"{where} with {cfg.model_dump()}"
        out.append((cfg, label))
    return out


def _check_configured(loss: Loss, where: str) -> None:
    try:
        needs = as_needs(loss.needs)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"{where}: needs must be a frozenset of prefopt Feature (or a Reference): {exc}") from None
    declared = ", ".join(sorted(f.name for f in needs))
    reads: set[str] = set()
    takes = takes_of(loss)
    for kind in ("rankings", "labelled"):
        if kind in takes:
            reads |= _check_groups(loss, kind, needs, where)
    if "pairs" not in takes:
        _check_reads(needs, reads, where)
        return
    preference = False
    for case_name, case in CASES.items():
        syn, out = _run(loss, case, needs, f"{where}: on {case_name} inputs (declared features: {declared})")
        reads |= syn.inputs.reads
        _check_reduction(loss, out, where, case_name)
        _expect(out.loss.requires_grad, f"{where}: the loss does not depend on the policy log-probs (no gradient)")
        out.loss.backward()
        for key, leaf in syn.leaves.items():
            if leaf.grad is not None:
                _expect(bool(torch.isfinite(leaf.grad).all()), f"{where}: non-finite gradient of the {key} inputs on {case_name} inputs")
        _check_metrics(where, out.metrics, case_name)
        if case_name == "ordinary":
            grad = syn.leaves["policy"].grad
            preference = grad is not None and bool((syn.per_completion(grad)[1] != 0).any())
        if preference:
            missing = [m for m in REWARD_METRICS if m not in out.metrics]
            _expect(not missing, f"{where}: a preference loss must report the metrics {', '.join(missing)}")
    _check_reads(needs, reads, where)
    _check_no_host_reads(loss, CASES["ordinary"], needs, where)
    _check_independent(loss, CASES["ordinary"], needs, where)
    if type(loss).sign_exempt is None:
        _check_sign(loss, CASES["ordinary"], needs, where)


def _check_groups(loss: Loss, kind: str, needs: frozenset[Feature], where: str) -> set[str]:
    """The contract on group inputs of ``kind``: shapes, finite values and gradients, metrics, no host reads,
    examples independent (unless the loss declares couples_pairs), and the sign at the reference point. Returns the fields read."""
    reads: set[str] = set()
    label = f"{where}: on {kind}"
    for case_name, case in GROUP_CASES[kind].items():
        try:
            syn, out = run_on_groups(loss, case, needs)
        except AssertionError as exc:
            raise AssertionError(f"{label} ({case_name}): {exc}") from None
        reads |= syn.inputs.reads
        _check_reduction(loss, out, where, case_name)
        _expect(out.loss.requires_grad, f"{label}: the loss does not depend on the policy log-probs (no gradient)")
        out.loss.backward()
        for key, leaf in syn.leaves.items():
            _expect(leaf.grad is None or bool(torch.isfinite(leaf.grad).all()), f"{label}: non-finite gradient of the {key} inputs on {case_name}")
        _check_metrics(where, out.metrics, f"{kind} {case_name}")
    case = next(iter(GROUP_CASES[kind].values()))
    syn = synthetic_group_inputs(case, needs)
    with SyncCounter() as host:
        loss(syn.inputs).loss.backward()
    _expect(host.count == 0, f"{label}: reads values back to the host in forward or backward ({', '.join(sorted(host.ops))}), a GPU sync per step")
    if not loss.couples_pairs:
        with torch.no_grad():
            base = run_on_groups(loss, case, needs)[1].losses
            changed = run_on_groups(loss, case.perturbed(0), needs)[1].losses
        _expect(torch.allclose(base[1:], changed[1:], rtol=1e-5, atol=1e-6), f"{label}: changing prompt 0 changed the losses of others "
                "(set couples_pairs = True on the class if that is meant)")
    _check_group_sign(loss, kind, case, needs, label)
    return reads


def _check_group_sign(loss: Loss, kind: str, case: Any, needs: frozenset[Feature], label: str) -> None:
    """At policy = reference, -grad raises the best (desirable) completions' log-ratios and lowers the worst (undesirable)."""
    syn, out = run_on_groups(loss, case.at_reference(), needs)
    out.loss.backward()
    grad = syn.leaves["policy"].grad
    grad = torch.zeros_like(syn.leaves["policy"]) if grad is None else grad
    last = torch.tensor(case.counts) - 1
    if kind == "rankings":
        up, down = grad[:, 0], grad[torch.arange(len(last)), last]
    else:
        labels = torch.tensor(case.labels)[:, 0]
        up, down = grad[labels, 0], grad[~labels, 0]
    _expect(bool((up <= 0).all() and (down >= 0).all() and ((up < 0).any() or (down > 0).any())),
            f"{label}: at the reference point a step down the loss must raise the best (desirable) completions' log-ratios and "
            f"lower the worst (undesirable) ones (d loss / d best = {up.tolist()}, d loss / d worst = {down.tolist()})")


def _run(loss: Loss, case: Case, needs: frozenset[Feature], where: str) -> tuple[Synthetic, Any]:
    try:
        return run_on(loss, case, needs)
    except AssertionError as exc:
        raise AssertionError(f"{where}: {exc}") from None


def _check_reduction(loss: Loss, out: Any, where: str, case_name: str) -> None:
    reduce = {"mean": torch.mean, "sum": torch.sum}.get(type(loss).reduction)
    if reduce is None:
        return
    expected = reduce(out.losses.detach())
    _expect(
        torch.allclose(out.loss.detach(), expected, rtol=1e-5, atol=1e-6),
        f"{where}: loss {out.loss.item():.6g} is not the {type(loss).reduction} of the per-pair losses ({expected.item():.6g}) "
        f"on {case_name} inputs; return losses.{type(loss).reduction}() or declare the loss's reduction",
    )


def _check_reads(needs: frozenset[Feature], reads: set[str], where: str) -> None:
    for feature in sorted(needs - {Feature.POLICY_LOGPS, Feature.LENGTHS}, key=lambda f: f.value):
        fields = [n for n, f in FIELD_FEATURE.items() if f is feature]
        _expect(bool(reads & set(fields)), f"{where}: declares Feature.{feature.name} but never reads LossInputs.{' or LossInputs.'.join(fields)}; "
                "leave it out of its features (the engine computes every declared feature)")


def _check_no_host_reads(loss: Loss, case: Case, needs: frozenset[Feature], where: str) -> None:
    """Forward and backward keep every value on the device: on a GPU each host read stalls the step."""
    syn = synthetic_inputs(case, needs)
    with SyncCounter() as reads:
        loss(syn.inputs).loss.backward()
    _expect(reads.count == 0, f"{where}: reads values back to the host in forward or backward ({', '.join(sorted(reads.ops))}), "
            "a GPU sync per step; keep them tensors (no .item(), float(), .tolist(), bool(), torch.tensor(...) of them, "
            "or shapes that depend on values)")


def _check_independent(loss: Loss, case: Case, needs: frozenset[Feature], where: str) -> None:
    """Changing every input of pair j leaves the per-pair loss of every other pair unchanged.

    A loss that declares ``couples_pairs`` is exempt; its batch loss must instead not depend
    on the order of the pairs.
    """
    if loss.couples_pairs:
        _check_order_free(loss, case, needs, where)
        return
    with torch.no_grad():
        base = run_on(loss, case, needs)[1].losses
        for j in (0, case.num_pairs - 1):
            changed = run_on(loss, case.perturbed(j), needs)[1].losses
            for i in range(case.num_pairs):
                if i != j and not torch.allclose(base[i], changed[i], rtol=1e-5, atol=1e-6):
                    raise AssertionError(
                        f"{where}: per-pair losses mix pairs: changing the inputs of pair {j} changed the loss of pair {i} "
                        f"({base[i].item():.6g} -> {changed[i].item():.6g}); losses[i] must depend on pair i only"
                    )


def _check_order_free(loss: Loss, case: Case, needs: frozenset[Feature], where: str) -> None:
    b = case.num_pairs
    order = [*reversed(range(b)), *(b + i for i in reversed(range(b)))]
    swap = lambda values: tuple(values[k] for k in order)  # noqa: E731
    reordered = dataclasses.replace(case, **{f.name: swap(getattr(case, f.name)) for f in dataclasses.fields(case)})
    with torch.no_grad():
        base, other = run_on(loss, case, needs)[1].loss, run_on(loss, reordered, needs)[1].loss
    _expect(torch.allclose(base, other, rtol=1e-5, atol=1e-6), f"{where}: declares couples_pairs, but its loss depends on the "
            f"order of the pairs in the batch ({base.item():.6g} -> {other.item():.6g} when reversed)")


def _check_sign(loss: Loss, case: Case, needs: frozenset[Feature], where: str) -> None:
    """At policy = reference, -grad raises each chosen log-ratio and lowers each rejected one."""
    syn, out = run_on(loss, case.at_reference(), needs)
    out.loss.backward()
    grad = syn.leaves["policy"].grad
    g_c, g_r = syn.per_completion(grad if grad is not None else torch.zeros_like(syn.leaves["policy"]))
    tol = 1e-7 * float(torch.cat([g_c, g_r]).abs().max().clamp(min=1e-30))
    hint = "check the sign of the margin (chosen minus rejected), or set sign_exempt = '<reason>' on the loss class"
    for i in range(case.num_pairs):
        _expect(g_c[i] <= tol, f"{where}: at the reference point a step down the loss lowers the chosen log-ratio of pair {i} "
                f"(d loss / d pc = {g_c[i].item():+.3g}); {hint}")
        _expect(g_r[i] >= -tol, f"{where}: at the reference point a step down the loss raises the rejected log-ratio of pair {i} "
                f"(d loss / d pr = {g_r[i].item():+.3g}); {hint}")
    _expect(bool((g_c < -tol).any() or (g_r > tol).any()), f"{where}: at the reference point a step down the loss moves no log-ratio "
            f"(zero gradient); {hint}")


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _check_metrics(where: str, metrics: object, case: str) -> None:
    _expect(isinstance(metrics, dict), f"{where}: metrics must be a dict, got {type(metrics).__name__}")
    for key, value in metrics.items():  # type: ignore[union-attr]
        _expect(isinstance(key, str), f"{where}: metric names must be strings, got {key!r}")
        if isinstance(value, torch.Tensor):
            _expect(value.numel() == 1 and value.ndim == 0, f"{where}: metric {key!r} must be a scalar, got shape {shape(value)}")
            _expect(not value.requires_grad, f"{where}: metric {key!r} must be detached")
            value = value.item()
        _expect(isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: metric {key!r} must be a number, got {type(value).__name__}")
        _expect(torch.isfinite(torch.tensor(float(value))).item(), f"{where}: metric {key!r} is not finite on {case} inputs: {value}")
