"""Shared helpers for the engine tests: an easy preference data set, a tiny tokenizer, run configs."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird", "star"]


def easy_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Short pairs where the chosen completion always says "good" and the rejected one "bad"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.sample(WORDS, 2)
        tail = " ".join(rng.sample(WORDS, rng.randint(1, 3)))  # varying lengths, so batches need padding
        rows.append({"prompt": f"{a} and {b}?", "chosen": f" good {tail}", "rejected": f" bad {tail}"})
    return rows


PLAIN_WORDS = "the cat dog sat ran on a mat log good bad happy sad big small red blue green".split()


def word_rows(seed: int, n: int, prompt: tuple[int, int] = (3, 8), completion: tuple[int, int] = (2, 6)) -> list[dict[str, str]]:
    """Rows of random words: prompts of ``prompt`` words, completions of ``completion`` words (inclusive ranges)."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(PLAIN_WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": text(*prompt), "chosen": text(*completion), "rejected": text(*completion)} for _ in range(n)]


def set_dotted(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with each ``"section.field": value`` of ``overrides`` set (nested sections created); returns ``raw``."""
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


def word_tokenizer(root: Path) -> Path:
    """A tokenizer trained on :func:`word_rows` ``(0, 16)``, saved in ``root / "tok"``."""
    from prefopt.testing.tiny import build_tokenizer

    texts = [r[k] for r in word_rows(0, 16) for k in ("prompt", "chosen", "rejected")]
    build_tokenizer(texts, 300).save_pretrained(root / "tok")
    return root / "tok"


def small_run(tok: Path, tmp: Path, **overrides: Any) -> dict[str, Any]:
    """A raw config of a one-layer model on 16 word rows (written once into ``tmp``), 2 steps of 4 pairs;
    ``overrides`` as ``"section.field": value``."""
    from prefopt.testing.tiny import model_config

    tmp.mkdir(parents=True, exist_ok=True)
    train = tmp / "train.jsonl"
    if not train.exists():
        write_jsonl(train, word_rows(0, 16, prompt=(3, 6), completion=(2, 4)))
    raw = {
        "model": {"config": model_config("llama", 300, 32, 1, 2, max_position=64), "tokenizer": str(tok)},
        "data": {"train": str(train), "max_length": 48},
        "reference": {"cache_dir": str(tmp / "cache")},
        "trainer": {"output_dir": str(tmp / "run"), "batch_size": 4, "max_steps": 2, "lr": 1e-3, "schedule": "constant"},
    }
    return set_dotted(raw, overrides)


def train_raw(raw: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Validate and train a run-config mapping in this process; returns the summary."""
    from prefopt.config import validate
    from prefopt.training.trainer import train

    return train(validate(raw), **kwargs)


def write_plugin_dist(site: Path, dist: str, modules: dict[str, str], entries: dict[str, str] | None = None) -> None:
    """An installed distribution ``dist`` in ``site``: ``modules`` (name -> source) and a dist-info declaring
    ``entries`` (entry-point name -> module; by default each module under its own name) as ``prefopt`` plugins."""
    site.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    declared = entries if entries is not None else {m: m for m in modules}
    (info / "entry_points.txt").write_text("[prefopt]\n" + "".join(f"{e} = {m}\n" for e, m in declared.items()))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_assets(root: Path, n_train: int = 160, n_eval: int = 32) -> dict[str, str]:
    """Train/eval JSONL files and a locally built tokenizer under ``root``; returns their paths."""
    from prefopt.testing.tiny import build_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    train, held = easy_rows(n_train, seed=1), easy_rows(n_eval, seed=2)
    texts = [r[k] for r in train + held for k in ("prompt", "chosen", "rejected")]
    tokenizer = build_tokenizer(texts * 4, vocab_size=128)
    tokenizer.save_pretrained(root / "tokenizer")
    return {
        "train": str(write_jsonl(root / "train.jsonl", train)),
        "eval": str(write_jsonl(root / "eval.jsonl", held)),
        "tokenizer": str(root / "tokenizer"),
        "vocab_size": len(tokenizer),
    }


def make_config(assets: dict[str, Any], out: Path, *, arch: str = "llama", loss: Any = None, **trainer: Any) -> dict[str, Any]:
    """A raw run-config mapping for a tiny model (hidden 32, 2 layers) on the assets' data.

    ``trainer`` keys override the trainer section; ``reference``/``data``/``model`` keys
    given as ``section__field`` override those sections.
    """
    from prefopt.testing.tiny import model_config

    sections: dict[str, dict[str, Any]] = {"reference": {}, "data": {}, "model": {}}
    for key in [k for k in trainer if "__" in k]:
        section, name = key.split("__", 1)
        sections[section][name] = trainer.pop(key)
    return {
        "model": {
            "config": model_config(arch, vocab_size=assets["vocab_size"], hidden_size=32, num_layers=2, num_heads=4, max_position=64),
            "tokenizer": assets["tokenizer"],
            **sections["model"],
        },
        "data": {"train": assets["train"], "max_length": 48, **sections["data"]},
        "loss": loss if loss is not None else {"name": "dpo", "beta": 0.1},
        "reference": {"cache_dir": str(out / "cache"), **sections["reference"]},
        "trainer": {
            "output_dir": str(out / "run"),
            "seed": 0,
            "batch_size": 8,
            "lr": 3e-3,
            "max_steps": 8,
            "schedule": "constant",
            "max_grad_norm": 1.0,
            **trainer,
        },
    }


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """Training rows of metrics.jsonl (those with a train ``loss``), in order."""
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def eval_rows(output_dir: str | Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" not in r and any(k.startswith("eval/") for k in r)]


def final_weights(output_dir: str | Path) -> dict[str, torch.Tensor]:
    """The saved final model's tensors (model.safetensors in the output directory)."""
    from safetensors.torch import load_file

    return load_file(str(Path(output_dir) / "model.safetensors"))


def assert_rows_close(expected: list[dict[str, Any]], actual: list[dict[str, Any]], keys: tuple[str, ...],
                      abs: float = 1e-5, rel: float = 1e-4) -> None:
    """Two runs' metric rows agree row by row on ``keys``: ``actual[key] == approx(expected[key])``."""
    for e, a in zip(expected, actual, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(e[key], abs=abs, rel=rel), (e.get("step"), key)


def assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5, rtol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
