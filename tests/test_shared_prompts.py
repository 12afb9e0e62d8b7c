"""Shared prompts: each prompt computed once, followed by its completions; the numbers of the unshared engine.

Every completion attends to its prompt and to itself only, with position ids continuing from the
prompt's end, so per-token log-probs, KL, entropy and gradients equal those of each sequence run
alone (within fp32 rounding) for learned absolute positions (GPT-2), RoPE (Llama, Qwen2 with
grouped-query attention) and sliding windows (Mistral, a window shorter than the prompts).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from prefopt.data.batching import pack, pack_shared, pair_tokens
from prefopt.data.pairs import Pair, load_pairs
from prefopt.engine.modeling import PreferenceModel, frozen_copy, load_model
from prefopt.training.run import use_packed_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ARCHS = ["llama", "qwen2", "gpt2", "mistral"]
OUTPUTS = ("logps", "kl", "ref_logps", "entropy", "logsumsq")


def _model(arch: str, seed: int = 0, vocab: int = 400):
    from prefopt.config import ModelConfig
    from prefopt.testing.tiny import model_config

    torch.manual_seed(seed)
    params = model_config("llama" if arch == "mistral" else arch, vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4,
                          max_position=128)
    if arch == "mistral":  # a window of 4 positions: shorter than every prompt here, so it spans the shared prompt
        params.update(model_type="mistral", sliding_window=4, num_key_value_heads=2)
    elif arch == "qwen2":
        params["num_key_value_heads"] = 2  # grouped-query attention
    model = load_model(ModelConfig(config=params, tokenizer="unused"))
    use_packed_attention(model)
    return model


@pytest.fixture(scope="module")
def hard_pairs(tokenizer, tmp_path_factory):
    """Pairs through the real data path with truncation (a prompt cut to max_prompt_length, completions cut at
    max_length, so without EOS), plus 1-token completions and chosen/rejected of very different lengths."""
    rows = [
        {"prompt": "Tell me about the new phone. " * 6, "chosen": "It is fast.",
         "rejected": "The screen was awful and the phone was slow, far too slow, boring and far too long. " * 2},
        {"prompt": "Review of the hotel:", "chosen": "!", "rejected": "the room was clean, the staff were kind."},
        {"prompt": "What did you think of the movie?", "chosen": "It was boring and far too long. " * 5, "rejected": "Great."},
    ]
    path = tmp_path_factory.mktemp("shared") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = load_pairs(str(path), tokenizer, max_length=40, max_prompt_length=24)
    eos = tokenizer.eos_token_id
    assert len(pairs[0].prompt_ids) == 24 and eos not in pairs[0].rejected_ids and eos not in pairs[2].chosen_ids
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(3, 400) for _ in range(n)]  # noqa: E731
    pairs += [Pair(ids(9), ids(1), ids(14), row=3), Pair(ids(6), ids(12), ids(1), row=4), Pair(ids(1), ids(1), ids(1), row=5)]
    return pairs


def _run(arch: str, batch: dict, kernel: str = "sdpa", autocast: torch.dtype | None = None) -> tuple[dict, torch.Tensor]:
    """Every per-token output of a policy with a (different) live reference, and the gradient of their sum."""
    policy, reference = _model(arch), frozen_copy(_model(arch, seed=1))
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = PreferenceModel(policy, reference, chunk_tokens=7, kernel=kernel)(batch, reference="kl", stats=True)
        objective = out["logps"].sum() + out["kl"].sum() + out["entropy"].sum() + 0.3 * out["logsumsq"].sum()
    objective.backward()
    return {k: v.detach() for k, v in out.items()}, torch.cat([p.grad.flatten() for p in policy.parameters()])


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompts_give_the_unshared_numbers_and_gradients(arch, hard_pairs):
    idx = list(range(len(hard_pairs)))
    unshared = pack(hard_pairs, idx, 2, 16)
    shared = pack(hard_pairs, idx, 2, 16, share_prompt=True)
    assert shared["num_tokens"] == sum(pair_tokens(p, True) for p in hard_pairs) < unshared["num_tokens"]
    (a, grad_a), (b, grad_b) = _run(arch, unshared), _run(arch, shared)
    for key in OUTPUTS:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(grad_b, grad_a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"], ids=["grouped-query", "sliding-window"])
def test_the_varlen_branch_reads_each_prompt_through_separate_key_boundaries(arch, hard_pairs):
    """The CUDA branch, torch's ``varlen_attn`` with query and key boundaries apart (CPU kernels standing in for
    FlashAttention's, causal aligned to the end), gives the unshared per-sequence numbers under fp16 autocast."""
    import varlen_cpu

    varlen_cpu.register()
    idx = list(range(len(hard_pairs)))
    shared = pack(hard_pairs, idx, 2, 16, share_prompt=True)
    assert (shared["cu_seqlens_k"] != shared["cu_seqlens"]).any()  # some queries read more keys than their own
    (a, grad_a), (b, grad_b) = _run(arch, pack(hard_pairs, idx, 2, 16), "sdpa", torch.float16), _run(arch, shared, "varlen", torch.float16)
    for key in OUTPUTS:
        torch.testing.assert_close(b[key], a[key], atol=3e-3, rtol=3e-3, msg=key)
    assert (grad_b - grad_a).norm() < 3e-3 * grad_a.norm()
    if arch == "mistral":  # the window spans the shared prompt: without it the numbers differ
        policy = _model(arch)
        policy.config.sliding_window = None
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            unwindowed = PreferenceModel(policy, kernel="varlen")(shared)["logps"]
        assert (unwindowed - b["logps"]).abs().max() > 1e-2


def _groups(k: int, n: int = 4, seed: int = 0) -> list[tuple[list[int], list[list[int]]]]:
    rng = random.Random(seed)
    ids = lambda lo, hi: [rng.randrange(3, 400) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    return [(ids(0 if g == 0 else 5, 20), [ids(1, 1) if (g + j) % 3 == 0 else ids(1, 9) for j in range(k)]) for g in range(n)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_any_number_of_completions_per_prompt(k):
    """K completions per prompt (one segment each, prompt first; an empty prompt in group 0): the same per-token
    log-probs and gradients as each (prompt, completion) alone, numbered completion-major."""
    groups = _groups(k)
    alone = [(p, [c[j]]) for j in range(k) for p, c in groups]  # one sequence per segment: nothing shared
    shared, single = pack_shared(groups, range(4), 2), pack_shared(alone, range(4 * k), 2)
    assert shared["num_tokens"] == sum(len(p) + sum(map(len, c)) for p, c in groups)
    assert ("kv_index" in shared) == (k > 1)
    assert shared["token_target"].tolist() == single["token_target"].tolist()
    assert shared["completion_lengths"].tolist() == single["completion_lengths"].tolist()
    results = []
    for batch in (single, shared):
        policy = _model("llama")
        logps = PreferenceModel(policy, chunk_tokens=5)(batch)["logps"]
        (logps * torch.linspace(0.5, 1.5, logps.numel())).sum().backward()
        results.append((logps.detach(), torch.cat([p.grad.flatten() for p in policy.parameters()])))
    (a, grad_a), (b, grad_b) = results
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_b, grad_a, atol=1e-5, rtol=1e-4)
    if k == 1:  # and these are the model's own log-probs of each sequence run alone
        from prefopt.engine.attention import standard

        policy = _model("llama")
        with torch.no_grad(), standard(policy):
            own = [policy(input_ids=torch.tensor([p + c[0]])).logits[0].log_softmax(-1) for p, c in groups]
        want = torch.cat([o[max(len(p) - 1, 0) : -1].gather(-1, torch.tensor(p + c[0])[max(len(p), 1) :, None])[:, 0]
                          for o, (p, c) in zip(own, groups)])
        torch.testing.assert_close(a, want, atol=1e-5, rtol=1e-5)


def test_shared_layout_positions_and_key_pieces():
    """[prompt | c1 | c2 | c3]: positions continue from the prompt's end for every completion; the first piece is
    [prompt | c1] over its own keys, each later c_k reads [prompt | c_k]; a shared prompt's last position
    predicts each completion's first token."""
    batch = pack_shared([([5, 6, 7], [[8, 9], [10], [11, 12, 13]])], [0], pad_id=2, multiple_of=12)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 2, 2, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 3, 4, 5, 0, 1, 2]]
    assert batch["cu_host"].tolist() == [0, 5, 6, 9, 12]
    assert batch["kv_index"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 0, 1, 2, 6, 7, 8, 9, 10, 11]
    assert batch["cu_k_host"].tolist() == [0, 5, 9, 15, 18] and batch["max_seqlen_k"] == 6
    assert batch["token_index"].tolist() == [2, 3, 2, 2, 6, 7]
    assert batch["token_target"].tolist() == [8, 9, 10, 11, 12, 13]
    assert batch["completion_lengths"].tolist() == [2, 1, 3]
    # prompts with different numbers of completions (rankings of ragged K): c_1 of every prompt, then c_2 where present
    ragged = pack_shared([([1], [[2]]), ([4], [[5], [6]])], [0, 1], 2, multiple_of=5)
    assert ragged["position_ids"].tolist() == [[0, 1, 0, 1, 1]] and ragged["token_target"].tolist() == [2, 5, 6]
    assert ragged["token_index"].tolist() == [0, 2, 2] and ragged["kv_index"].tolist() == [0, 1, 2, 3, 2, 4]
    assert ragged["cu_k_host"].tolist() == [0, 2, 4, 6]


# ---------------------------------------------------------------- runs: shared and unshared train the same model


@pytest.fixture(scope="module")
def long_prompt_assets(tmp_path_factory):
    """Chats whose prompts are most of the tokens (some cut to max_prompt_length, some completions to max_length)."""
    from engine_helpers import word_rows, write_jsonl
    from prefopt.testing.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("long_prompts")
    train, held = word_rows(1, 48, prompt=(6, 30), completion=(1, 12)), word_rows(2, 8, prompt=(6, 30), completion=(1, 12))
    for r in train + held:  # completions apart from their first word: no cut makes a pair identical (refused)
        if r["chosen"].split()[0] == r["rejected"].split()[0]:
            r["rejected"] = "zz " + r["rejected"]
    tokenizer = build_tokenizer([r[k] for r in train + held for k in ("prompt", "chosen", "rejected")] * 4, vocab_size=128)
    tokenizer.save_pretrained(root / "tokenizer")
    return {"train": str(write_jsonl(root / "train.jsonl", train)), "eval": str(write_jsonl(root / "eval.jsonl", held)),
            "tokenizer": str(root / "tokenizer"), "vocab_size": len(tokenizer)}


def _train_both(assets, tmp_path, **settings) -> tuple[dict, dict]:
    """The same run unshared then shared; returns both configs."""
    from engine_helpers import make_config, train_raw

    common = dict(data__eval=assets["eval"], data__max_prompt_length=28, data__max_length=40, **settings)
    configs = {}
    for name, share in (("unshared", False), ("shared", True)):
        configs[name] = make_config(assets, tmp_path / name, share_prompt=share, **common)
        train_raw(configs[name])
    return configs["unshared"], configs["shared"]


def _assert_same_training(a: dict, b: dict, keys: tuple[str, ...], tol: float = 1e-5) -> None:
    from safetensors.torch import load_file

    from engine_helpers import assert_rows_close, assert_weights_close, eval_rows, read_metrics

    ra, rb = read_metrics(a["trainer"]["output_dir"]), read_metrics(b["trainer"]["output_dir"])
    assert_rows_close(ra, rb, keys, abs=tol, rel=tol)
    assert all(y["num_tokens"] < x["num_tokens"] for x, y in zip(ra, rb))  # the prompt computed once
    assert_rows_close(eval_rows(a["trainer"]["output_dir"]), eval_rows(b["trainer"]["output_dir"]), ("eval/loss", "eval/rewards/margins"),
                      abs=tol, rel=tol)
    saved = lambda c: {p.name: load_file(str(p)) for p in Path(c["trainer"]["output_dir"]).glob("*.safetensors")}  # noqa: E731
    wa, wb = saved(a), saved(b)  # the model, or a LoRA adapter
    assert wa and wa.keys() == wb.keys()
    for name in wa:
        assert_weights_close(wa[name], wb[name], atol=tol, rtol=tol)


def test_ten_steps_shared_and_unshared_with_a_cached_reference(long_prompt_assets, tmp_path, caplog):
    """A 10-step trajectory (DPO, cached reference computed shared in one run, unshared in the other): losses,
    rewards, gradient norms, held-out metrics and final weights within 1e-5; the two caches hold the same values."""
    from safetensors.torch import load_file

    caplog.set_level("INFO", logger="prefopt")
    a, b = _train_both(long_prompt_assets, tmp_path, max_steps=10, reference__batch_size=5)
    assert "shared prompts: on" in caplog.text and "shared prompts: off (set by trainer.share_prompt: false" in caplog.text
    _assert_same_training(a, b, ("loss", "rewards/margins", "rewards/chosen", "logps/rejected", "grad_norm"))
    files = {p.name: p for p in (tmp_path / "unshared" / "cache").glob("*.safetensors")}
    assert len(files) == 2 and {p.name for p in (tmp_path / "shared" / "cache").glob("*.safetensors")} == set(files)  # one key
    for file in files.values():
        for name, value in load_file(str(file)).items():
            torch.testing.assert_close(load_file(str(tmp_path / "shared" / "cache" / file.name))[name], value, atol=1e-5, rtol=1e-5)


class _TokenMean:
    """A loss reading per-token policy and (cached) reference log-probs, and the policy's per-token entropy."""

    @staticmethod
    def cls():
        from prefopt.losses.base import Feature, Loss, LossConfig, LossOutput, preference_loss, reward_metrics

        class TokenMean(Loss):
            name = "shared-token-mean"
            Config = LossConfig
            features = frozenset({Feature.POLICY_TOKEN_LOGPS, Feature.REF_TOKEN_LOGPS, Feature.TOKEN_ENTROPY})

            def forward(self, inputs):
                ratio = inputs.policy_token_logps.like(inputs.policy_token_logps.values - inputs.ref_token_logps.values)
                (c, r), (ec, er) = ratio.mean(), inputs.token_entropy.mean()
                losses = preference_loss(c - r) + 0.01 * (ec + er)
                return LossOutput(losses.mean(), losses, reward_metrics(c, r, inputs))

        return TokenMean


@pytest.mark.parametrize("setting", ["per-token-cache-budget", "live-kl-checkpointing", "lora"])
def test_shared_prompts_train_like_unshared_with_every_feature(setting, long_prompt_assets, tmp_path):
    """Per-token cached features with a token budget per forward; a live reference's token KL (TDPO) with
    gradient checkpointing; LoRA with the adapter-disabled reference. Three steps each, within 1e-5."""
    from prefopt.testing import registered

    settings = {
        "per-token-cache-budget": dict(loss={"name": "shared-token-mean"}, max_tokens_per_forward=150, reference__batch_size=3),
        "live-kl-checkpointing": dict(loss={"name": "tdpo", "variant": "tdpo2"}, reference__mode="live", gradient_checkpointing=True),
        "lora": dict(reference__mode="live", model__lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, lr=1e-2),
    }[setting]
    with registered(_TokenMean.cls()):
        a, b = _train_both(long_prompt_assets, tmp_path, max_steps=3, **settings)
    keys = ("loss", "rewards/margins", "grad_norm") + (("kl/chosen",) if "live-kl" in setting else ())
    _assert_same_training(a, b, keys)


def test_sharing_is_chosen_with_a_reason():
    from prefopt.engine.attention import choose_sharing
    from prefopt.errors import ConfigError

    llama = _model("llama")
    assert choose_sharing("auto", llama, True)[0] is True
    assert choose_sharing(False, llama, True) == (False, "set by trainer.share_prompt: false; each prompt computed once per completion")
    off, why = choose_sharing("auto", llama, False)
    assert not off and "packed batches" in why
    with pytest.raises(ConfigError, match="share_prompt: true, but it needs packed batches"):
        choose_sharing(True, llama, False)
    from transformers import AutoConfig, AutoModelForCausalLM

    bloom = AutoModelForCausalLM.from_config(AutoConfig.for_model("bloom", vocab_size=64, hidden_size=32, n_layer=1, n_head=4))
    off, why = choose_sharing("auto", bloom, True)  # ALiBi: positions from the layout, not from position ids
    assert not off and "bloom does not place tokens by position ids" in why


def test_a_failed_start_up_check_on_the_shared_layout_falls_back_to_unshared(long_prompt_assets, tmp_path, monkeypatch, caplog):
    """Where the start-up check (the engine's log-probs against the model's own forward) fails on the shared layout
    only (a model that takes position ids but does not place tokens by them), ``auto`` falls back to unshared and
    says why; ``true`` refuses to start. The failing check is stood in for on the shared batches."""
    from engine_helpers import make_config
    from prefopt.config import validate
    from prefopt.errors import ConfigError
    from prefopt.training import health
    from prefopt.training.run import setup

    real = health.check_start

    def check(policy, make_batch, pairs, *args, **kwargs):
        if "kv_index" in make_batch(pairs, [0, 1]):
            raise ConfigError("model: the engine's per-token log-probs differ from the model's own forward")
        return real(policy, make_batch, pairs, *args, **kwargs)

    monkeypatch.setattr(health, "check_start", check)
    caplog.set_level("INFO", logger="prefopt")
    run = setup(validate(make_config(long_prompt_assets, tmp_path / "auto", max_steps=1, reference__mode="live")))
    assert run.shared is False and "shared prompts: off (on the shared layout" in caplog.text
    assert "kv_index" not in run.make_batch(run.train_pairs, [0, 1])
    with pytest.raises(ConfigError, match="differ from the model's own forward"):
        setup(validate(make_config(long_prompt_assets, tmp_path / "true", max_steps=1, share_prompt=True)))
