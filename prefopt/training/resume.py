"""Resuming safely: which config changes a run survives, the output directory, metrics after a crash."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefopt.atomic import atomic_write, sha256_file
from prefopt.config import RunConfig, is_template_text
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


# Paths whose contents a resume checks itself, so the same files at another path (a moved project, another
# mount) resume: the training pairs' token ids after loading, the local weight files' fingerprints before.
CHECKED_BY_CONTENT = {"data.train": "data_fingerprint", "model.tokenizer": "data_fingerprint",
                      "data.chat_template": "data_fingerprint", "model.name_or_path": "model_files",
                      "model.reference": "model_files"}


def breaking_differences(saved: dict[str, Any], current: dict[str, Any], say: bool = True) -> list[str]:
    """:func:`config_differences` between a checkpoint's ``state.json`` and this config, less the paths that
    moved but whose contents the resume checks (logged when ``say``)."""
    diffs = config_differences(saved["config"], current)
    moved = [k for k in diffs if _checked(k, saved)]
    if moved and say:
        log.warning("--resume: %s moved since the checkpoint; resuming only if their contents are the same (checked by "
                    "fingerprint)", ", ".join(moved))
    return [k for k in diffs if k not in moved]


def _checked(key: str, saved: dict[str, Any]) -> bool:
    how = CHECKED_BY_CONTENT.get(key)
    if how == "model_files":  # recorded for a local directory only: a Hub name that changed is another model
        return key in (saved.get("model_files") or {})
    return how is not None and saved.get(how) is not None


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
    _check_length(saved.get("total_steps"), facts["total_steps"], config)


def _check_length(old_total: int | None, total: int, config: RunConfig) -> None:
    """Refuse another number of steps when the learning rate depends on it: a decaying schedule, or a warm-up
    given as ``warmup_ratio`` (its length is a fraction of the steps)."""
    tc = config.trainer
    by_ratio = tc.warmup_ratio > 0 and not tc.warmup_steps
    if old_total is None or old_total == total or (tc.schedule == "constant" and not by_ratio):
        return
    fixed = f"its {tc.schedule} learning-rate schedule is" if tc.schedule != "constant" else "its warm-up (trainer.warmup_ratio) is"
    raise ConfigError(
        f"--resume: trainer.max_steps/trainer.epochs give {total} steps but the run was started with {old_total}; "
        f"{fixed} fixed by that length. Keep the original trainer.max_steps/epochs (schedule: constant with no "
        f"warmup_ratio allows changing them), or start a new run"
    )


MARKER = ".prefopt-run"  # written into every output directory prefopt creates; --overwrite moves only those


def protected_paths(config: RunConfig, extra: Iterable[str | Path] = ()) -> dict[str, Path]:
    """Local paths a run reads or needs, by the name shown in messages: --overwrite never moves a directory holding one.

    Each is taken both as written (its folder resolved) and fully resolved: a symlink inside the output
    directory that points elsewhere would be moved with it, and a symlink elsewhere into it reads from it."""
    named: dict[str, Any] = {
        "the working directory": Path.cwd(), "data.train": config.data.train, "data.eval": config.data.eval,
        "model.name_or_path": config.model.name_or_path, "model.tokenizer": config.model.tokenizer,
        "model.reference": config.model.reference, "reference.cache_dir": config.reference.cache_dir,
    }
    template = config.data.chat_template
    if template and not is_template_text(template):  # a file the tokenizer reads after the output directory is prepared
        named["data.chat_template"] = template
    named.update({f"the config file {p}": p for p in extra})
    out: dict[str, Path] = {}
    for k, v in named.items():
        if v and os.path.lexists(os.path.expanduser(v)):
            p = Path(os.path.expanduser(v))
            out[k] = Path(os.path.realpath(p))
            out[f"{k} (as written)"] = Path(os.path.realpath(p.parent)) / p.name
    return out


def has_contents(directory: Path) -> bool:
    """Whether ``directory`` holds anything but the run marker (all a run that failed at start leaves)."""
    return any(p.name != MARKER for p in directory.iterdir())


def output_problems(config: RunConfig, resume: bool, overwrite: bool, protect: Iterable[str | Path] = ()) -> list[str]:
    """What ``train`` would refuse about ``trainer.output_dir`` with these flags (``validate`` reports the same)."""
    out = Path(config.trainer.output_dir)
    if resume and overwrite:
        return ["--resume and --overwrite together: --resume continues the run in trainer.output_dir, --overwrite moves it "
                "aside and starts again; pass one"]
    try:
        real = Path(os.path.realpath(out))
        exists, is_dir = real.exists(), real.is_dir()
        nonempty = is_dir and has_contents(real)
    except OSError as exc:
        from prefopt.training.lock import describe_os_error

        return [f"trainer.output_dir: {out} cannot be used: {describe_os_error(exc)}"]
    if exists and not is_dir:
        return [f"trainer.output_dir: {out} is a file, not a directory"]
    if not nonempty or resume:
        return []
    if not overwrite:
        return [f"trainer.output_dir: {out} is not empty; pass --resume to continue that run or --overwrite to replace it"]
    for what, path in protected_paths(config, protect).items():
        if path == real or real in path.parents:
            return [f"trainer.output_dir: {out} contains {what.removesuffix(' (as written)')} ({path}); --overwrite will not move it. "
                    f"Choose another trainer.output_dir"]
    if not (real / MARKER).is_file():
        return [f"trainer.output_dir: {out} was not created by prefopt (it has no {MARKER} file); --overwrite moves aside only "
                f"a directory prefopt created. Choose another trainer.output_dir, or empty it yourself"]
    if os.path.ismount(real):
        return [f"trainer.output_dir: {out} is a mount point; --overwrite cannot move it aside. Use a directory below it, "
                f"or empty it yourself"]
    if not os.access(real.parent, os.W_OK):
        return [f"trainer.output_dir: --overwrite cannot move {out} aside: its parent {real.parent} is not writable "
                f"(a read-only mount?). Use a directory below it, or empty it yourself"]
    return []


def prepare_output(config: RunConfig, resume: bool, overwrite: bool, protect: Iterable[str | Path] = ()) -> Path:
    """The output directory, refusing to overwrite a run unless asked to.

    ``--overwrite`` moves the old contents aside to ``NAME.old-TIMESTAMP`` (never deletes
    them), and only a directory prefopt created (it holds :data:`MARKER`); it refuses when
    the directory holds the config (``protect``), the data, the model, the cache or the
    working directory. ``--resume`` promotes complete checkpoint temporaries left by a run
    killed while saving and removes incomplete ones.
    """
    from prefopt.training.lock import make_directory, relock

    problems = output_problems(config, resume, overwrite, protect)
    if problems:
        raise ConfigError("\n".join(problems))
    out = Path(config.trainer.output_dir)
    real = Path(os.path.realpath(out))  # a symlinked output directory: its target is moved, never the link
    if overwrite and real.is_dir() and has_contents(real):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = real.with_name(f"{real.name}.old-{stamp}")
        n = 1
        while aside.exists():
            aside, n = real.with_name(f"{real.name}.old-{stamp}-{n}"), n + 1
        os.replace(real, aside)
        log.warning("--overwrite: moved the previous contents of %s to %s; delete that when you no longer need it", out, aside)
    fresh = not (real.is_dir() and has_contents(real))
    make_directory(real, "trainer.output_dir")
    relock(real)
    if fresh and not resume:
        from prefopt import __version__

        atomic_write(real / MARKER, lambda tmp: tmp.write_text(json.dumps({"prefopt": __version__, "created": time.time()}) + "\n"))
    if resume:
        from prefopt.training.checkpoint import recover_temporaries

        recover_temporaries(real / "checkpoints")
        if (real / ".final.tmp").is_dir():  # a final model whose writing was killed: rewritten at the end
            shutil.rmtree(real / ".final.tmp")
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


# ---------------------------------------------------------------- what a checkpoint must match, checked before loading


def run_identity(config: RunConfig, processes: int) -> dict[str, Any]:
    """What every checkpoint records so that ``--resume`` can refuse, before loading anything, a run it would break."""
    return {"versions": versions(config), "model_files": model_files(config), "processes": processes,
            "global_batch": config.trainer.batch_size * config.trainer.grad_accum * processes}


def versions(config: RunConfig) -> dict[str, str]:
    """prefopt, torch, transformers and each loss's providing package, with their versions."""
    import torch
    import transformers

    from prefopt import __version__
    from prefopt.plugins.registry import get_registry

    out = {"prefopt": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    specs = config.loss if isinstance(config.loss, list) else [config.loss]
    registry = get_registry()
    for spec in specs:
        entry = registry.losses.get(str(spec.get("name")))
        if entry is not None:
            out[f"loss {entry.name} ({entry.dist})"] = entry.version
    return out


SAMPLED_ABOVE = 64 * 2**20  # weight files larger than this are fingerprinted from 32 spread 64 KiB blocks


def model_files(config: RunConfig) -> dict[str, str]:
    """A fingerprint of the weight files of each local model directory (name, size, contents), by field."""
    out = {}
    for field in ("name_or_path", "reference"):
        folder = getattr(config.model, field)
        if not folder or not Path(folder).is_dir():
            continue
        h = hashlib.sha256()
        for f in sorted(Path(folder).iterdir()):
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf") or f.name == "config.json":
                size = f.stat().st_size
                h.update(f"{f.name}:{size}:".encode())
                h.update(_file_digest(f, size).encode())
        out[f"model.{field}"] = h.hexdigest()
    return out


def _file_digest(path: Path, size: int) -> str:
    if size <= SAMPLED_ABOVE:
        return sha256_file(path)
    h, block = hashlib.sha256(), 1 << 16
    with open(path, "rb") as f:
        for i in range(32):
            f.seek((size - block) * i // 31)
            h.update(f.read(block))
    return h.hexdigest()


def check_before_loading(config: RunConfig, processes: int) -> dict[str, Any] | None:
    """``--resume``, before data, models or a cache are touched: refuse what breaks the run; for a run that
    already finished, say so and return its summary (nothing is changed)."""
    from prefopt.training import checkpoint as ckpt

    out = Path(config.trainer.output_dir)
    root = out / "checkpoints"
    temps = [p for p in sorted(root.glob(".step-*.tmp")) if ckpt.is_complete(p)] if root.is_dir() else []
    path = ckpt.latest_valid(root) or (temps[-1] if temps else None)
    if path is None:
        raise ckpt.CheckpointError(f"--resume: no complete checkpoint in {root}")
    saved = json.loads((path / "state.json").read_text())
    current = config.model_dump(mode="json")
    diffs = breaking_differences(saved, current)
    if diffs:
        raise ConfigError(f"--resume: the config changed in ways that break the run: {', '.join(diffs)}")
    _check_identity(saved, run_identity(config, processes), path)
    if config.trainer.max_steps:  # the length is known before the data is read
        _check_length(saved.get("total_steps"), config.trainer.max_steps, config)
    summary_file = out / "summary.json"
    same_length = all(saved["config"]["trainer"].get(k) == current["trainer"][k] for k in ("max_steps", "epochs"))
    if summary_file.is_file() and same_length:
        summary = json.loads(summary_file.read_text())
        if summary.get("steps") == saved.get("step"):
            log.warning("--resume: the run in %s already finished at step %d (its final model and summary.json are there); "
                        "nothing to do. Raise trainer.max_steps to train further, or start a new run", out, summary["steps"])
            return {**summary, "already_finished": True}
    return None


def _check_identity(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    old = saved.get("versions") or {}
    changed = [f"{k} {old[k]} -> {now['versions'].get(k, 'not installed')}" for k in old if old[k] != now["versions"].get(k)]
    if changed:
        raise ConfigError(f"--resume: {path} was written with other versions ({'; '.join(changed)}); a resumed run would not "
                          f"continue the same computation. Install the recorded versions, or start a new run")
    for field, digest in (saved.get("model_files") or {}).items():
        if now["model_files"].get(field) != digest:
            raise ConfigError(f"--resume: the weights at {field} changed since {path} was written (same path, other files); "
                              f"restore them, or start a new run")
    for key, what in (("processes", "number of processes"), ("global_batch", "global batch (batch_size x grad_accum x processes)")):
        if key in saved and saved[key] != now[key]:
            raise ConfigError(f"--resume: the run was trained with {what} {saved[key]}, this launch has {now[key]}; the data "
                              f"order and the optimiser steps would differ. Launch it as before (e.g. accelerate launch "
                              f"--num_processes {saved.get('processes')} ...), or start a new run")
