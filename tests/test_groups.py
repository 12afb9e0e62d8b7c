"""Groups on the engine: a prompt with K completions (rankings, labelled completions with KTO's mismatched
completion) laid out each prompt once, summed per completion, cached per completion, and trained."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from prefopt.data.examples import Group
from prefopt.data.groups import grid_sums, pack_groups
from prefopt.engine.modeling import PreferenceModel, load_model
from prefopt.training.health import model_token_logps
from prefopt.training.run import use_packed_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


def _groups(seed: int, n: int, labelled: bool = False) -> list[Group]:
    """Groups of ragged K (1 to 4) with scores, or one labelled completion each with a mismatched one; some
    prompts empty or one token long, some completions one token long."""
    rng = random.Random(seed)
    ids = lambda lo, hi: [rng.randrange(3, 200) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    out = []
    for i in range(n):
        prompt = [] if i == 1 else ids(1, 9)
        if labelled:
            out.append(Group(prompt, [ids(1, 7)], labels=[bool(i % 2)], row=i, mismatched_ids=ids(1, 7)))
        else:
            k = 1 + i % 4
            out.append(Group(prompt, [ids(1, 7) for _ in range(k)], scores=sorted((rng.random() for _ in range(k)), reverse=True), row=i))
    return out


@pytest.mark.parametrize("layout", ["shared", "packed", "padded"])
@pytest.mark.parametrize("labelled", [False, True], ids=["rankings", "labelled"])
def test_each_completion_of_a_group_sums_the_models_own_logps(layout, labelled):
    """Per-completion summed log-probs of a batch of groups, in every layout, equal the model's own forward of
    each [prompt | completion] alone (fp32 rounding), slot by slot; the mismatched completion lands in the last column."""
    from prefopt.config import ModelConfig
    from prefopt.testing.tiny import model_config

    torch.manual_seed(0)
    model = load_model(ModelConfig(config=model_config("llama", vocab_size=200, hidden_size=32, num_layers=2, num_heads=4,
                                                       max_position=64), tokenizer="unused")).eval()
    if layout != "padded":
        use_packed_attention(model)
    groups = _groups(1, 7, labelled)
    batch = pack_groups(groups, list(range(len(groups))), 0, packing=layout != "padded", shared=layout == "shared", mismatched=True)
    with torch.no_grad():
        grid = grid_sums(PreferenceModel(model)(batch)["logps"], batch)
    alone = model_token_logps(model, groups, mismatched=True)
    seq, cu = 0, batch["cu_completion"]
    expected = torch.zeros(grid.shape)
    for k in range(max(len(g.completions) + labelled for g in groups)):  # completion-major, as the engine orders them
        for b, g in enumerate(groups):
            slots = len(g.completions) + labelled
            if k < slots:
                column = grid.shape[1] - 1 if labelled and k == slots - 1 else k
                expected[b, column] = alone[cu[seq] : cu[seq + 1]].sum()
                seq += 1
    assert seq == len(cu) - 1 and alone.shape[0] == cu[-1]
    torch.testing.assert_close(grid, expected, atol=2e-5, rtol=1e-6)  # fp32: the engine computes in fp32
    mask = batch["completion_mask"]
    assert mask.tolist() == [[k < len(g.completions) for k in range(mask.shape[1])] for g in groups]
    assert (grid[:, : mask.shape[1]][~mask] == 0).all()


# ---------------------------------------------------------------- runs (the losses are first-party plugins)


@pytest.fixture(scope="module")
def ranked_assets(tmp_path_factory):
    """The same prompts as pairs and as rankings of two; and as rankings of three."""
    from engine_helpers import word_rows, write_jsonl
    from prefopt.testing.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("ranked")
    distinct = lambda rs: [r | {"chosen": "good " + r["chosen"], "rejected": "bad " + r["rejected"]} for r in rs]  # noqa: E731
    rows, held = distinct(word_rows(3, 40, completion=(1, 6))), distinct(word_rows(4, 8, completion=(1, 6)))
    extra = [r | {"chosen": "so so " + r["chosen"]} for r in word_rows(5, 48, prompt=(1, 1), completion=(1, 6))]
    tokenizer = build_tokenizer([r[k] for r in rows + held + extra for k in ("prompt", "chosen", "rejected")] * 4, vocab_size=128)
    tokenizer.save_pretrained(root / "tokenizer")
    two = lambda rs: [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]], "scores": [1.0, 0.0]} for r in rs]  # noqa: E731
    three = lambda rs, xs: [{"prompt": r["prompt"], "completions": [r["rejected"], x["chosen"], r["chosen"]], "scores": [0.5, 0.0, 2.0]}  # noqa: E731
                            for r, x in zip(rs, xs)]
    return {"tokenizer": str(root / "tokenizer"), "vocab_size": len(tokenizer),
            "pairs": str(write_jsonl(root / "pairs.jsonl", rows)), "pairs_eval": str(write_jsonl(root / "pairs_eval.jsonl", held)),
            "two": str(write_jsonl(root / "two.jsonl", two(rows))), "two_eval": str(write_jsonl(root / "two_eval.jsonl", two(held))),
            "three": str(write_jsonl(root / "three.jsonl", three(rows, extra))),
            "three_eval": str(write_jsonl(root / "three_eval.jsonl", three(held, extra[40:])))}


@pytest.fixture(scope="module")
def labelled_assets(ranked_assets, tmp_path_factory):
    """TRL's unpaired format from the ranked fixture's pairs: each pair's completions as two labelled rows, shuffled."""
    root = tmp_path_factory.mktemp("labelled")

    def unpaired(path: str, seed: int) -> list[dict]:
        pairs = [json.loads(line) for line in Path(path).read_text().splitlines()]
        rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"} for r in pairs for side in ("chosen", "rejected")]
        random.Random(seed).shuffle(rows)
        return rows

    from engine_helpers import write_jsonl

    return {**ranked_assets, "labelled": str(write_jsonl(root / "train.jsonl", unpaired(ranked_assets["pairs"], 0))),
            "labelled_eval": str(write_jsonl(root / "eval.jsonl", unpaired(ranked_assets["pairs_eval"], 1)))}


def _config(assets, out: Path, train: str, loss: dict, **settings) -> dict:
    from engine_helpers import make_config

    settings = {"max_steps": 4, "log_every": 1, **settings}
    return make_config({**assets, "train": assets[train]}, out, loss=loss, data__eval=assets[f"{train}_eval"], **settings)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["plain", "budget-unshared", "live"])
def test_plackett_luce_on_rankings_of_two_trains_like_dpo_on_pairs(setting, group_plugins, ranked_assets, tmp_path):
    """Plackett-Luce on K = 2 rankings is DPO: 4 steps give the same losses, rewards, gradient norms, held-out
    metrics and weights as DPO on the same pairs (for the groups: cut into forwards by a token budget, and
    laid out unshared, so the weighting of forwards and the unshared group layout are checked too; and with a
    live reference for both)."""
    from engine_helpers import assert_rows_close, assert_weights_close, eval_rows, final_weights, read_metrics, train_raw

    extra = {"max_tokens_per_forward": 60, "share_prompt": False} if setting == "budget-unshared" else {}
    extra |= {"reference__mode": "live"} if setting == "live" else {}
    dpo = _config(ranked_assets, tmp_path / "dpo", "pairs", {"name": "dpo", "beta": 0.1}, **({"reference__mode": "live"} if setting == "live" else {}))
    pl = _config(ranked_assets, tmp_path / "pl", "two", {"name": "plackett_luce", "beta": 0.1}, **extra)
    train_raw(dpo)
    train_raw(pl)
    a, b = dpo["trainer"]["output_dir"], pl["trainer"]["output_dir"]
    keys = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "logps/rejected", "grad_norm")
    assert_rows_close(read_metrics(a), read_metrics(b), keys, abs=1e-5, rel=1e-5)
    assert_rows_close(eval_rows(a), eval_rows(b), ("eval/loss", "eval/rewards/margins", "eval/rewards/accuracies"), abs=1e-5, rel=1e-5)
    assert eval_rows(a)[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert_weights_close(final_weights(a), final_weights(b), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_one_group_cache_serves_plackett_luce_and_dpo_through_pairs_from(group_plugins, ranked_assets, tmp_path, caplog):
    """Plackett-Luce on rankings of three computes the per-completion reference cache; DPO on the same data
    (data.pairs_from: all_pairs) then reads its pairs from that cache and computes no reference."""
    from engine_helpers import eval_rows, train_raw
    from prefopt.engine import reference

    calls = []
    real = reference.compute_group_ref
    caplog.set_level("INFO", logger="prefopt")
    cache = {"reference__cache_dir": str(tmp_path / "cache")}
    pl = _config(ranked_assets, tmp_path / "pl", "three", {"name": "plackett_luce"}, max_steps=2, **cache)
    dpo = _config(ranked_assets, tmp_path / "dpo", "three", {"name": "dpo"}, max_steps=2, data__pairs_from="all_pairs", **cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference, "compute_group_ref", lambda *a, **k: calls.append(1) or real(*a, **k))
        train_raw(pl)
        assert len(calls) == 2  # train and eval
        files = sorted(p.name for p in (tmp_path / "cache").iterdir())
        caplog.clear()
        train_raw(dpo)
    assert len(calls) == 2 and sorted(p.name for p in (tmp_path / "cache").iterdir()) == files
    assert caplog.text.count("reusing") == 2 and "computing it" not in caplog.text
    before_pl, before_dpo = eval_rows(pl["trainer"]["output_dir"])[0], eval_rows(dpo["trainer"]["output_dir"])[0]
    # at the reference point every implicit reward is 0: the cached values are the policy's own, exactly
    assert before_pl["eval/loss"] == pytest.approx(math.log(6), abs=1e-6)
    assert before_dpo["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert {"eval/rewards/accuracies", "eval/rewards/top1_accuracy"} <= set(before_pl)


def _example_config(name: str, tmp_path: Path, loss: dict) -> dict:
    raw = yaml.safe_load((REPO / "examples" / name).read_text())
    root = REPO / "examples"
    raw["model"]["name_or_path"] = str(root / raw["model"]["name_or_path"])
    raw["data"] |= {"train": str(root / raw["data"]["train"]), "eval": str(root / raw["data"]["eval"]), "max_rows": 192}
    raw["loss"] = loss
    raw["reference"] = {"cache_dir": str(tmp_path / "cache")}
    raw["trainer"] |= {"output_dir": str(tmp_path / "run"), "max_steps": 6, "warmup_steps": 1, "log_every": 2}
    return raw


@pytest.mark.slow
@pytest.mark.parametrize("name, loss, metrics", [
    ("ranked.yaml", {"name": "plackett_luce", "beta": 0.1}, ("eval/rewards/accuracies", "eval/rewards/top1_accuracy")),
    ("unpaired.yaml", {"name": "kto", "beta": 0.1}, ("eval/kl", "eval/rewards/chosen", "eval/rewards/rejected")),
])
def test_the_examples_train_their_group_losses(name, loss, metrics, group_plugins, tmp_path):
    """examples/ranked.yaml with plackett_luce and examples/unpaired.yaml with kto train on the quickstart's model and
    tokenizer (fewer rows and steps), with held-out metrics before and after; KTO starts at 1 - sigmoid(0) = 0.5."""
    from engine_helpers import eval_rows, read_metrics, train_raw

    raw = _example_config(name, tmp_path, loss)
    summary = train_raw(raw)
    rows = eval_rows(raw["trainer"]["output_dir"])
    assert summary["steps"] == 6 and len(rows) == 2 and all(set(metrics) <= set(r) for r in rows)
    start = math.log(24) if loss["name"] == "plackett_luce" else 0.5  # four completions ranked: log 4!
    assert rows[0]["eval/loss"] == pytest.approx(start, abs=1e-5) and rows[1]["eval/loss"] < start
    assert all(math.isfinite(r["loss"]) for r in read_metrics(raw["trainer"]["output_dir"]))


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_two_processes_train_rankings_like_one_process(group_plugins, ranked_assets, tmp_path):
    """Plackett-Luce on rankings of three, two DDP processes of 2 groups each (two micro-batches per step) train
    like one process of 4: losses, ranking metrics, gradient norms, held-out loss, weights and the group cache."""
    import os

    from safetensors.torch import load_file

    from dist_helpers import ROOT, cpu_env, launch, torchrun, train_one_process
    from engine_helpers import assert_rows_close, assert_weights_close, eval_rows, final_weights, read_metrics

    common = dict(max_steps=3, grad_accum=2, group_by_length=False)
    single = _config(ranked_assets, tmp_path / "single", "three", {"name": "plackett_luce"}, batch_size=4, **common)
    ddp = _config(ranked_assets, tmp_path / "ddp", "three", {"name": "plackett_luce"}, batch_size=2, **common)
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(ddp))
    proc = launch(torchrun(2, "train", str(tmp_path / "ddp.yaml")), cpu_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(group_plugins)])))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train_one_process(single)
    a, b = single["trainer"]["output_dir"], ddp["trainer"]["output_dir"]
    keys = ("loss", "rewards/accuracies", "rewards/top1_accuracy", "rewards/margins", "grad_norm")
    assert_rows_close(read_metrics(a), read_metrics(b), keys)
    assert_rows_close(eval_rows(a), eval_rows(b), ("eval/loss", "eval/rewards/accuracies"))
    assert_weights_close(final_weights(a), final_weights(b))
    caches = [{p.name: load_file(str(p)) for p in (tmp_path / run / "cache").glob("*.safetensors")} for run in ("single", "ddp")]
    assert len(caches[0]) == 2 and caches[0].keys() == caches[1].keys()
    for name, tensors in caches[0].items():
        torch.testing.assert_close(caches[1][name]["ref_completion_logps"], tensors["ref_completion_logps"], atol=1e-5, rtol=1e-5)


def test_features_the_engine_does_not_compute_for_groups_are_refused():
    """A group loss declaring per-token features or the live KL is refused at start-up, naming them."""
    from prefopt.errors import ConfigError
    from prefopt.losses.base import Feature
    from prefopt.training.run import check_group_needs

    with pytest.raises(ConfigError, match="reads kl, policy_token_logps, which the engine computes for pairs only"):
        check_group_needs("listwise", frozenset({Feature.POLICY_LOGPS, Feature.POLICY_TOKEN_LOGPS, Feature.KL}), "rankings")
    check_group_needs("kto", frozenset({Feature.POLICY_LOGPS, Feature.REF_LOGPS, Feature.MISMATCHED_LOGPS}), "labelled")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_two_processes_train_kto_like_one_process(group_plugins, labelled_assets, tmp_path):
    """KTO, two DDP processes of 2 labelled completions each (two micro-batches per step), train like one process of 4:
    the reference point (``kl``) is the mean over the whole global batch's mismatched completions (gathered in training,
    shared once per evaluation), so losses, ``kl``, gradient norms, held-out loss and weights agree within 1e-5; so do
    the means over desirable or undesirable completions only (``rewards/chosen``, ``logratios/desirable``...), which
    each process counts, although the processes hold different numbers of them."""
    import os

    from dist_helpers import ROOT, cpu_env, launch, torchrun, train_one_process
    from engine_helpers import assert_rows_close, assert_weights_close, eval_rows, final_weights, read_metrics

    common = dict(max_steps=4, grad_accum=2, group_by_length=False, lr=1e-2)
    loss = {"name": "kto", "beta": 0.1, "undesirable_weight": 1.5}
    single = _config(labelled_assets, tmp_path / "single", "labelled", loss, batch_size=4, **common)
    ddp = _config(labelled_assets, tmp_path / "ddp", "labelled", loss, batch_size=2, **common)
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(ddp))
    proc = launch(torchrun(2, "train", str(tmp_path / "ddp.yaml")), cpu_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(group_plugins)])))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train_one_process(single)
    a, b = single["trainer"]["output_dir"], ddp["trainer"]["output_dir"]
    rows, evals = read_metrics(a), eval_rows(a)
    assert max(r["kl"] for r in rows) > 1e-3 and evals[-1]["eval/kl"] > 1e-3  # the reference point is not clamped to 0
    counted = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
               "logratios/desirable", "logratios/undesirable")  # means over some completions: weighted by their counts
    assert_rows_close(rows, read_metrics(b), ("loss", "kl", "grad_norm", *counted), abs=1e-5, rel=1e-5)
    assert_rows_close(evals, eval_rows(b), ("eval/loss", "eval/kl", *(f"eval/{k}" for k in counted)), abs=1e-5, rel=1e-5)
    assert_weights_close(final_weights(a), final_weights(b), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- logratios/* of groups, from the engine


def test_counted_metrics_are_means_over_their_examples_left_out_where_there_are_none():
    """A metric with a count (KTO's rewards/chosen: a mean over the desirable completions only) is averaged over those
    completions of every forward, not over forwards; a forward with none adds nothing, even a plugin's 0/0; a window
    with none leaves it out, and a margin of counted means is their difference."""
    from types import SimpleNamespace

    from prefopt.training.step import MetricSums

    acc = SimpleNamespace(device=torch.device("cpu"), reduce=lambda t, op: t)
    t = torch.tensor
    nan = float("nan")
    sums = MetricSums()  # two forwards of one step, half the examples each
    sums.add({"loss": t(1.0), "rewards/chosen": t(2.0), "rewards/rejected": t(nan), "rewards/margins": t(nan)},
             {"rewards/chosen": t(3), "rewards/rejected": t(0)}, 0.5)
    sums.add({"loss": t(3.0), "rewards/chosen": t(6.0), "rewards/rejected": t(-1.0), "rewards/margins": t(7.0)},
             {"rewards/chosen": t(1), "rewards/rejected": t(2)}, 0.5)
    means, _ = sums.means(acc, 1.0)
    assert means == pytest.approx({"loss": 2.0, "rewards/chosen": 3.0, "rewards/rejected": -1.0, "rewards/margins": 4.0})
    none = MetricSums()
    none.add({"loss": t(1.0), "rewards/chosen": t(2.0), "rewards/rejected": t(0.0), "rewards/margins": t(2.0)},
             {"rewards/chosen": t(3), "rewards/rejected": t(0)}, 1.0)
    means, _ = none.means(acc, 1.0)
    assert means == pytest.approx({"loss": 1.0, "rewards/chosen": 2.0})


def test_group_logratios_are_the_per_completion_log_ratios():
    """Rankings: best (slot 0), worst (last valid slot), their margin and its sign; labelled: means over the desirable
    and the undesirable completions; against a plain loop in float64, ragged K and the mismatched column ignored."""
    from prefopt.training.step import group_logratio_metrics

    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False], [True, True, True]])
    policy, ref = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)  # column 3: a mismatched completion
    ratio = (policy - ref).double().tolist()
    last = [int(m.sum()) - 1 for m in mask]
    rankings, counts = group_logratio_metrics(policy, ref, {"completion_mask": mask, "labels": None})
    assert counts == {}  # means over every ranking
    margins = [ratio[b][0] - ratio[b][last[b]] for b in range(4)]
    expected = {"best": sum(r[0] for r in ratio) / 4, "worst": sum(ratio[b][last[b]] for b in range(4)) / 4,
                "margins": sum(margins) / 4, "accuracies": sum(m > 0 for m in margins) / 4}
    assert 0 < expected["accuracies"] < 1
    assert {k: rankings[f"logratios/{k}"].item() for k in expected} == pytest.approx(expected, abs=1e-6)
    labels = torch.tensor([[True, False, True], [False, False, False], [True, False, False], [False, True, False]])
    labelled, counts = group_logratio_metrics(policy, ref, {"completion_mask": mask, "labels": labels})
    slots = [(b, k) for b in range(4) for k in range(3) if mask[b, k]]
    for name, want in (("desirable", True), ("undesirable", False)):
        values = [ratio[b][k] for b, k in slots if bool(labels[b, k]) == want]
        assert labelled[f"logratios/{name}"].item() == pytest.approx(sum(values) / len(values), abs=1e-6)
        assert counts[f"logratios/{name}"].item() == len(values)
    none, _ = group_logratio_metrics(policy, ref, {"completion_mask": mask, "labels": torch.zeros_like(labels)})
    assert none["logratios/desirable"].item() == 0.0  # no desirable completion in the batch: 0, not NaN


@pytest.mark.parametrize("kind", ["rankings", "labelled"])
def test_a_group_step_logs_engine_logratios_with_one_host_read(kind, group_plugins, labelled_assets, tmp_path):
    """Forwards, backwards and the flag read of a step on groups read the device once, and their metrics include the
    engine's logratios/*; they agree with the losses' own rewards (beta times the log-ratio) computed apart."""
    from prefopt.config import validate
    from prefopt.engine.syncs import SyncCounter
    from prefopt.training.run import setup
    from prefopt.training.step import forward_backward, read_flags

    loss, data = ({"name": "plackett_luce", "beta": 0.5}, "three") if kind == "rankings" else ({"name": "kto", "beta": 0.5}, "labelled")
    run = setup(validate(_config(labelled_assets, tmp_path, data, loss, batch_size=4, reference__mode="live")))
    model, acc = run.model, run.accelerator
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model, optimizer = acc.prepare(model, optimizer)
    batches = [run.make_batch(run.train_pairs, g, "train") for g in ([0, 1, 2, 3], [4, 5, 6, 7])]
    for step in range(2):  # the second step: the policy has moved, the log-ratios are not 0
        with SyncCounter() as syncs:
            result = forward_backward(run, model, batches, [0.5, 0.5], params)
            finite, _, _ = read_flags(run, result, False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert finite and syncs.count == 1, dict(syncs.ops)
    m = {k: v.item() for k, v in result.metrics.sums.items()}  # weighted sums: counted metrics (labelled) by their counts
    pairs = (("best", "chosen"), ("worst", "rejected")) if kind == "rankings" else (("desirable", "chosen"), ("undesirable", "rejected"))
    for ours, theirs in pairs:
        assert abs(m[f"logratios/{ours}"]) > 1e-4
        assert 0.5 * m[f"logratios/{ours}"] == pytest.approx(m[f"rewards/{theirs}"], abs=1e-6)
    if kind == "rankings":
        assert m["logratios/margins"] == pytest.approx(m["logratios/best"] - m["logratios/worst"], abs=1e-6)


# ---------------------------------------------------------------- groups with --resume and LoRA


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["crash", "sigterm"])
@pytest.mark.parametrize("kind", ["rankings", "labelled"])
def test_an_interrupted_group_run_resumes_to_the_same_weights(kind, stop, group_plugins, labelled_assets, tmp_path):
    """A group run (plackett_luce on rankings of three, kto on labelled completions) that dies inside step 5 (after
    the checkpoints of steps 2 and 4) or is asked to stop by SIGTERM in step 3, then resumed, ends with exactly the
    weights, and logs exactly the losses, of a run never interrupted (fp32, one thread)."""
    import os
    import signal

    from engine_helpers import final_weights, read_metrics, train_raw
    from prefopt.training import trainer

    loss, data = ({"name": "plackett_luce"}, "three") if kind == "rankings" else ({"name": "kto", "undesirable_weight": 1.5}, "labelled")
    settings = dict(max_steps=6, save_every=2, batch_size=4, grad_accum=2, lr=1e-2)
    whole = _config(labelled_assets, tmp_path / "whole", data, loss, **settings)
    broken = _config(labelled_assets, tmp_path / "broken", data, loss, **settings)
    train_raw(whole)
    real, calls = trainer.forward_backward, []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if stop == "crash" and len(calls) == 5:
            raise RuntimeError("killed")
        if stop == "sigterm" and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer finishes the step, checkpoints and stops
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "forward_backward", interrupt)
        if stop == "crash":
            with pytest.raises(RuntimeError, match="killed"):
                train_raw(broken)
        else:
            assert train_raw(broken)["steps"] == 3
    train_raw(broken, resume=True)
    a, b = whole["trainer"]["output_dir"], broken["trainer"]["output_dir"]
    assert [r["loss"] for r in read_metrics(b)] == [r["loss"] for r in read_metrics(a)]
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_groups_train_with_lora_and_the_reference_is_the_base_model(group_plugins, labelled_assets, tmp_path):
    """LoRA on groups (kto on labelled completions): the held-out loss starts at exactly 1 - sigmoid(0) = 0.5 (the
    adapter-disabled reference, cached or live, equals the untrained policy), the run trains (the held-out loss
    falls; a reference that followed the adapters would hold it at 0.5), and a cached and a live reference give the
    same losses and reference points, mismatched completions included."""
    from engine_helpers import eval_rows, read_metrics, train_raw

    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    runs = {mode: _config(labelled_assets, tmp_path / mode, "labelled", {"name": "kto"}, max_steps=4, batch_size=4, lr=3e-2,
                          model__lora=lora, reference__mode=mode) for mode in ("cache", "live")}
    for raw in runs.values():
        train_raw(raw)
        evals = eval_rows(raw["trainer"]["output_dir"])
        assert evals[0]["eval/loss"] == pytest.approx(0.5, abs=1e-6) and evals[0]["eval/logratios/desirable"] == 0.0
        assert evals[-1]["eval/loss"] < 0.5
    cached, live = (read_metrics(runs[m]["trainer"]["output_dir"]) for m in ("cache", "live"))
    assert max(r["kl"] for r in cached) > 1e-3
    for x, y in zip(cached, live, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5) and x["kl"] == pytest.approx(y["kl"], abs=1e-5)
