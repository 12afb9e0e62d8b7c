"""The training loop: batches -> log-probs -> loss plugin -> AdamW, through accelerate."""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from prefopt import checkpoint as ckpt
from prefopt import distributed
from prefopt.batching import batch_order, collate, pair_length, padding_fraction
from prefopt.config import RunConfig
from prefopt.errors import ConfigError, PrefoptError
from prefopt.interrupt import GracefulStop
from prefopt.resume import config_differences, drop_metrics_after, flatten, prepare_output
from prefopt.run import make_accelerator, precompute_reference, setup
from prefopt.step import compute_loss, evaluate

__all__ = ["TrainingError", "format_summary", "precompute_reference", "setup", "train"]

log = logging.getLogger("prefopt")


class TrainingError(PrefoptError):
    """Training cannot go on (e.g. too many non-finite steps)."""


def train(config: RunConfig, *, resume: bool = False, overwrite: bool = False, config_path: str = "CONFIG.yaml") -> dict[str, Any]:
    """Train the policy as the config says; returns a summary (metrics before/after, paths, counts)."""
    accelerator = make_accelerator(config)
    out = prepare_output(config, resume, overwrite) if accelerator.is_main_process else Path(config.trainer.output_dir)
    accelerator.wait_for_everyone()
    run = setup(config, accelerator)
    tc = config.trainer
    model, optimizer, params = distributed.prepare(
        run, lambda ps: torch.optim.AdamW(ps, lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay))
    world, rank = accelerator.num_processes, accelerator.process_index
    lengths = [pair_length(p) for p in run.train_pairs]
    micro_per_epoch = len(batch_order(lengths, tc.batch_size * world, tc.seed, 0, tc.group_by_length))
    steps_per_epoch = max(1, micro_per_epoch // tc.grad_accum)
    total = tc.max_steps or math.ceil(tc.epochs * steps_per_epoch)
    schedule = "constant_with_warmup" if tc.schedule == "constant" and tc.warmup_steps else tc.schedule  # "constant" alone ignores warmup
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=total)
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
            drop_metrics_after(out / "metrics.jsonl", state["step"])
    if accelerator.is_main_process and tc.report_to != ["jsonl"]:
        accelerator.init_trackers("prefopt", config=flatten(current))
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
        gathered = ckpt.gather(unwrapped, optimizer)  # every process, under FSDP
        if accelerator.is_main_process:
            ckpt.save_checkpoint(ckpt_root, step, unwrapped, optimizer, scheduler, {**state, "config": current}, tc.keep_checkpoints, gathered)
        accelerator.wait_for_everyone()

    bar = tqdm(total=total, initial=state["step"], desc="training", disable=not accelerator.is_main_process, dynamic_ncols=True)
    model.train()
    started, interrupted = time.time(), None
    with GracefulStop() as stop:
        while state["step"] < total:
            step = state["step"]
            sums: dict[str, torch.Tensor] = {}
            tokens, padding = 0, 0.0
            for k in range(tc.grad_accum):
                idx = micro_batch(step * tc.grad_accum + k)
                batch = collate([run.train_pairs[i] for i in idx], idx, run.tokenizer.pad_token_id)
                padding += padding_fraction(batch) / tc.grad_accum
                sync = k == tc.grad_accum - 1
                with (accelerator.no_sync(model) if not sync and world > 1 else nullcontext()):
                    output, n = compute_loss(run, model, batch, "train")
                    accelerator.backward(output.loss / tc.grad_accum)
                tokens += n
                for key, value in {"loss": output.loss.detach(), **output.metrics}.items():
                    sums[key] = sums.get(key, 0) + value.float() / tc.grad_accum
            grad_norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm or float("inf"))
            keys = sorted(sums)  # one collective and one host sync for all metrics
            reduced = dict(zip(keys, accelerator.reduce(torch.stack([sums[k] for k in keys]), "mean").tolist()))
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
    else:
        save(state["step"])
        summary["after"] = evaluate(run, model)
        if summary["after"]:
            log_metrics({"step": state["step"], **summary["after"]})
        policy_state = ckpt.full_state(unwrapped.policy)  # every process, under FSDP; None otherwise
        if accelerator.is_main_process:
            unwrapped.policy.save_pretrained(out, safe_serialization=True, state_dict=policy_state)
            run.tokenizer.save_pretrained(out)
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
    accelerator.wait_for_everyone()
    # Free the DDP wrapper while every process is still here: freed after end_training()
    # destroyed the process group, it tears gloo down alone and can wait forever for a peer.
    model = optimizer = scheduler = None
    accelerator.free_memory()
    accelerator.end_training()
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The before/after table on the held-out split printed at the end of training."""
    before, after = summary.get("before") or {}, summary.get("after") or {}
    if not after:
        return f"trained {summary['steps']} steps in {summary['seconds']} s (no held-out data: set data.eval or data.eval_fraction for a before/after summary)"
    keys = [k for k in ("eval/rewards/accuracies", "eval/rewards/margins", "eval/loss", "eval/logps/chosen", "eval/logps/rejected") if k in after]
    lines = ["held-out pairs        before      after"]
    lines += [f"{k[5:]:<20}{before.get(k, float('nan')):>8.4f}{after[k]:>11.4f}" for k in keys]
    lines.append(f"trained {summary['steps']} steps in {summary['seconds']} s; model and tokenizer saved to {summary['output_dir']}")
    return "\n".join(lines)
