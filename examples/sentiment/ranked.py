"""Beyond pairs: K SFT samples per prompt, scored by the reward, trained as rankings, as pairs and as labels.

    python3 -m examples.sentiment.ranked --seeds 0 1 --betas 0.1 0.3 --threads 1   # default scale
    python3 -m examples.sentiment.ranked --scale tiny                               # seconds

For each seed (its own corpus, SFT model, data and held-out prompts, as ``python3 -m
examples.sentiment --seed N``) it samples ``--k`` completions per prompt from the SFT model,
scores them with VADER and writes ``rankings.jsonl`` (``prompt``, ``completions``, ``scores``)
and ``labelled.jsonl`` (``prompt``, ``completion``, ``label``: above or below the prompt's
median score), then trains DPO on best/worst pairs, DPO on all pairs, Plackett-Luce on the
rankings and KTO on the labels with the scale's steps, batch size and learning rate, and
evaluates every policy on the reward-KL plane. Everything goes to
``runs/sentiment-ranked-<scale>/`` (``seed<N>/`` per seed; ``ranked_reward_kl.png`` and
``ranked.md`` for all seeds). The corpus, SFT model, sampling, reward and evaluation are
the main pipeline's, with its seeds; stages already done are reused.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch
from transformers import AutoTokenizer

from examples.sentiment import corpus, lm
from examples.sentiment.pipeline import SCALES, Scale, _load, build_sft, evaluate_all, train_runs
from examples.sentiment.reward import sentiment

METHODS = {  # name -> (loss name, data file, data overrides), label and colour
    "dpo-best_worst": ("dpo", "rankings", {"pairs_from": "best_worst"}),
    "dpo-all_pairs": ("dpo", "rankings", {"pairs_from": "all_pairs"}),
    "plackett_luce": ("plackett_luce", "rankings", {}),
    "kto": ("kto", "labelled", {}),
}
COLOURS = {"dpo-best_worst": "tab:red", "dpo-all_pairs": "tab:orange", "plackett_luce": "tab:blue", "kto": "tab:green"}


def rank_group(prompt: str, texts: list[str], finished: list[bool]) -> tuple[dict | None, str]:
    """One prompt's scored completions as a ranking row, or ``(None, reason)`` when it cannot be one.

    Unfinished (no EOS within the token limit) and empty completions are dropped, and
    duplicates kept once, as the pair stage does; a ranking needs two completions whose
    scores are not all tied.
    """
    kept: list[str] = []
    for text, done in zip(texts, finished):
        if done and text.strip() and text not in kept:
            kept.append(text)
    if len(kept) < 2:
        return None, "fewer than two distinct finished completions"
    scores = sentiment([prompt + t for t in kept])
    if len(set(scores)) == 1:
        return None, "all scores tied"
    return {"prompt": prompt, "completions": kept, "scores": scores}, ""


def median_labels(scores: list[float]) -> list[bool | None]:
    """True above the median of ``scores``, False below it, None (dropped) at it."""
    m = statistics.median(scores)
    return [None if s == m else s > m for s in scores]


def labelled_rows(rankings: list[dict], rng: random.Random) -> list[dict]:
    """KTO rows from rankings, ordered so that neighbours come from different prompts.

    prefopt gives each labelled row the previous row's completion as KTO's mismatched
    completion, so rows are written in rounds (the i-th labelled completion of every
    prompt, prompts shuffled), and a round that would start with the previous round's
    last prompt is rotated by one.
    """
    per_prompt = [[{"prompt": r["prompt"], "completion": c, "label": lab}
                   for c, lab in zip(r["completions"], median_labels(r["scores"])) if lab is not None] for r in rankings]
    order: list[dict] = []
    for i in range(max((len(rows) for rows in per_prompt), default=0)):
        round_ = [rows[i] for rows in per_prompt if len(rows) > i]
        rng.shuffle(round_)
        if order and len(round_) > 1 and round_[0]["prompt"] == order[-1]["prompt"]:
            round_ = round_[1:] + round_[:1]
        order.extend(round_)
    return order


def build_ranked_data(scale: Scale, sft_dir: Path, out: Path, seed: int, k: int) -> dict:
    """``k`` SFT samples per prompt, scored: writes rankings.jsonl, labelled.jsonl and data.json (counts)."""
    stats_path = out / "data.json"
    if stats_path.exists():
        return json.loads(stats_path.read_text())
    tokenizer, model = AutoTokenizer.from_pretrained(sft_dir), _load(sft_dir)
    prompts = corpus.prompts(scale.pair_prompts, seed + 1)
    samples = [lm.sample(model, tokenizer, prompts, scale.max_new_tokens, 256, seed + 20 + j) for j in range(k)]
    rankings, dropped = [], {}
    for i, prompt in enumerate(prompts):
        texts = [tokenizer.decode(s[i][1], skip_special_tokens=True) for s in samples]
        row, reason = rank_group(prompt, texts, [s[i][2] for s in samples])
        if row is None:
            dropped[reason] = dropped.get(reason, 0) + 1
        else:
            rankings.append(row)
    labelled = labelled_rows(rankings, random.Random(seed))
    _write_jsonl(out / "rankings.jsonl", rankings)
    _write_jsonl(out / "labelled.jsonl", labelled)
    stats = {"prompts": len(prompts), "k": k, "rankings": len(rankings), "rankings_dropped": dropped,
             **per_example(rankings, labelled)}
    stats_path.write_text(json.dumps(stats, indent=1))
    return stats


def per_example(rankings: list[dict], labelled: list[dict]) -> dict:
    """What one training example holds, per method: completions and ordered pairs (scores differing)."""
    n = max(1, len(rankings))
    pairs = sum(sum(a != b for i, a in enumerate(r["scores"]) for b in r["scores"][i + 1:]) for r in rankings)
    medians = sum(sum(lab is None for lab in median_labels(r["scores"])) for r in rankings)
    return {"completions_per_ranking": sum(len(r["completions"]) for r in rankings) / n,
            "pairs_per_ranking": pairs / n, "all_pairs": pairs, "labelled": len(labelled),
            "desirable": sum(r["label"] for r in labelled), "labelled_dropped_at_median": medians,
            "mismatched_same_prompt": sum(a["prompt"] == b["prompt"] for a, b in zip(labelled, labelled[-1:] + labelled[:-1]))}


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def seen(name: str, steps: int, batch_size: int, stats: dict, run_dir: Path) -> dict:
    """What a run trained on: examples, completions with a gradient, ordered pairs compared, and tokens."""
    examples = steps * batch_size
    k, p = stats["completions_per_ranking"], stats["pairs_per_ranking"]
    completions, pairs = {"plackett_luce": (k, p), "kto": (1, 0)}.get(name, (2, 1))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"examples": examples, "completions": examples * completions, "pairs": examples * pairs,
            "tokens": sum(r.get("num_tokens", 0) for r in rows)}


def run_seed(scale_name: str, out: Path, seed: int, betas: list[float], k: int = 4, log=print) -> dict:
    """Every stage for one seed; writes and returns ``out/results.json``."""
    scale = SCALES[scale_name]
    out.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    torch.manual_seed(seed)
    sft_dir = build_sft(scale, out, seed, log)
    stats = build_ranked_data(scale, sft_dir, out, seed, k)
    log(f"seed {seed}: {stats['rankings']} rankings, {stats['labelled']} labelled completions")
    files = {"rankings": out / "rankings.jsonl", "labelled": out / "labelled.jsonl"}
    plan = {f"{name}-beta{b:g}": ({"name": loss, "beta": b}, files[data], extra, 1.0)
            for b in betas for name, (loss, data, extra) in METHODS.items()}
    runs = train_runs(plan, scale, sft_dir, out / "policies", seed, log)
    path = out / "results.json"
    results = json.loads(path.read_text())["results"] if path.exists() else {}
    todo = {name: info for name, info in runs.items() if name not in results}
    if todo or not results:  # evaluate only the policies an earlier call did not
        results.update(evaluate_all(scale, sft_dir, todo, seed, log))
    results = {name: results[name] for name in ("sft", *runs)}
    for name, info in runs.items():
        results[name].update(method=name.rsplit("-beta", 1)[0], beta=info["loss"]["beta"],
                             seen=seen(name.rsplit("-beta", 1)[0], scale.steps, scale.batch_size, stats, info["dir"]))
    summary = {"scale": scale_name, "seed": seed, "k": k, "betas": betas, "data": stats, "results": results}
    _write(path, json.dumps(summary, indent=1))
    return summary


def plot(summaries: list[dict], path: Path, title: str) -> None:
    """Reward against KL: a colour per method, a marker per seed, each method's beta values joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    for summary, marker in zip(summaries, "osD^v"):
        res, seed = summary["results"], summary["seed"]
        ax.errorbar(res["sft"]["kl"], res["sft"]["reward"], yerr=res["sft"]["reward_se"], color="black", marker="*",
                    ms=12, label=f"SFT, seed {seed}", mfc="black" if marker == "o" else "white")
        for method, colour in COLOURS.items():
            pts = sorted((r["kl"], r["reward"], r["kl_se"], r["reward_se"], r["beta"]) for r in res.values()
                         if r.get("method") == method)
            if pts:
                xs, ys, xe, ye, bs = zip(*pts)
                ax.errorbar(xs, ys, xerr=xe, yerr=ye, color=colour, marker=marker, ms=6, lw=1, capsize=2,
                            ls="-" if marker == "o" else "--", label=f"{method}, seed {seed}")
                for x, y, b in zip(xs, ys, bs):
                    ax.annotate(f"β={b:g}", (x, y), textcoords="offset points", xytext=(5, -3), fontsize=7, color=colour)
    ax.set_xlabel("KL(pi || pi_ref) per completion (nats)")
    ax.set_ylabel("mean VADER reward")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(summaries: list[dict]) -> str:
    """A markdown table, one row per policy and seed, with what each run trained on."""
    rows = ["| method | β | seed | mean reward (± s.e.) | KL nats (± s.e.) | finished | tokens/sample "
            "| examples seen | completions seen | pairs seen | train tokens | train s |", "|" + "---|" * 12]
    order = ["sft", *METHODS]
    flat = [(s["seed"], r) for s in summaries for r in
            [{"method": "sft", "beta": None, **s["results"]["sft"]}, *(r for r in s["results"].values() if "method" in r)]]
    for seed, r in sorted(flat, key=lambda t: (order.index(t[1]["method"]), -(t[1]["beta"] or 0), t[0])):
        sn = r.get("seen")
        cells = ["-"] * 5 if sn is None else [f"{sn['examples']}", f"{sn['completions']:.0f}", f"{sn['pairs']:.0f}",
                                                f"{sn['tokens']}", f"{r['train_seconds']:.0f}"]
        rows.append(f"| {r['method']} | {'-' if r['beta'] is None else format(r['beta'], 'g')} | {seed} "
                    f"| {r['reward']:.3f} ± {r['reward_se']:.3f} | {r['kl']:.2f} ± {r['kl_se']:.2f} "
                    f"| {r['finished']:.2f} | {r['length']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m examples.sentiment.ranked", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="default")
    parser.add_argument("--out", type=Path, help="run directory (default runs/sentiment-ranked-<scale>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1])
    parser.add_argument("--k", type=int, default=4, help="completions sampled per prompt")
    parser.add_argument("--threads", type=int, help="torch CPU threads (use 1 on a machine shared with other jobs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / f"sentiment-ranked-{args.scale}"
    summaries = [run_seed(args.scale, out / f"seed{s}", s, args.betas, args.k) for s in args.seeds]
    scale = SCALES[args.scale]
    plot(summaries, out / "ranked_reward_kl.png",
         f"Synthetic reviews, scale '{args.scale}', {args.k} samples per prompt, {scale.steps} steps of {scale.batch_size}")
    (out / "ranked.md").write_text(table(summaries) + "\n")
    print((out / "ranked.md").read_text())
    print(f"figure: {out / 'ranked_reward_kl.png'}")


if __name__ == "__main__":
    main()
