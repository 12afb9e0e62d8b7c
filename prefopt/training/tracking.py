"""What goes to experiment trackers (TensorBoard and other accelerate trackers) besides metrics."""
from __future__ import annotations

import json
import math
from typing import Any

from prefopt.training.resume import flatten


def tracker_config(config: dict[str, Any]) -> dict[str, int | float | str | bool]:
    """The run config flattened to ``section.field`` keys with scalar values, as trackers require
    (TensorBoard's hparams take only int, float, str and bool; lists, mappings and null become JSON text)."""
    out: dict[str, int | float | str | bool] = {}
    for key, value in flatten(config).items():
        out[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return out


def log_text(accelerator, tag: str, text: str, step: int) -> None:
    """Text for the trackers that show it (TensorBoard); others are left alone."""
    if not accelerator.is_main_process:
        return
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            tracker.writer.add_text(tag, text, global_step=step)
            tracker.writer.flush()


# How each accelerate tracker takes a run's name (its project is accelerate's project_name).
_RUN_NAME_ARG = {"wandb": "name", "trackio": "name", "mlflow": "run_name", "swanlab": "experiment_name",
                 "clearml": "task_name", "dvclive": "exp_name"}


def tracker_init_kwargs(trackers: list[str], run_name: str | None) -> dict[str, dict[str, str]]:
    """``init_kwargs`` for ``Accelerator.init_trackers`` that name the run in each tracker that takes a name
    (TensorBoard has none: its folder is ``output_dir/project``, and the run name is among the hparams)."""
    if run_name is None:
        return {}
    names = set(_RUN_NAME_ARG) if "all" in trackers else set(trackers) & set(_RUN_NAME_ARG)
    return {t: {_RUN_NAME_ARG[t]: run_name} for t in sorted(names)}


def name_runs(accelerator, run_name: str | None) -> None:
    """Name the run in trackers that are named after they start (Aim, Comet)."""
    if run_name is None:
        return
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "aim":
            tracker.writer.name = run_name
        elif tracker.name == "comet_ml":
            tracker.writer.set_name(run_name)


def strict(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON ``null``), in nested dicts and lists too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def json_line(row: dict[str, Any], indent: int | None = None) -> str:
    """Strict JSON (RFC 8259) for ``metrics.jsonl`` and ``summary.json``: a non-finite number is written as ``null``."""
    return json.dumps(strict(row), indent=indent, allow_nan=False)
