"""Aggregating run results into ratios, a Markdown report and the summary line."""
from __future__ import annotations

import statistics
from collections import defaultdict

from benchmarks.scenarios import PEAK_BF16_FLOPS

MiB = 2**20
SIDE_BY_SIDE = ("1-live-reference", "2-cached-reference", "4-long-tail")


def _params(model_config: dict) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(model_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    return sum(p.numel() for p in model.parameters())  # tied embeddings count once


def _aggregate(runs: list[dict]) -> dict | None:
    ok = [r["result"] for r in runs if r["result"].get("ok")]
    if not ok:
        return None
    steps = [t for r in ok for t in r["step_times"]]
    return {
        "repeats": len(ok),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
        "tokens_per_cpu_s": statistics.median(r["tokens"] / r["cpu_seconds"] for r in ok),
        "step_s": statistics.median(steps),
        "peak_memory": statistics.median(r["peak_memory"] for r in ok),
        "peak_above_imports": statistics.median(r["peak_memory"] - r["rss_after_imports"] for r in ok),
        "pad_fraction": statistics.mean(r["pad_fraction"] for r in ok),
        "tokens_per_step": statistics.mean(r["tokens"] / r["timed_steps"] for r in ok),
        "memory_kind": ok[0]["memory_kind"],
    }


def _peak_flops(gpu: str | None) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if gpu and k in gpu), None)


def build(name: str, profile: dict, model_config: dict, device: dict, results: list[dict], wall_s: float, argv: list[str]) -> dict:
    """The JSON document of a benchmark run, with its Markdown report and summary line."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["scenario"], r["label"])].append(r)
    agg = {f"{s} / {label}": _aggregate(rs) for (s, label), rs in groups.items() if s != "3-large-vocab"}
    params = _params(model_config)
    peak = _peak_flops(device.get("gpu"))
    for key, a in agg.items():
        if a and peak:
            live = "2-cached-reference" not in key
            a["mfu"] = (6 + 2 * live) * params * a["tokens_per_s"] / peak

    def get(scenario: str, label: str) -> dict | None:
        return agg.get(f"{scenario} / {label}")

    ratios: dict[str, dict] = {}
    for s in SIDE_BY_SIDE:
        p, t = get(s, "prefopt"), get(s, "TRL")
        if p and t:
            ratios[s] = {
                "throughput": p["tokens_per_s"] / t["tokens_per_s"],
                "throughput_cpu_time": p["tokens_per_cpu_s"] / t["tokens_per_cpu_s"],
                "step_time": p["step_s"] / t["step_s"],
                "peak_memory": p["peak_memory"] / t["peak_memory"],
                "peak_above_imports": p["peak_above_imports"] / t["peak_above_imports"],
            }
    live, cached = get("1-live-reference", "prefopt"), get("2-cached-reference", "prefopt")
    cache_vs_live = cached["step_s"] / live["step_s"] if live and cached else None
    cache_vs_live_cpu = live["tokens_per_cpu_s"] / cached["tokens_per_cpu_s"] if live and cached else None

    vocab: dict[int, dict] = defaultdict(dict)
    for r in results:
        if r["scenario"] == "3-large-vocab" and r["result"].get("ok"):
            vocab[r["settings"]["vocab_size"]][r["label"]] = r["result"]

    if ratios:
        worst = min(ratios, key=lambda s: ratios[s]["throughput"])
        summary = f"prefopt/TRL throughput ratio: {ratios[worst]['throughput']:.2f} (scenario: {worst})"
    else:
        summary = "prefopt/TRL throughput ratio: n/a (scenario: none ran side by side)"
    doc = {
        "profile": name, "settings": profile, "model_config": model_config, "parameters": params, "device": device,
        "command": "python -m benchmarks " + " ".join(argv), "wall_s": wall_s, "aggregates": agg, "ratios": ratios,
        "cached_vs_live_step": cache_vs_live, "cached_vs_live_cpu": cache_vs_live_cpu, "large_vocab": vocab, "runs": results, "summary": summary,
    }
    doc["markdown"] = _markdown(doc, peak)
    return doc


def _mib(x: float) -> str:
    return f"{x / MiB:,.0f}"


def _markdown(doc: dict, peak: float | None) -> str:
    s, dev, agg = doc["settings"], doc["device"], doc["aggregates"]
    mem = "peak CUDA memory allocated" if s["device"] == "cuda" else "peak RSS"
    lines = [
        f"### Profile `{doc['profile']}`: `{doc['command'].strip()}`",
        "",
        f"Device: {dev.get('gpu') or dev['cpu']}; torch {dev['torch']}, transformers {dev['transformers']}, TRL {dev['trl']}. "
        f"Model: {doc['model_config']['model_type']} shape, {doc['parameters'] / 1e6:.1f}M parameters, built from a config; "
        f"{s['precision']}, batch {s['batch_size']} pairs, max length {s['max_length']}, AdamW (torch, lr {s['lr']}), "
        f"{s['steps']} steps of which the first {s['warmup']} are warm-up and not timed; each run repeated {s['repeats']}x. "
        f"Total wall time {doc['wall_s']:.0f} s.",
        "",
        f"Tokens/s counts all processed tokens: non-pad tokens of the chosen and rejected sequences (prompt + completion), "
        f"the same rule for both. Memory: {mem} of the run's own process"
        + (", and that peak minus the resident size after imports (the import baseline differs: TRL imports more)." if s["device"] == "cpu" else "."),
        "",
    ]
    head = "| Scenario | prefopt tok/s | TRL tok/s | **ratio** | prefopt step ms | TRL step ms | prefopt " + mem + " MiB | TRL MiB | **ratio** |"
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if s["device"] == "cpu":
        head += " above imports prefopt / TRL MiB | **ratio** | throughput ratio by CPU time |"
        sep += "---:|---:|---:|"
    if peak:
        head += " prefopt MFU | TRL MFU |"
        sep += "---:|---:|"
    head += " padded positions prefopt / TRL |"
    sep += "---:|"
    lines += [head, sep]
    for sc, r in doc["ratios"].items():
        p, t = agg[f"{sc} / prefopt"], agg[f"{sc} / TRL"]
        row = (f"| {sc} | {p['tokens_per_s']:,.0f} | {t['tokens_per_s']:,.0f} | **{r['throughput']:.2f}** | {p['step_s'] * 1e3:.1f} | "
               f"{t['step_s'] * 1e3:.1f} | {_mib(p['peak_memory'])} | {_mib(t['peak_memory'])} | **{r['peak_memory']:.2f}** |")
        if s["device"] == "cpu":
            row += (f" {_mib(p['peak_above_imports'])} / {_mib(t['peak_above_imports'])} | **{r['peak_above_imports']:.2f}** |"
                    f" {r['throughput_cpu_time']:.2f} |")
        if peak:
            row += f" {p['mfu']:.1%} | {t['mfu']:.1%} |"
        row += f" {p['pad_fraction']:.1%} / {t['pad_fraction']:.1%} |"
        lines.append(row)
    failed = [r for r in doc["runs"] if not r["result"].get("ok")]
    lines.append("")
    if doc["cached_vs_live_step"] is not None:
        line = f"prefopt step time, cached reference / live reference: **{doc['cached_vs_live_step']:.2f}**"
        if s["device"] == "cpu":
            line += f" (by CPU time per token: {doc['cached_vs_live_cpu']:.2f})"
        lines.append(line)
        lines.append("")

    dpo = agg.get("1-live-reference / prefopt")
    losses = [(label, agg.get(f"5-losses / {label}")) for label in ("ipo", "tdpo")]
    if dpo and any(a for _, a in losses):
        lines += ["Scenario 5, prefopt losses (all with a live reference; TDPO also computes the per-token KL over the vocabulary):", "",
                  f"| Loss | tok/s | step ms | {mem} MiB | throughput vs DPO |", "|---|---:|---:|---:|---:|"]
        for label, a in [("dpo", dpo), *losses]:
            if a:
                lines.append(f"| {label} | {a['tokens_per_s']:,.0f} | {a['step_s'] * 1e3:.1f} | {_mib(a['peak_memory'])} | {a['tokens_per_s'] / dpo['tokens_per_s']:.2f} |")
        lines.append("")

    if doc["large_vocab"]:
        what = "CUDA memory allocated" if s["device"] == "cuda" else "RSS"
        lines += [f"Scenario 3, one forward + backward of per-token log-probs, batch {s['vocab_batch']} x {s['vocab_seq']} tokens "
                  f"(a quarter of them prompt), hidden size {s['vocab_hidden']}, one layer; peak {what} above the start, MiB:", "",
                  "| Vocabulary | naive (full logits) | prefopt (chunked) | TRL (fused LM head) | **prefopt / naive** | **prefopt / TRL** | seconds naive / prefopt / TRL |",
                  "|---:|---:|---:|---:|---:|---:|---|"]
        for v, m in sorted(doc["large_vocab"].items(), key=lambda kv: int(kv[0])):
            if {"naive", "prefopt", "trl"} <= m.keys():
                n, p, t = (m[k]["peak_memory"] for k in ("naive", "prefopt", "trl"))
                secs = " / ".join(f"{m[k]['seconds']:.1f}" for k in ("naive", "prefopt", "trl"))
                lines.append(f"| {int(v):,} | {_mib(n)} | {_mib(p)} | {_mib(t)} | **{p / n:.2f}** | **{p / t:.2f}** | {secs} |")
        lines.append("")
    for r in failed:
        lines.append(f"FAILED: scenario {r['scenario']} / {r['label']}: {r['result'].get('error')}")
    return "\n".join(lines) + "\n"
