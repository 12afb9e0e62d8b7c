"""One measured prefopt run (in its own process)."""
from __future__ import annotations

import logging
from pathlib import Path


def config_dict(spec: dict) -> dict:
    """The prefopt run config equivalent to the spec (and to the TRL run beside it)."""
    workdir = Path(spec["workdir"])
    loss = {"name": spec["loss"], {"ipo": "tau"}.get(spec["loss"], "beta"): spec["beta"]}
    if spec["loss"] == "tdpo":
        loss["variant"] = "tdpo2"
    return {
        "model": {"config": spec["model_config"], "tokenizer": spec["tokenizer"]},
        "data": {"train": spec["data"], "max_length": spec["max_length"]},
        "loss": loss,
        "reference": {"mode": spec["reference"], "cache_dir": str(workdir / "prefopt-cache"), "batch_size": spec["batch_size"]},
        "trainer": {
            "output_dir": str(workdir / f"prefopt-out-{spec['run_id']}"),
            "seed": spec["seed"],
            "batch_size": spec["batch_size"],
            "max_steps": spec["steps"],
            "lr": spec["lr"],
            "schedule": "constant",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "precision": spec["precision"],
            "group_by_length": spec.get("group_by_length", True),
            "log_every": 10,  # a metrics row every 10 steps, as TRL logs by default (its runs here log nothing)
            "report_to": ["jsonl"],
            "share_prompt": spec.get("share_prompt", "auto"),
        },
    }


def preload() -> None:
    """Import what a run needs, so the post-import memory baseline includes it."""
    import datasets  # noqa: F401  (prefopt reads local JSON through it)

    import prefopt.training.trainer  # noqa: F401


def run(spec: dict) -> None:
    """Train with prefopt for ``spec['steps']`` steps on the spec's model, data and settings."""
    from prefopt.config import validate
    from prefopt.training.trainer import train

    logging.getLogger("prefopt").setLevel(logging.WARNING)
    from prefopt.config import apply_overrides

    raw = apply_overrides(config_dict(spec), spec.get("prefopt_overrides") or [])
    _report_pair_tokens()
    train(validate(raw, "benchmark"), overwrite=True)


def _report_pair_tokens() -> None:
    """Tell the probe the pair tokens of each step (with shared prompts the model computes fewer)."""
    from benchmarks import probe
    from prefopt.data.batching import pair_tokens
    from prefopt.training.trainer import ForwardPlan

    original = ForwardPlan.forwards

    def forwards(self, step: int):
        batches, weights, padding = original(self, step)
        if probe.CURRENT is not None:
            probe.CURRENT.note_pair_tokens(sum(pair_tokens(self.run.train_pairs[i]) for b in batches for i in b["index_host"]))
        return batches, weights, padding

    ForwardPlan.forwards = forwards
