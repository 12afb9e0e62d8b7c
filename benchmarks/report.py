"""Aggregating run results into ratios, a Markdown report and the summary line."""
from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable

from benchmarks.scenarios import peak_flops

MiB = 2**20
SIDE_BY_SIDE = ("1-live-reference", "2-cached-reference", "4-long-tail", "6-long-prompt")
SHARED_SIDES = ("prefopt", "prefopt-unshared", "TRL")


def _params(model_config: dict) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(model_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    return sum(p.numel() for p in model.parameters())  # tied embeddings count once


def _aggregate(runs: list[dict], batch_size: int) -> dict | None:
    ok = [r["result"] for r in runs if r["result"].get("ok")]
    if not ok:
        return None
    steps = [t for r in ok for t in r["step_times"]]
    return {
        # positions through the policy per trained pair (padding included): what the model computed
        "computed_per_pair": statistics.mean(r["positions"] / (r["timed_steps"] * batch_size) for r in ok if "positions" in r)
        if all("positions" in r for r in ok) else None,
        "computed_per_s": statistics.median(r.get("computed_tokens", r["tokens"]) / r["seconds"] for r in ok) if all("seconds" in r for r in ok) else None,
        "aten_ops_per_step": _median([r.get("aten_ops_per_step") for r in ok]),
        "top_ops": ok[0].get("top_ops"),
        "repeats": len(ok),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
        "tokens_per_cpu_s": statistics.median(r.get("pair_tokens", r["tokens"]) / r["cpu_seconds"] for r in ok),
        "step_s": statistics.median(steps),
        "peak_memory": statistics.median(r["peak_memory"] for r in ok),
        "peak_above_imports": statistics.median(r["peak_memory"] - r["rss_after_imports"] for r in ok),
        "pad_fraction": statistics.mean(r["pad_fraction"] for r in ok),
        "tokens_per_step": statistics.mean(r["tokens"] / r["timed_steps"] for r in ok),
        "memory_kind": ok[0]["memory_kind"],
        "input_shapes": max(r.get("input_shapes", 0) for r in ok),
        "host_syncs_per_step": _median([r.get("host_syncs_per_step") for r in ok]),
        "cuda_sync_warnings_per_step": _median([r.get("cuda_sync_warnings_per_step") for r in ok]),
        "gpu_busy": _median([r.get("gpu_busy") for r in ok]),
    }


def _median(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def build(name: str, profile: dict, model_config: dict, device: dict, results: list[dict], wall_s: float, argv: list[str],
          notes: list[str] | None = None) -> dict:
    """The JSON document of a benchmark run, with its Markdown report and summary line."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["scenario"], r["label"])].append(r)
    agg = {f"{s} / {label}": _aggregate(rs, profile["batch_size"]) for (s, label), rs in groups.items() if s != "3-large-vocab"}
    params = _params(model_config)
    peak = peak_flops(device.get("gpu"))
    for key, a in agg.items():
        if a and peak:  # 6N FLOPs per computed token, 2N more per token through a live reference
            live = "2-cached-reference" not in key
            a["mfu"] = (6 + 2 * live) * params * (a.get("computed_per_s") or a["tokens_per_s"]) / peak

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
    liger: dict[str, dict] = {}
    for s in SIDE_BY_SIDE:
        p, t = get(s, "prefopt"), get(s, "TRL+Liger")
        if p and t:
            liger[s] = {"throughput": p["tokens_per_s"] / t["tokens_per_s"], "peak_memory": p["peak_memory"] / t["peak_memory"]}
    shared = _shared_ratios(agg)
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
        "command": "python -m benchmarks " + " ".join(argv), "wall_s": wall_s, "aggregates": agg, "ratios": ratios, "ratios_liger": liger,
        "ratios_shared": shared, "notes": notes or [],
        "cached_vs_live_step": cache_vs_live, "cached_vs_live_cpu": cache_vs_live_cpu, "large_vocab": vocab, "runs": results, "summary": summary,
    }
    for r in results:
        if r["result"].get("compilations"):
            c = r["result"]["compilations"]
            doc["notes"].append(f"{r['scenario']} / {r['label']}: torch.compile compiled {c.get('graphs', 0)} graphs, "
                                f"{c.get('recompiles', 0)} of them recompiles.")
    doc["shared_targets"] = _shared_targets(profile["device"], agg, ratios, shared)
    if profile["device"] == "cuda":
        doc["targets"] = _targets(agg, ratios, liger)
        if not peak:
            doc["notes"].append(f"MFU: n/a, {device.get('gpu')} is not in benchmarks.scenarios.PEAK_BF16_FLOPS.")
    doc["markdown"] = _budget_markdown(doc, peak) if profile.get("budget") else _markdown(doc, peak)
    return doc


def _shared_ratios(agg: dict) -> dict[str, dict]:
    """prefopt with shared prompts / prefopt unshared, per scenario: the same pairs in the same order, so the
    throughput ratio is the step-time ratio."""
    out = {}
    for s in SIDE_BY_SIDE:
        p, u = agg.get(f"{s} / prefopt"), agg.get(f"{s} / prefopt-unshared")
        if p and u:
            out[s] = {"throughput": p["tokens_per_s"] / u["tokens_per_s"], "peak_memory": p["peak_memory"] / u["peak_memory"],
                      "throughput_cpu_time": p["tokens_per_cpu_s"] / u["tokens_per_cpu_s"]}
    return out


def _shared_targets(device: str, agg: dict, ratios: dict, shared: dict) -> list[tuple[str, str, bool | None]]:
    """The shared-prompt targets: (target, measured, met); met is None where a figure is missing."""
    rows: list[tuple[str, str, bool | None]] = []

    def add(target: str, values: dict[str, float], ok: Callable[[float], bool], fmt: str = "{:.2f}") -> None:
        shown = ", ".join(f"{fmt.format(v)} ({k.split('-')[0]})" for k, v in values.items()) or "not measured"
        rows.append((target, shown, all(ok(v) for v in values.values()) if values else None))

    if device == "cpu":
        for by, key in (("", "throughput"), (" (by CPU time)", "throughput_cpu_time")):
            add(f">= 1.3x unshared on the long-prompt scenario{by}", {s: r[key] for s, r in shared.items() if s.startswith("6")}, lambda v: v >= 1.3)
            add(f">= 0.97x unshared on the other scenarios{by}", {s: r[key] for s, r in shared.items() if not s.startswith("6")},
                lambda v: v >= 0.97)
        add("peak memory <= unshared", {s: r["peak_memory"] for s, r in shared.items()}, lambda v: v <= 1.0)
    else:
        add(">= 1.5x TRL 1.16 as shipped", {s: r["throughput"] for s, r in ratios.items()}, lambda v: v >= 1.5)
        mfu = {s: agg[f"{s} / prefopt"].get("mfu") for s in SIDE_BY_SIDE if agg.get(f"{s} / prefopt")}
        add("MFU >= 40% with a cached reference", {s: v for s, v in mfu.items() if v is not None and s.startswith("2")}, lambda v: v >= 0.40, "{:.1%}")
        add("peak memory <= TRL's", {s: r["peak_memory"] for s, r in ratios.items()}, lambda v: v <= 1.0)
    return rows


def _shared_table(doc: dict, peak: float | None) -> list[str]:
    """Per scenario, prefopt with shared prompts, prefopt unshared and TRL: one row each."""
    agg, cuda = doc["aggregates"], doc["settings"]["device"] == "cuda"
    mem = "CUDA MiB" if cuda else "RSS MiB"
    lines = ["| Scenario | side | computed tokens / pair | pair tok/s | s / step | " + ("MFU | " if peak else "")
             + f"peak {mem} | aten ops / step | vs unshared | vs unshared by CPU time | vs TRL | top operators (self {'CUDA' if cuda else 'CPU'} ms) |",
             "|---|---|---:|---:|---:|" + ("---:|" if peak else "") + "---:|---:|---:|---:|---:|---|"]
    for sc in SIDE_BY_SIDE:
        for side in SHARED_SIDES:
            a = agg.get(f"{sc} / {side}")
            if not a:
                continue
            u, t = agg.get(f"{sc} / prefopt-unshared"), agg.get(f"{sc} / TRL")
            vs_u = f"{a['tokens_per_s'] / u['tokens_per_s']:.2f}x" if u else "n/a"
            vs_t = f"{a['tokens_per_s'] / t['tokens_per_s']:.2f}x" if t else "n/a"
            vs_cpu = f"{a['tokens_per_cpu_s'] / u['tokens_per_cpu_s']:.2f}x" if u else "n/a"
            per_pair = "n/a" if a.get("computed_per_pair") is None else f"{a['computed_per_pair']:.0f}"
            ops = "n/a" if a.get("aten_ops_per_step") is None else f"{a['aten_ops_per_step']:,.0f}"
            top = ", ".join(f"{n.removeprefix('aten::')} {ms:.0f}" for n, ms in (a.get("top_ops") or [])[:3]) or "n/a"
            mfu = (f"{a['mfu']:.1%} | " if a.get("mfu") is not None else "n/a | ") if peak else ""
            lines.append(f"| {sc} | {side} | {per_pair} | {a['tokens_per_s']:,.0f} | {a['step_s']:.3f} | {mfu}{_mib(a['peak_memory'])} | "
                         f"{ops} | {vs_u} | {vs_cpu} | {vs_t} | {top} |")
    return lines + [""]


def _steps_range(runs: list[dict]) -> str:
    steps = [r["result"]["steps"] for r in runs if r["result"].get("ok") and "steps" in r["result"]]
    return "n/a" if not steps else f"{min(steps)}" if min(steps) == max(steps) else f"{min(steps)}-{max(steps)}"


def _shared_section(doc: dict, peak: float | None) -> list[str]:
    lines = ["Shared prompts: prefopt (shared, the default), prefopt with `trainer.share_prompt: false` and TRL. Computed tokens / "
             "pair: positions through the policy per trained pair; pair tok/s: the pairs' tokens with the prompt counted once per "
             "completion, per second (the same work for all three); aten ops / step: operators dispatched in one warm-up step.", "",
             *_shared_table(doc, peak), "| Target | Measured | Met |", "|---|---|---|"]
    return lines + [f"| {t} | {m} | {'-' if ok is None else 'yes' if ok else 'no'} |" for t, m, ok in doc["shared_targets"]] + [""]


def _budget_markdown(doc: dict, peak: float | None) -> str:
    """The one-call check (``--budget``): one table, its targets and notes."""
    s, dev = doc["settings"], doc["device"]
    lines = [f"### `{doc['command'].strip()}`", "",
             f"Device: {dev.get('gpu') or dev['cpu']}; torch {dev['torch']}, transformers {dev['transformers']}, TRL {dev['trl']}. "
             f"Model: {doc['model_config']['model_type']} shape, {doc['parameters'] / 1e6:.1f}M parameters; {s['precision']}, batch "
             f"{s['batch_size']} pairs, max length {s['max_length']}; steps fitted to the budget of {s['budget']:.0f} s "
             f"({_steps_range(doc['runs'])} per run), the first {s['warmup']} untimed; "
             f"each run {s['repeats']}x. Total wall time {doc['wall_s']:.0f} s.", "", *_shared_table(doc, peak),
             "| Target | Measured | Met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'-' if ok is None else 'yes' if ok else 'no'} |" for t, m, ok in doc["shared_targets"]]
    lines += [""] + [f"Note: {n}" for n in doc["notes"]]
    lines += [f"FAILED: scenario {r['scenario']} / {r['label']}: {r['result'].get('error')}" for r in doc["runs"] if not r["result"].get("ok")]
    return "\n".join(lines) + "\n"


def _targets(agg: dict, ratios: dict, liger: dict) -> list[tuple[str, str, bool | None]]:
    """Issue 10's GPU targets: (target, measured, met); met is None where a figure is missing."""
    rows: list[tuple[str, str, bool | None]] = []

    def add(target: str, values: dict[str, float], ok: Callable[[float], bool], fmt: str = "{:.2f}") -> None:
        shown = ", ".join(f"{fmt.format(v)} ({k.split('-')[0]})" for k, v in values.items()) or "not measured"
        rows.append((target, shown, all(ok(v) for v in values.values()) if values else None))

    add(">= 1.5x TRL as shipped", {s: r["throughput"] for s, r in ratios.items()}, lambda v: v >= 1.5)
    add(">= 1.2x TRL with Liger", {s: r["throughput"] for s, r in liger.items()}, lambda v: v >= 1.2)
    mfu = {s: agg[f"{s} / prefopt"].get("mfu") for s in SIDE_BY_SIDE if agg.get(f"{s} / prefopt")}
    add("MFU >= 40% with a cached reference", {s: v for s, v in mfu.items() if v is not None and s.startswith("2")}, lambda v: v >= 0.40, "{:.1%}")
    add("MFU >= 35% with a live reference", {s: v for s, v in mfu.items() if v is not None and not s.startswith("2")}, lambda v: v >= 0.35, "{:.1%}")
    add("peak memory <= TRL's", {s: r["peak_memory"] for s, r in ratios.items()}, lambda v: v <= 1.0)
    uni, tail = agg.get("1-live-reference / prefopt"), agg.get("4-long-tail / prefopt")
    add("long-tail tokens/s within 20% of uniform", {"4/1": tail["tokens_per_s"] / uni["tokens_per_s"]} if uni and tail else {}, lambda v: v >= 0.8)
    return rows


def _per_run(doc: dict, peak: float | None) -> list[str]:
    """One row per (scenario, side): the figures issue 10 asks for."""
    mem = "CUDA MiB" if doc["settings"]["device"] == "cuda" else "RSS MiB"
    lines = ["Per run: distinct `input_ids` shapes over the whole run (policy and reference forwards); host syncs per step "
             "counted in warm-up steps " + ("(reads of CUDA tensors; in brackets CUDA's sync-debug warnings)" if doc["settings"]["device"] == "cuda"
                                            else "(every host read of tensor data, CPU tensors included)")
             + "; GPU busy: share of the wall time of profiled warm-up steps covered by CUDA kernels (under the profiler).", "",
             f"| Scenario | side | tok/s | MFU | step ms | peak {mem} | padded | input shapes | host syncs / step | GPU busy |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, a in doc["aggregates"].items():
        if not a:
            continue
        sc, side = key.split(" / ", 1)
        mfu = f"{a['mfu']:.1%}" if a.get("mfu") is not None else "n/a"
        syncs = "n/a" if a["host_syncs_per_step"] is None else f"{a['host_syncs_per_step']:.1f}"
        if a.get("cuda_sync_warnings_per_step") is not None:
            syncs += f" ({a['cuda_sync_warnings_per_step']:.1f})"
        busy = "n/a" if a["gpu_busy"] is None else f"{a['gpu_busy']:.0%}"
        lines.append(f"| {sc} | {side} | {a['tokens_per_s']:,.0f} | {mfu} | {a['step_s'] * 1e3:.1f} | {_mib(a['peak_memory'])} | "
                     f"{a['pad_fraction']:.1%} | {a['input_shapes']} | {syncs} | {busy} |")
    return lines + [""]


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
        f"Total wall time {doc['wall_s']:.0f} s."
        + (f" prefopt config overrides: `{' '.join(s['prefopt_overrides'])}`." if s.get("prefopt_overrides") else ""),
        "",
        f"Tokens/s counts pair tokens: the tokens of the trained pairs' chosen and rejected sequences (prompt + completion), "
        f"the same rule for every engine, whether or not it computes a shared prompt once. Memory: {mem} of the run's own process"
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
    lines += ["", *_per_run(doc, peak), *_shared_section(doc, peak)]
    if doc["ratios_liger"]:
        lines += ["prefopt against TRL with `use_liger_kernel=True`:", "",
                  "| Scenario | prefopt tok/s | TRL+Liger tok/s | **ratio** | memory ratio |", "|---|---:|---:|---:|---:|"]
        for sc, r in doc["ratios_liger"].items():
            p, t = agg[f"{sc} / prefopt"], agg[f"{sc} / TRL+Liger"]
            lines.append(f"| {sc} | {p['tokens_per_s']:,.0f} | {t['tokens_per_s']:,.0f} | **{r['throughput']:.2f}** | {r['peak_memory']:.2f} |")
        lines.append("")
    if doc.get("targets"):
        lines += ["Targets (issue 10, one GPU):", "", "| Target | Measured | Met |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'-' if ok is None else 'yes' if ok else 'no'} |" for t, m, ok in doc["targets"]]
        lines.append("")
    lines += [f"Note: {n}" for n in doc["notes"]] + ([""] if doc["notes"] else [])
    failed = [r for r in doc["runs"] if not r["result"].get("ok")]
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
