"""Profiles (sizes per mode) and the ordered list of measured runs."""
from __future__ import annotations

from dataclasses import dataclass, field

# Dense bf16 peak of the card (vendor data sheets, without sparsity), for model FLOPs
# utilisation; the first name contained in torch.cuda.get_device_name() wins.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("GH200", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
]


def peak_flops(device_name: str | None) -> float | None:
    """The dense bf16 peak of a CUDA device by name; None when the card is not in the table."""
    return next((v for k, v in PEAK_BF16_FLOPS if device_name and k in device_name), None)


# Priors of the budget planner (benchmarks.budget): a run's start-up and the slowest side's step, in seconds.
BUDGET_PRIORS = {"cpu": dict(overhead_s=10.0, step_s=0.1), "cuda": dict(overhead_s=30.0, step_s=1.0)}

PROFILES: dict[str, dict] = {
    # Two CPU cores, a few minutes.
    "quick": dict(
        model="tiny", device="cpu", threads=1, precision="fp32", max_length=128, batch_size=4, steps=24, warmup=3, repeats=1,
        tokenizer_vocab=2048, lr=1e-5, vocab_sizes=[151936], vocab_batch=1, vocab_hidden=64, vocab_seq=1024,
    ),
    # A longer CPU run: a bigger model, longer sequences, every run twice.
    "full": dict(
        model="small", device="cpu", threads=1, precision="fp32", max_length=512, batch_size=8, steps=20, warmup=3, repeats=2,
        tokenizer_vocab=4096, lr=1e-5, vocab_sizes=[128256, 151936], vocab_batch=2, vocab_hidden=64, vocab_seq=1024,
    ),
    # One CUDA GPU: the Qwen2-0.5B shape in bf16; TRL also with Liger kernels.
    "gpu": dict(
        model="qwen2-0.5b", device="cuda", threads=None, precision="bf16", max_length=1024, batch_size=8, steps=30, warmup=5, repeats=1,
        tokenizer_vocab=4096, lr=1e-6, vocab_sizes=[128256, 151936], vocab_batch=8, vocab_hidden=896, vocab_seq=1024, liger=True,
    ),
    # One CUDA GPU: the Llama-3.2-1B shape (vocabulary 128,256) in bf16.
    "gpu-llama": dict(
        model="llama-3.2-1b", device="cuda", threads=None, precision="bf16", max_length=1024, batch_size=4, steps=30, warmup=5, repeats=1,
        tokenizer_vocab=4096, lr=1e-6, vocab_sizes=[128256], vocab_batch=4, vocab_hidden=2048, vocab_seq=1024, liger=True,
    ),
}
# Measurement windows inside the warm-up (see benchmarks.probe): steps under the host-sync
# counter, then steps under torch.profiler (always on CUDA; on the CPU with --profile).
WINDOWS = {"cpu": dict(sync_steps=1, profile_steps=2), "cuda": dict(sync_steps=2, profile_steps=3)}


@dataclass
class RunSpec:
    """One measured process: a training run of one side, or one log-prob memory measurement."""

    scenario: str
    side: str  # prefopt | trl | logits
    label: str  # what the run is within its scenario
    settings: dict = field(default_factory=dict)


SHARED_SCENARIOS = ("1-live-reference", "2-cached-reference", "4-long-tail", "6-long-prompt")


def training_runs(repeats: int, liger: bool = False, losses: bool = True) -> list[RunSpec]:
    """Training runs in order; in each scenario prefopt (shared prompts, the default), prefopt with
    ``share_prompt: false`` and TRL alternate, and swap who goes first on each repeat.

    ``liger``: TRL also runs with ``use_liger_kernel=True`` (label ``TRL+Liger``) after them;
    ``losses``: scenario 5 (prefopt's other losses) too.
    """
    runs: list[RunSpec] = []
    for r in range(repeats):

        def trio(scenario: str, settings: dict) -> list[RunSpec]:
            p = RunSpec(scenario, "prefopt", "prefopt", settings)
            u = RunSpec(scenario, "prefopt", "prefopt-unshared", {**settings, "share_prompt": False})
            t = RunSpec(scenario, "trl", "TRL", settings)
            extra = [RunSpec(scenario, "trl", "TRL+Liger", {**settings, "liger": True})] if liger else []
            return ([p, u, t] if r % 2 == 0 else [t, u, p]) + extra

        runs += trio("1-live-reference", {"reference": "live", "data": "uniform"})
        cached = {"reference": "cache", "data": "uniform"}
        if r == 0:  # prefopt's measured runs are then later ones, reusing the disk cache (computed shared or not: the same values)
            runs.append(RunSpec("2-cached-reference", "prefopt", "cache-build", cached))
        runs += trio("2-cached-reference", cached)
        runs += trio("4-long-tail", {"reference": "live", "data": "long_tail"})
        runs += trio("6-long-prompt", {"reference": "live", "data": "long_prompt"})
        if losses:
            for loss in ("ipo", "tdpo"):
                runs.append(RunSpec("5-losses", "prefopt", loss, {"reference": "live", "data": "uniform", "loss": loss}))
    return runs


def vocab_runs(vocab_sizes: list[int]) -> list[RunSpec]:
    return [RunSpec("3-large-vocab", "logits", m, {"vocab_size": v, "method": m}) for v in vocab_sizes for m in ("naive", "prefopt", "trl")]
