"""Step 6: the reward-KL figure, the results table and the per-token reward page."""
from __future__ import annotations

import html
from pathlib import Path

FAMILIES = {  # run-name prefix -> (label, colour, marker)
    "sft": ("SFT (reference)", "black", "*"),
    "preferred-ft": ("Preferred-FT", "tab:gray", "s"),
    "dpo": ("DPO", "tab:red", "o"),
    "ipo": ("IPO", "tab:blue", "^"),
    "tdpo2": ("TDPO2", "tab:green", "D"),
}


def family(name: str) -> str:
    return "preferred-ft" if name.startswith("preferred-ft") else name.split("-")[0]


def plot(results: dict[str, dict[str, float]], path: Path, title: str, zoom_kl: float = 1.5) -> None:
    """Reward against KL, one colour per method (runs of a method joined in order of KL); the right panel zooms on low KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120)
    for ax, zoom in zip(axes, (False, True)):
        for fam, (label, colour, marker) in FAMILIES.items():
            pts = sorted((r["kl"], r["reward"], r["kl_se"], r["reward_se"], n) for n, r in results.items()
                         if family(n) == fam and (not zoom or r["kl"] <= zoom_kl))
            if not pts:
                continue
            xs, ys, xe, ye, names = zip(*pts)
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, color=colour, marker=marker, ms=12 if marker == "*" else 6,
                        ls="-" if len(pts) > 1 else "none", lw=1, capsize=2, label=label)
            for x, y, n in zip(xs, ys, names):
                if fam != "sft" and (zoom or x > zoom_kl):
                    ax.annotate(n.rsplit("-", 1)[1], (x, y), textcoords="offset points", xytext=(5, -3), fontsize=7, color=colour)
        ax.set_xlabel("KL(pi || pi_ref) per completion (nats)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean VADER reward")
    axes[0].set_title(title, fontsize=10)
    axes[1].set_title(f"zoom: KL <= {zoom_kl:g}", fontsize=10)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(results: dict[str, dict[str, float]]) -> str:
    """A markdown table of every policy, sorted by method then KL."""
    rows = ["| policy | mean reward (± s.e.) | KL(pi‖pi_ref) nats (± s.e.) | finished | tokens | train s |",
            "|---|---|---|---|---|---|"]
    order = list(FAMILIES)
    for name, r in sorted(results.items(), key=lambda kv: (order.index(family(kv[0])), kv[1]["kl"])):
        secs = f"{r['train_seconds']:.0f}" if "train_seconds" in r else "-"
        rows.append(f"| {name} | {r['reward']:.3f} ± {r['reward_se']:.3f} | {r['kl']:.2f} ± {r['kl_se']:.2f} "
                    f"| {r['finished']:.2f} | {r['length']:.1f} | {secs} |")
    return "\n".join(rows)


def _colour(v: float, scale: float) -> str:
    a = min(1.0, abs(v) / scale) if scale > 0 else 0.0
    return f"rgba(0,160,0,{a:.2f})" if v >= 0 else f"rgba(220,0,0,{a:.2f})"


def token_page(examples: list[dict], beta: float, path: Path, title: str) -> None:
    """HTML page: each completion's tokens shaded by implicit reward (green credit, red blame); hover for values."""
    scale = max((abs(v) for e in examples for _, v in e["tokens"]), default=1.0)
    out = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
           ".ex{font-family:monospace;margin:1em 0;line-height:1.9}.p{color:#777}"
           "span.t{padding:2px 0;border-radius:3px}</style>",
           f"<h2>{html.escape(title)}</h2>",
           f"<p>Implicit reward per token, beta &times; (log &pi;<sub>&theta;</sub> &minus; log &pi;<sub>ref</sub>) with beta = {beta:g}. "
           f"Green tokens were made more likely by training (credit), red less likely. Darkest = {scale:.3f}. "
           "Grey text is the prompt. Hover a token for its value.</p>"]
    for e in examples:
        spans = "".join(f"<span class=t style='background:{_colour(v, scale)}' title='{v:+.3f}'>{html.escape(t)}</span>"
                        for t, v in e["tokens"])
        total = sum(v for _, v in e["tokens"])
        out.append(f"<div class=ex><span class=p>{html.escape(e['prompt'])}</span>{spans}<br>"
                   f"<small>{html.escape(e['label'])}; VADER {e['vader']:+.2f}; summed implicit reward {total:+.2f}</small></div>")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
