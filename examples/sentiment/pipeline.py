"""The whole experiment, one command: corpus -> SFT -> pairs -> prefopt training -> evaluation -> figure.

    python3 -m examples.sentiment                      # default scale, CPU, about 20 minutes on 2 cores
    python3 -m examples.sentiment --scale large        # a GPU-sized run
    python3 -m examples.sentiment --scale tiny         # seconds; what the test suite runs

Everything goes to ``runs/sentiment-<scale>/`` (override with ``--out``). A stage whose
output is already there is reused; delete the directory to start over.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from examples.sentiment import corpus, lm, report
from examples.sentiment.evaluate import evaluate_policy, per_token_rewards
from examples.sentiment.reward import sentiment
from examples.sentiment.train import methods, run_config, train_policy


@dataclass
class Scale:
    reviews: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    sft_epochs: int
    sft_batch_size: int
    sft_lr: float
    pair_prompts: int
    eval_prompts: int
    max_new_tokens: int
    steps: int
    batch_size: int
    lr: float
    dpo_betas: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.3, 1.0, 3.0])
    ipo_taus: list[float] = field(default_factory=lambda: [0.25, 1.0, 4.0, 16.0])
    tdpo_betas: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0])
    pft_lr_mults: list[float] = field(default_factory=lambda: [1.0, 4.0])


SCALES = {
    "tiny": Scale(reviews=1000, vocab_size=800, hidden_size=32, num_layers=1, num_heads=2, sft_epochs=2, sft_batch_size=32,
                  sft_lr=3e-3, pair_prompts=48, eval_prompts=24, max_new_tokens=48, steps=3, batch_size=8, lr=1e-3,
                  dpo_betas=[0.1], ipo_taus=[1.0], tdpo_betas=[0.1], pft_lr_mults=[1.0]),
    "default": Scale(reviews=10000, vocab_size=800, hidden_size=64, num_layers=2, num_heads=4, sft_epochs=2,
                     sft_batch_size=64, sft_lr=2e-3, pair_prompts=4000, eval_prompts=1000, max_new_tokens=64, steps=200,
                     batch_size=32, lr=3e-4),
    "large": Scale(reviews=100000, vocab_size=1024, hidden_size=256, num_layers=6, num_heads=8, sft_epochs=2,
                   sft_batch_size=128, sft_lr=1e-3, pair_prompts=20000, eval_prompts=2000, max_new_tokens=64, steps=600,
                   batch_size=64, lr=1e-4, dpo_betas=[0.03, 0.05, 0.1, 0.2, 0.5, 1.0], ipo_taus=[0.1, 0.25, 0.5, 1.0, 4.0],
                   tdpo_betas=[0.05, 0.1, 0.3, 1.0, 3.0], pft_lr_mults=[1.0, 3.0, 10.0]),
}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(_device()).eval()


def build_sft(scale: Scale, out: Path, seed: int, log=print) -> Path:
    """Steps 1-2: the corpus, a tokenizer trained on it, and the SFT model (the reference policy)."""
    sft_dir = out / "sft"
    if (sft_dir / "config.json").exists():
        return sft_dir
    texts = corpus.reviews(scale.reviews, seed)
    (out / "corpus-sample.txt").write_text("\n".join(texts[:50]) + "\n")
    tokenizer = lm.build_tokenizer(texts, scale.vocab_size)
    model = lm.build_model(tokenizer, scale.hidden_size, scale.num_layers, scale.num_heads, seed).to(_device())
    lm.train_sft(model, tokenizer, texts, scale.sft_epochs, scale.sft_batch_size, scale.sft_lr, seed, log)
    model.save_pretrained(sft_dir)
    tokenizer.save_pretrained(sft_dir)
    return sft_dir


def build_pairs(scale: Scale, sft_dir: Path, out: Path, seed: int) -> Path:
    """Step 3: two SFT samples per prompt, the one VADER scores higher is chosen."""
    path = out / "pairs.jsonl"
    if path.exists():
        return path
    tokenizer, model = AutoTokenizer.from_pretrained(sft_dir), _load(sft_dir)
    prompts = corpus.prompts(scale.pair_prompts, seed + 1)
    a = lm.sample(model, tokenizer, prompts, scale.max_new_tokens, 256, seed + 10)
    b = lm.sample(model, tokenizer, prompts, scale.max_new_tokens, 256, seed + 11)
    rows = []
    for prompt, (_, ca, fa), (_, cb, fb) in zip(prompts, a, b):
        ta, tb = (tokenizer.decode(c, skip_special_tokens=True) for c in (ca, cb))
        if not (fa and fb and ta.strip() and tb.strip()) or ta == tb:
            continue  # an unfinished completion would be trained with an EOS it never produced
        sa, sb = sentiment([prompt + ta, prompt + tb])
        if sa == sb:
            continue
        chosen, rejected = (ta, tb) if sa > sb else (tb, ta)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": abs(sa - sb)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_all(scale: Scale, sft_dir: Path, pairs: Path, out: Path, seed: int, log=print) -> dict[str, dict]:
    """Step 4: every method through prefopt; returns name -> {dir, train_seconds, loss}."""
    plan = {name: (loss, pairs, {}, lr_mult) for name, (loss, lr_mult) in
            methods(scale.dpo_betas, scale.ipo_taus, scale.tdpo_betas, scale.pft_lr_mults).items()}
    return train_runs(plan, scale, sft_dir, out / "policies", seed, log)


def train_runs(plan: dict[str, tuple[dict, Path, dict, float]], scale: Scale, sft_dir: Path, root: Path, seed: int,
               log=print) -> dict[str, dict]:
    """Train each ``name -> (loss, data file, data overrides, lr multiplier)`` into ``root/name`` (reused if done)."""
    runs = {}
    for name, (loss, data, data_extra, lr_mult) in plan.items():
        run_dir = root / name
        if not (run_dir / "summary.json").exists():
            raw = run_config(loss, sft_dir, data, run_dir, steps=scale.steps, batch_size=scale.batch_size,
                             lr=scale.lr * lr_mult, seed=seed, max_length=scale.max_new_tokens + 32)
            raw["data"].update(data_extra)
            log(f"training {name}: {loss} {data_extra}")
            train_policy(raw)
        summary = json.loads((run_dir / "summary.json").read_text())
        runs[name] = {"dir": run_dir, "train_seconds": summary["seconds"], "loss": loss}
    return runs


def evaluate_all(scale: Scale, sft_dir: Path, runs: dict[str, dict], seed: int, log=print) -> dict[str, dict]:
    """Step 5: the SFT model and every trained policy on the same held-out prompts; name -> metrics."""
    tokenizer, reference = AutoTokenizer.from_pretrained(sft_dir), _load(sft_dir)
    prompts = corpus.prompts(scale.eval_prompts, seed + 2)

    def evaluate(model) -> dict[str, float]:
        return evaluate_policy(model, reference, tokenizer, prompts, scale.max_new_tokens, 256, seed + 3)

    results = {"sft": evaluate(reference)}
    for name, info in runs.items():
        results[name] = {**evaluate(_load(info["dir"])), "train_seconds": info["train_seconds"]}
        log(f"{name}: reward {results[name]['reward']:.3f} kl {results[name]['kl']:.2f}")
    return results


def run(scale_name: str, out: Path, seed: int = 0, log=print) -> dict:
    """Run (or resume) every stage; writes results.json, reward_kl.png, token_rewards.html and results.md in ``out``."""
    scale = SCALES[scale_name]
    out.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    torch.manual_seed(seed)
    t0 = time.time()
    times = {}
    sft_dir = build_sft(scale, out, seed, log)
    times["sft"] = time.time() - t0
    pairs = build_pairs(scale, sft_dir, out, seed)
    times["pairs"] = time.time() - t0 - sum(times.values())
    runs = train_all(scale, sft_dir, pairs, out, seed, log)
    times["train"] = time.time() - t0 - sum(times.values())

    results = evaluate_all(scale, sft_dir, runs, seed, log)
    times["eval"] = time.time() - t0 - sum(times.values())

    tokenizer, reference = AutoTokenizer.from_pretrained(sft_dir), _load(sft_dir)
    prompts = corpus.prompts(scale.eval_prompts, seed + 2)

    dpo_name = min((n for n in runs if n.startswith("dpo-")), key=lambda n: abs(runs[n]["loss"]["beta"] - 0.1))
    examples = token_examples(_load(runs[dpo_name]["dir"]), reference, tokenizer, prompts, scale, seed,
                              runs[dpo_name]["loss"]["beta"], dpo_name)
    n_pairs = sum(1 for _ in pairs.open())
    times["total"] = time.time() - t0
    summary = {"scale": scale_name, "seed": seed, "config": asdict(scale), "pairs": n_pairs, "device": _device(),
               "torch_threads": torch.get_num_threads(), "seconds": times, "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    title = f"Synthetic reviews, scale '{scale_name}', {n_pairs} pairs, {scale.steps} steps"
    report.plot(results, out / "reward_kl.png", title)
    report.token_page(examples, runs[dpo_name]["loss"]["beta"], out / "token_rewards.html",
                      f"Per-token implicit reward of the {dpo_name} policy")
    (out / "results.md").write_text(
        f"Scale `{scale_name}`, seed {seed}, {n_pairs} pairs, device {_device()} ({torch.get_num_threads()} threads).\n"
        f"Wall time: {times['total']:.0f} s (SFT {times['sft']:.0f}, pairs {times['pairs']:.0f}, "
        f"training {times['train']:.0f}, evaluation {times['eval']:.0f}).\n\n{report.table(results)}\n")
    return summary


def token_examples(policy, reference, tokenizer, prompts: list[str], scale: Scale, seed: int, beta: float, name: str) -> list[dict]:
    """Four completions sampled from the DPO policy and four negative ones from the SFT model, with per-token rewards."""
    picked = []
    for model, label, keep in ((policy, f"sampled from {name}", lambda s: True), (reference, "sampled from SFT", lambda s: s < 0)):
        samples = lm.sample(model, tokenizer, prompts[:64], scale.max_new_tokens, 64, seed + 4)
        n = 0
        for prompt, (_, c, done) in zip(prompts, samples):
            score = sentiment([prompt + tokenizer.decode(c, skip_special_tokens=True)])[0]
            if done and keep(score) and n < 4:
                picked.append({"prompt": prompt, "label": label, "vader": score,
                               "tokens": per_token_rewards(policy, reference, tokenizer, prompt, c, beta)})
                n += 1
    return picked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m examples.sentiment", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="default")
    parser.add_argument("--out", type=Path, help="run directory (default runs/sentiment-<scale>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (use 1 on a machine shared with other jobs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / f"sentiment-{args.scale}"
    run(args.scale, out, args.seed)
    print((out / "results.md").read_text())
    print(f"figure: {out / 'reward_kl.png'}\nper-token rewards: {out / 'token_rewards.html'}")
