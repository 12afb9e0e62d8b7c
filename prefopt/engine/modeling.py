"""Loading models and tokenizers, and the module that computes per-token log-probs for a batch."""
from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prefopt.config import ModelConfig, is_template_text
from prefopt.engine import attention
from prefopt.engine.logprobs import token_features
from prefopt.errors import ConfigError

log = logging.getLogger("prefopt")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_tokenizer(cfg: ModelConfig, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer, a pad token set to EOS if it has none; ``chat_template`` (Jinja text or a file) replaces its own."""
    name = cfg.tokenizer or cfg.name_or_path
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    if tok.eos_token_id is None:
        raise ConfigError(f"model.tokenizer: {name} has no EOS token; completions need one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if chat_template is not None:
        tok.chat_template = read_chat_template(chat_template)
    return tok


def read_chat_template(value: str) -> str:
    """``data.chat_template``: the Jinja text itself, or the text of the file it names."""
    if is_template_text(value):
        return value
    path = Path(value).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"data.chat_template: {value!r} is neither a Jinja template (no '{{{{' or '{{%') nor a readable "
                          f"file ({getattr(exc, 'strerror', None) or exc})") from None
    if not is_template_text(text):
        raise ConfigError(f"data.chat_template: {path} holds no Jinja template (no '{{{{' or '{{%')")
    return text


def weights_dtype(cfg: ModelConfig, master_weights: str = "fp32") -> torch.dtype:
    """The dtype the policy's weights are held in: ``model.dtype``, except a full fine-tune with fp32 masters."""
    if cfg.lora is None and master_weights == "fp32":
        return torch.float32
    return DTYPES[cfg.dtype]


def load_model(cfg: ModelConfig, name_or_path: str | None = None, empty: bool = False,
               dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The policy (or, with ``name_or_path``, another pretrained model), with dropout disabled as in TRL.

    The weights are read in ``model.dtype`` and then held in ``dtype`` (default: ``model.dtype``): a bf16
    model upcast to fp32 masters holds exactly the bf16 values. ``empty``: the architecture without its
    weights (parameters on the meta device, buffers real), for a process that receives them from the
    first one once sharded (FSDP)."""
    source = name_or_path or cfg.name_or_path
    loaded = DTYPES[cfg.dtype]
    dtype = dtype or loaded
    if empty:
        from accelerate import init_empty_weights

        if source is not None:
            config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        else:
            params = dict(cfg.config or {})
            config = AutoConfig.for_model(params.pop("model_type"), **params)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code, dtype=dtype)
        model.tie_weights()  # the meta context registers a tied head as a parameter of its own
    elif source is not None and _has_weights(source):
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, dtype=loaded)
    elif source is not None:
        if cfg.init != "random":
            raise ConfigError(f"model: {source} has a config.json but no weights (*.safetensors, *.bin); if you mean to train "
                              f"from randomly initialised weights, set model.init: random")
        log.info("model: %s holds a config but no weights; initialising a fresh model from it (model.init: random)", source)
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code, dtype=loaded)
    else:
        params = dict(cfg.config or {})
        model_type = params.pop("model_type", None)
        if model_type is None:
            raise ConfigError("model.config.model_type: required (e.g. llama, qwen2, gpt2)")
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **params), dtype=loaded)
    if not empty and dtype != loaded:
        model.to(dtype)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def disable_dropout(model: nn.Module) -> list[str]:
    """Set every dropout of ``model`` to 0 (``nn.Dropout`` modules, LoRA's included, and the float rates that
    attention reads from its module or config, e.g. ``attention_dropout``); returns what was not already 0.

    Dropout is off so that a resumed run equals an uninterrupted one and the reference (policy at step 0)
    matches the policy's own log-probs, as TRL's ``disable_dropout`` does."""
    changed: set[str] = set()
    for holder in [*model.modules(), *(m.config for m in model.modules() if hasattr(m, "config"))]:
        if isinstance(holder, nn.Dropout):
            if holder.p > 0:
                changed.add(f"{type(holder).__name__}(p={holder.p})")
                holder.p = 0.0
            continue
        for name, value in list(vars(holder).items()):
            if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float) and not isinstance(value, bool) and value > 0:
                changed.add(f"{name}={value}")
                setattr(holder, name, 0.0)
    return sorted(changed)


def has_weights(path: Path) -> bool:
    """Whether a local model directory holds weight files (sharded or not)."""
    return any(any(path.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json"))


def _has_weights(source: str) -> bool:
    """False only for a local directory with a config.json and no weight files (a model to initialise)."""
    path = Path(source)
    if not (path.is_dir() and (path / "config.json").exists()):
        return True  # a Hub name or a checkpoint: let from_pretrained resolve it
    return has_weights(path)


def frozen_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen, eval-mode copy of ``model``; with ``dtype``, its linear layers' weights held in that dtype.

    Autocast rounds a linear layer's fp32 weights to its dtype on every forward; holding them
    rounded already gives the same numbers without the casts, in half the memory. Embeddings
    and norms stay as they are (autocast leaves them in fp32), so the copy computes exactly
    what the fp32 model computes under autocast: a live reference equals a cached one.
    """
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    if dtype is not None:
        embeddings = ref.get_input_embeddings() if hasattr(ref, "get_input_embeddings") else None
        tied = embeddings.weight if embeddings is not None else None
        for module in ref.modules():
            # nn.Linear, and transformers' Conv1D (GPT-2), whose addmm autocast casts the same way
            if (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D") and module.weight is not tied:
                module.to(dtype)
    return ref.eval()


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    if hasattr(model, "get_base_model"):  # a peft model
        model = model.get_base_model()
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, attr, None) not in (None, 1.0):
            raise ConfigError(f"model: {model.config.model_type} transforms its logits ({attr}); not supported yet")
    return model.base_model, model.get_output_embeddings()


class PreferenceModel(nn.Module):
    """Policy (and, for a live reference, the reference) computing per-token quantities of completions.

    ``reference`` is a frozen model, the string ``"adapter"`` for a peft policy whose
    reference is the base model with the adapter disabled, or ``None``. Batches come from
    :mod:`prefopt.data.batching` (packed or padded); outputs are flat over the batch's
    completion tokens, in the layout of :class:`prefopt.losses.base.Tokens`.
    """

    def __init__(self, policy: nn.Module, reference: nn.Module | str | None = None, chunk_tokens: int = 512,
                 kernel: str = "sdpa") -> None:
        super().__init__()
        self.policy = policy
        self.reference = reference if isinstance(reference, nn.Module) else None
        self.ref_is_adapter = reference == "adapter"
        self.chunk_tokens = chunk_tokens
        self.kernel = kernel

    def sync_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """``(reference, policy)`` parameters in order, for :meth:`sync_reference`; a ConfigError if they do not match."""
        if self.reference is None:
            raise ConfigError("reference.sync: needs a separate live reference model (not a cache, nor the base model under a LoRA adapter)")
        ref, pol = list(self.reference.parameters()), list(self.policy.parameters())
        if len(ref) != len(pol) or any(r.shape != p.shape for r, p in zip(ref, pol)):
            raise ConfigError("reference.sync: the reference's parameters do not match the policy's one for one (model.reference "
                              "must have the policy's architecture)")
        return list(zip(ref, pol))

    @torch.no_grad()
    def sync_reference(self, mix: float) -> None:
        """TR-DPO's soft update, as TRL's ``SyncRefModelCallback``: ``ref = (1 - mix) * ref + mix * policy``, in the
        reference's dtype; no host reads."""
        for ref, pol in self.sync_pairs():
            ref.mul_(1.0 - mix).add_(pol.detach().to(ref.dtype), alpha=mix)

    def train(self, mode: bool = True) -> "PreferenceModel":
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def _hidden(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, nn.Linear]:
        """Final hidden states at the completion-predicting positions ``(N, H)``, and the LM head."""
        backbone, head = _backbone_and_head(model)
        if "cu_seqlens" in batch:
            if model.config._attn_implementation != attention.NAME:  # e.g. a reference copied before packing was set up
                attention.register()
                model.config._attn_implementation = attention.NAME
            # Host-side boundaries for the per-sequence kernel, as a CPU tensor: compiled layers make its length
            # dynamic once, where a Python list would be guarded on (a recompile per batch composition).
            host = {"prefopt_cu_host": batch["cu_host"], "prefopt_cu_k_host": batch.get("cu_k_host")} if self.kernel != "varlen" else {}
            out = backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                           cu_seq_lens_q=batch["cu_seqlens"], cu_seq_lens_k=batch.get("cu_seqlens_k", batch["cu_seqlens"]),
                           max_length_q=batch["max_seqlen"], max_length_k=batch.get("max_seqlen_k", batch["max_seqlen"]),
                           prefopt_kernel=self.kernel, prefopt_kv_index=batch.get("kv_index"), **host)
        else:
            out = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        hidden = out.last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1]), head

    def _ref_hidden(self, batch: dict) -> tuple[torch.Tensor, nn.Linear]:
        ctx = self.policy.disable_adapter() if self.ref_is_adapter else nullcontext()
        with torch.inference_mode(), ctx:
            hidden, head = self._hidden(self.reference if self.reference is not None else self.policy, batch)
        return hidden, head

    def forward(self, batch: dict, reference: str = "none", stats: bool = False) -> dict[str, torch.Tensor]:
        """Flat per-token ``logps`` of the policy; ``reference="logps"`` adds ``ref_logps``,
        ``"kl"`` adds ``ref_logps`` and ``kl``; ``stats`` adds ``entropy`` and ``logsumsq``."""
        index = batch["token_index"]
        target = batch["token_target"] if "token_target" in batch else batch["targets"].reshape(-1).index_select(0, index)
        hidden, head = self._hidden(self.policy, batch)
        hidden = hidden.index_select(0, index)
        ref_out: dict[str, torch.Tensor] = {}
        ref_hidden = ref_head = None
        if reference in ("kl", "logps"):
            full, ref_head = self._ref_hidden(batch)
            if reference == "logps":
                with torch.inference_mode():
                    ref_out["ref_logps"] = token_features(full.index_select(0, index), ref_head, target, self.chunk_tokens)["logps"]
                ref_out["ref_logps"] = ref_out["ref_logps"].clone()  # a normal tensor again
            else:
                ref_hidden = full.index_select(0, index)  # outside inference mode: a normal tensor autograd can save
        out = token_features(hidden, head, target, self.chunk_tokens, ref_hidden=ref_hidden, ref_head=ref_head, stats=stats)
        return {**out, **ref_out}
