"""The run config: one pydantic model, loaded from YAML with safe loading."""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from prefopt.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelConfig(_Section):
    name_or_path: str | None = Field(None, description="Hub name or local directory of a pretrained causal LM.")
    config: dict[str, Any] | None = Field(
        None, description="Build a freshly initialised model from this transformers config instead (e.g. model_type: llama)."
    )
    tokenizer: str | None = Field(None, description="Hub name or local directory of the tokenizer; defaults to name_or_path.")
    reference: str | None = Field(None, description="A different reference model (Hub name or directory); defaults to the initial policy.")
    trust_remote_code: bool = Field(False, description="Allow model code from the Hub to run. Off unless you trust the repository.")
    lora: dict[str, Any] | None = Field(
        None, description="Train a LoRA adapter with peft (keys of peft.LoraConfig); the reference is then the base model."
    )
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="random: a name_or_path directory with a config but no weights is initialised randomly (otherwise an error)."
    )
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="The weights as loaded. With LoRA the frozen base (and so the reference) stays in it; a full "
        "fine-tune trains fp32 masters unless trainer.master_weights: none (docs/engine.md, Precision).")

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError("give exactly one of model.name_or_path and model.config")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("model.tokenizer is required when the model is built from model.config")
        return self


class DataConfig(_Section):
    train: str = Field(description="Training data: a local JSON/JSONL/Parquet/CSV file or directory, or a Hub dataset name.")
    split: str = Field("train", description="Split to read from the training source.")
    eval: str | None = Field(None, description="Held-out data (same forms as train); if unset, eval_fraction of train is held out.")
    eval_split: str = Field("test", description="Split to read from a Hub eval source.")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Fraction of train held out for evaluation when eval is unset.")
    max_length: int = Field(512, gt=1, description="Maximum tokens of prompt + completion (+ EOS).")
    max_prompt_length: int | None = Field(None, gt=0, description="Cut prompts to their last N tokens first (default: no cut).")
    max_completion_length: int | None = Field(
        None, gt=0, description="Cut each completion to its first N tokens first (default: no cut); then max_length applies.")
    chat_template: str | None = Field(
        None, description="A Jinja chat template, or the path of a file holding one, used instead of the tokenizer's.")
    on_error: Literal["raise", "skip"] = Field("raise", description="Malformed rows stop the run (raise) or are skipped and counted (skip).")
    on_overlong: Literal["drop", "raise"] = Field("drop", description="Rows that cannot fit max_length are dropped and counted, or stop the run.")
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows of train (for quick runs).")
    columns: dict[Literal["prompt", "chosen", "rejected", "completions", "scores", "completion", "label"], str] = Field(
        default_factory=dict, description="The dataset's column names for prefopt's fields (prompt, chosen, rejected, completions, "
        "scores, completion, label), e.g. {prompt: question}."
    )
    pairs_from: Literal["best_worst", "all_pairs", "best_vs_rest"] = Field(
        "best_worst", description="How a pairwise loss trains on rankings: the best against the worst completion, every two "
        "completions whose scores differ, or the best against each one scored below it.")
    text_tokenization: Literal["separate", "trl"] = Field(
        "separate", description="Plain-text rows: tokenise prompt and completion apart (separate) or joined, as TRL does (trl)."
    )


class SyncConfig(_Section):
    every: int = Field(description="Update the reference after every N optimiser steps (TRL's ref_model_sync_steps).", gt=0)
    mix: float = Field(description="ref = mix * policy + (1 - mix) * ref at each update (TRL's ref_model_mixup_alpha).", gt=0, le=1)


class ReferenceConfig(_Section):
    mode: Literal["auto", "cache", "live", "none"] = Field(
        "auto", description="auto picks cache when the loss allows, live when it needs token KL, none when reference-free."
    )
    cache_dir: str = Field(".prefopt-cache", description="Directory of reference log-prob caches, keyed by fingerprint.")
    batch_size: int | None = Field(None, gt=0, description="Pairs per forward when precomputing (default: the train batch size).")
    sync: SyncConfig | None = Field(
        None, description="TR-DPO: every N steps move the live reference toward the policy (TRL's sync_ref_model); null: a fixed reference.")

    @pydantic.model_validator(mode="after")
    def _sync_needs_live(self) -> "ReferenceConfig":
        if self.sync is not None and self.mode in ("cache", "none"):
            raise ValueError(f"reference.sync updates the reference during training, which needs reference.mode live or auto "
                             f"(got {self.mode}: {'a cache holds fixed log-probs' if self.mode == 'cache' else 'no reference'})")
        return self

    @pydantic.field_validator("cache_dir")
    @classmethod
    def _home(cls, v: str) -> str:
        return os.path.expanduser(v)  # "~/.cache/prefopt": the user's cache, wherever the config lives


class TrainerConfig(_Section):
    output_dir: str = Field("runs/prefopt", description="Where checkpoints, metrics and the final model go.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for initialisation, data order and dropout.")
    batch_size: int = Field(8, gt=0, description="Pairs per forward pass per process; a step accumulates grad_accum of them.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimiser step; the effective batch is batch_size * grad_accum * processes.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimiser steps.")
    lr: float = Field(5e-7, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Linear warmup over this fraction of the steps, rounded up (TRL's "
                                "warmup_ratio); give this or warmup_steps.")
    schedule: Literal["constant", "linear", "cosine"] = Field("linear", description="Decay after warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (null: no clipping).")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Mixed precision through accelerate; fp16 needs CUDA.")
    master_weights: Literal["fp32", "none"] = Field(
        "fp32", description="Full fine-tune with model.dtype bf16/fp16: fp32 upcasts the trainable weights once, so AdamW "
        "updates fp32 masters; none updates them in model.dtype (less memory; steps under half a bf16 spacing are lost).")
    group_by_length: bool = Field(True, description="Batch pairs of similar length so padding stays small.")
    logprob_chunk_tokens: int = Field(512, gt=0, description="Completion positions projected through the LM head at once.")
    packing: bool = Field(True, description="Pack each forward's sequences end to end in one row (no padding); false pads them into rows.")
    max_tokens_per_forward: int | None = Field(
        None, gt=0, description="Token budget of one forward: a step's pairs are packed into forwards of at most this many tokens "
        "(the optimiser batch stays batch_size * grad_accum pairs). Null: grad_accum forwards of batch_size pairs.")
    share_prompt: Literal["auto"] | bool = Field(
        "auto", description="Each pair as one packed segment [prompt | chosen | rejected]: the prompt computed once, the same numbers. "
        "auto: on wherever supported (packed batches, a model that takes position ids); the start-up log says which and why.")
    pad_to_multiple_of: int | None = Field(
        None, gt=0, description="Round packed rows up to a multiple of this, bounding the number of distinct shapes "
        "(null: a step of 1/32 of the row's power of two, at least 8: under 1/16 of the row is padding).")
    attention: Literal["auto", "varlen", "sdpa", "eager"] = Field(
        "auto", description="Attention kernel: auto picks varlen (FlashAttention over packed rows) on CUDA sm80+ in bf16/fp16, else sdpa.")
    compile: bool = Field(False, description="torch.compile each decoder layer (regional); compilations are logged. Off until measured on a GPU.")
    liger: bool = Field(False, description="Liger's RMSNorm, RoPE and SwiGLU kernels on the policy (CUDA, prefopt[liger]). Off until measured on a GPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    log_every: int = Field(1, gt=0, description="Log metrics every N optimiser steps.")
    eval_every: int | None = Field(None, gt=0, description="Evaluate on the held-out split every N steps (and always at start and end).")
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N optimiser steps.")
    keep_checkpoints: int = Field(2, gt=0, description="Keep the last N checkpoints.")
    max_bad_steps: int = Field(10, ge=0, description="Steps with a non-finite loss or gradient tolerated (each skipped); one more stops the run.")
    report_to: list[str] = Field(default_factory=lambda: ["jsonl"], description="jsonl, and accelerate trackers such as tensorboard.")
    project: str = Field("prefopt", min_length=1, description="Tracker project (TensorBoard: the folder under output_dir).")
    run_name: str | None = Field(None, min_length=1, description="The run's name in trackers that name runs (wandb, trackio, mlflow, ...).")
    sample_prompts: int = Field(0, ge=0, description="At each evaluation, write greedy completions of N held-out prompts to samples.jsonl.")
    sample_max_new_tokens: int = Field(48, gt=0, description="Longest sampled completion, in tokens.")

    @pydantic.field_validator("adam_betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each AdamW beta must be in [0, 1)")
        return v

    @pydantic.field_validator("report_to")
    @classmethod
    def _trackers(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in TRACKERS:
                close = difflib.get_close_matches(name, sorted(TRACKERS), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown tracker {name!r}; known: {', '.join(sorted(TRACKERS))}{hint}")
        return v


TRACKERS = {"jsonl", "all", "aim", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab"}


class RunConfig(_Section):
    model: ModelConfig
    data: DataConfig
    loss: dict[str, Any] | list[dict[str, Any]] = Field(
        default_factory=lambda: {"name": "dpo"},
        description="A loss by name with its parameters, or a list of them with weights (see `prefopt losses`).",
    )
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)

    @pydantic.model_validator(mode="after")
    def _weights(self) -> "RunConfig":
        pure = self.model.dtype != "fp32" and self.model.lora is None and self.trainer.master_weights == "none"
        if pure and self.model.dtype == "fp16":
            raise ValueError("model.dtype fp16 with trainer.master_weights none: fp16 weights cannot be trained without "
                             "fp32 masters (loss scaling needs fp32 gradients); use master_weights fp32 or model.dtype bf16")
        if self.trainer.warmup_steps and self.trainer.warmup_ratio:
            raise ValueError("trainer.warmup_steps and trainer.warmup_ratio: give one of them")
        if pure and self.trainer.precision == "fp16":
            raise ValueError("trainer.precision fp16 with trainer.master_weights none: loss scaling needs fp32 gradients")
        return self

    def build_loss(self):
        """The loss object this config selects (validated by the loss's own config model)."""
        from prefopt.plugins.registry import build_loss

        return build_loss(self.loss, "loss")


# PyYAML follows YAML 1.1, where `1e-6` is a string; accept it as a float as users expect.
from prefopt.yaml_safe import AliasLimit, NoDuplicateKeys, short_repr  # noqa: E402


class _Loader(AliasLimit, NoDuplicateKeys, yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Safe-load YAML text; an error names the source. Aliases and the expanded size are bounded."""
    from prefopt.yaml_safe import check_expanded_size

    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: " + str(exc).replace('"<unicode string>"', source)) from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply; refusing it") from None
    check_expanded_size(data, source)
    return data


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. trainer.lr=1e-6")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        if value.strip() == "~":  # YAML reads it as null; on a command line it reads as the home directory
            raise ConfigError(f"--set {key}=~: a lone ~ is ambiguous here (YAML's null, or the home directory); "
                              f"write {key}=null, or the path in full")
        node[parts[-1]] = parse_yaml(value, f"--set {key}")
    return raw


def validate(raw: Any, source: str = "<config>", check_loss: bool = True) -> RunConfig:
    """Validate a raw mapping into a :class:`RunConfig`; every bad field is named by its path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    problems: list[str] = []
    config = None
    try:
        config = RunConfig.model_validate(raw)
    except pydantic.ValidationError as exc:
        from prefopt.yaml_safe import suggest_key

        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"])
            got = "" if e["type"] == "missing" else f" (got {short_repr(e['input'])})"
            hint = suggest_key(RunConfig, e["loc"]) if e["type"] == "extra_forbidden" else ""
            problems.append(f"{where}: {e['msg']}{got}{hint}")
    if check_loss and isinstance(raw.get("loss", {"name": "dpo"}), (dict, list)):
        from prefopt.plugins.registry import build_loss

        try:
            build_loss(raw.get("loss", {"name": "dpo"}), "loss")
        except ConfigError as exc:
            problems.extend(str(exc).splitlines())
    if problems:
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(problems))
    assert config is not None
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML run config.

    Relative paths resolve by one rule (docs/config.md): those written in the file, and
    the defaults, are relative to the file's directory; those given with ``--set`` are
    relative to the working directory.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason}); a run config is YAML text") from None
    raw = parse_yaml(text, str(path)) or {}
    old_loss = dict(raw["loss"]) if isinstance(raw, dict) and isinstance(raw.get("loss"), dict) else None
    raw = apply_overrides(raw, overrides or [])
    if any(item.partition("=")[0] == "loss.name" for item in overrides or []):
        _retarget_loss(raw, old_loss)
    config = validate(raw, str(path))
    from_cli = {item.partition("=")[0] for item in overrides or []}
    _resolve_paths(config, path.parent, from_cli, str(path))
    return config


def _retarget_loss(raw: dict[str, Any], old: Any) -> None:
    """After ``--set loss.name=NEW``: keep the old loss's parameters NEW accepts, drop the others, and say which."""
    import logging

    from prefopt.errors import PrefoptError
    from prefopt.plugins.registry import get_loss_class

    loss = raw.get("loss")
    if not (isinstance(loss, dict) and isinstance(old, dict)) or old.get("name") == loss.get("name"):
        return
    try:
        fields = get_loss_class(str(loss.get("name"))).Config.model_fields
    except PrefoptError:
        return  # an unknown name is reported by validation
    carried = [k for k in loss if k != "name" and k in old and loss[k] == old[k]]
    kept = [k for k in carried if k in fields]
    dropped = [k for k in carried if k not in fields]
    for k in dropped:
        del loss[k]
    log = logging.getLogger("prefopt")
    new, was = loss["name"], old.get("name")
    if kept:
        log.warning("--set loss.name=%s: keeps %s from the %s config (check the values suit %s; its defaults: %s)", new,
                    ", ".join(f"{k}={loss[k]!r}" for k in kept), was, new,
                    ", ".join(f"{k}={fields[k].get_default(call_default_factory=True)!r}" for k in kept if not fields[k].is_required()))
    if dropped:
        log.warning("--set loss.name=%s: drops %s (not %s parameters)", new, ", ".join(f"{k}={old[k]!r}" for k in dropped), new)


def _resolve_paths(config: RunConfig, base: Path, from_cli: set[str], source: str) -> None:
    _check_path_text(config, source)
    for section, key in _PATH_FIELDS + _OUTPUT_FIELDS:
        value = getattr(getattr(config, section), key)
        if value and value.startswith("~"):
            value = os.path.expanduser(value)  # every path field, so no literal ./~ directory is ever made
            if value.startswith("~"):  # ~name of no such user: expanduser leaves it as it was
                raise ConfigError(f"{source}: {section}.{key}: {short_repr(value)}: no user named "
                                  f"{value[1:].split('/', 1)[0][:40]!r} to expand ~ for; write the path out in full")
            setattr(getattr(config, section), key, value)
        if not value or Path(value).is_absolute():
            continue
        if f"{section}.{key}" in from_cli:  # from the working directory; absolute, so a resume from elsewhere matches
            if (section, key) in _OUTPUT_FIELDS or _exists(value) or _looks_local(value):
                setattr(getattr(config, section), key, os.path.abspath(value))
            continue
        beside = Path(os.path.abspath(base / value))
        if (section, key) in _OUTPUT_FIELDS or _exists(beside):
            setattr(getattr(config, section), key, str(beside))
        elif _exists(value):
            raise ConfigError(
                f"{source}: {section}.{key}: {value!r} is not beside the config ({beside} does not exist) but exists in the "
                f"working directory; a relative path in a config file is relative to the file's directory: write "
                f"{os.path.relpath(Path(value).resolve(), base.resolve())!r}, an absolute path, or pass it with --set {section}.{key}=..."
            )
        elif _looks_local(value):  # a missing local path: the error will name where it was looked for
            setattr(getattr(config, section), key, str(beside))
        # else: a Hub name, passed through unchanged
    template = config.data.chat_template
    if template and "data.chat_template" not in from_cli and not is_template_text(template) and not Path(template).expanduser().is_absolute():
        config.data.chat_template = os.path.normpath(base / template)


def _check_path_text(config: RunConfig, source: str) -> None:
    """A NUL character in a path field (``"\\0"`` in YAML) cannot name a file: say so, instead of a ``ValueError`` later."""
    fields = _PATH_FIELDS + _OUTPUT_FIELDS + [("data", "chat_template")]
    for section, key in fields:
        value = getattr(getattr(config, section), key)
        if value and "\0" in value and not (key == "chat_template" and is_template_text(value)):
            raise ConfigError(f"{source}: {section}.{key}: {short_repr(value)} contains a NUL character, which no path can hold")


def is_template_text(value: str) -> bool:
    """``data.chat_template`` holds the Jinja text itself (otherwise it names a file)."""
    return "{{" in value or "{%" in value


def _exists(path: str | Path) -> bool:
    """``Path.exists`` that says False for a path the OS refuses (a name too long): preflight names the problem."""
    try:
        return Path(path).exists()
    except OSError:
        return False


def _looks_local(value: str) -> bool:
    return value.startswith((".", "~")) or Path(value).suffix.lower() in {".json", ".jsonl", ".parquet", ".csv"}


def describe_paths(config: RunConfig) -> str:
    """The resolved data, model, output and cache locations, for the start-up log."""
    parts = []
    for section, key in _PATH_FIELDS + _OUTPUT_FIELDS:
        value = getattr(getattr(config, section), key)
        if value:
            shown = str(Path(value).resolve()) if _exists(value) or (section, key) in _OUTPUT_FIELDS else f"{value} (Hub)"
            parts.append(f"{section}.{key} = {shown}")
    return "paths: " + "; ".join(parts)


_PATH_FIELDS = [("data", "train"), ("data", "eval"), ("model", "name_or_path"), ("model", "tokenizer"), ("model", "reference")]
_OUTPUT_FIELDS = [("trainer", "output_dir"), ("reference", "cache_dir")]
