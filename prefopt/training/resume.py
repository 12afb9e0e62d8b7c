"""Resuming safely: which config changes a run survives, the output directory, metrics after a crash."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefopt.atomic import atomic_write
from prefopt.config import RunConfig
from prefopt.errors import ConfigError

log = logging.getLogger("prefopt")

# Fields that may change between a run and its resumption without breaking it.
RESUMABLE_CHANGES = {
    "trainer.max_steps", "trainer.epochs", "trainer.log_every", "trainer.eval_every", "trainer.save_every",
    "trainer.keep_checkpoints", "trainer.report_to", "trainer.max_bad_steps", "trainer.output_dir",
    "reference.cache_dir", "reference.batch_size", "data.eval", "data.eval_split", "trainer.project", "trainer.run_name",
}



def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; the loss section and saved configs stay whole."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "loss" and k != "config":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """Fields that differ between two configs and would break a resumed run."""
    a, b = flatten(old), flatten(new)
    # a field added since the checkpoint was written is no change while it holds its default
    a |= {k: v for k, v in _defaults().items() if k not in a}
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)


def _defaults() -> dict[str, Any]:
    """``section.field`` -> default, for the fields that have one."""
    out = {}
    for section, info in RunConfig.model_fields.items():
        fields = getattr(info.annotation, "model_fields", {})
        for name, f in fields.items():
            default = None if f.is_required() else f.get_default(call_default_factory=True)
            if not f.is_required() and not isinstance(default, dict):  # a mapping flattens into its own keys
                out[f"{section}.{name}"] = default
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def check_resume(saved: dict[str, Any], facts: dict[str, Any], config: RunConfig) -> None:
    """Refuse a resume whose training data or schedule length differs from the checkpoint's.

    ``saved`` is the checkpoint's ``state.json``; ``facts`` holds this run's
    ``data_fingerprint`` (token ids of every training pair) and ``total_steps``.
    Checkpoints written before these were recorded are not checked.
    """
    old_fp = saved.get("data_fingerprint")
    if old_fp is not None and old_fp != facts["data_fingerprint"]:
        raise ConfigError(
            f"--resume: the training data changed since the checkpoint (data.train: {config.data.train}): its pairs no longer "
            f"tokenise to the ones the run was trained on. Restore the data, or start a new run in another trainer.output_dir"
        )
    old_total = saved.get("total_steps")
    if old_total is not None and old_total != facts["total_steps"] and config.trainer.schedule != "constant":
        raise ConfigError(
            f"--resume: trainer.max_steps/trainer.epochs give {facts['total_steps']} steps but the run was started with "
            f"{old_total}; its {config.trainer.schedule} learning-rate schedule is fixed by that length. Keep the original "
            f"trainer.max_steps/epochs (schedule: constant allows changing them), or start a new run"
        )


def protected_paths(config: RunConfig, extra: Iterable[str | Path] = ()) -> dict[str, Path]:
    """Local paths a run reads or needs, by the name shown in messages: --overwrite never moves a directory holding one."""
    named: dict[str, Any] = {
        "the working directory": Path.cwd(), "data.train": config.data.train, "data.eval": config.data.eval,
        "model.name_or_path": config.model.name_or_path, "model.tokenizer": config.model.tokenizer,
        "model.reference": config.model.reference, "reference.cache_dir": config.reference.cache_dir,
    }
    named.update({f"the config file {p}": p for p in extra})
    return {k: Path(v).resolve() for k, v in named.items() if v and Path(v).exists()}


def prepare_output(config: RunConfig, resume: bool, overwrite: bool, protect: Iterable[str | Path] = ()) -> Path:
    """The output directory, refusing to overwrite a run unless asked to.

    ``--overwrite`` moves the old contents aside to ``NAME.old-TIMESTAMP`` (never deletes
    them), and refuses when the directory holds the config (``protect``), the data, the
    model, the cache or the working directory. ``--resume`` removes checkpoint
    temporaries left by a run killed while saving.
    """
    out = Path(config.trainer.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"trainer.output_dir: {out} is a file, not a directory")
    nonempty = out.exists() and any(out.iterdir())
    if nonempty and not (resume or overwrite):
        raise ConfigError(f"trainer.output_dir: {out} is not empty; pass --resume to continue that run or --overwrite to replace it")
    if overwrite and not resume and nonempty:
        target = out.resolve()
        for what, path in protected_paths(config, protect).items():
            if path == target or target in path.parents:
                raise ConfigError(f"trainer.output_dir: {out} contains {what} ({path}); --overwrite will not move it. Choose another trainer.output_dir")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = out.with_name(f"{out.name}.old-{stamp}")
        n = 1
        while aside.exists():
            aside, n = out.with_name(f"{out.name}.old-{stamp}-{n}"), n + 1
        os.replace(out, aside)
        log.warning("--overwrite: moved the previous contents of %s to %s; delete that when you no longer need it", out, aside)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        from prefopt.training.checkpoint import remove_temporaries

        remove_temporaries(out / "checkpoints")
    return out


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget metric rows of steps after ``step``: a resumed run logs them again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines(keepends=True) if _row_step(line) <= step]
    atomic_write(path, lambda tmp: tmp.write_text("".join(keep)))


def _row_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except ValueError:  # a row cut short by kill -9
        return math.inf
