"""Building a run: accelerator, tokenizer, data, loss, policy and reference (mode and cache)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from prefopt.config import RunConfig
from prefopt.data.batching import collate, completion_tokens, forward_plans, pack, pair_tokens, to_device
from prefopt.data.examples import Group
from prefopt.data.groups import group_tokens, pack_groups
from prefopt.data.pairs import fingerprint, load_data
from prefopt.engine import accelerators, attention
from prefopt.engine import reference as ref
from prefopt.engine.modeling import PreferenceModel, disable_dropout, frozen_copy, load_model, load_tokenizer, weights_dtype
from prefopt.errors import ConfigError
from prefopt.losses.base import TOKEN_FEATURES, Feature, needs_of, reference_for, takes_of
from prefopt.training import distributed, health
from prefopt.training.distributed import accelerate_without_fsdp, accelerator_options, check_launch, describe

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
    caches: dict[str, ref.RefCache] = field(default_factory=dict)
    kernel: str = "sdpa"
    shared: bool = False  # each pair's prompt computed once (trainer.share_prompt)
    needs: frozenset[Feature] = frozenset()  # what the loss reads (computed once)
    # under FSDP, the cache to fill once sharded: (weights fingerprint, per-token, a separate reference or None)
    pending_cache: tuple[str, bool, torch.nn.Module | None] | None = None

    def fill_pending_cache(self, model: torch.nn.Module) -> None:
        """Under FSDP, compute the reference cache with the sharded policy (at step 0, the reference), or with
        a separate reference sharded the same way: each process holds shards, never a whole model. Collective."""
        if self.pending_cache is None:
            return
        weights_fp, per_token, separate = self.pending_cache
        acc = self.accelerator
        if separate is not None:
            model = distributed.shard_from_first(PreferenceModel(separate, chunk_tokens=self.config.trainer.logprob_chunk_tokens,
                                                                 kernel=self.kernel), acc)

        def forward(batch: dict[str, Any]) -> torch.Tensor:
            # no_grad, not inference_mode: FSDP reuses the policy's all-gather buffers in training
            with acc.autocast(), torch.no_grad():
                return model(to_device(batch, acc.device))["logps"]

        if acc.is_main_process:
            log.info("reference cache: computed by the sharded %s (FSDP) where not on disk", "policy" if separate is None else "model.reference")
        model.eval()
        for name, pairs in (("train", self.train_pairs), ("eval", self.eval_pairs)):
            if pairs:
                self.caches[name] = fill_cache(self.config, acc, forward, self.tokenizer, pairs, name, weights_fp, per_token,
                                               matched=True, shared=self.shared)
        model.train()
        self.pending_cache = None

    def make_batch(self, pairs: list, indices: Any, split: str | None = None) -> dict[str, Any]:
        """The batch of ``pairs[i] for i in indices`` in the run's layout (packed or padded), on the host.

        With ``split`` and a cached reference, the batch carries its reference log-probs
        (``ref_sums``, and ``ref_tokens`` when the loss reads them per token; for groups the
        ``(B, W)`` grid ``ref_grid``), so they travel to the device with it.
        """
        mismatched = Feature.MISMATCHED_LOGPS in self.needs
        batch = make_batch(self.config, self.tokenizer.pad_token_id, pairs, indices, self.shared, mismatched)
        cache = self.caches.get(split) if split is not None and self.mode == "cache" else None
        if isinstance(cache, ref.GroupRefCache):
            counts = [len(pairs[i].completions) for i in batch["index_host"]]
            batch["ref_grid"] = cache.grid(batch["index_host"], counts, batch["group_shape"], batch["has_mismatched"])
        elif cache is not None:
            batch["ref_sums"] = cache.pair_sums(batch["index_host"])
            if Feature.REF_TOKEN_LOGPS in self.needs:
                batch["ref_tokens"] = cache.batch_tokens(batch["index_host"], batch).values
        return batch


def make_batch(config: RunConfig, pad_id: int, pairs: list, indices: Any, shared: bool = False,
               mismatched: bool = False) -> dict[str, Any]:
    """Pack (each prompt once with ``shared``; or, with ``trainer.packing: false``, pad) the given pairs or groups
    (with their mismatched completions if ``mismatched``)."""
    chosen = [pairs[i] for i in indices]
    if isinstance(chosen[0], Group):
        return pack_groups(chosen, indices, pad_id, packing=config.trainer.packing, shared=shared, mismatched=mismatched,
                           multiple_of=config.trainer.pad_to_multiple_of)
    if config.trainer.packing:
        return pack(chosen, indices, pad_id, config.trainer.pad_to_multiple_of, shared)
    return collate(chosen, indices, pad_id)


def use_packed_attention(model: torch.nn.Module) -> None:
    """Route the model's attention layers through :func:`prefopt.engine.attention.packed_attention`."""
    attention.register()
    model.config._attn_implementation = attention.NAME


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


def fill_cache(run_cfg: RunConfig, accelerator: Accelerator, forward: Callable[[dict[str, Any]], torch.Tensor], tokenizer,
               pairs: list, name: str, weights_fp: str, per_token: bool = False, matched: bool = False,
               shared: bool = False) -> ref.RefCache:
    """Reference log-probs of ``pairs`` from the disk cache, computing (once, across processes) and saving them if needed.

    ``forward(batch)``: the reference's flat per-token log-probs of a host batch; ``matched``: every process
    runs as many forwards (a sharded model gathers its shards in each); ``shared``: batches with each prompt once
    (the same values, so the cache does not depend on it)."""

    settings = {"precision": run_cfg.trainer.precision, "max_length": run_cfg.data.max_length,
                "max_prompt_length": run_cfg.data.max_prompt_length, "per_token": per_token}
    if run_cfg.data.max_completion_length is not None:  # only when set: caches written before the field keep their keys
        settings["max_completion_length"] = run_cfg.data.max_completion_length
    groups = source_groups(pairs) if not per_token else None
    if groups is not None:  # groups, or pairs taken from rankings: one cache per completion of the groups
        cache = fill_group_cache(run_cfg, accelerator, forward, tokenizer, groups, name, weights_fp, matched, shared, settings)
        if isinstance(pairs[0], Group):
            return cache
        index = {id(g): i for i, g in enumerate(groups)}
        return ref.RefCache(cache.pair_sums([(index[id(p.source[0])], p.source[1], p.source[2]) for p in pairs]))
    parts = ref.cache_parts(weights_fp, ref.tokenizer_fingerprint(tokenizer), fingerprint(pairs), settings)
    key = ref.cache_key(**parts)
    path = Path(run_cfg.reference.cache_dir).expanduser() / f"{key}.safetensors"
    cached = ref.load_cache(path, key, len(pairs), parts, per_token)
    if found_everywhere(accelerator, cached, name, path):
        return cached
    bs = run_cfg.reference.batch_size or run_cfg.trainer.batch_size
    budget = run_cfg.trainer.max_tokens_per_forward  # the training budget bounds these forwards too
    sizes = [pair_tokens(p, shared) for p in pairs] if budget else [0] * len(pairs)
    mine = forward_plans(sizes, bs, budget, accelerator.num_processes, matched)[accelerator.process_index]
    batches = [make_batch(run_cfg, tokenizer.pad_token_id, pairs, g or [0], shared) | ({"filler": True} if g is None else {}) for g in mine]

    counts = [(completion_tokens(p.prompt_ids, p.chosen_ids), completion_tokens(p.prompt_ids, p.rejected_ids)) for p in pairs] if per_token else None
    local = ref.compute_ref_logps(forward, batches, len(pairs), accelerator.is_main_process, counts)
    owned = torch.zeros(len(pairs), dtype=torch.bool)
    owned[[i for g in mine if g for i in g]] = True
    # pairs another process computed count as zero here; a NaN the model gave stays NaN
    sums = torch.where(owned[:, None], local.sums, 0.0)
    reduce = lambda t: accelerator.reduce(t.to(accelerator.device), "sum").cpu()  # noqa: E731
    values = ref.RefCache(reduce(sums), reduce(local.tokens) if per_token else None, local.offsets, local.split)
    bad = (~torch.isfinite(values.sums)).any(-1).nonzero()
    if len(bad):
        raise ConfigError(f"data.{'eval' if name == 'eval' else 'train'}: the reference model's log-probs are not finite for "
                          f"{len(bad)} pairs (first: row {pairs[int(bad[0])].row}); check the reference weights and precision")
    if accelerator.is_local_main_process:  # one writer per machine (atomic, so a shared directory is safe)
        ref.save_cache(path, key, values, parts)
        if accelerator.is_main_process:
            log.info("reference cache (%s): wrote %s", name, path)
    accelerator.wait_for_everyone()
    return values


def found_everywhere(accelerator: Accelerator, cached: Any, name: str, path: Path) -> bool:
    """Whether every process found the cache on disk. All must take the same branch (computing it is
    collective): on machines that do not share the cache directory, one that lacks it makes all compute it."""
    missing = cached is None
    if accelerator.num_processes > 1:
        missing = accelerator.reduce(torch.tensor(float(missing), device=accelerator.device), "sum").item() > 0
    if not missing:
        log.info("reference cache (%s): reusing %s", name, path)
    return not missing


def source_groups(examples: list) -> list[Group] | None:
    """The groups ``examples`` are (or, for pairs from rankings, come from, in order of first use); ``None`` for plain pairs."""
    if isinstance(examples[0], Group):
        return examples
    if any(p.source is None for p in examples):
        return None
    seen: dict[int, Group] = {}
    for p in examples:
        seen.setdefault(id(p.source[0]), p.source[0])
    return list(seen.values())


def fill_group_cache(run_cfg: RunConfig, accelerator: Accelerator, forward: Callable[[dict[str, Any]], torch.Tensor], tokenizer,
                     groups: list[Group], name: str, weights_fp: str, matched: bool, shared: bool, settings: dict) -> ref.GroupRefCache:
    """Reference log-probs of every completion of ``groups`` (with their mismatched ones), from the disk cache or
    computed (once, across processes) and saved: one cache for every loss that trains on these groups."""
    parts = ref.cache_parts(weights_fp, ref.tokenizer_fingerprint(tokenizer), fingerprint(groups), settings)
    key = ref.cache_key(**parts)
    path = Path(run_cfg.reference.cache_dir).expanduser() / f"{key}.safetensors"
    counts = [len(g.completions) + (g.mismatched_ids is not None) for g in groups]
    cached = ref.load_group_cache(path, key, counts)
    if found_everywhere(accelerator, cached, name, path):
        return cached
    bs = run_cfg.reference.batch_size or run_cfg.trainer.batch_size
    budget = run_cfg.trainer.max_tokens_per_forward
    sizes = [group_tokens(g, shared, True) for g in groups] if budget else [0] * len(groups)
    mine = forward_plans(sizes, bs, budget, accelerator.num_processes, matched)[accelerator.process_index]
    batches = [make_batch(run_cfg, tokenizer.pad_token_id, groups, g or [0], shared, True) | ({"filler": True} if g is None else {})
               for g in mine]
    local = ref.compute_group_ref(forward, batches, counts, accelerator.is_main_process)
    values = ref.GroupRefCache(accelerator.reduce(local.values.to(accelerator.device), "sum").cpu(), local.offsets)
    bad = (~torch.isfinite(values.values)).nonzero()
    if len(bad):
        g = int(torch.searchsorted(values.offsets, bad[0], right=True)) - 1
        raise ConfigError(f"data.{'eval' if name == 'eval' else 'train'}: the reference model's log-probs are not finite for "
                          f"{len(bad)} completions (first: row {groups[g].row}); check the reference weights and precision")
    if accelerator.is_local_main_process:
        ref.save_cache(path, key, values, parts)
        if accelerator.is_main_process:
            log.info("reference cache (%s): wrote %s", name, path)
    accelerator.wait_for_everyone()
    return values


def setup(config: RunConfig, accelerator: Accelerator | None = None) -> Run:
    """Load tokenizer, data, loss and models; choose the reference mode; fill the cache if used."""
    accelerator = accelerator or make_accelerator(config)
    set_seed(config.trainer.seed)
    loss = health.CheckedLoss(config.build_loss())
    needs = needs_of(loss)
    mode, why = ref.choose_mode(config.reference.mode, reference_for(needs), config.reference.sync is not None)
    log.info("reference model: %s (%s)", mode, why)
    log.info("loss %s reads: %s", getattr(loss, "name", loss), ", ".join(sorted(f.value for f in needs)))
    kernel, why = attention.choose_kernel(config.trainer.attention, accelerator.device, config.trainer.packing, config.trainer.precision)
    log.info("attention: %s (%s)", kernel, why)
    accelerators.check(accelerator.device, liger=config.trainer.liger)
    tokenizer = load_tokenizer(config.model, config.data.chat_template)
    train_pairs, eval_pairs, reports = load_data(config.data, tokenizer, config.trainer.seed, takes_of(loss), loss.name)
    for report in reports:
        log.info("%s", report.summary())
    if isinstance(train_pairs[0], Group):
        check_group_needs(loss.name, needs, train_pairs[0].kind)
    if len(train_pairs) < config.trainer.batch_size * accelerator.num_processes:
        raise ConfigError(f"data.train: {len(train_pairs)} usable pairs, fewer than one batch ({config.trainer.batch_size} x {accelerator.num_processes} processes)")
    # FSDP: only the first process reads the weights; the others receive their shards from it once sharded
    empty = distributed.sharded(accelerator) and not accelerator.is_main_process
    if distributed.sharded(accelerator) and accelerator.is_main_process:
        log.info("model: weights read by the first process only; the others receive their shards once sharded (FSDP)")
    policy = load_model(config.model, empty=empty, dtype=weights_dtype(config.model, config.trainer.master_weights))
    describe_weights(config, policy)
    if config.trainer.packing:
        use_packed_attention(policy)
    elif kernel == "eager":
        policy.config._attn_implementation = "eager"
    mismatched = Feature.MISMATCHED_LOGPS in needs
    shared = _share_and_check(config, accelerator, policy, tokenizer.pad_token_id, train_pairs, mismatched)
    batch_of = lambda pairs, idx: make_batch(config, tokenizer.pad_token_id, pairs, idx, shared, mismatched)  # noqa: E731
    reference: torch.nn.Module | str | None = None
    caches: dict[str, ref.RefCache] = {}
    pending = None
    if mode != "none":
        ref_model = load_model(config.model, config.model.reference, empty) if config.model.reference else None
        if ref_model is not None:
            ref_model.config._attn_implementation = policy.config._attn_implementation
            distributed.on_main_process(accelerator, lambda: health.check_start(
                ref_model, batch_of, train_pairs, config.trainer.logprob_chunk_tokens, "sdpa", "model.reference", mismatched))
        if mode == "cache":
            source = ref_model or policy  # before training, the policy is the reference
            weights_fp = distributed.on_main_process(accelerator, lambda: ref.weights_fingerprint(source))
            per_token = Feature.REF_TOKEN_LOGPS in needs
            if distributed.sharded(accelerator):
                pending = (weights_fp, per_token, ref_model)  # computed sharded: Run.fill_pending_cache
            else:
                caches = _fill_caches(config, accelerator, source, kernel, tokenizer, (train_pairs, eval_pairs), weights_fp,
                                      per_token, shared)
        elif ref_model is not None:
            reference = frozen_copy(ref_model, _precision_dtype(config))
        elif config.model.lora is None:
            reference = frozen_copy(policy, _precision_dtype(config))
        else:
            reference = "adapter"
    policy = accelerators.apply(_for_training(config, policy), config.trainer, accelerator.device)
    model = PreferenceModel(policy, reference, config.trainer.logprob_chunk_tokens, kernel)
    if config.reference.sync is not None:
        if distributed.sharded(accelerator):
            raise ConfigError("reference.sync: not supported with FSDP yet (the reference would need sharding like the policy)")
        model.sync_pairs()  # the reference matches the policy parameter for parameter
    return Run(config, accelerator, tokenizer, model, loss, mode, train_pairs, eval_pairs, caches, kernel, shared, needs, pending)


def _for_training(config: RunConfig, policy: torch.nn.Module) -> torch.nn.Module:
    """The policy as it trains: with its LoRA adapter, gradient checkpointing, and no dropout."""
    if config.model.lora is not None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("model.lora: needs the peft package (pip install 'prefopt[peft]')") from None
        policy = get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", **config.model.lora))
        health.check_output_head(policy)
    if config.trainer.gradient_checkpointing:
        if hasattr(policy, "activation_checkpointing_enable"):  # the name since transformers 5
            policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if dropped := disable_dropout(policy):  # with a reference model: its frozen copy runs in eval mode anyway
        log.info("dropout: set to 0 (%s); prefopt trains without dropout, so a resumed run equals an uninterrupted one", ", ".join(dropped))
    return policy


def _fill_caches(config: RunConfig, accelerator: Accelerator, source: torch.nn.Module, kernel: str, tokenizer,
                 splits: tuple[list, list], weights_fp: str, per_token: bool, shared: bool) -> dict[str, ref.RefCache]:
    """The reference caches of the train and eval splits, computed by ``source`` (unsharded) where not on disk."""
    module = PreferenceModel(source, chunk_tokens=config.trainer.logprob_chunk_tokens, kernel=kernel).to(accelerator.device).eval()

    def forward(batch: dict[str, Any]) -> torch.Tensor:
        with accelerator.autocast(), torch.inference_mode():
            return module(to_device(batch, accelerator.device))["logps"]

    return {name: fill_cache(config, accelerator, forward, tokenizer, examples, name, weights_fp, per_token, shared=shared)
            for name, examples in zip(("train", "eval"), splits) if examples}


def check_group_needs(loss_name: str, needs: frozenset[Feature], kind: str) -> None:
    """Refuse features the engine does not compute for groups yet (per-token values, the live KL)."""
    unsupported = sorted(f.value for f in needs if f in TOKEN_FEATURES or f == Feature.KL)
    if unsupported:
        raise ConfigError(f"loss {loss_name!r} reads {', '.join(unsupported)}, which the engine computes for pairs only; "
                          f"on {kind} it provides per-completion sums (policy_logps, ref_logps, completion_tokens, mismatched_logps)")
    if kind == "labelled" and Feature.MISMATCHED_LOGPS not in needs:
        log.info("labelled data: the loss reads no mismatched log-probs, so no mismatched completions are computed")


def describe_weights(config: RunConfig, policy: torch.nn.Module) -> None:
    """Log the dtype the weights are held in and what AdamW updates; warn where updates are lost to rounding."""
    held = next(policy.parameters()).dtype
    if config.model.lora is not None:
        log.info("weights: base held frozen in %s (model.dtype); LoRA adapters trained in fp32", config.model.dtype)
    elif held == torch.float32:
        shown = f"read in {config.model.dtype}, " if config.model.dtype != "fp32" else ""
        log.info("weights: %sheld and updated by AdamW in fp32; forwards in %s (trainer.precision)", shown, config.trainer.precision)
    else:
        # an AdamW step moves each weight by about lr; a bf16 weight w only changes by steps of |w| * 2**-8
        log.warning("weights: held and updated by AdamW in %s (trainer.master_weights: none): an update smaller than half "
                    "the spacing of the weight's dtype is rounded away, at lr %g most are (bf16 spacing of 0.02 is 1.2e-4); "
                    "trainer.master_weights: fp32 keeps fp32 masters", config.model.dtype, config.trainer.lr)


def _share_and_check(config: RunConfig, accelerator: Accelerator, policy: torch.nn.Module, pad_id: int, pairs: list,
                     mismatched: bool = False) -> bool:
    """Whether prompts are shared (logged with why), after the start-up check of the engine's log-probs against
    the model's own forward on that layout; under ``auto``, a model that fails it only when shared runs unshared."""
    shared, why = attention.choose_sharing(config.trainer.share_prompt, policy, config.trainer.packing)
    log.info("shared prompts: %s (%s)", "on" if shared else "off", why)

    def check(share: bool) -> None:
        # on the host, before the model moves to its device: the CPU attention kernel (what is checked is the head's transform)
        batch_of = lambda ps, idx: make_batch(config, pad_id, ps, idx, share, mismatched)  # noqa: E731
        distributed.on_main_process(accelerator, lambda: health.check_start(policy, batch_of, pairs, config.trainer.logprob_chunk_tokens,
                                                                            "sdpa", "model", mismatched))

    try:
        check(shared)
    except ConfigError as exc:
        if not shared or config.trainer.share_prompt is True:
            raise
        # a model that takes position ids but does not place tokens by them: the shared layout is wrong for it
        log.warning("shared prompts: off (on the shared layout the engine's log-probs differ from the model's own forward; "
                    "it does not place tokens by position ids): %s", exc)
        shared = False
        check(shared)
    return shared


def _precision_dtype(config: RunConfig) -> torch.dtype | None:
    """The dtype a frozen reference's linear layers are held in: the training precision (no per-forward casts)."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.trainer.precision]


def precompute_reference(config: RunConfig) -> dict[str, str]:
    """Fill the reference cache for the train and eval data ahead of training."""
    run = setup(config)
    if run.mode != "cache":
        raise ConfigError(f"reference.mode: the run uses mode {run.mode!r}; only 'cache' has anything to precompute")
    if run.pending_cache is not None:  # FSDP: the sharded policy computes it
        distributed.prepare(run, lambda params: torch.optim.SGD(params, lr=0.0))
    return {name: f"{len(t.sums)} pairs" if isinstance(t, ref.RefCache) else f"{len(t.offsets) - 1} groups"
            for name, t in run.caches.items()}


