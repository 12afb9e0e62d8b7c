"""Step 4: train each policy with prefopt's engine, from the SFT model, on the sampled pairs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefopt.config import validate
from prefopt.training.trainer import train


def methods(dpo_betas: list[float], ipo_taus: list[float], tdpo_betas: list[float],
            pft_lr_mults: list[float]) -> dict[str, tuple[dict[str, Any], float]]:
    """Run name -> (prefopt loss config, learning-rate multiplier).

    DPO, IPO and TDPO at several strengths; preferred-FT (SFT on the chosen
    completions) has no strength parameter, so it moves further with a larger learning rate.
    """
    runs = {f"preferred-ft-lr{m:g}x": ({"name": "sft"}, m) for m in pft_lr_mults}
    runs.update({f"dpo-beta{b:g}": ({"name": "dpo", "beta": b}, 1.0) for b in dpo_betas})
    runs.update({f"ipo-tau{t:g}": ({"name": "ipo", "tau": t}, 1.0) for t in ipo_taus})
    runs.update({f"tdpo2-beta{b:g}": ({"name": "tdpo", "variant": "tdpo2", "beta": b}, 1.0) for b in tdpo_betas})
    return runs


def run_config(loss: dict[str, Any], sft_dir: Path, pairs: Path, out_dir: Path, *, steps: int, batch_size: int,
               lr: float, seed: int, max_length: int) -> dict[str, Any]:
    """The prefopt run config (as a YAML file would hold it) for one method."""
    return {
        "model": {"name_or_path": str(sft_dir), "tokenizer": str(sft_dir)},
        "data": {"train": str(pairs), "max_length": max_length},
        "loss": loss,
        "reference": {"cache_dir": str(out_dir.parent / "ref-cache")},
        "trainer": {
            "output_dir": str(out_dir), "seed": seed, "batch_size": batch_size, "lr": lr, "max_steps": steps,
            "warmup_steps": max(1, steps // 10), "schedule": "linear", "log_every": max(1, steps // 10),
            "keep_checkpoints": 1,
        },
    }


def train_policy(raw: dict[str, Any]) -> Path:
    """Validate and train one config; the trained model (save_pretrained) is in its output_dir."""
    config = validate(raw, source=raw["trainer"]["output_dir"])
    summary = train(config, overwrite=True)
    return Path(summary["output_dir"])
