"""FSDP2 on two CPU processes over gloo, launched with the shipped accelerate config: the same run as one
process, crash-safe checkpoints of whole weights that resume under FSDP, and a from_pretrained final model."""
from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_helpers import ROOT, cpu_env, free_port, kill_tree, launch, torchrun_script, train_one_process
from engine_helpers import assert_rows_close, assert_weights_close, eval_rows, final_weights, make_config, read_metrics, write_assets
from prefopt.config import validate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo"),
]
STEPS = 10


def _fsdp(config: Path, *args: str, command: str = "train") -> list[str]:
    import sys

    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "examples" / "accelerate" / "fsdp.yaml"),
            "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "prefopt", command, str(config), *args]


def _assert_same_caches(single: dict, fsdp: dict) -> None:
    """The two runs wrote the same cache files (train and eval, same fingerprints) with the same values."""
    caches = [{p.name: load_file(str(p)) for p in sorted(Path(c["reference"]["cache_dir"]).glob("*.safetensors"))} for c in (single, fsdp)]
    assert len(caches[1]) == 2 and caches[1].keys() == caches[0].keys()
    for name in caches[0]:
        torch.testing.assert_close(caches[1][name]["ref_logps"], caches[0][name]["ref_logps"], atol=1e-5, rtol=1e-5)


def _pretrained(config: dict, path: Path, seed: int = 123) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(config)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(params.pop("model_type"), **params)).save_pretrained(path)
    return str(path)


def test_fsdp_trains_like_one_process_and_resumes_after_kill9(tmp_path):
    assets = write_assets(tmp_path / "assets", n_train=64, n_eval=8)
    # a live reference, so the frozen copy is sharded too; warm-up, cosine decay, two micro-batches per step
    common = dict(max_steps=STEPS, warmup_steps=2, schedule="cosine", grad_accum=2, save_every=2, group_by_length=False,
                  data__eval=assets["eval"], reference__mode="live")
    single = make_config(assets, tmp_path / "single", batch_size=4, **common)
    fsdp = make_config(assets, tmp_path / "fsdp", batch_size=2, **common)  # 2 per process x 2 processes
    # pretrained weights, loaded with from_pretrained in every process (as a real model would be)
    pretrained = _pretrained(single["model"]["config"], tmp_path / "pretrained")
    for raw in (single, fsdp):
        raw["model"] = {"name_or_path": pretrained, "tokenizer": assets["tokenizer"]}
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(fsdp))
    out = Path(fsdp["trainer"]["output_dir"])

    # crash: kill -9 every process of the launch once the first checkpoint is complete
    victim = subprocess.Popen(_fsdp(config), cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "step-0000002").exists() and victim.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        kill_tree(victim)  # launcher and workers: nothing is flushed or saved
        log = victim.communicate()[0]
    assert (out / "checkpoints" / "step-0000002").exists(), log[-3000:]
    assert not (out / "model.safetensors").exists(), "the run finished before it could be killed"

    proc = launch(_fsdp(config, "--resume"), cpu_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("[prefopt] 2 processes (FSDP2 on cpu)") == 1
    assert proc.stderr.count("weights read by the first process only") == 1  # the second built the model empty
    assert "resuming from" in proc.stderr
    assert proc.stdout.count("saved to") == 1

    train_one_process(single)

    one, two = read_metrics(single["trainer"]["output_dir"]), read_metrics(out)
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # one row per step across the crash
    assert [b["lr"] for b in two] == pytest.approx([a["lr"] for a in one], rel=1e-12)
    assert_rows_close(one, two, ("loss", "rewards/margins", "grad_norm"))
    assert two[-1]["loss"] < two[0]["loss"] - 0.05  # it learned something
    assert eval_rows(out)[-1]["eval/loss"] == pytest.approx(eval_rows(single["trainer"]["output_dir"])[-1]["eval/loss"], abs=1e-5)
    # the final model: whole weights in an ordinary from_pretrained directory
    assert_weights_close(final_weights(single["trainer"]["output_dir"]), final_weights(out))
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(loaded.state_dict()["lm_head.weight"], final_weights(out)["lm_head.weight"])
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS


def test_fsdp_with_a_token_budget_runs_matched_forwards_and_trains_like_one_process(tmp_path):
    """Processes whose pairs need different numbers of forwards under the budget all run the same number
    (FSDP gathers weights in every forward), and the steps equal one process's. So do evaluation, on
    held-out pairs that split unevenly (5 and 4: different numbers of forwards per process), and the
    reference cache, computed by the sharded policy (``precompute-ref`` under FSDP, then reused). With a
    tied output head (GPT-2), received by the second process from the first."""
    from transformers import AutoTokenizer

    from prefopt.data.batching import batch_order, pair_length, pair_tokens, split_by_tokens
    from prefopt.data.pairs import load_data

    assets = write_assets(tmp_path / "assets", n_train=48, n_eval=9)
    # GPT-2: its output head is tied to the input embeddings, which the second process must rebuild tied
    common = dict(arch="gpt2", max_steps=4, group_by_length=False, max_tokens_per_forward=120, reference__batch_size=16,
                  data__eval=assets["eval"])
    single = make_config(assets, tmp_path / "single", batch_size=8, **common)
    fsdp = make_config(assets, tmp_path / "fsdp", batch_size=4, **common)  # 4 per process x 2 processes
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(fsdp))

    # the budget really splits the processes' pairs into different numbers of forwards in some step
    cfg = validate(fsdp)
    pairs, _, _ = load_data(cfg.data, AutoTokenizer.from_pretrained(assets["tokenizer"]), 0)
    order = batch_order([pair_length(p) for p in pairs], 8, 0, 0, False)
    counts = [[len(split_by_tokens(b[r * 4 : (r + 1) * 4], [pair_tokens(p) for p in pairs], 120)) for r in (0, 1)] for b in order[:4]]
    assert any(a != b for a, b in counts), counts

    pre = launch(_fsdp(config, command="precompute-ref"), cpu_env(), timeout=300)
    assert pre.returncode == 0, pre.stdout[-3000:] + pre.stderr[-3000:]
    assert pre.stderr.count("reference cache (train): wrote") == 1
    assert "computed by the sharded policy" in pre.stderr
    proc = launch(_fsdp(config), cpu_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reference cache (train): reusing" in proc.stderr and "wrote" not in proc.stderr
    train_one_process(single)
    _assert_same_caches(single, fsdp)
    one, two = read_metrics(single["trainer"]["output_dir"]), read_metrics(fsdp["trainer"]["output_dir"])
    assert_rows_close(one, two, ("loss", "rewards/margins", "grad_norm"))
    evals = eval_rows(single["trainer"]["output_dir"]), eval_rows(fsdp["trainer"]["output_dir"])
    assert len(evals[0]) == len(evals[1]) == 2  # before and after training
    assert_rows_close(*evals, ("eval/loss", "eval/rewards/margins", "eval/rewards/accuracies", "eval/logps/chosen"))


def test_fsdp_with_shared_prompts_trains_like_one_unshared_process(tmp_path):
    """Two FSDP processes on the shared-prompt layout (matched forwards under a token budget, a live reference's KL,
    a tied head) give one unshared process's losses, KL, gradient norms, held-out metrics and final weights."""
    assets = write_assets(tmp_path / "assets", n_train=48, n_eval=9)
    common = dict(arch="gpt2", max_steps=4, group_by_length=False, max_tokens_per_forward=100, data__eval=assets["eval"],
                  reference__mode="live", loss={"name": "tdpo", "variant": "tdpo2"})
    single = make_config(assets, tmp_path / "single", batch_size=8, share_prompt=False, **common)
    fsdp = make_config(assets, tmp_path / "fsdp", batch_size=4, share_prompt=True, **common)
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(fsdp))
    proc = launch(_fsdp(config), cpu_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "shared prompts: on" in proc.stderr
    train_one_process(single)
    one, two = read_metrics(single["trainer"]["output_dir"]), read_metrics(fsdp["trainer"]["output_dir"])
    assert_rows_close(one, two, ("loss", "rewards/margins", "kl/chosen", "kl/rejected", "grad_norm"))
    assert all(b["num_tokens"] < a["num_tokens"] for a, b in zip(one, two))
    assert_rows_close(eval_rows(single["trainer"]["output_dir"]), eval_rows(fsdp["trainer"]["output_dir"]), ("eval/loss", "eval/rewards/margins"))
    saved = final_weights(fsdp["trainer"]["output_dir"])
    if "lm_head.weight" in saved:  # the gathered state holds the tied head under its own name too
        assert torch.equal(saved.pop("lm_head.weight"), saved["transformer.wte.weight"])
    assert_weights_close(final_weights(single["trainer"]["output_dir"]), saved)


def test_fsdp_in_bf16_with_a_live_token_level_reference_starts_at_kl_zero(tmp_path):
    """The GPU configuration on two CPU processes: bf16 autocast, a live reference held in bf16 and sharded,
    whose weights the second process received from the first; at step 0 it equals the policy (KL exactly 0,
    held-out KL too), and the run follows one process's to bf16 accuracy."""
    assets = write_assets(tmp_path / "assets", n_train=32, n_eval=5)
    common = dict(max_steps=3, precision="bf16", reference__mode="live", loss={"name": "tdpo", "variant": "tdpo1"},
                  data__eval=assets["eval"], group_by_length=False)
    single = make_config(assets, tmp_path / "single", batch_size=4, **common)
    fsdp = make_config(assets, tmp_path / "fsdp", batch_size=2, **common)
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(fsdp))
    proc = launch(_fsdp(config), cpu_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train_one_process(single)
    one, two = read_metrics(single["trainer"]["output_dir"]), read_metrics(fsdp["trainer"]["output_dir"])
    assert two[0]["kl/chosen"] == 0.0 and two[0]["kl/rejected"] == 0.0
    assert eval_rows(fsdp["trainer"]["output_dir"])[0]["eval/kl/chosen"] == 0.0
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-3), a["step"]


def test_fsdp_with_a_separate_reference_model_computes_its_cache_sharded(tmp_path):
    """``model.reference`` (not the policy's initial weights) with a cached reference under FSDP: the reference is
    read by the first process only, sharded for the cache, and gives the single-process cache and run."""
    assets = write_assets(tmp_path / "assets", n_train=32, n_eval=4)
    common = dict(max_steps=3, group_by_length=False, reference__mode="cache", data__eval=assets["eval"])
    single = make_config(assets, tmp_path / "single", batch_size=4, **common)
    fsdp = make_config(assets, tmp_path / "fsdp", batch_size=2, **common)
    policy = _pretrained(single["model"]["config"], tmp_path / "policy")
    reference = _pretrained(single["model"]["config"], tmp_path / "reference", seed=7)
    for raw in (single, fsdp):
        raw["model"] = {"name_or_path": policy, "reference": reference, "tokenizer": assets["tokenizer"]}
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(fsdp))
    proc = launch(_fsdp(config), cpu_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "computed by the sharded model.reference" in proc.stderr
    train_one_process(single)
    _assert_same_caches(single, fsdp)
    one, two = read_metrics(single["trainer"]["output_dir"]), read_metrics(fsdp["trainer"]["output_dir"])
    assert one[0]["rewards/margins"] != 0.0  # the reference is not the policy: margins start away from 0
    assert_rows_close(one, two, ("loss", "rewards/margins", "grad_norm"))


@contextmanager
def _one_process_group(tmp_path: Path) -> Iterator[object]:
    """An in-process, one-process gloo group (FSDP2 shards as in a run, over one rank); yields a stand-in accelerator."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield type("Acc", (), {"device": torch.device("cpu"), "num_processes": 1})()
    finally:
        torch.distributed.destroy_process_group()


def _tiny_llama(tied: bool = False, model_type: str = "llama") -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied))


def test_an_empty_model_holds_no_weights_and_the_real_buffers(tmp_path):
    """What the processes after the first build under FSDP: the architecture with every parameter on the meta
    device (no memory), and the buffers no state dict carries (rotary frequencies) computed as in a loaded model."""
    from prefopt.config import ModelConfig
    from prefopt.engine.modeling import load_model

    path = tmp_path / "pretrained"
    _tiny_llama(tied=True, model_type="qwen2").save_pretrained(path)
    loaded, empty = (load_model(ModelConfig(name_or_path=str(path), tokenizer="unused"), empty=e) for e in (False, True))
    assert all(p.is_meta for p in empty.parameters()) and not any(p.is_meta for p in loaded.parameters())
    assert [n for n, _ in empty.named_parameters()] == [n for n, _ in loaded.named_parameters()]
    assert empty.lm_head.weight is empty.model.embed_tokens.weight  # tied as loaded
    buffers = dict(loaded.named_buffers())
    assert buffers and dict(empty.named_buffers()).keys() == buffers.keys()
    for name, value in empty.named_buffers():
        assert not value.is_meta and torch.equal(value, buffers[name]), name


def test_checkpoint_gathers_the_policy_and_never_the_frozen_reference(tmp_path, monkeypatch):
    """Saving under FSDP gathers whole tensors on the first process: only trainable ones, so a live
    reference costs no memory at save time."""
    from torch.distributed.tensor import DTensor

    from prefopt.engine.modeling import PreferenceModel, frozen_copy
    from prefopt.training import checkpoint as ckpt
    from prefopt.training.distributed import shard

    with _one_process_group(tmp_path) as accelerator:
        policy = _tiny_llama()
        before = {n: p.detach().clone() for n, p in policy.named_parameters()}
        model = shard(PreferenceModel(policy, frozen_copy(policy, torch.bfloat16)), accelerator)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        frozen = {p.to_local().data_ptr() for p in model.reference.parameters()}
        gathered: list[int] = []
        original = DTensor.redistribute

        def redistribute(self, *args, **kwargs):
            gathered.append(self.to_local().data_ptr())
            return original(self, *args, **kwargs)

        monkeypatch.setattr(DTensor, "redistribute", redistribute)
        weights, _ = ckpt.gather(model, optimizer)
    assert gathered and not frozen & set(gathered)
    assert set(weights) == {f"policy.{n}" for n in before}
    for n, t in before.items():
        torch.testing.assert_close(weights[f"policy.{n}"], t, rtol=0, atol=0)


SHARDED_REFERENCE = """
import sys, torch
from torch.distributed.tensor import DTensor
from prefopt.training.distributed import shard
from prefopt.engine.modeling import PreferenceModel, frozen_copy
from prefopt.training.run import use_packed_attention
sys.path.insert(0, sys.argv[2])
from test_fsdp import _packed_batch, _tiny_llama
torch.distributed.init_process_group("gloo")
accelerator = type("Acc", (), {"device": torch.device("cpu"), "num_processes": 2})()
result = {}
for tied, kind in ((False, "llama"), (True, "llama"), (False, "qwen3")):
    policy = _tiny_llama(tied, kind)
    use_packed_attention(policy)
    model = shard(PreferenceModel(policy, frozen_copy(policy, torch.bfloat16)), accelerator)
    dtypes = {n: (type(p).__name__, p.dtype) for n, p in model.reference.named_parameters()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_packed_batch(), reference="kl")
    result[tied, kind] = {"dtypes": dtypes, **{k: out[k] for k in ("logps", "ref_logps", "kl")}}
torch.save(result, sys.argv[1] + f"/out-{torch.distributed.get_rank()}.pt")
torch.distributed.destroy_process_group()
"""


def _packed_batch() -> dict:
    import random

    from prefopt.data.batching import pack
    from prefopt.data.pairs import Pair

    rng = random.Random(0)
    words = lambda n: [rng.randrange(3, 64) for _ in range(n)]  # noqa: E731
    return pack([Pair(words(4), words(5), words(3), row=i) for i in range(3)], range(3), 2)


def test_a_sharded_live_reference_is_held_in_the_training_precision_and_equals_the_policy(tmp_path):
    """Under FSDP too the live reference keeps its linear layers in bf16 (half the memory and the all-gather
    traffic): in each of its layers the attention and the MLP are units of their own, so every unit has one
    dtype. On two processes, at step 0 it computes exactly what the fp32 policy computes under autocast, and
    what the unsharded reference computes; with its own LM head, with one tied to the embeddings, and with
    norms inside the attention (Qwen3: its projections become units one by one)."""
    from prefopt.engine.modeling import PreferenceModel, frozen_copy
    from prefopt.training.run import use_packed_attention

    proc = launch(torchrun_script(2, tmp_path / "run.py", SHARDED_REFERENCE, str(tmp_path), str(Path(__file__).parent)),
                  cpu_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [torch.load(tmp_path / f"out-{r}.pt") for r in (0, 1)]
    for tied, kind in ((False, "llama"), (True, "llama"), (False, "qwen3")):
        dtypes = results[0][tied, kind]["dtypes"]
        assert all(kind == "DTensor" for kind, _ in dtypes.values())
        for name, (_, dtype) in dtypes.items():
            assert dtype == (torch.bfloat16 if "proj" in name else torch.float32), name  # the head: see shard()
        policy = _tiny_llama(tied, kind)
        use_packed_attention(policy)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            unsharded = PreferenceModel(policy, frozen_copy(policy, torch.bfloat16))(_packed_batch(), reference="kl")
        for r in (r[tied, kind] for r in results):
            assert torch.equal(r["logps"], r["ref_logps"])
            assert r["kl"].abs().max() < 1e-6
            torch.testing.assert_close(r["ref_logps"], unsharded["ref_logps"], rtol=1e-6, atol=1e-6)
