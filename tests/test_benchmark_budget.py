"""The one-call check's budget logic (``python -m benchmarks --gpu --budget 420``), on the CPU with a simulated clock."""
from __future__ import annotations

import pytest

from benchmarks.budget import Budget


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _simulate(total: float, runs: int, overhead: float, step: float, prior_step: float = 1.0, prior_overhead: float = 30.0):
    """Runs one after another on a simulated clock; returns (steps given to each run or None, clock at the end)."""
    clock = Clock()
    plan = Budget(total, warmup=5, max_steps=30, overhead_s=prior_overhead, step_s=prior_step, clock=clock)
    given = []
    for i in range(runs):
        steps = plan.steps(runs - i)
        given.append(steps)
        if steps is None:
            continue
        clock.now += overhead + steps * step
        plan.record(overhead + steps * step, steps, [step] * (steps - 5))
    return given, clock.now, plan


def test_steps_are_fitted_so_every_run_fits_the_budget():
    given, end, plan = _simulate(420, runs=13, overhead=20, step=0.4)
    assert all(s is not None and s >= plan.min_steps for s in given)
    assert end <= 420 - plan.reserve_s
    assert end > 0.8 * 420  # the time is used, not left idle
    assert max(given) <= 30  # never above the profile's steps


def test_a_slower_side_after_the_first_run_still_fits():
    """Estimates start from priors and keep the largest step and start-up seen (TRL's slower steps)."""
    clock = Clock()
    plan = Budget(420, warmup=5, max_steps=30, overhead_s=30, step_s=1.0, clock=clock)
    for i, step in enumerate([0.3, 0.9, 0.3, 0.9, 0.3, 0.9, 0.3, 0.9, 0.3, 0.9, 0.3, 0.9]):
        steps = plan.steps(12 - i)
        assert steps is not None
        clock.now += 20 + steps * step
        plan.record(20 + steps * step, steps, [step] * (steps - 5))
    assert clock.now <= 420 and plan.step_s == pytest.approx(0.9)


def test_runs_that_cannot_fit_are_skipped_not_squeezed():
    given, end, plan = _simulate(100, runs=6, overhead=30, step=1.0)
    assert given[0] is not None and None in given
    assert all(s is None or s >= plan.min_steps for s in given)
    assert end <= 100 + 30  # at most the run started when it still fitted by the estimates


def test_repeats_grow_with_the_budget():
    assert Budget(420, 5, 30, overhead_s=30, step_s=1.0).repeats(13) == 1
    assert Budget(3600, 5, 30, overhead_s=30, step_s=1.0).repeats(13) == 3
    assert Budget(1500, 5, 30, overhead_s=30, step_s=1.0).repeats(13) == 2


def test_the_budget_run_records_skips_and_reports_one_table(monkeypatch, tmp_path):
    """``_run_all`` with a simulated worker: steps shrink as time goes, a run past the budget is noted as not
    measured; the report of a budget run is one table with the three sides, ratios and top operators."""
    from benchmarks import __main__ as bench
    from benchmarks import fixtures, report
    from benchmarks.scenarios import PROFILES, training_runs

    clock = Clock()
    plan = Budget(200, warmup=3, max_steps=24, overhead_s=10, step_s=0.5, clock=clock)

    def execute(spec, workdir):
        step = 0.5 if spec["side"] == "prefopt" else 1.0
        clock.now += 10 + spec["steps"] * step
        tokens = 1000.0 * spec["steps"]
        return {"ok": True, "steps": spec["steps"], "step_times": [step] * (spec["steps"] - 3), "timed_steps": spec["steps"] - 3,
                "tokens_per_s": tokens / 10, "tokens": tokens, "positions": 400.0 * (spec["steps"] - 3), "seconds": 10.0,
                "computed_tokens": tokens / (2 if spec.get("share_prompt") == "auto" else 1), "cpu_seconds": 10.0,
                "peak_memory": 5e8, "rss_after_imports": 1e8, "pad_fraction": 0.0, "memory_kind": "peak RSS", "input_shapes": 3,
                "host_syncs_per_step": 1.0, "aten_ops_per_step": 900.0, "top_ops": [("aten::mm", 12.0), ("aten::bmm", 3.0)]}

    monkeypatch.setattr(bench, "_execute", execute)
    profile = {**PROFILES["quick"], "budget": 200}
    runs = [r for r in training_runs(1, losses=False) if r.scenario[0] in "1246"]
    shared = {"model_config": fixtures.model_config("tiny", 64, 0, 1), "tokenizer": "t", "pad_id": 0, "data": dict.fromkeys(
        ("uniform", "long_tail", "long_prompt"), "d")}
    notes: list[str] = []
    results = bench._run_all(runs, profile, shared, tmp_path, plan, notes)
    assert clock.now <= 200 + 10 + 24  # at most one run past the estimate
    assert len(results) + len(notes) == len(runs) and results
    device = {"cpu": "x", "torch": "t", "transformers": "t", "trl": "t"}
    doc = report.build("quick", profile, shared["model_config"], device, results, clock.now, ["--quick", "--budget", "200"], notes)
    md = doc["markdown"]
    assert md.count("| Scenario | side |") == 1 and "prefopt-unshared" in md and "mm 12" in md
    assert all(n in md for n in notes)
