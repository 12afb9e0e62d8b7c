"""Building a run: accelerator, tokenizer, data, loss, policy and reference (mode and cache)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from prefopt import reference as ref
from prefopt.batching import collate
from prefopt.config import RunConfig
from prefopt.data import fingerprint, load_data
from prefopt.distributed import accelerate_without_fsdp, accelerator_options, check_launch, describe
from prefopt.errors import ConfigError
from prefopt.losses.base import Reference
from prefopt.modeling import PreferenceModel, frozen_copy, load_model, load_tokenizer

log = logging.getLogger("prefopt")


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


def make_accelerator(config: RunConfig) -> Accelerator:
    """An Accelerator for the configured precision and trackers (a clear error for fp16 without CUDA)."""
    precision = config.trainer.precision
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("trainer.precision: fp16 needs a CUDA device (it trains with loss scaling); use bf16 or fp32 on CPU")
    trackers = [t for t in config.trainer.report_to if t != "jsonl"]
    # accelerate keeps its state per process and refuses a second Accelerator with another
    # precision; forget it so train() can run again in one process (the process group stays).
    AcceleratorState._reset_state()
    check_launch()
    with accelerate_without_fsdp():
        accelerator = Accelerator(
            **accelerator_options(),
            mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
            log_with=trackers or None,
            project_dir=config.trainer.output_dir,
        )
    describe(accelerator)
    return accelerator


def fill_cache(run_cfg: RunConfig, accelerator: Accelerator, ref_model: torch.nn.Module, tokenizer, pairs: list, name: str, weights_fp: str) -> torch.Tensor:
    """Reference log-probs of ``pairs`` from the disk cache, computing (once, across processes) and saving them if needed."""

    settings = {"precision": run_cfg.trainer.precision, "max_length": run_cfg.data.max_length,
                "max_prompt_length": run_cfg.data.max_prompt_length}
    parts = ref.cache_parts(weights_fp, ref.tokenizer_fingerprint(tokenizer), fingerprint(pairs), settings)
    key = ref.cache_key(**parts)
    path = Path(run_cfg.reference.cache_dir) / f"{key}.safetensors"
    cached = ref.load_cache(path, key, len(pairs), parts)
    # Every process must take the same branch (computing is collective): on machines that do
    # not share the cache directory, one that lacks the file makes all of them compute it.
    missing = cached is None
    if accelerator.num_processes > 1:
        missing = accelerator.reduce(torch.tensor(float(missing), device=accelerator.device), "sum").item() > 0
    if not missing:
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
    if accelerator.is_local_main_process:  # one writer per machine (atomic, so a shared directory is safe)
        ref.save_cache(path, key, values, parts)
        if accelerator.is_main_process:
            log.info("reference cache (%s): wrote %s", name, path)
    accelerator.wait_for_everyone()
    return values


def setup(config: RunConfig, accelerator: Accelerator | None = None) -> Run:
    """Load tokenizer, data, loss and models; choose the reference mode; fill the cache if used."""
    accelerator = accelerator or make_accelerator(config)
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
                    caches[name] = fill_cache(config, accelerator, source, tokenizer, pairs, name, weights_fp)
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


def precompute_reference(config: RunConfig) -> dict[str, str]:
    """Fill the reference cache for the train and eval data ahead of training."""
    run = setup(config)
    if run.mode != "cache":
        raise ConfigError(f"reference.mode: the run uses mode {run.mode!r}; only 'cache' has anything to precompute")
    return {name: f"{len(t)} pairs" for name, t in run.caches.items()}


