"""Profiles (sizes per mode) and the ordered list of measured runs."""
from __future__ import annotations

from dataclasses import dataclass, field

# Dense bf16 peak of the card, for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

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
    # One CUDA GPU: the Qwen2-0.5B shape in bf16.
    "gpu": dict(
        model="qwen2-0.5b", device="cuda", threads=None, precision="bf16", max_length=1024, batch_size=8, steps=30, warmup=5, repeats=1,
        tokenizer_vocab=4096, lr=1e-6, vocab_sizes=[128256, 151936], vocab_batch=8, vocab_hidden=896, vocab_seq=1024,
    ),
}


@dataclass
class RunSpec:
    """One measured process: a training run of one side, or one log-prob memory measurement."""

    scenario: str
    side: str  # prefopt | trl | logits
    label: str  # what the run is within its scenario
    settings: dict = field(default_factory=dict)


def training_runs(repeats: int) -> list[RunSpec]:
    """Training runs in order; prefopt and TRL alternate, and swap who goes first on each repeat."""
    runs: list[RunSpec] = []
    for r in range(repeats):

        def pair(scenario: str, settings: dict) -> list[RunSpec]:
            p = RunSpec(scenario, "prefopt", "prefopt", settings)
            t = RunSpec(scenario, "trl", "TRL", settings)
            return [p, t] if r % 2 == 0 else [t, p]

        runs += pair("1-live-reference", {"reference": "live", "data": "uniform"})
        cached = {"reference": "cache", "data": "uniform"}
        if r == 0:  # prefopt's measured run is then its second, reusing the disk cache
            runs.append(RunSpec("2-cached-reference", "prefopt", "cache-build", cached))
        runs += pair("2-cached-reference", cached)
        runs += pair("4-long-tail", {"reference": "live", "data": "long_tail"})
        for loss in ("ipo", "tdpo"):
            runs.append(RunSpec("5-losses", "prefopt", loss, {"reference": "live", "data": "uniform", "loss": loss}))
    return runs


def vocab_runs(vocab_sizes: list[int]) -> list[RunSpec]:
    return [RunSpec("3-large-vocab", "logits", m, {"vocab_size": v, "method": m}) for v in vocab_sizes for m in ("naive", "prefopt", "trl")]
