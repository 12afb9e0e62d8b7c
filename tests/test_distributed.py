"""Two CPU processes (DDP over gloo, started by torchrun) train exactly like one process with the same global batch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_helpers import cpu_env, launch, torchrun, torchrun_script, train_one_process
from engine_helpers import assert_rows_close, assert_weights_close, eval_rows, final_weights, make_config, read_metrics, write_assets
from prefopt.config import validate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo"),
]


def _cache(out: Path) -> dict[str, torch.Tensor]:
    return {p.name: load_file(str(p))["ref_logps"] for p in sorted((out / "cache").glob("*.safetensors"))}


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    assets = write_assets(tmp_path / "assets", n_train=64, n_eval=16)
    # warm-up then cosine decay, two micro-batches per step, reference log-probs from the cache
    common = dict(max_steps=6, warmup_steps=2, schedule="cosine", grad_accum=2, group_by_length=False,
                  data__eval=assets["eval"], reference__mode="cache")
    single = make_config(assets, tmp_path / "single", batch_size=4, **common)
    ddp = make_config(assets, tmp_path / "ddp", batch_size=2, **common)  # 2 per process x 2 processes
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(ddp))

    proc = launch(torchrun(2, "train", str(config)), cpu_env())
    stdout, stderr = proc.stdout, proc.stderr
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]

    train_one_process(single)

    one, two = read_metrics(single["trainer"]["output_dir"]), read_metrics(ddp["trainer"]["output_dir"])
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]  # one writer: the processes trained together, not side by side
    # the schedule advances once per optimiser step, not once per process: warm-up over at step 2, then cosine to 0 at step 6
    lrs = [r["lr"] for r in two]
    assert lrs == pytest.approx([r["lr"] for r in one], rel=1e-12)
    assert lrs[:2] == pytest.approx([1.5e-3, 3e-3]) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], abs=1e-5)
    assert_rows_close(one, two, ("loss", "rewards/margins", "rewards/chosen", "grad_norm"))
    assert [b["num_tokens"] for b in two] == [a["num_tokens"] for a in one]  # counted over both processes
    assert [r["step"] for r in eval_rows(ddp["trainer"]["output_dir"])] == [0, 6]
    assert eval_rows(ddp["trainer"]["output_dir"])[1]["eval/loss"] == pytest.approx(eval_rows(single["trainer"]["output_dir"])[1]["eval/loss"], abs=1e-5)
    assert_weights_close(final_weights(single["trainer"]["output_dir"]), final_weights(ddp["trainer"]["output_dir"]))

    # the reference cache was computed once, split over the processes: one file per split,
    # under the same fingerprint as the single-process run's, holding the same values
    cache_one, cache_two = _cache(tmp_path / "single"), _cache(tmp_path / "ddp")
    assert len(cache_two) == 2 and cache_two.keys() == cache_one.keys()
    for name in cache_one:
        assert not torch.isnan(cache_two[name]).any()
        torch.testing.assert_close(cache_two[name], cache_one[name], atol=1e-5, rtol=1e-5)
    assert stderr.count("reference cache (train): wrote") == 1
    # the before/after table and the "saved" line come from the main process only
    assert stdout.count("held-out pairs") == 1 and stdout.count("saved to") == 1, stdout


SCRIPT = """
import os, sys, torch
from prefopt.config import load_config
from prefopt.training.run import setup
run = setup(load_config(sys.argv[1] + f"/cfg-{os.environ['RANK']}.yaml", []))
torch.save(run.caches["train"].sums, sys.argv[1] + f"/values-{os.environ['RANK']}.pt")
run.accelerator.end_training()
"""


def test_processes_that_disagree_about_the_cache_all_compute_it(tmp_path):
    # machines with their own cache directories: the first has the file, the second not. Reusing it
    # on one and computing it (a collective) on the other would hang; all of them must compute it.
    assets = write_assets(tmp_path / "assets", n_train=16, n_eval=4)
    for rank in (0, 1):
        raw = make_config(assets, tmp_path / f"node{rank}", batch_size=2, reference__mode="cache")
        (tmp_path / f"cfg-{rank}.yaml").write_text(yaml.safe_dump(raw))
    from prefopt.training.trainer import precompute_reference

    precompute_reference(validate(yaml.safe_load((tmp_path / "cfg-0.yaml").read_text())))
    (seeded,) = _cache(tmp_path / "node0").values()
    cmd = torchrun_script(2, tmp_path / "run.py", SCRIPT, str(tmp_path))
    proc = launch(cmd, cpu_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reference log-probs: 100%" in proc.stderr  # the first process, which had the file, computed too
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(tmp_path / f"values-{rank}.pt"), seeded, atol=1e-5, rtol=1e-5)


EVAL_SCRIPT = """
import json, os, sys
from prefopt.training import distributed
from prefopt.config import load_config
from prefopt.training.run import setup
from prefopt.training.step import evaluate
run = setup(load_config(sys.argv[1] + "/cfg.yaml", []))
model, _, _ = distributed.prepare(run, lambda params: __import__("torch").optim.AdamW(params))
metrics = evaluate(run, model)
open(sys.argv[1] + f"/eval-{os.environ['RANK']}.json", "w").write(json.dumps(metrics))
model = None
run.accelerator.free_memory()
run.accelerator.end_training()
"""


def test_held_out_pairs_fewer_than_processes_are_evaluated_like_one_process(tmp_path):
    """One held-out pair, two processes: the second has no share and must still take part in the reduction."""
    import json

    from prefopt.config import load_config
    from prefopt.training.run import setup
    from prefopt.training.step import evaluate

    assets = write_assets(tmp_path / "assets", n_train=16, n_eval=1)
    raw = make_config(assets, tmp_path / "out", batch_size=2, data__eval=assets["eval"], reference__mode="cache")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    cmd = torchrun_script(2, tmp_path / "run.py", EVAL_SCRIPT, str(tmp_path))
    proc = launch(cmd, cpu_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = [json.loads((tmp_path / f"eval-{r}.json").read_text()) for r in (0, 1)]
    assert two[0] == two[1] and "eval/loss" in two[0]

    run = setup(load_config(tmp_path / "cfg.yaml", []))
    try:
        one = evaluate(run, run.model)
    finally:
        run.accelerator.end_training()
    assert two[0].keys() == one.keys()
    for key in one:
        assert two[0][key] == pytest.approx(one[key], abs=1e-5), key


ON_MAIN_SCRIPT = """
import json, sys, torch
from prefopt.training.distributed import on_main_process
from prefopt.errors import ConfigError
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
acc = type("Acc", (), {"num_processes": 2, "is_main_process": rank == 0})()
out = {"value": on_main_process(acc, lambda: f"from {rank}")}

def refused():
    raise ConfigError("model: refused")

class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("cannot pickle")

def strange():
    raise Unpicklable("strange")

for key, fn in (("config", refused), ("other", strange)):
    try:
        on_main_process(acc, fn)
    except Exception as exc:
        out[key] = f"{type(exc).__name__}: {exc}"
open(sys.argv[1] + f"/{rank}.json", "w").write(json.dumps(out))
torch.distributed.destroy_process_group()
"""


def test_work_done_on_the_first_process_reaches_every_process_errors_included(tmp_path):
    """FSDP reads weights and runs the start-up check on the first process only: its result, or its error
    (even one that does not pickle), must reach the others, which would otherwise wait in a collective."""
    import json

    proc = launch(torchrun_script(2, tmp_path / "run.py", ON_MAIN_SCRIPT, str(tmp_path)), cpu_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first, second = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert first["value"] == second["value"] == "from 0"
    assert first["config"] == second["config"] == "ConfigError: model: refused"
    assert first["other"] == "Unpicklable: strange"
    assert second["other"] == "RuntimeError: on the first process: Unpicklable: strange"
