"""A real model end to end, offline: the README's recipe (examples/recipes/qwen2.5-0.5b-dpo.yaml) on a
Hub-shaped model directory and dataset directory, TensorBoard, sampled completions, ``prefopt report``,
and TRL's tokenisation token for token."""
from __future__ import annotations

import json
import re
import shlex
import struct
from pathlib import Path

import pytest
import torch

from hub_assets import build_hub_assets

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_PROMPTS, EVAL_EVERY, STEPS = 2, 2, 4


def readme_recipe() -> Path:
    """The config of the README's "train a real model" command."""
    text = (ROOT / "README.md").read_text()
    command = re.search(r"```bash\n(prefopt train examples/recipes/\S+\.yaml)\n```", text).group(1)
    return ROOT / shlex.split(command)[2]


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    return build_hub_assets(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="session")
def recipe_run(hub, tmp_path_factory):
    """The README's command with the Hub names replaced by the directories (what a download gives), and
    what a CPU test must change: test-sized steps, evaluation and sampling, and a temporary output and cache."""
    import io
    from contextlib import redirect_stdout

    from prefopt.cli import commands as cli
    from prefopt.config import load_config

    out = tmp_path_factory.mktemp("recipe")
    recipe = load_config(readme_recipe())
    assert (recipe.model.name_or_path, recipe.data.train, recipe.data.eval) == (
        "Qwen/Qwen2.5-0.5B-Instruct", "trl-lib/ultrafeedback_binarized", "trl-lib/ultrafeedback_binarized")
    args = [f"model.name_or_path={hub['model']}", f"data.train={hub['dataset']}", f"data.eval={hub['dataset']}"]
    test_only = [f"trainer.max_steps={STEPS}", f"trainer.output_dir={out / 'run'}", f"reference.cache_dir={out / 'cache'}",
                 f"trainer.eval_every={EVAL_EVERY}", "trainer.log_every=1", f"trainer.sample_prompts={SAMPLE_PROMPTS}",
                 "trainer.sample_max_new_tokens=8", "trainer.report_to=[jsonl, tensorboard]"]
    stdout = io.StringIO()
    torch.set_num_threads(1)
    with redirect_stdout(stdout):
        code = cli.main(["train", str(readme_recipe()), *[x for t in args + test_only for x in ("--set", t)]])
    return {"code": code, "stdout": stdout.getvalue(), "dir": out / "run", "project": recipe.trainer.project}


# --- the recipe ------------------------------------------------------------------------------


def test_readme_recipe_trains_the_hub_shaped_model(recipe_run, hub):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert recipe_run["code"] == 0, recipe_run["stdout"]
    run = recipe_run["dir"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["reference"] == "cache"
    assert summary["before"]["eval/rewards/margins"] == 0.0  # the policy is the reference at step 0
    assert summary["after"]["eval/rewards/margins"] != 0.0
    assert "policy equals the reference, so every margin is 0" in recipe_run["stdout"]
    assert "eval/rewards/accuracies" in summary["after"]
    model = AutoModelForCausalLM.from_pretrained(run)
    start = AutoModelForCausalLM.from_pretrained(hub["model"])
    assert model.config.model_type == "qwen2"
    # read in bf16 (model.dtype), trained as fp32 masters (trainer.master_weights): at lr 5e-7 the weights move
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    start = {n: p.to(torch.bfloat16).float() for n, p in start.state_dict().items()}
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, start[n])]
    assert len(changed) > len(start) // 2, "training at lr 5e-7 moves the weights"
    tok = AutoTokenizer.from_pretrained(run)
    assert tok.chat_template == AutoTokenizer.from_pretrained(hub["model"]).chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "How was the cafe?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_metrics_use_trl_names_and_tensorboard_gets_the_same_values(recipe_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [json.loads(line) for line in (recipe_run["dir"] / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "lr", "grad_norm"):
        assert key in train_rows[0], key
    assert recipe_run["project"] != "prefopt"  # the recipe names its tracker project: TensorBoard's folder
    events = EventAccumulator(str(recipe_run["dir"] / recipe_run["project"]), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("rewards/margins")}
    assert logged == pytest.approx({r["step"]: r["rewards/margins"] for r in train_rows}, rel=1e-6)
    assert {e.step for e in events.Scalars("eval/rewards/accuracies")} == {0, EVAL_EVERY, STEPS}
    texts = [e for e in events.Tensors("samples/text_summary")]
    assert [t.step for t in texts] == [0, EVAL_EVERY, STEPS]
    assert b"| prompt | policy | reference |" in texts[0].tensor_proto.string_val[0]


def test_samples_are_greedy_completions_of_held_out_prompts(recipe_run, hub):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in (recipe_run["dir"] / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [s for s in (0, EVAL_EVERY, STEPS) for _ in range(SAMPLE_PROMPTS)]
    first = rows[:SAMPLE_PROMPTS]
    assert first[0]["prompt"].endswith("<|im_start|>user\nHow was the " + first[0]["prompt"].split("How was the ")[1])
    # The reference is the initial policy: its completions are the policy's at step 0, at every evaluation.
    assert all(r["reference"] == first[i % SAMPLE_PROMPTS]["policy"] for i, r in enumerate(rows))
    # ... and they are what the downloaded model writes, greedily.
    tok = AutoTokenizer.from_pretrained(hub["model"])
    model = AutoModelForCausalLM.from_pretrained(hub["model"])
    ids = tok(first[0]["prompt"], add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True) == first[0]["policy"]


def test_report_draws_the_curves_and_prints_the_table(recipe_run, tmp_path, capsys):
    from prefopt.cli import commands as cli
    from prefopt.cli.report import PANELS, plot, read_metrics, series

    png = tmp_path / "curves.png"
    assert cli.main(["report", str(recipe_run["dir"]), "--out", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "held-out pairs        before      after" in printed and f"curves: {png}" in printed
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (990, 1008)  # 11 x 11.2 inches at 90 dpi: 8 panels in 4 rows
    rows = read_metrics(recipe_run["dir"])
    steps, values = series(rows, "eval/loss")
    assert steps == [0, EVAL_EVERY, STEPS] and all(v > 0 for v in values)
    assert all(series(rows, key)[0] for _, curves in PANELS for key, _ in curves[:1])
    assert plot(recipe_run["dir"]) == recipe_run["dir"] / "report.png"


def test_report_on_a_directory_without_metrics_is_a_clear_error(tmp_path, capsys):
    from prefopt.cli import commands as cli

    assert cli.main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path}: no metrics.jsonl" in capsys.readouterr().err


# --- data in TRL's schemas -------------------------------------------------------------------


def _hub_tokenizer(hub):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hub["model"])


def _trl_tokenise(rows: list[dict], tokenizer, max_length: int | None = None) -> list[dict]:
    """What TRL's DPOTrainer makes of ``rows`` (its dataset preparation, without building a trainer);
    with ``max_length``, the rows left after it drops those whose prompt fills ``max_length``."""
    trl = pytest.importorskip("trl")
    import types

    import datasets
    from trl.trainer.dpo_trainer import DPOTrainer

    if not trl.__version__.startswith("1."):
        pytest.skip(f"compares with TRL 1.x's tokenisation; trl {trl.__version__} is installed")
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    out = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tokenizer), datasets.Dataset.from_list(rows), tokenizer, args, "train")
    return [{k: out[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(len(out))]


def _ours(pairs) -> list[dict]:
    return [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs]


def test_ultrafeedback_directory_is_tokenised_as_trl_does(hub):
    import datasets

    from prefopt.data.pairs import load_pairs

    tok = _hub_tokenizer(hub)
    pairs, report = load_pairs(str(hub["dataset"]), tok, split="test", max_length=1024)
    assert report.format == "conversational, implicit prompt" and report.kept == report.rows == 12
    rows = datasets.load_dataset(str(hub["dataset"]), split="test").to_list()
    assert _ours(pairs) == _trl_tokenise(rows, tok)
    # No extra EOS after the template's own end of turn.
    assert tok.decode(pairs[0].chosen_ids).endswith("<|im_end|>\n") and pairs[0].chosen_ids.count(tok.eos_token_id) == 1


def test_max_length_cuts_as_trl_keep_start(hub, tmp_path):
    """max_length alone (no prompt or completion cut) keeps what TRL 1.16 keeps with ``max_length`` and
    ``truncation_mode="keep_start"``: the first max_length tokens of prompt + completion, and no row whose
    prompt fills max_length. Compared on the sequences TRL's own collator builds."""
    import datasets
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from prefopt.data.pairs import load_pairs

    tok = _hub_tokenizer(hub)
    rows = datasets.load_dataset(str(hub["dataset"]), split="test").to_list()
    for row in rows:  # answers that differ from their first word, so no cut makes a pair identical (prefopt refuses those)
        row["chosen"][-1]["content"] = "Yes. " + row["chosen"][-1]["content"]
        row["rejected"][-1]["content"] = "No. " + row["rejected"][-1]["content"]
    data = tmp_path / "apart.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    full, _ = load_pairs(str(data), tok, max_length=1024)
    prompt = min(len(p.prompt_ids) for p in full)
    max_length = prompt + 3  # every completion is cut; a prompt one token longer is dropped
    assert any(len(p.prompt_ids) >= max_length for p in full) and all(len(p.chosen_ids) > 3 for p in full)
    pairs, report = load_pairs(str(data), tok, max_length=max_length)
    trl_rows = _trl_tokenise(rows, tok, max_length)
    assert report.skipped.get("overlong", 0) == len(rows) - len(trl_rows) > 0
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=max_length)(trl_rows)
    n = len(trl_rows)
    for i, p in enumerate(pairs):
        for j, completion in ((i, p.chosen_ids), (n + i, p.rejected_ids)):
            kept = batch["attention_mask"][j].bool()
            assert batch["input_ids"][j][kept].tolist() == p.prompt_ids + completion
            assert batch["completion_mask"][j][kept].tolist() == [0] * len(p.prompt_ids) + [1] * len(completion)


def test_explicit_prompt_schemas_and_text_with_the_trl_rule_match_trl(hub, tmp_path):
    from prefopt.data.pairs import load_pairs

    tok = _hub_tokenizer(hub)
    user = [{"role": "user", "content": "How was the park?"}]
    chat = [{"prompt": user, "chosen": [{"role": "assistant", "content": "The park was calm."}],
             "rejected": [{"role": "assistant", "content": "The park was loud."}]}]
    text = [{"prompt": "How was the park? ", "chosen": "It was calm.", "rejected": "It was loud."},  # prompt ends in a space
            {"prompt": "The train was", "chosen": "lovely", "rejected": "slow"}]  # no separator
    for name, rows, mode in (("chat", chat, "separate"), ("text", text, "trl")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        pairs, _ = load_pairs(str(path), tok, max_length=1024, text_tokenization=mode)
        assert _ours(pairs) == _trl_tokenise(rows, tok), name


def test_text_rows_differ_from_trl_only_where_docs_say(hub, tmp_path):
    """The default keeps prompt and completion tokens apart; TRL tokenises them joined."""
    from prefopt.data.pairs import load_pairs

    tok = _hub_tokenizer(hub)
    row = {"prompt": "The park ", "chosen": "was calm.", "rejected": "was loud."}  # a prompt ending in a space
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (ours,), _ = load_pairs(str(path), tok, max_length=1024)
    (trl_rule,), _ = load_pairs(str(path), tok, max_length=1024, text_tokenization="trl")
    assert tok.decode(ours.prompt_ids) == "The park "  # the space stays a token of the prompt
    assert ours.chosen_ids == tok("was calm.<|im_end|>")["input_ids"]
    # TRL tokenises "The park was calm." in one piece: " was" is one token, so its boundary
    # falls before the space and the completion starts with it.
    assert trl_rule.prompt_ids == ours.prompt_ids[:-1] and tok.decode(trl_rule.chosen_ids) == " was calm.<|im_end|>"
    assert trl_rule.chosen_ids == tok("The park was calm.<|im_end|>")["input_ids"][len(trl_rule.prompt_ids) :]


def test_column_names_are_configurable_and_errors_name_the_column(hub, tmp_path):
    from prefopt.data.pairs import load_pairs
    from prefopt.errors import DataError

    tok = _hub_tokenizer(hub)
    rows = [{"question": "How was the cafe?", "good": " Lovely.", "bad": " Awful.", "prompt": "ignored"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"question": "Q", "good": "", "bad": " x"}]))
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    with pytest.raises(DataError, match=r"d.jsonl line 2, field 'good' \(chosen\): empty completion"):
        load_pairs(str(path), tok, max_length=64, columns=columns)
    pairs, report = load_pairs(str(path), tok, max_length=64, columns=columns, on_error="skip")
    assert report.kept == 1 and tok.decode(pairs[0].prompt_ids) == "How was the cafe?"
    with pytest.raises(DataError, match="data.columns: unknown field 'answer'"):
        load_pairs(str(path), tok, max_length=64, columns={"answer": "good"})


def test_split_directories(hub, tmp_path):
    from prefopt.data.pairs import load_pairs
    from prefopt.errors import DataError

    tok = _hub_tokenizer(hub)
    train, report = load_pairs(str(hub["dataset"]), tok, split="train", max_length=1024, max_rows=5)
    assert report.rows == 5 and report.source == str(hub["dataset"])
    with pytest.raises(DataError, match=r"no split 'validation' in this dataset directory \(splits: test, train\)"):
        load_pairs(str(hub["dataset"]), tok, split="validation", max_length=1024)
    # JSON lines named by split are read the same way; row numbers stay line numbers.
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n{\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"prompt": "a", "chosen": " d", "rejected": " e"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl line 2: malformed JSON"):
        load_pairs(str(tmp_path), tok, split="train", max_length=64)
    test, _ = load_pairs(str(tmp_path), tok, split="test", max_length=64)
    assert tok.decode(test[0].chosen_ids) == " d<|im_end|>"


# --- small things -------------------------------------------------------------------------------


def test_version(capsys):
    from prefopt import __version__
    from prefopt.cli import commands as cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"prefopt {__version__}"


def test_the_quickstart_points_at_the_readmes_recipe():
    comment = "".join(line[1:] for line in (ROOT / "examples" / "quickstart.yaml").read_text().splitlines(True) if line.startswith("#"))
    named = re.findall(r"prefopt train (examples/recipes/\S+\.yaml)", comment)
    assert named and ROOT / named[0] == readme_recipe() and readme_recipe().exists()


def test_samples_with_a_live_reference_come_from_the_reference_model(tmp_path):
    """TDPO keeps the reference in memory: it is sampled at every evaluation, and at step 0 agrees with the policy."""
    from engine_helpers import make_config, write_assets
    from prefopt.config import validate
    from prefopt.training.trainer import train

    assets = write_assets(tmp_path / "assets", n_train=16, n_eval=4)
    cfg = make_config(assets, tmp_path, loss={"name": "tdpo", "variant": "tdpo1"}, max_steps=2, batch_size=4,
                      sample_prompts=2, sample_max_new_tokens=4, data__eval=assets["eval"])
    torch.set_num_threads(1)
    summary = train(validate(cfg))
    assert summary["reference"] == "live"
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 0, 2, 2]
    assert all(r["reference"] is not None for r in rows)
    assert [r["reference"] for r in rows[:2]] == [r["policy"] for r in rows[:2]] == [r["reference"] for r in rows[2:]]
