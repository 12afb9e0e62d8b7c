"""``python -m benchmarks.long_row [--mb 40] [--field prompt]``: the cost of reading one very long row, prefopt beside TRL.

A JSON-lines file of 40 short pairs, then the same file with one pair's chosen text (or with
``--field prompt``, its prompt) grown to ``--mb`` megabytes. Each is read and tokenised
(``max_length`` 64; for a long prompt also ``max_prompt_length`` 32, which keeps its end) in a
fresh process by

- ``prefopt``: ``prefopt.data.pairs.load_examples``, which tokenises a long field only as far as
  the cuts can keep;
- ``prefopt, whole rows``: the same with cutting turned off, i.e. every row tokenised whole;
- ``TRL``: ``DPOTrainer._prepare_dataset`` of TRL, which tokenises whole rows and keeps their ids.

Printed: peak resident memory and seconds per run, and each run's cost of the long row
(long file minus short file) as a ratio to prefopt's.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LENGTH = 64
MAX_PROMPT_LENGTH = {"chosen": None, "prompt": 32}
WORDS = "the a good bad movie film great awful plot acting was is very not".split()


def write_data(path: Path, megabytes: float, base: list[dict], field: str) -> Path:
    rows = [dict(r) for r in base]
    if megabytes:
        rng = random.Random(0)
        words = " ".join(rng.choice(WORDS) for _ in range(int(megabytes * 2**20 / 5)))
        rows[3][field] = words + " " + rows[3][field] if field == "prompt" else rows[3][field] + " " + words
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def measure(kind: str, data: str, field: str) -> None:
    """In this process: read and tokenise ``data`` as ``kind`` does; print peak RSS (bytes) and seconds as JSON."""
    import resource

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ROOT / "examples" / "tiny-llama"))
    start = time.perf_counter()
    if kind == "trl":
        from types import SimpleNamespace

        from datasets import load_dataset
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(output_dir=tempfile.mkdtemp(), max_length=MAX_LENGTH, report_to=[], bf16=False, use_cpu=True)
        ds = load_dataset("json", data_files=data, split="train")
        n = len(DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), ds, tok, args, "train"))
    else:
        import prefopt.data.pairs as pairs
        from prefopt.data.window import Window

        if kind == "whole":
            pairs.window_for = lambda *a: Window(10**18, 0, 0, False)
        n = len(pairs.load_examples(data, tok, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH[field])[0])
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": n, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": seconds}))


def _run(kind: str, data: Path, field: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.long_row", "--measure", kind, str(data), field], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.long_row", description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=40, help="megabytes of the long row's chosen text")
    p.add_argument("--field", choices=["chosen", "prompt"], default="chosen", help="which field of one row is long")
    p.add_argument("--measure", nargs=3, metavar=("KIND", "DATA", "FIELD"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.measure:
        return measure(*a.measure)
    base = [json.loads(line) for line in (ROOT / "examples" / "data" / "quickstart.jsonl").read_text().splitlines()[:40]]
    names = {"prefopt": "prefopt", "whole": "prefopt, whole rows", "trl": "TRL 1.16"}
    with tempfile.TemporaryDirectory() as tmp:
        short = write_data(Path(tmp) / "short.jsonl", 0, base, a.field)
        long = write_data(Path(tmp) / "long.jsonl", a.mb, base, a.field)
        results = {k: (_run(k, short, a.field), _run(k, long, a.field)) for k in names}
    cost = {k: (lg["peak"] - sh["peak"], lg["seconds"] - sh["seconds"]) for k, (sh, lg) in results.items()}
    cuts = f"max_length {MAX_LENGTH}" + (f", max_prompt_length {MAX_PROMPT_LENGTH[a.field]}" if MAX_PROMPT_LENGTH[a.field] else "")
    print(f"one row's {a.field} of {a.mb:g} MB, {cuts}; cost = long file minus short file")
    print("| reader | peak MB short | peak MB long | cost MB | cost s | cost / prefopt's (memory, time) |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, (sh, lg) in results.items():
        m, s = cost[k]
        print(f"| {names[k]} | {sh['peak'] / 2**20:.0f} | {lg['peak'] / 2**20:.0f} | {m / 2**20:.0f} | {s:.1f} | "
              f"{m / max(cost['prefopt'][0], 1):.1f}x, {s / max(cost['prefopt'][1], 1e-3):.1f}x |")


if __name__ == "__main__":
    main()
