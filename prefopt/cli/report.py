"""``prefopt report RUN_DIR``: a run's curves in one PNG and its before/after table."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prefopt.errors import PrefoptError

# (panel title, [(metric, label)]); a training metric and its eval/ twin share a panel.
PANELS: list[tuple[str, list[tuple[str, str]]]] = [
    ("loss", [("loss", "train"), ("eval/loss", "held-out")]),
    ("reward margin (chosen - rejected)", [("rewards/margins", "train"), ("eval/rewards/margins", "held-out")]),
    ("reward accuracy", [("rewards/accuracies", "train"), ("eval/rewards/accuracies", "held-out")]),
    ("log-prob of completions", [("logps/chosen", "chosen"), ("logps/rejected", "rejected"),
                                 ("eval/logps/chosen", "held-out chosen"), ("eval/logps/rejected", "held-out rejected")]),
    ("learning rate", [("lr", "lr")]),
    ("gradient norm (before clipping)", [("grad_norm", "grad norm")]),
    ("padding fraction", [("padding_fraction", "padding")]),
    ("steps skipped (non-finite)", [("bad_steps", "skipped")]),
]


class ReportError(PrefoptError):
    """The run directory has nothing to report."""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a last line cut short by a crash is ignored."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise ReportError(f"{run_dir}: no metrics.jsonl (is this a trainer.output_dir?)")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, in step order, without repeats of a step (the last wins)."""
    by_step = {r["step"]: r[key] for r in rows if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves into a PNG (``RUN_DIR/report.png`` by default); returns its path."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError("prefopt report: needs matplotlib (pip install 'prefopt[report]')") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    panels = [(title, [(label, *series(rows, key)) for key, label in lines]) for title, lines in PANELS]
    panels = [(title, [c for c in curves if c[1]]) for title, curves in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        raise ReportError(f"{run_dir}/metrics.jsonl: no metrics to plot yet")
    cols = 2
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(11, 2.8 * math.ceil(len(panels) / cols)), squeeze=False)
    for ax, (title, curves) in zip(axes.flat, panels):
        for label, steps, values in curves:
            ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(str(run_dir), fontsize=10)
    fig.tight_layout()
    path = Path(out) if out else run_dir / "report.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def summary_table(run_dir: str | Path) -> str:
    """The before/after table of a finished run (from ``summary.json``), or why there is none."""
    from prefopt.training.trainer import format_summary

    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return f"{run_dir}: no summary.json (the run has not finished); curves only"
    return format_summary(json.loads(path.read_text(encoding="utf-8")))
