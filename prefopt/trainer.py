"""The training loop: data -> batches -> log-probs -> loss plugin -> AdamW, through accelerate."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from prefopt import checkpoint as ckpt
from prefopt import reference as ref
from prefopt.batching import batch_order, collate, pair_length, padding_fraction
from prefopt.config import RunConfig
from prefopt.data import load_data
from prefopt.errors import ConfigError, PrefoptError
from prefopt.losses.base import LossInputs, LossOutput, Reference
from prefopt.modeling import PreferenceModel, frozen_copy, load_model, load_tokenizer

log = logging.getLogger("prefopt")

# Fields that may change between a run and its resumption without breaking it.
RESUMABLE_CHANGES = {
    "trainer.max_steps", "trainer.epochs", "trainer.log_every", "trainer.eval_every", "trainer.save_every",
    "trainer.keep_checkpoints", "trainer.report_to", "trainer.max_bad_steps", "trainer.output_dir",
    "reference.cache_dir", "reference.batch_size", "data.eval", "data.eval_split",
}


class TrainingError(PrefoptError):
    """Training cannot go on (e.g. too many non-finite steps)."""


@dataclass
class Run:
    """Everything a run builds before its first step."""

    config: RunConfig
    accelerator: Accelerator
    tokenizer: Any
    model: PreferenceModel
    loss: Any
    mode: str
    train_pairs: list
    eval_pairs: list
    caches: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def ref_kind(self) -> str:
        if self.mode == "live":
            return "kl" if self.loss.needs == Reference.TOKEN_KL else "logps"
        return "none"


def _accelerator(config: RunConfig) -> Accelerator:
    precision = config.trainer.precision
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("trainer.precision: fp16 needs a CUDA device (it trains with loss scaling); use bf16 or fp32 on CPU")
    trackers = [t for t in config.trainer.report_to if t != "jsonl"]
    # accelerate keeps its state per process and refuses a second Accelerator with another
    # precision; forget it so train() can run again in one process (the process group stays).
    AcceleratorState._reset_state()
    # Started as one of several processes (torchrun) on a machine without CUDA: accelerate
    # joins them only when told to use the CPU; otherwise each would train alone.
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=several and not torch.cuda.is_available(),
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
        log_with=trackers or None,
        project_dir=config.trainer.output_dir,
    )


def _cache_for(run_cfg: RunConfig, accelerator: Accelerator, ref_model: torch.nn.Module, tokenizer, pairs: list, name: str, weights_fp: str) -> torch.Tensor:
    from prefopt.data import fingerprint

    settings = {"precision": run_cfg.trainer.precision, "max_length": run_cfg.data.max_length,
                "max_prompt_length": run_cfg.data.max_prompt_length}
    parts = ref.cache_parts(weights_fp, ref.tokenizer_fingerprint(tokenizer), fingerprint(pairs), settings)
    key = ref.cache_key(**parts)
    path = Path(run_cfg.reference.cache_dir) / f"{key}.safetensors"
    cached = ref.load_cache(path, key, len(pairs), parts)
    if cached is not None:
        log.info("reference cache (%s): reusing %s", name, path)
        return cached
    module = PreferenceModel(ref_model, chunk_tokens=run_cfg.trainer.logprob_chunk_tokens).to(accelerator.device).eval()
    bs = run_cfg.reference.batch_size or run_cfg.trainer.batch_size
    idx = list(range(len(pairs)))
    mine = [idx[s : s + bs] for s in range(0, len(idx), bs)][accelerator.process_index :: accelerator.num_processes]
    batches = [collate([pairs[i] for i in b], b, tokenizer.pad_token_id) for b in mine]

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with accelerator.autocast():
            return module({k: v.to(accelerator.device) for k, v in batch.items()})["logps"]

    local = ref.compute_ref_logps(forward, batches, len(pairs), accelerator.is_main_process)
    values = accelerator.reduce(torch.nan_to_num(local, nan=0.0).to(accelerator.device), "sum").cpu()
    if accelerator.is_main_process:
        ref.save_cache(path, key, values, parts)
        log.info("reference cache (%s): wrote %s", name, path)
    accelerator.wait_for_everyone()
    return values


def setup(config: RunConfig, accelerator: Accelerator | None = None) -> Run:
    """Load tokenizer, data, loss and models; choose the reference mode; fill the cache if used."""
    accelerator = accelerator or _accelerator(config)
    set_seed(config.trainer.seed)
    loss = config.build_loss()
    mode, why = ref.choose_mode(config.reference.mode, loss.needs)
    log.info("reference model: %s (%s)", mode, why)
    tokenizer = load_tokenizer(config.model)
    train_pairs, eval_pairs, reports = load_data(config.data, tokenizer, config.trainer.seed)
    for report in reports:
        log.info("%s", report.summary())
    if len(train_pairs) < config.trainer.batch_size * accelerator.num_processes:
        raise ConfigError(f"data.train: {len(train_pairs)} usable pairs, fewer than one batch ({config.trainer.batch_size} x {accelerator.num_processes} processes)")
    policy = load_model(config.model)
    reference: torch.nn.Module | str | None = None
    caches: dict[str, torch.Tensor] = {}
    if mode != "none":
        ref_model = load_model(config.model, config.model.reference) if config.model.reference else None
        if mode == "cache":
            source = ref_model or policy  # before training, the policy is the reference
            weights_fp = ref.weights_fingerprint(source)
            for name, pairs in (("train", train_pairs), ("eval", eval_pairs)):
                if pairs:
                    caches[name] = _cache_for(config, accelerator, source, tokenizer, pairs, name, weights_fp)
        elif ref_model is not None:
            reference = frozen_copy(ref_model)
        elif config.model.lora is None:
            reference = frozen_copy(policy)
        else:
            reference = "adapter"
    if config.model.lora is not None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("model.lora: needs the peft package (pip install 'prefopt[peft]')") from None
        policy = get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", **config.model.lora))
    if config.trainer.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PreferenceModel(policy, reference, config.trainer.logprob_chunk_tokens)
    return Run(config, accelerator, tokenizer, model, loss, mode, train_pairs, eval_pairs, caches)


def compute_loss(run: Run, model: torch.nn.Module, batch: dict[str, torch.Tensor], split: str) -> tuple[LossOutput, int]:
    """One forward on a collated batch through the loss plugin; returns its output and token count."""
    device = run.accelerator.device
    batch = {k: v.to(device) for k, v in batch.items()}
    with run.accelerator.autocast():
        out = model(batch, reference=run.ref_kind)
    tokens = (batch["labels"][:, 1:] != -100).sum(-1)
    half = tokens.shape[0] // 2
    sums = out["logps"].sum(-1)
    inputs = LossInputs(sums[:half], sums[half:], tokens[:half], tokens[half:])
    if run.mode == "cache":
        cached = run.caches[split][batch["index"].cpu()].to(device)
        inputs.ref_chosen_logps, inputs.ref_rejected_logps = cached[:, 0], cached[:, 1]
    elif "ref_logps" in out:
        ref_sums = out["ref_logps"].sum(-1)
        inputs.ref_chosen_logps, inputs.ref_rejected_logps = ref_sums[:half], ref_sums[half:]
    if "kl" in out:
        kl = out["kl"].sum(-1)
        inputs.chosen_kl, inputs.rejected_kl = kl[:half], kl[half:]
    return run.loss(inputs), int(batch["attention_mask"].sum())


@torch.no_grad()
def evaluate(run: Run, model: torch.nn.Module) -> dict[str, float]:
    """Loss and reward metrics on the held-out pairs (``eval/`` prefixed), averaged over pairs."""
    if len(run.eval_pairs) < run.accelerator.num_processes:  # every process needs a share
        return {}
    model.eval()
    bs, pad = run.config.trainer.batch_size, run.tokenizer.pad_token_id
    idx = list(range(len(run.eval_pairs)))[run.accelerator.process_index :: run.accelerator.num_processes]
    totals: dict[str, torch.Tensor] = {}
    count = torch.zeros((), device=run.accelerator.device)
    for s in range(0, len(idx), bs):
        b = idx[s : s + bs]
        out, _ = compute_loss(run, model, collate([run.eval_pairs[i] for i in b], b, pad), "eval")
        for key, value in {"loss": out.loss.detach(), **out.metrics}.items():
            totals[key] = totals.get(key, 0) + value.float() * len(b)
        count += len(b)
    model.train()
    count = run.accelerator.reduce(count, "sum")
    return {f"eval/{k}": (run.accelerator.reduce(v, "sum") / count).item() for k, v in sorted(totals.items())}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "loss" and k != "config":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """Fields that differ between two configs and would break a resumed run."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)


class _Interrupt:
    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Interrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("interrupt received: finishing this step, writing a checkpoint, then stopping")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _prepare_output(config: RunConfig, resume: bool, overwrite: bool) -> Path:
    out = Path(config.trainer.output_dir)
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise ConfigError(f"trainer.output_dir: {out} is not empty; pass --resume to continue that run or --overwrite to replace it")
    if overwrite and not resume and out.exists():
        import shutil

        here = Path.cwd().resolve()
        if out.resolve() == here or out.resolve() in here.parents:
            raise ConfigError(f"trainer.output_dir: {out} contains the working directory; --overwrite will not delete it")

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _drop_metrics_after(path: Path, step: int) -> None:
    """Forget metric rows of steps after ``step``: a resumed run logs them again."""
    if not path.exists():
        return
    from prefopt.atomic import atomic_write

    keep = [line for line in path.read_text().splitlines(keepends=True) if _row_step(line) <= step]
    atomic_write(path, lambda tmp: tmp.write_text("".join(keep)))


def _row_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except ValueError:  # a row cut short by kill -9
        return math.inf


def train(config: RunConfig, *, resume: bool = False, overwrite: bool = False, config_path: str = "CONFIG.yaml") -> dict[str, Any]:
    """Train the policy as the config says; returns a summary (metrics before/after, paths, counts)."""
    accelerator = _accelerator(config)
    out = _prepare_output(config, resume, overwrite) if accelerator.is_main_process else Path(config.trainer.output_dir)
    accelerator.wait_for_everyone()
    run = setup(config, accelerator)
    tc = config.trainer
    model = run.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay)
    world, rank = accelerator.num_processes, accelerator.process_index
    lengths = [pair_length(p) for p in run.train_pairs]
    micro_per_epoch = len(batch_order(lengths, tc.batch_size * world, tc.seed, 0, tc.group_by_length))
    steps_per_epoch = max(1, micro_per_epoch // tc.grad_accum)
    total = tc.max_steps or math.ceil(tc.epochs * steps_per_epoch)
    schedule = "constant_with_warmup" if tc.schedule == "constant" and tc.warmup_steps else tc.schedule  # "constant" alone ignores warmup
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=total)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    ckpt_root = out / "checkpoints"
    state = {"step": 0, "bad_steps": 0, "overflow_steps": 0, "before": None}
    current = config.model_dump(mode="json")
    if resume:
        path = ckpt.latest_valid(ckpt_root)
        if path is None:
            raise ckpt.CheckpointError(f"--resume: no complete checkpoint in {ckpt_root}")
        saved = json.loads((path / "state.json").read_text())
        diffs = config_differences(saved["config"], current)
        if diffs:
            raise ConfigError(f"--resume: the config changed in ways that break the run: {', '.join(diffs)}")
        state = ckpt.load_checkpoint(path, unwrapped, optimizer, scheduler)
        log.info("resuming from %s (step %d)", path, state["step"])
        if accelerator.is_main_process:
            _drop_metrics_after(out / "metrics.jsonl", state["step"])
    if accelerator.is_main_process and tc.report_to != ["jsonl"]:
        accelerator.init_trackers("prefopt", config=_flatten(current))
    metrics_file = out / "metrics.jsonl"

    def log_metrics(row: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            if tc.report_to != ["jsonl"]:
                accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("step"))

    if state["before"] is None:
        state["before"] = evaluate(run, model)
        if state["before"]:
            log_metrics({"step": 0, **state["before"]})
    epoch_cache: dict[int, list[list[int]]] = {}

    def micro_batch(m: int) -> list[int]:
        epoch, j = divmod(m, steps_per_epoch * tc.grad_accum)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            batches = batch_order(lengths, tc.batch_size * world, tc.seed, epoch, tc.group_by_length)
            epoch_cache[epoch] = [b[rank * tc.batch_size : (rank + 1) * tc.batch_size] for b in batches]
        return epoch_cache[epoch][j]

    def save(step: int) -> None:
        if accelerator.is_main_process:
            ckpt.save_checkpoint(ckpt_root, step, unwrapped, optimizer, scheduler, {**state, "config": current}, tc.keep_checkpoints)
        accelerator.wait_for_everyone()

    bar = tqdm(total=total, initial=state["step"], desc="training", disable=not accelerator.is_main_process, dynamic_ncols=True)
    model.train()
    started, interrupted = time.time(), None
    with _Interrupt() as stop:
        while state["step"] < total:
            step = state["step"]
            sums: dict[str, torch.Tensor] = {}
            tokens, padding = 0, 0.0
            for k in range(tc.grad_accum):
                idx = micro_batch(step * tc.grad_accum + k)
                batch = collate([run.train_pairs[i] for i in idx], idx, run.tokenizer.pad_token_id)
                padding += padding_fraction(batch) / tc.grad_accum
                sync = k == tc.grad_accum - 1
                with (accelerator.no_sync(model) if not sync and world > 1 else _null()):
                    output, n = compute_loss(run, model, batch, "train")
                    accelerator.backward(output.loss / tc.grad_accum)
                tokens += n
                for key, value in {"loss": output.loss.detach(), **output.metrics}.items():
                    sums[key] = sums.get(key, 0) + value.float() / tc.grad_accum
            grad_norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm or float("inf"))
            reduced = {k: accelerator.reduce(v, "mean").item() for k, v in sums.items()}
            finite = math.isfinite(reduced["loss"]) and math.isfinite(float(grad_norm))
            if tc.precision == "fp16":
                optimizer.step()
                if optimizer.step_was_skipped:
                    state["overflow_steps"] += 1
                else:
                    scheduler.step()
            elif finite:
                optimizer.step()
                scheduler.step()
            else:
                state["bad_steps"] += 1
                log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); step skipped (%d so far)",
                            step + 1, reduced["loss"], float(grad_norm), state["bad_steps"])
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{reduced['loss']:.4f}", acc=f"{reduced.get('rewards/accuracies', float('nan')):.2f}",
                            margin=f"{reduced.get('rewards/margins', float('nan')):.3f}")
            if state["step"] % tc.log_every == 0 or state["step"] == total:
                row = {"step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 4), "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm), "num_tokens": int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum").item()), "padding_fraction": round(padding, 4),
                       "bad_steps": state["bad_steps"], **reduced}
                if tc.eval_every and state["step"] % tc.eval_every == 0 and state["step"] != total:
                    row.update(evaluate(run, model))
                log_metrics(row)
            if state["bad_steps"] > tc.max_bad_steps:
                save(state["step"])
                raise TrainingError(f"{state['bad_steps']} steps had a non-finite loss or gradient (trainer.max_bad_steps = {tc.max_bad_steps}); stopping. Lower trainer.lr or check the data.")
            flag = torch.tensor(float(stop.signal is not None), device=accelerator.device)
            if accelerator.reduce(flag, "sum").item() > 0:
                interrupted = stop.signal or signal.SIGTERM
                save(state["step"])
                break
            if tc.save_every and state["step"] % tc.save_every == 0 and state["step"] != total:
                save(state["step"])
    bar.close()
    summary = {"output_dir": str(out), "steps": state["step"], "bad_steps": state["bad_steps"], "reference": run.mode,
               "seconds": round(time.time() - started, 2), "before": state["before"]}
    if interrupted:
        summary["interrupted"] = True
        summary["resume"] = f"prefopt train {config_path} --resume"
        if accelerator.is_main_process:
            log.warning("stopped at step %d; checkpoint written to %s; resume with: prefopt train %s --resume",
                        state["step"], ckpt_root, config_path)
        accelerator.end_training()
        return summary
    save(state["step"])
    summary["after"] = evaluate(run, model)
    if summary["after"]:
        log_metrics({"step": state["step"], **summary["after"]})
    if accelerator.is_main_process:
        policy = accelerator.unwrap_model(model).policy
        policy.save_pretrained(out, safe_serialization=True)
        run.tokenizer.save_pretrained(out)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def precompute_reference(config: RunConfig) -> dict[str, str]:
    """Fill the reference cache for the train and eval data ahead of training."""
    run = setup(config)
    if run.mode != "cache":
        raise ConfigError(f"reference.mode: the run uses mode {run.mode!r}; only 'cache' has anything to precompute")
    return {name: f"{len(t)} pairs" for name, t in run.caches.items()}


def format_summary(summary: dict[str, Any]) -> str:
    """The before/after table on the held-out split printed at the end of training."""
    before, after = summary.get("before") or {}, summary.get("after") or {}
    if not after:
        return f"trained {summary['steps']} steps in {summary['seconds']} s (no held-out data: set data.eval or data.eval_fraction for a before/after summary)"
    keys = [k for k in ("eval/rewards/accuracies", "eval/rewards/margins", "eval/loss", "eval/logps/chosen", "eval/logps/rejected") if k in after]
    lines = [f"held-out pairs        before      after"]
    lines += [f"{k[5:]:<20}{before.get(k, float('nan')):>8.4f}{after[k]:>11.4f}" for k in keys]
    lines.append(f"trained {summary['steps']} steps in {summary['seconds']} s; model and tokenizer saved to {summary['output_dir']}")
    return "\n".join(lines)
