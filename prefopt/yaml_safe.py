"""Bounds on what a config may make prefopt do: aliases, expanded size, the length of echoed values; key suggestions."""
from __future__ import annotations

import difflib
import reprlib
import typing
from typing import Any

import yaml

from prefopt.errors import ConfigError

MAX_ALIASES = 100  # a config has a handful; an alias bomb has many
MAX_VALUES = 100_000  # scalars, lists and mappings once aliases are expanded

# Names users bring from TRL / transformers, and what they are called here.
SYNONYMS = {
    "learning_rate": "lr", "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs", "lr_scheduler_type": "schedule",
    "save_steps": "save_every", "logging_steps": "log_every", "eval_steps": "eval_every", "save_total_limit": "keep_checkpoints",
    "model_name_or_path": "name_or_path", "tokenizer_name_or_path": "tokenizer", "ref_model": "reference",
    "dataset_name": "train", "train_file": "train", "eval_file": "eval", "bf16": "precision", "fp16": "precision",
    "adam_beta1": "adam_betas", "adam_beta2": "adam_betas", "warmup_ratio": "warmup_steps", "peft_config": "lora",
}

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80
_repr.maxlist = _repr.maxdict = _repr.maxtuple = 6
_repr.maxlevel = 3


def short_repr(value: Any) -> str:
    """``repr`` cut to a bounded length, for error messages that echo user input."""
    return _repr.repr(value)


class AliasLimit:
    """Mixin for a PyYAML loader: refuse a document with more than :data:`MAX_ALIASES` aliases."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):  # type: ignore[attr-defined]
            self._prefopt_aliases = getattr(self, "_prefopt_aliases", 0) + 1
            if self._prefopt_aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark  # type: ignore[attr-defined]
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (*name), line {mark.line + 1}; refusing it (an alias bomb?)")
        return super().compose_node(parent, index)  # type: ignore[misc]


class NoDuplicateKeys:
    """Mixin for a PyYAML loader: a key written twice in one mapping is an error (YAML says keys are unique;
    PyYAML would keep the last silently, dropping a whole section). Keys brought in by a ``<<`` merge may be overridden."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)  # type: ignore[attr-defined]
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {short_repr(key)} (first at line {first.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)  # type: ignore[misc]


def check_expanded_size(data: Any, source: str) -> None:
    """Refuse a document that expands (through aliases, or recursively) to more than :data:`MAX_VALUES` values."""
    count, stack = 0, [data]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(f"{source}: the YAML expands to more than {MAX_VALUES} values (through aliases?); refusing it")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def suggest_key(root: type, loc: tuple) -> str:
    """``"; did you mean 'lr'?"`` for an unknown key at ``loc`` (a pydantic error location), or ``""``."""
    model, *parents, key = [root, *loc]
    for part in parents:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return ""
        model = _model_of(fields[part].annotation)
        if model is None:
            return ""
    names = list(getattr(model, "model_fields", {}))
    if not names or not isinstance(key, str):
        return ""
    synonyms = {k: v for k, v in SYNONYMS.items() if v in names}
    if key in synonyms:
        return f"; did you mean {synonyms[key]!r}?"
    close = difflib.get_close_matches(key, names + list(synonyms), n=1, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean {synonyms.get(close[0], close[0])!r}?"


def _model_of(annotation: Any) -> type | None:
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
