"""What goes to experiment trackers (TensorBoard and other accelerate trackers) besides metrics."""
from __future__ import annotations

import json
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
