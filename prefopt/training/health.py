"""Checks that a run is not silently wrong: engine log-probs vs the model's own, finite weights, sane loss outputs."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from prefopt.errors import ConfigError, PluginError, PrefoptError

log = logging.getLogger("prefopt")

LOGPROB_TOLERANCE = 1e-3  # fp32 chunked log-softmax vs the model's logits agree to ~1e-5
# weights held in bf16/fp16 (model.dtype): packed and unpacked forwards round activations differently;
# a transform prefopt does not reproduce (a logit scale, a softcap) still differs by tenths of a nat or more
HALF_LOGPROB_TOLERANCE = 5e-2


class TrainingError(PrefoptError):
    """Training cannot go on, or ended with a model that must not be used."""


# ---------------------------------------------------------------- engine log-probs


def model_token_logps(model: nn.Module, pairs: list, mismatched: bool = False) -> torch.Tensor:
    """Completion-token log-probs from the model's own forward, each sequence alone (no padding, no packing).

    Flat, in the engine's order: chosen completions of ``pairs``, then rejected ones; for groups, completion-major
    (with each group's mismatched completion last if ``mismatched``).
    """
    from prefopt.data.batching import completion_tokens
    from prefopt.data.examples import Group
    from prefopt.data.groups import group_sequences
    from prefopt.engine.attention import standard

    if pairs and isinstance(pairs[0], Group):
        rows = group_sequences(pairs, mismatched)
    else:
        rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    out = []
    with standard(model):
        for prompt, completion in rows:
            k = completion_tokens(prompt, completion)
            ids = torch.tensor([prompt + completion], device=next(model.parameters()).device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(logp[logp.shape[0] - k :] if k else logp[:0])
    return torch.cat(out)


def compare_logps(engine: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest difference between two flat per-token log-prob tensors."""
    if engine.shape != reference.shape:
        raise ConfigError(f"model: the engine gives {tuple(engine.shape)} completion log-probs, the model's own forward {tuple(reference.shape)}")
    diff = (engine.float() - reference.float()).abs()
    return float(diff.max()) if diff.numel() else 0.0


def check_engine_logps(engine: Callable[[], torch.Tensor], own: Callable[[], torch.Tensor], what: str = "model",
                       tol: float = LOGPROB_TOLERANCE) -> float:
    """Refuse a model whose log-probs under the engine differ from its own forward's (both flat, same tokens)."""
    with torch.no_grad():
        a, b = engine(), own()
    worst = compare_logps(a, b)
    if not worst <= tol:  # NaN fails too
        raise ConfigError(
            f"{what}: the engine's per-token log-probs differ from the model's own forward by up to {worst:.4g} "
            f"(tolerance {tol:g}) on a start-up batch; this model transforms its logits in a way prefopt does not "
            f"reproduce (e.g. a logit scale or multiplier, or an adapter on the output head), so training would be wrong"
        )
    return worst


def check_output_head(model: nn.Module) -> None:
    """Refuse an output head that computes more than ``hidden @ weight.T + bias`` (e.g. LoRA on lm_head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if head is not None and type(head).forward is not nn.Linear.forward:
        raise ConfigError(
            f"model.lora: the output head is a {type(head).__module__}.{type(head).__name__}, not a plain Linear; "
            f"prefopt projects through the head's weight only, so its adapter would be ignored and get no gradient. "
            f"Remove the output head (e.g. lm_head) from model.lora.target_modules"
        )


def check_start(policy: nn.Module, make_batch: Callable[[list, list[int]], dict], pairs: list, chunk_tokens: int,
                kernel: str = "sdpa", what: str = "model", mismatched: bool = False) -> float:
    """Start-up check on the two shortest pairs, batched as training batches them: the engine's log-probs equal
    the model's own forward's on each sequence alone; returns the largest difference.

    It runs where the model was loaded (the host, in the weights' dtype, once per process): what it checks, how the
    model turns hidden states into logits, shows on any length, and short pairs keep a large model's
    start quick."""
    import heapq

    from prefopt.data.batching import pair_tokens, to_device
    from prefopt.data.examples import Group
    from prefopt.data.groups import group_tokens
    from prefopt.engine.modeling import PreferenceModel

    check_output_head(policy)
    bad = nonfinite_parameters((n, p) for n, p in policy.named_parameters() if not p.is_meta)
    if bad:  # before the log-prob comparison, which would blame it on a logit transform
        from prefopt.errors import ConfigError

        raise ConfigError(f"{what}: the loaded weights are not finite (NaN or infinite) in {len(bad)} tensors, e.g. "
                          f"{', '.join(bad[:3])}; the checkpoint is damaged or was saved from a diverged run")
    if not pairs:
        return 0.0
    size = (lambda e: group_tokens(e, False, mismatched)) if isinstance(pairs[0], Group) else pair_tokens
    take = sorted(heapq.nsmallest(2, range(len(pairs)), key=lambda i: size(pairs[i])))
    device = next(policy.parameters()).device
    batch = to_device(make_batch(pairs, take), device)
    engine = PreferenceModel(policy, chunk_tokens=chunk_tokens, kernel=kernel)
    was_training = policy.training
    policy.eval()
    try:
        half = any(p.dtype in (torch.bfloat16, torch.float16) for p in policy.parameters())
        worst = check_engine_logps(lambda: engine(batch)["logps"], lambda: model_token_logps(policy, [pairs[i] for i in take], mismatched), what,
                                   HALF_LOGPROB_TOLERANCE if half else LOGPROB_TOLERANCE)
        log.info("%s: the engine's log-probs match the model's own forward (largest difference %.2g)", what, worst)
        return worst
    finally:
        policy.train(was_training)


# ---------------------------------------------------------------- weights


def nonfinite_parameters(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors with a NaN or infinite value (one host sync)."""
    named = list(named)
    if not named:
        return []
    local = [p.detach()._local_tensor if hasattr(p, "_local_tensor") else p.detach() for _, p in named]  # FSDP: this process's shard
    flags = torch.stack([torch.isfinite(t).all().cpu() for t in local])
    return [n for (n, _), ok in zip(named, flags.tolist()) if not ok]


def weights_finite(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """A device flag, true when every weight is finite: one fused max-abs pass, no host read."""
    local = [p.detach()._local_tensor if hasattr(p, "_local_tensor") else p.detach() for p in params]  # FSDP shards
    local = [t for t in local if t.numel()]
    if not local:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([n.float() for n in torch._foreach_norm(local, float("inf"))]).isfinite().all()


def _refuse_nonfinite(named: Iterable[tuple[str, torch.Tensor]], reduce: Callable[[torch.Tensor], torch.Tensor] | None,
                      what: str, consequence: str) -> None:
    bad = nonfinite_parameters(named)
    count = torch.tensor(float(len(bad)))
    if reduce is not None:
        count = reduce(count)
    if float(count) > 0:
        example = f", e.g. {bad[0]}" if bad else ""
        raise TrainingError(f"{what} ({int(count)} tensors{example}); {consequence} (earlier checkpoints are intact). "
                            f"Lower trainer.lr or set trainer.max_grad_norm")


def check_step(named: list[tuple[str, torch.Tensor]], step: int, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """After an applied optimiser step: stop if it made any weight non-finite (``reduce`` sums a count across processes)."""
    _refuse_nonfinite(named, reduce, f"step {step} made the weights non-finite", "stopping without saving them")


def check_final_weights(model: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Before the last checkpoint and the final model are written: refuse weights that are not finite."""
    _refuse_nonfinite(model.named_parameters(), reduce, "the trained weights are not finite", "the final model was not saved")


def check_skipped(steps: int, skipped: int) -> None:
    """After the last checkpoint is written: refuse a run that skipped most of its steps."""
    if steps and skipped * 2 > steps:
        raise TrainingError(
            f"{skipped} of {steps} steps were skipped (non-finite loss or gradient), so the model barely trained; "
            f"the final model was not saved (the last checkpoint was). Lower trainer.lr or the loss's scale "
            f"(e.g. loss.beta), or check the data"
        )


def check_final_loss(after: dict[str, float], last_step_skipped: bool) -> None:
    """After the final evaluation: refuse a model whose loss is not finite, though its weights are (a run of huge
    steps can leave such a model after only some steps were skipped)."""
    loss = after.get("eval/loss")
    if loss is not None and not math.isfinite(loss):
        where = "the held-out data"
    elif last_step_skipped:
        where = "the last training batch (that step was skipped)"
    else:
        return
    raise TrainingError(f"the trained model gives a non-finite loss on {where}, so it is broken; the final model was not saved "
                        f"(the last checkpoint was). Lower trainer.lr or the loss's scale (e.g. loss.beta), or set trainer.max_grad_norm")


def sign_warning(before: dict[str, float], after: dict[str, float], first_loss: float | None, last_loss: float | None) -> str | None:
    """A plain warning when training moved the held-out log-ratio margin against the preference while the loss fell.

    The margin is the engine's ``eval/logratios/margins`` (policy minus reference log-probs, chosen minus
    rejected), which the loss does not compute; a loss with its sign wrong lowers it while reporting success.
    """
    key = "eval/logratios/margins"
    if key not in before or key not in after or first_loss is None or last_loss is None:
        return None
    was, now = before[key], after[key]
    if not (now < was - 1e-4 * (1 + abs(was)) and last_loss < first_loss):
        return None
    return (f"WARNING: the loss may have its sign wrong. The training loss fell ({first_loss:.4g} -> {last_loss:.4g}) while the "
            f"held-out log-ratio margin moved against the preference ({was:.4g} -> {now:.4g}): the policy now favours the "
            f"rejected completions over the chosen ones more than the reference does. The rewards/* metrics come from the loss "
            f"itself and cannot show this; check that the loss falls as chosen log-ratios rise over rejected ones")


def step_summary(steps: int, bad: int, overflow: int = 0) -> dict[str, int]:
    """Steps applied and skipped, for the summary."""
    return {"steps_applied": steps - bad - overflow, "steps_skipped": bad + overflow}


# ---------------------------------------------------------------- loss outputs


def _provider(name: str) -> str:
    try:
        from prefopt.plugins.registry import get_registry

        entry = get_registry().losses.get(name)
        return f"{entry.dist} {entry.version}".removesuffix(" ?") if entry else "unknown package"
    except Exception:  # noqa: BLE001 - only used in an error message
        return "unknown package"


class CheckedLoss:
    """Wraps a loss: an exception or a malformed output names the loss and the package that provides it."""

    def __init__(self, loss: Any) -> None:
        self.inner = loss

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    def __repr__(self) -> str:
        return repr(self.inner)

    def _where(self) -> str:
        name = getattr(self.inner, "name", type(self.inner).__name__)
        terms = getattr(self.inner, "terms", None)
        if terms:
            return f"loss {name!r} (" + ", ".join(f"{l.name}: {_provider(l.name)}" for _, l in terms) + ")"
        return f"loss {name!r} ({_provider(name)})"

    def __call__(self, inputs: Any) -> Any:
        from prefopt.losses.base import LossOutput

        try:
            out = self.inner(inputs)
        except PrefoptError:
            raise
        except SystemExit as exc:  # would end the run with no model, and exit status 0 for sys.exit()
            raise PluginError(f"{self._where()} called sys.exit({exc.code!r}) during training; a loss must return or raise") from None
        except Exception as exc:
            raise PluginError(f"{self._where()} raised {type(exc).__name__}: {exc}") from exc
        n = inputs.num_examples
        problem = None
        if not isinstance(out, LossOutput):
            problem = f"returned {type(out).__name__}, expected a prefopt.LossOutput"
        elif not isinstance(out.loss, torch.Tensor) or out.loss.ndim != 0 or not out.loss.is_floating_point():
            problem = f"returned loss {_describe(out.loss)}, expected a scalar float tensor"
        elif torch.is_grad_enabled() and not out.loss.requires_grad:  # training, not evaluation
            problem = "returned a loss without a gradient (detached, or not computed from the policy log-probs), so training cannot step"
        elif not isinstance(out.losses, torch.Tensor) or tuple(out.losses.shape) != (n,):
            problem = f"returned losses {_describe(out.losses)}, expected a tensor of shape ({n},), one per example"
        elif not isinstance(out.metrics, dict) or not isinstance(out.counts, dict):
            bad = "metrics" if not isinstance(out.metrics, dict) else "counts"
            problem = f"returned {bad} {type(getattr(out, bad)).__name__}, expected a dict of scalar tensors"
        else:
            for key, value in [*out.metrics.items(), *out.counts.items()]:
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    problem = f"returned metric {key!r} {_describe(value)}, expected a scalar tensor"
                    break
            stray = sorted(set(out.counts) - set(out.metrics))
            if not problem and stray:
                problem = f"returned counts for {', '.join(map(repr, stray))}, which are not among its metrics"
        if problem:
            raise PluginError(f"{self._where()} {problem}")
        return out


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"of type {type(value).__name__}"


__all__ = ["CheckedLoss", "TrainingError", "check_engine_logps", "check_final_loss", "check_final_weights", "check_skipped", "check_step", "check_output_head", "check_start",
           "compare_logps", "model_token_logps", "nonfinite_parameters", "sign_warning", "step_summary"]
