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
from prefopt import distributed, health
from prefopt.batching import batch_order, pair_length, pair_tokens, split_by_tokens
from prefopt.config import RunConfig
from prefopt.data import fingerprint
from prefopt.errors import ConfigError
from prefopt.health import TrainingError
from prefopt.interrupt import GracefulStop
from prefopt.lock import DirectoryLock
from prefopt.resume import check_resume, config_differences, drop_metrics_after, prepare_output
from prefopt.run import make_accelerator, precompute_reference, setup
from prefopt.samples import make_sampler
from prefopt.step import LogWindow, evaluate, forward_backward, read_flags
from prefopt.tracking import tracker_config

__all__ = ["TrainingError", "format_summary", "precompute_reference", "setup", "train"]

log = logging.getLogger("prefopt")


def train(config: RunConfig, *, resume: bool = False, overwrite: bool = False, config_path: str = "CONFIG.yaml",
          config_file: str | None = None) -> dict[str, Any]:
    """Train the policy as the config says; returns a summary (metrics before/after, paths, counts).

    The config is checked first (as ``prefopt validate`` does); the main process holds a
    lock on ``trainer.output_dir`` for the whole run; ``config_file`` is never moved by ``--overwrite``.
    """
    from prefopt.losscheck import smoke_test
    from prefopt.preflight import preflight

    preflight(config)
    smoke_test(config.build_loss())  # the loss on synthetic inputs of exactly its declared features: seconds, before any model
    main = distributed.is_main_process()  # before the Accelerator exists: from the launcher's environment
    with DirectoryLock(config.trainer.output_dir) if main else nullcontext():
        return _train(config, resume, overwrite, config_path, [config_file] if config_file else [])


def _train(config: RunConfig, resume: bool, overwrite: bool, config_path: str, protect: list[str]) -> dict[str, Any]:
    accelerator = make_accelerator(config)
    out = prepare_output(config, resume, overwrite, protect) if accelerator.is_main_process else Path(config.trainer.output_dir)
    accelerator.wait_for_everyone()
    run = setup(config, accelerator)
    tc = config.trainer
    fused = accelerator.device.type == "cuda" and not distributed.sharded(accelerator)  # FSDP: plain AdamW on the shards
    model, optimizer, params = distributed.prepare(run, lambda ps: torch.optim.AdamW(
        ps, lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay, fused=(fused and all(p.is_floating_point() for p in ps)) or None))
    world, rank = accelerator.num_processes, accelerator.process_index
    lengths = [pair_length(p) for p in run.train_pairs]
    sizes = [pair_tokens(p) for p in run.train_pairs]
    micro_per_epoch = len(batch_order(lengths, tc.batch_size * world, tc.seed, 0, tc.group_by_length))
    steps_per_epoch = max(1, micro_per_epoch // tc.grad_accum)
    total = tc.max_steps or math.ceil(tc.epochs * steps_per_epoch)
    schedule = "constant_with_warmup" if tc.schedule == "constant" and tc.warmup_steps else tc.schedule  # "constant" alone ignores warmup
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=total)
    unwrapped = accelerator.unwrap_model(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    reduce_sum = lambda t: accelerator.reduce(t.to(accelerator.device), "sum").cpu()  # noqa: E731
    run_facts = {"data_fingerprint": fingerprint(run.train_pairs), "total_steps": total}
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
        check_resume(saved, run_facts, config)
        state = ckpt.load_checkpoint(path, unwrapped, optimizer, scheduler)
        log.info("resuming from %s (step %d)", path, state["step"])
        if accelerator.is_main_process:
            drop_metrics_after(out / "metrics.jsonl", state["step"])
    if accelerator.is_main_process and tc.report_to != ["jsonl"]:
        accelerator.init_trackers("prefopt", config=tracker_config(current))
    metrics_file = out / "metrics.jsonl"

    def log_metrics(row: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            if tc.report_to != ["jsonl"]:
                accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("step"))

    sample = make_sampler(run, unwrapped, out)  # trainer.sample_prompts completions at each evaluation
    if state["before"] is None:
        state["before"] = evaluate(run, model)
        sample(0)
        if state["before"]:
            log_metrics({"step": 0, **state["before"]})
    epoch_cache: dict[int, list[list[int]]] = {}

    def micro_batch(m: int, of: int = rank) -> list[int]:
        """Micro-batch ``m`` of process ``of``: its slice of the ``m``-th global batch."""
        epoch, j = divmod(m, steps_per_epoch * tc.grad_accum)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = batch_order(lengths, tc.batch_size * world, tc.seed, epoch, tc.group_by_length)
        return epoch_cache[epoch][j][of * tc.batch_size : (of + 1) * tc.batch_size]

    def save(step: int) -> None:
        health.check_step(named, step, reduce_sum)  # never checkpoint non-finite weights
        gathered = ckpt.gather(unwrapped, optimizer)  # every process, under FSDP
        if accelerator.is_main_process:
            ckpt.save_checkpoint(ckpt_root, step, unwrapped, optimizer, scheduler, {**state, **run_facts, "config": current}, tc.keep_checkpoints, gathered)
        accelerator.wait_for_everyone()

    def forwards(step: int) -> tuple[list[dict[str, Any]], list[float], float]:
        """The batches of one optimiser step on this process, each one's share of its pairs, and padding."""
        groups = [micro_batch(step * tc.grad_accum + k) for k in range(tc.grad_accum)]
        if tc.max_tokens_per_forward is not None:
            # every process runs as many forwards as the one that needs most (FSDP gathers weights in each)
            pairs = [[i for k in range(tc.grad_accum) for i in micro_batch(step * tc.grad_accum + k, r)] for r in range(world)]
            most = max(len(split_by_tokens(p, sizes, tc.max_tokens_per_forward)) for p in pairs)
            groups = split_by_tokens(pairs[rank], sizes, tc.max_tokens_per_forward, at_least=most)
        n = sum(len(g) for g in groups)
        batches = [run.make_batch(run.train_pairs, g, "train") for g in groups]
        padding = sum(b["padding"] * b["input_ids"].numel() for b in batches) / sum(b["input_ids"].numel() for b in batches)
        return batches, [len(g) / n for g in groups], padding

    bar = tqdm(total=total, initial=state["step"], desc="training", disable=not accelerator.is_main_process, dynamic_ncols=True)
    model.train()
    started, interrupted = time.time(), None
    window = LogWindow()
    upcoming = forwards(state["step"]) if state["step"] < total else None
    pending = None  # device flag of the last applied step: did it leave the weights finite (read with the next step's flags)
    with GracefulStop() as stop:
        while state["step"] < total:
            step = state["step"]
            batches, weights, padding = upcoming
            result = forward_backward(run, model, batches, weights, params)
            # Build the next step's batches on the host while the device works on this one.
            upcoming = forwards(step + 1) if step + 1 < total else None
            finite, stopping, weights_ok = read_flags(run, result, stop.signal is not None, pending)
            if not weights_ok:
                health.check_step(named, step, reduce_sum)  # names the tensors and stops
            if tc.precision == "fp16":
                optimizer.step()
                if optimizer.step_was_skipped:
                    state["overflow_steps"] += 1
                else:
                    scheduler.step()
            elif finite:
                optimizer.step()
                scheduler.step()
                pending = health.weights_finite(params)
            else:
                state["bad_steps"] += 1
                log.warning("step %d: non-finite loss or gradient; step skipped (%d so far)", step + 1, state["bad_steps"])
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step + 1
            window.add(result, sum(b["num_tokens"] for b in batches), padding)
            bar.update(1)
            if state["step"] % tc.log_every == 0 or state["step"] == total:
                row = {"step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 4), "lr": scheduler.get_last_lr()[0],
                       "bad_steps": state["bad_steps"], **window.row(run)}
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('rewards/accuracies', float('nan')):.2f}",
                                margin=f"{row.get('rewards/margins', float('nan')):.3f}")
                if tc.eval_every and state["step"] % tc.eval_every == 0 and state["step"] != total:
                    row.update(evaluate(run, model))
                    sample(state["step"])
                log_metrics(row)
            if state["bad_steps"] > tc.max_bad_steps:
                save(state["step"])
                raise TrainingError(f"{state['bad_steps']} steps had a non-finite loss or gradient (trainer.max_bad_steps = {tc.max_bad_steps}); stopping. Lower trainer.lr or check the data.")
            if stopping:
                interrupted = stop.signal or signal.SIGTERM
                save(state["step"])
                break
            if tc.save_every and state["step"] % tc.save_every == 0 and state["step"] != total:
                save(state["step"])
    bar.close()
    summary = {"output_dir": str(out), "steps": state["step"], "bad_steps": state["bad_steps"], "reference": run.mode,
               "seconds": round(time.time() - started, 2), "before": state["before"],
               **health.step_summary(state["step"], state["bad_steps"], state["overflow_steps"])}
    if interrupted:
        summary["interrupted"] = True
        summary["resume"] = f"prefopt train {config_path} --resume"
        if accelerator.is_main_process:
            log.warning("stopped at step %d; checkpoint written to %s; resume with: prefopt train %s --resume",
                        state["step"], ckpt_root, config_path)
    else:
        health.check_final_weights(unwrapped, reduce_sum)
        save(state["step"])
        health.check_skipped(state["step"], state["bad_steps"] + state["overflow_steps"])
        summary["after"] = evaluate(run, model)
        sample(state["step"])
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
    steps = f"{summary['steps']} steps"
    if "steps_skipped" in summary:
        steps += f" ({summary['steps_applied']} applied, {summary['steps_skipped']} skipped)"
    if not after:
        return f"trained {steps} in {summary['seconds']} s (no held-out data: set data.eval or data.eval_fraction for a before/after summary)"
    keys = [k for k in ("eval/rewards/accuracies", "eval/rewards/margins", "eval/loss", "eval/logps/chosen", "eval/logps/rejected") if k in after]
    lines = ["held-out pairs        before      after"]
    lines += [f"{k[5:]:<20}{before.get(k, float('nan')):>8.4f}{after[k]:>11.4f}" for k in keys]
    if abs(before.get("eval/rewards/margins", 1.0)) < 1e-6:
        lines.append("(before: the policy equals the reference, so every margin is 0 and accuracy counts these ties as misses)")
    lines.append(f"trained {steps} in {summary['seconds']} s; model and tokenizer saved to {summary['output_dir']}")
    return "\n".join(lines)
