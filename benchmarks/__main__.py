"""``python -m benchmarks [--quick | --gpu | --gpu-llama]``: prefopt and TRL's DPOTrainer side by side.

Every measured run is a fresh process (so peak memory is per run), prefopt and
TRL runs alternate, and both get the same model config, data, tokenizer, batch
size, max length, precision, optimiser and number of steps. Results go to a
JSON file and a Markdown table; the last line printed is the summary.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import fixtures, report
from benchmarks.budget import Budget
from benchmarks.scenarios import BUDGET_PRIORS, PROFILES, WINDOWS, RunSpec, training_runs, vocab_runs

ROOT = Path(__file__).resolve().parent.parent


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small models, two CPU cores, a few minutes")
    mode.add_argument("--gpu", action="store_true", help="Qwen2-0.5B shape in bf16 on the CUDA device, with MFU; TRL also with Liger")
    mode.add_argument("--gpu-llama", action="store_true", help="the same with the Llama-3.2-1B shape (vocabulary 128,256)")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and Markdown results")
    p.add_argument("--only", nargs="*", metavar="SCENARIO", help="run only these scenarios (1 2 3 4 5 6)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="fit steps and repeats into this wall time: scenarios 1 2 4 6, prefopt shared and unshared and TRL, "
                        "with the profiler's top operators (the one-call GPU check: --gpu --budget 420)")
    p.add_argument("--steps", type=int, help="override the profile's number of optimiser steps")
    p.add_argument("--repeats", type=int, help="override how many times each training run is repeated")
    p.add_argument("--threads", type=int, help="intra-op threads per run (CPU profiles default to 1: stable on a shared machine)")
    p.add_argument("--batch-size", type=int, help="override the profile's pairs per step")
    p.add_argument("--profile", action="store_true", help="write torch.profiler's top operators by CPU and CUDA time to OUT/profiles/")
    p.add_argument("--liger", action=argparse.BooleanOptionalAction, help="also run TRL with use_liger_kernel=True (default: on the GPU profiles)")
    p.add_argument("--prefopt-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override prefopt's run config, e.g. trainer.compile=true (repeatable; measuring an option against TRL)")
    p.add_argument("--keep", action="store_true", help="keep the working directory (data, tokenizer, run outputs)")
    return p.parse_args(argv)


def _prepare(workdir: Path, profile: dict) -> dict:
    """Data files, tokenizer and model config shared by every run."""
    rows = profile["batch_size"] * (profile["steps"] + 2)
    data = {}
    # The long-tailed set fills at least one window of prefopt's length-grouping sampler
    # (64 batches), as any real data set does; only the first `steps` batches are trained on.
    for name in ("uniform", "long_tail", "long_prompt"):
        data[name] = workdir / f"{name}.jsonl"
        fixtures.write_pairs(data[name], rows if name == "uniform" else max(rows, profile["batch_size"] * 64), profile["max_length"], name, seed=1)
    tok_dir = workdir / "tokenizer"
    fixtures.build_tokenizer(tok_dir, data["uniform"], profile["tokenizer_vocab"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model_config = fixtures.model_config(profile["model"], len(tok), tok.pad_token_id, tok.eos_token_id)
    return {"data": {k: str(v) for k, v in data.items()}, "tokenizer": str(tok_dir), "model_config": model_config, "pad_id": tok.pad_token_id}


def _spec(run: RunSpec, i: int, profile: dict, shared: dict, workdir: Path) -> dict:
    common = {"side": run.side, "device": profile["device"], "threads": profile["threads"], "run_id": i, "workdir": str(workdir),
              "scenario": run.scenario, "label": run.label, **WINDOWS[profile["device"]], "profile_dir": profile.get("profile_dir")}
    if run.side == "logits":
        return {**common, **run.settings, "batch": profile["vocab_batch"], "hidden_size": profile["vocab_hidden"],
                "seq_len": profile["vocab_seq"], "chunk_tokens": 512}
    return {
        **common,
        "model_config": shared["model_config"], "tokenizer": shared["tokenizer"], "pad_id": shared["pad_id"],
        "data": shared["data"][run.settings["data"]], "reference": run.settings["reference"],
        "loss": run.settings.get("loss", "dpo"), "beta": 0.1, "seed": 0, "lr": profile["lr"],
        "batch_size": profile["batch_size"], "max_length": profile["max_length"], "steps": profile["steps"],
        "warmup": profile["warmup"], "precision": profile["precision"], "optim": "adamw_torch", "liger": run.settings.get("liger", False),
        "prefopt_overrides": profile.get("prefopt_overrides", []), "share_prompt": run.settings.get("share_prompt", "auto"),
    }


def _execute(spec: dict, workdir: Path) -> dict:
    spec_path = workdir / f"spec-{spec['run_id']}.json"
    out_path = workdir / f"result-{spec['run_id']}.json"
    log_path = workdir / f"log-{spec['run_id']}.txt"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        HF_HOME=str(workdir / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", DATASETS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
    )
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", str(spec_path), str(out_path)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if out_path.exists():
        return json.loads(out_path.read_text())
    return {"ok": False, "error": f"worker exited with {proc.returncode}; see {log_path}", "log_tail": log_path.read_text()[-2000:]}


def _device_info(profile: dict) -> dict:
    import platform

    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    info["cpu"] = f"{cpu}, {len(os.sched_getaffinity(0))} cores available"
    if profile["device"] == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _liger_side(profile: dict, wanted: bool | None, notes: list[str]) -> bool:
    """Whether TRL also runs with ``use_liger_kernel=True``; when it cannot, a note says why."""
    if not (profile.get("liger", False) if wanted is None else wanted):
        return False
    import importlib.util

    import torch

    why = ("liger-kernel is not installed (pip install liger-kernel)" if importlib.util.find_spec("liger_kernel") is None
           else "Liger's Triton kernels need a CUDA device" if not (profile["device"] == "cuda" and torch.cuda.is_available()) else None)
    if why:
        notes.append(f"TRL with use_liger_kernel=True: skipped, {why}.")
        print(notes[-1], file=sys.stderr)
    return why is None


def _run_all(runs: list[RunSpec], profile: dict, shared: dict, workdir: Path, budget: Budget | None, notes: list[str]) -> list[dict]:
    """Every run in order, each in a fresh process; with a budget, each run's steps fitted to what is left."""
    results = []
    for i, run in enumerate(runs):
        run_profile = profile
        if budget is not None and run.side != "logits":
            steps = budget.steps(len(runs) - i)
            if steps is None:
                notes.append(f"{run.scenario} / {run.label}: not measured, the budget of {budget.seconds:.0f} s ran out.")
                print(notes[-1], file=sys.stderr)
                continue
            run_profile = {**profile, "steps": steps}
        spec = _spec(run, i, run_profile, shared, workdir)
        t0 = time.perf_counter()
        result = _execute(spec, workdir)
        wall = time.perf_counter() - t0
        if budget is not None and result.get("ok") and run.side != "logits":
            budget.record(wall, result["steps"], result["step_times"])
        status = "ok" if result.get("ok") else f"FAILED: {result.get('error')}"
        print(f"[{i + 1}/{len(runs)}] scenario {run.scenario} / {run.label}: {status} ({wall:.0f} s)", flush=True)
        results.append({"scenario": run.scenario, "side": run.side, "label": run.label, "settings": run.settings, "result": result})
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    name = "gpu" if args.gpu else "gpu-llama" if args.gpu_llama else "quick" if args.quick else "full"
    profile = dict(PROFILES[name])
    if args.steps:
        profile["steps"] = args.steps
    if args.repeats:
        profile["repeats"] = args.repeats
    if args.threads:
        profile["threads"] = args.threads
    if args.prefopt_set:
        profile["prefopt_overrides"] = args.prefopt_set
    if args.batch_size:
        profile["batch_size"] = args.batch_size
    out = Path(args.out)
    if args.profile:
        profile["profile_dir"] = str((out / "profiles").resolve())
    if profile["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--gpu needs a CUDA device; none is visible", file=sys.stderr)
            return 2
    notes: list[str] = []
    budget = None
    if args.budget:
        profile["budget"] = args.budget
        profile["profile_dir"] = profile.get("profile_dir") or str((out / "profiles").resolve())  # the top operators
        budget = Budget(args.budget, profile["warmup"], profile["steps"], **BUDGET_PRIORS[profile["device"]])
    only = set(args.only or (["1", "2", "4", "6"] if budget else ["1", "2", "3", "4", "5", "6"]))
    liger = _liger_side(profile, args.liger if budget is None else bool(args.liger), notes)  # a budget leaves Liger out unless asked
    runs = [r for r in training_runs(1 if budget else profile["repeats"], liger, losses=budget is None) if r.scenario[0] in only]
    if budget is not None and not args.repeats:
        profile["repeats"] = budget.repeats(len(runs))
        runs = [r for r in training_runs(profile["repeats"], liger, losses=False) if r.scenario[0] in only]
    runs += [r for r in vocab_runs(profile["vocab_sizes"]) if r.scenario[0] in only]
    workdir = Path(tempfile.mkdtemp(prefix="prefopt-bench-"))
    started = time.perf_counter()
    try:
        shared = _prepare(workdir, profile)
        results = _run_all(runs, profile, shared, workdir, budget, notes)
    finally:
        if args.keep:
            print(f"working directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    doc = report.build(name, profile, shared["model_config"], _device_info(profile), results, time.perf_counter() - started,
                       argv if argv is not None else sys.argv[1:], notes)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1))
    (out / f"{name}.md").write_text(doc["markdown"])
    print(doc["markdown"])
    print(f"results: {out / (name + '.json')}, {out / (name + '.md')}")
    print(doc["summary"])
    return 0 if all(r["result"].get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
