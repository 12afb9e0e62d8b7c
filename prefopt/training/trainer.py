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
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import get_scheduler

from prefopt.config import RunConfig
from prefopt.data.batching import batch_order, pair_length, split_by_tokens
from prefopt.data.examples import Group
from prefopt.data.groups import group_length
from prefopt.data.pairs import fingerprint
from prefopt.errors import ConfigError
from prefopt.losses.base import Feature
from prefopt.training import checkpoint as ckpt
from prefopt.training import distributed, health
from prefopt.training.health import TrainingError
from prefopt.training.interrupt import GracefulStop
from prefopt.training.lock import DirectoryLock
from prefopt.training.resume import breaking_differences, check_before_loading, check_resume, drop_metrics_after, prepare_output, run_identity
from prefopt.training.run import make_accelerator, precompute_reference, setup
from prefopt.training.samples import make_sampler
from prefopt.training.step import LogWindow, evaluate, example_tokens, example_weight, forward_backward, read_flags
from prefopt.training.tracking import json_line, name_runs, tracker_config, tracker_init_kwargs

__all__ = ["TrainingError", "format_summary", "precompute_reference", "setup", "train"]

log = logging.getLogger("prefopt")


def train(config: RunConfig, *, resume: bool = False, overwrite: bool = False, config_path: str = "CONFIG.yaml",
          config_file: str | None = None) -> dict[str, Any]:
    """Train the policy as the config says; returns a summary (metrics before/after, paths, counts).

    The config is checked first (as ``prefopt validate`` does); the main process holds a
    lock on ``trainer.output_dir`` for the whole run; ``config_file`` is never moved by ``--overwrite``.
    """
    from prefopt.testing.losscheck import smoke_test
    from prefopt.training.preflight import preflight

    protect = [config_file] if config_file else []
    preflight(config, resume=resume, overwrite=overwrite, protect=protect)
    smoke_test(config.build_loss())  # the loss on synthetic inputs of exactly its declared features: seconds, before any model
    main = distributed.is_main_process()  # before the Accelerator exists: from the launcher's environment
    with DirectoryLock(config.trainer.output_dir) if main else nullcontext():
        if resume and (finished := check_before_loading(config, distributed.world_size())) is not None:
            return finished  # before data, models or a cache are touched
        return _train(config, resume, overwrite, config_path, protect)


def _train(config: RunConfig, resume: bool, overwrite: bool, config_path: str, protect: list[str]) -> dict[str, Any]:
    return Trainer(config, resume, overwrite, protect).fit(config_path)


class Trainer:
    """One run from its first step to its saved model: the loop in :meth:`fit`, one job per method."""

    def __init__(self, config: RunConfig, resume: bool, overwrite: bool, protect: list[str]) -> None:
        self.config, tc = config, config.trainer
        self.tc = tc
        self.acc = acc = make_accelerator(config)
        self.main = acc.is_main_process
        self.out = prepare_output(config, resume, overwrite, protect) if self.main else Path(tc.output_dir)
        acc.wait_for_everyone()
        self.run = run = setup(config, acc)
        fused = acc.device.type == "cuda" and not distributed.sharded(acc)  # FSDP: plain AdamW on the shards
        self.model, self.optimizer, self.params = distributed.prepare(run, lambda ps: torch.optim.AdamW(
            ps, lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay, fused=(fused and all(p.is_floating_point() for p in ps)) or None))
        self.plan = ForwardPlan(run, acc.num_processes, acc.process_index)
        self.total = tc.max_steps or math.ceil(tc.epochs * self.plan.steps_per_epoch)
        warmup = tc.warmup_steps or math.ceil(tc.warmup_ratio * self.total)
        schedule = "constant_with_warmup" if tc.schedule == "constant" and warmup else tc.schedule  # "constant" alone ignores warmup
        self.scheduler = get_scheduler(schedule, self.optimizer, num_warmup_steps=warmup, num_training_steps=self.total)
        self.unwrapped = acc.unwrap_model(self.model)
        self.named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.run_facts = {"data_fingerprint": fingerprint(run.train_pairs), "total_steps": self.total,
                          **run_identity(config, acc.num_processes)}
        self.ckpt_root = self.out / "checkpoints"
        self.current = config.model_dump(mode="json")
        self.state = {"step": 0, "bad_steps": 0, "overflow_steps": 0, "before": None}
        self.sync = config.reference.sync
        if resume:
            self._restore()
        if self.main and tc.report_to != ["jsonl"]:
            acc.init_trackers(tc.project, config=tracker_config(self.current), init_kwargs=tracker_init_kwargs(tc.report_to, tc.run_name))
            name_runs(acc, tc.run_name)
        self.sample = make_sampler(run, self.unwrapped, self.out)  # trainer.sample_prompts completions at each evaluation

    def fit(self, config_path: str) -> dict[str, Any]:
        """Evaluate, train to the last step (or a stop), then save and evaluate again."""
        state, run, model = self.state, self.run, self.model
        if state["before"] is None:
            state["before"] = evaluate(run, model)
            self.sample(0)
            if state["before"]:
                self.log_metrics({"step": 0, **state["before"]})
        bar = tqdm(total=self.total, initial=state["step"], desc="training", disable=not self.main, dynamic_ncols=True)
        model.train()
        started, interrupted, window = time.time(), None, LogWindow()
        upcoming = self.plan.forwards(state["step"]) if state["step"] < self.total else None
        pending = None  # device flag of the last applied step: did it leave the weights finite (read with the next step's flags)
        with GracefulStop() as stop, logging_redirect_tqdm([log]):  # warnings above the bar, never inside its line
            while state["step"] < self.total:
                step = state["step"]
                batches, weights, padding = upcoming
                result = forward_backward(run, model, batches, weights, self.params)
                # Build the next step's batches on the host while the device works on this one.
                upcoming = self.plan.forwards(step + 1) if step + 1 < self.total else None
                finite, stopping, weights_ok = read_flags(run, result, stop.signal is not None, pending)
                pending = self.apply(step, finite, weights_ok, pending)
                state["step"] = step + 1
                if self.sync is not None and state["step"] % self.sync.every == 0:
                    self.unwrapped.sync_reference(self.sync.mix)  # TR-DPO, counted in steps as TRL counts them
                window.add(result, sum(b["num_tokens"] for b in batches), padding)
                bar.update(1)
                self.bookkeeping(window, bar)
                if stopping:
                    interrupted = stop.signal or signal.SIGTERM
                    self.save(state["step"])
                    break
                if self.tc.save_every and state["step"] % self.tc.save_every == 0 and state["step"] != self.total:
                    self.save(state["step"])
        bar.close()
        return self.finish(time.time() - started, interrupted, config_path)

    def apply(self, step: int, finite: bool, weights_ok: bool, pending: torch.Tensor | None) -> torch.Tensor | None:
        """Apply the step's gradients, or skip and count a non-finite step; returns the new weights-finite flag."""
        if not weights_ok:
            health.check_step(self.named, step, self.reduce_sum)  # names the tensors and stops
        state, optimizer = self.state, self.optimizer
        if self.tc.precision == "fp16":
            optimizer.step()
            if optimizer.step_was_skipped:
                state["overflow_steps"] += 1
            else:
                self.scheduler.step()
        elif finite:
            optimizer.step()
            self.scheduler.step()
            pending = health.weights_finite(self.params)
        else:
            state["bad_steps"] += 1
            log.warning("step %d: non-finite loss or gradient; step skipped (%d so far)", step + 1, state["bad_steps"])
        state["last_skipped"] = not finite and self.tc.precision != "fp16"  # fp16 skips overflowing steps by design
        optimizer.zero_grad(set_to_none=True)
        return pending

    def bookkeeping(self, window: LogWindow, bar: tqdm) -> None:
        """After a step: log (and evaluate and sample) at their cadence; stop after too many bad steps."""
        state, tc, step = self.state, self.tc, self.state["step"]
        if step % tc.log_every == 0 or step == self.total:
            row = {"step": step, "epoch": round(step / self.plan.steps_per_epoch, 4), "lr": self.scheduler.get_last_lr()[0],
                   "bad_steps": state["bad_steps"], **window.row(self.run)}
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('rewards/accuracies', float('nan')):.2f}",
                            margin=f"{row.get('rewards/margins', float('nan')):.3f}")
            if tc.eval_every and step % tc.eval_every == 0 and step != self.total:
                row.update(evaluate(self.run, self.model))
                self.sample(step)
            self.log_metrics(row)
            state.setdefault("first_loss", row["loss"])  # kept in checkpoints, for the end-of-run sign check
            state["last_loss"] = row["loss"]
        if state["bad_steps"] > tc.max_bad_steps:
            self.save(step)
            raise TrainingError(f"{state['bad_steps']} steps had a non-finite loss or gradient (trainer.max_bad_steps = {tc.max_bad_steps}); stopping. Lower trainer.lr or check the data.")

    def finish(self, seconds: float, interrupted: Any, config_path: str) -> dict[str, Any]:
        """The summary; unless interrupted, check and save the final model and evaluate it."""
        state, run, acc = self.state, self.run, self.acc
        summary = {"output_dir": str(self.out), "steps": state["step"], "bad_steps": state["bad_steps"], "reference": run.mode,
                   "seconds": round(seconds, 2), "before": state["before"],
                   **health.step_summary(state["step"], state["bad_steps"], state["overflow_steps"])}
        if interrupted:
            summary["interrupted"] = True
            summary["resume"] = f"prefopt train {config_path} --resume"
            if self.main:
                log.warning("stopped at step %d; checkpoint written to %s; resume with: prefopt train %s --resume",
                            state["step"], self.ckpt_root, config_path)
        else:
            self.save_final(summary)
        acc.wait_for_everyone()
        # Free the DDP wrapper while every process is still here: freed after end_training()
        # destroyed the process group, it tears gloo down alone and can wait forever for a peer.
        self.model = self.optimizer = self.scheduler = None
        acc.free_memory()
        acc.end_training()
        return summary

    def save_final(self, summary: dict[str, Any]) -> None:
        """Check the final weights, checkpoint them, evaluate, and save model, tokenizer and summary."""
        state, run = self.state, self.run
        health.check_final_weights(self.unwrapped, self.reduce_sum)
        self.save(state["step"])
        health.check_skipped(state["step"], state["bad_steps"] + state["overflow_steps"])
        summary["after"] = evaluate(run, self.model)
        self.sample(state["step"])
        if summary["after"]:
            self.log_metrics({"step": state["step"], **summary["after"]})
        health.check_final_loss(summary["after"], state.get("last_skipped", False))
        warning = health.sign_warning(state["before"] or {}, summary["after"], state.get("first_loss"), state.get("last_loss"))
        if warning:
            summary["warnings"] = [warning]
            log.warning("%s", warning)
        policy_state = ckpt.full_state(self.unwrapped.policy)  # every process, under FSDP; None otherwise
        if self.main:
            ckpt.save_final_model(self.out, self.unwrapped.policy, run.tokenizer, policy_state, summary)

    def _restore(self) -> None:
        """``--resume``: the latest complete checkpoint, after checking that nothing that breaks the run changed."""
        path = ckpt.latest_valid(self.ckpt_root)
        if path is None:
            raise ckpt.CheckpointError(f"--resume: no complete checkpoint in {self.ckpt_root}")
        saved = json.loads((path / "state.json").read_text())
        diffs = breaking_differences(saved, self.current, say=False)  # said by check_before_loading
        if diffs:
            raise ConfigError(f"--resume: the config changed in ways that break the run: {', '.join(diffs)}")
        check_resume(saved, self.run_facts, self.config)
        self.state = ckpt.load_checkpoint(path, self.unwrapped, self.optimizer, self.scheduler)
        if self.sync is not None:
            ckpt.load_reference(path, self.unwrapped.reference)
        log.info("resuming from %s (step %d)", path, self.state["step"])
        if self.main:
            drop_metrics_after(self.out / "metrics.jsonl", self.state["step"])

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(t.to(self.acc.device), "sum").cpu()

    def log_metrics(self, row: dict[str, Any]) -> None:
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json_line(row) + "\n")
            if self.tc.report_to != ["jsonl"]:
                self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("step"))

    def save(self, step: int) -> None:
        health.check_step(self.named, step, self.reduce_sum)  # never checkpoint non-finite weights
        gathered = ckpt.gather(self.unwrapped, self.optimizer)  # every process, under FSDP
        if self.main:
            reference = ckpt.reference_state(self.unwrapped.reference) if self.sync is not None else None
            ckpt.save_checkpoint(self.ckpt_root, step, self.unwrapped, self.optimizer, self.scheduler,
                                 {**self.state, **self.run_facts, "config": self.current}, self.tc.keep_checkpoints, gathered, reference)
        self.acc.wait_for_everyone()


class ForwardPlan:
    """Which pairs each forward of an optimiser step takes on this process (the same on every run of the seed)."""

    def __init__(self, run: Any, world: int, rank: int) -> None:
        self.run, self.tc, self.world, self.rank = run, run.config.trainer, world, rank
        mismatched = Feature.MISMATCHED_LOGPS in run.needs
        self.lengths = [group_length(p) if isinstance(p, Group) else pair_length(p) for p in run.train_pairs]
        self.sizes = [example_tokens(p, run.shared, mismatched) for p in run.train_pairs]
        self.weights = [example_weight(p) for p in run.train_pairs]
        tc = self.tc
        micro_per_epoch = len(batch_order(self.lengths, tc.batch_size * world, tc.seed, 0, tc.group_by_length))
        from prefopt.training.preflight import epoch_problems

        for problem in epoch_problems(len(run.train_pairs), run.config, world):
            raise ConfigError(problem)  # else an IndexError in the loop
        self.steps_per_epoch = max(1, micro_per_epoch // tc.grad_accum)
        self._epoch: dict[int, list[list[int]]] = {}

    def micro_batch(self, m: int, of: int | None = None) -> list[int]:
        """Micro-batch ``m`` of process ``of`` (default: this one): its slice of the ``m``-th global batch."""
        tc, of = self.tc, self.rank if of is None else of
        epoch, j = divmod(m, self.steps_per_epoch * tc.grad_accum)
        if epoch not in self._epoch:
            self._epoch.clear()
            self._epoch[epoch] = batch_order(self.lengths, tc.batch_size * self.world, tc.seed, epoch, tc.group_by_length)
        return self._epoch[epoch][j][of * tc.batch_size : (of + 1) * tc.batch_size]

    def forwards(self, step: int) -> tuple[list[dict[str, Any]], list[float], float]:
        """The batches of one optimiser step on this process, each one's share of its pairs, and padding."""
        tc, accum = self.tc, self.tc.grad_accum
        every = [[self.micro_batch(step * accum + k, r) for k in range(accum)] for r in range(self.world)]
        if tc.max_tokens_per_forward is not None:
            # every process runs as many forwards as the one that needs most (FSDP gathers weights in each)
            pairs = [[i for g in forwards for i in g] for forwards in every]
            most = max(len(split_by_tokens(p, self.sizes, tc.max_tokens_per_forward)) for p in pairs)
            every = [split_by_tokens(p, self.sizes, tc.max_tokens_per_forward, at_least=most) for p in pairs]
        groups = every[self.rank]
        w = [sum(self.weights[i] for i in g) for g in groups]
        batches = [self.run.make_batch(self.run.train_pairs, g, "train") for g in groups]
        if self.world > 1 and Feature.MISMATCHED_LOGPS in self.run.needs:
            # forward i's examples on every process, known here on the host: the step gathers their mismatched
            # log-probs across processes without first exchanging sizes
            for i, batch in enumerate(batches):
                batch["gather_counts"] = [len(forwards[i]) for forwards in every]
        padding = sum(b["padding"] * b["input_ids"].numel() for b in batches) / sum(b["input_ids"].numel() for b in batches)
        return batches, [x / sum(w) for x in w], padding


def format_summary(summary: dict[str, Any]) -> str:
    """The before/after table on the held-out split printed at the end of training."""
    before, after = summary.get("before") or {}, summary.get("after") or {}
    steps = f"{summary['steps']} steps"
    if "steps_skipped" in summary:
        steps += f" ({summary['steps_applied']} applied, {summary['steps_skipped']} skipped)"
    if not after:
        return f"trained {steps} in {summary['seconds']} s (no held-out data: set data.eval or data.eval_fraction for a before/after summary)"
    keys = [k for k in ("eval/rewards/accuracies", "eval/rewards/margins", "eval/logratios/accuracies", "eval/logratios/margins",
                        "eval/loss", "eval/logps/chosen", "eval/logps/rejected") if k in after]
    lines = ["held-out pairs        before      after"]
    num = lambda v: float("nan") if v is None else v  # noqa: E731 - a summary.json read back has null for NaN
    lines += [f"{k[5:]:<20}{num(before.get(k)):>8.4f}{num(after[k]):>11.4f}" for k in keys]
    if abs(before.get("eval/rewards/margins", 1.0)) < 1e-6:
        lines.append("(before: the policy equals the reference, so every margin is 0 and accuracy counts these ties as misses)")
    lines.append(f"trained {steps} in {summary['seconds']} s; model and tokenizer saved to {summary['output_dir']}")
    lines += summary.get("warnings", [])
    return "\n".join(lines)
