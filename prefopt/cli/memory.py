"""Memory per GPU for the model states of a run (weights, gradients, AdamW state, reference), estimated and measured.

``python -m prefopt.cli.memory`` prints the table in docs/engine.md. Activations and the logit
buffer depend on batch size and sequence length and are not counted; neither is the CUDA context.

By default the policy trains fp32 master weights (``trainer.precision`` only sets autocast; a
``model.dtype: bf16`` model is upcast once after loading), so per parameter a process holds 4 bytes
of weights, 4 of gradient and 8 of AdamW moments for the policy, 4 bytes of DDP gradient buckets,
and, for a live reference, its weights (4 bytes in fp32; in bf16 or fp16 its linear layers take 2,
counted here as the whole model: embeddings, norms and, under FSDP, an untied output head stay fp32).
With ``model.dtype: bf16`` and ``trainer.master_weights: none`` (``--master-weights none``) every one
of these is 2 bytes, the live reference wholly so.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

GIB = 1024**3
FP32 = 4

# Architecture configs (from each model's config.json), so the table needs no download.
MODELS: dict[str, dict[str, Any]] = {
    "Qwen2-0.5B": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                   "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                   "tie_word_embeddings": True},
    "Llama-3.1-8B": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "tie_word_embeddings": False},
    "Llama-3.1-70B": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
                      "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                      "tie_word_embeddings": False},
}


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of the causal LM ``config`` describes (tied embeddings counted once), built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@dataclass(frozen=True)
class Estimate:
    """Bytes one process holds for the model states."""

    weights: int
    gradients: int
    optimizer: int
    buckets: int
    reference: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.buckets + self.reference


def estimate(n_params: int, *, processes: int = 1, sharded: bool = False, live_reference: bool = True, reference_bytes: int = FP32,
             weight_bytes: int = FP32) -> Estimate:
    """Model-state bytes per process for full fine-tuning of ``n_params`` parameters.

    ``sharded`` (FSDP): every state is split over ``processes`` and there are no DDP buckets.
    Otherwise (one process or DDP) every process holds everything; DDP adds gradient buckets.
    ``weight_bytes``: 4 for fp32 masters, 2 for weights updated in bf16/fp16 (gradients, AdamW
    moments and buckets then take the weights' dtype too).
    """
    share = processes if sharded else 1

    def part(bytes_per_param: int) -> int:
        return -(-n_params * bytes_per_param // share)  # ceil: shards are padded up

    return Estimate(
        weights=part(weight_bytes),
        gradients=part(weight_bytes),
        optimizer=part(2 * weight_bytes),  # AdamW exp_avg and exp_avg_sq, in the weights' dtype
        buckets=n_params * weight_bytes if processes > 1 and not sharded else 0,
        reference=part(reference_bytes) if live_reference else 0,
    )


def measure(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of this process's tensors: trainable and frozen weights, gradients, optimiser state (shared storage counted once)."""
    seen: set[tuple[int, int]] = set()

    def nbytes(t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this process
        key = (local.untyped_storage().data_ptr(), local.untyped_storage().nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return local.untyped_storage().nbytes()

    params = list(model.parameters())
    return {
        "weights": sum(nbytes(p) for p in params if p.requires_grad),
        "gradients": sum(nbytes(p.grad) for p in params if p.requires_grad),
        "optimizer": sum(nbytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0),
        "reference": sum(nbytes(p) for p in params if not p.requires_grad),
    }


def table(processes: int = 8, master_weights: str = "fp32") -> str:
    """A markdown table of model-state GiB per GPU for :data:`MODELS` under DDP and FSDP, live and cached reference
    (``master_weights="none"``: weights held and updated in bf16, ``model.dtype: bf16``)."""
    half = master_weights == "none"
    sizes = {"weight_bytes": 2, "reference_bytes": 2} if half else {}
    rows = [f"| model | parameters | DDP, live ref | DDP, cached ref | FSDP x{processes}, live ref | FSDP x{processes}, cached ref |",
            "|---|---|---|---|---|---|"]
    for name, config in MODELS.items():
        n = count_parameters(config)
        cells = [estimate(n, processes=processes, sharded=s, live_reference=live, **sizes).total / GIB
                 for s in (False, True) for live in (True, False)]
        rows.append(f"| {name} | {n / 1e9:.2f} B | " + " | ".join(f"{c:,.1f}" for c in cells) + " |")
    return "\n".join(rows)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure_run(config_path: str) -> dict[str, Any]:
    """Set up the run ``config_path`` describes in this process (one of several under a launcher), take one
    optimiser step on its trainable weights, and return this process's measured and estimated model-state bytes."""
    import gc

    from prefopt.config import load_config
    from prefopt.training import distributed
    from prefopt.training.run import make_accelerator, setup

    config = load_config(config_path, [])
    gc.collect()
    rss_before = _rss()
    accelerator = make_accelerator(config)
    run = setup(config, accelerator)
    n_params = sum(p.numel() for p in run.model.policy.parameters())
    model, optimizer, trainable = distributed.prepare(run, lambda ps: torch.optim.AdamW(ps, lr=config.trainer.lr))
    # every gradient, without activations to speak of (a sharded model's forward would gather its shards)
    accelerator.backward(sum((p.float() ** 2).sum() for p in trainable))
    optimizer.step()
    gc.collect()
    measured = measure(model, optimizer)
    pure = config.model.dtype != "fp32" and config.trainer.master_weights == "none"
    est = estimate(n_params, processes=accelerator.num_processes, sharded=distributed.sharded(accelerator),
                   live_reference=run.mode == "live", weight_bytes=2 if pure else FP32,
                   reference_bytes=2 if pure or config.trainer.precision in ("bf16", "fp16") else FP32)
    result = {"rank": accelerator.process_index, "processes": accelerator.num_processes, "reference": run.mode,
              "sharded": distributed.sharded(accelerator),
              "parameters": n_params, "measured": measured, "estimate": est.__dict__ | {"total": est.total},
              "rss_growth": _rss() - rss_before}
    accelerator.wait_for_everyone()
    model = optimizer = None
    accelerator.free_memory()
    accelerator.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(prog="python -m prefopt.cli.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8, help="GPUs the run is sharded over (FSDP columns)")
    parser.add_argument("--master-weights", choices=("fp32", "none"), default="fp32",
                        help="fp32: fp32 masters (the default); none: model.dtype bf16 weights updated in bf16")
    parser.add_argument("--measure", metavar="CONFIG", help="instead, set up this run (under a launcher: each process), "
                        "take one step and print each process's measured and estimated bytes as JSON")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if args.measure:
        import sys

        sys.stdout.write(json.dumps(measure_run(args.measure)) + "\n")  # one write: processes share the pipe
        sys.stdout.flush()
        return 0
    print(table(args.processes, args.master_weights))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
