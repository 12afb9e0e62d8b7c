"""Packed batches: the same numbers as padded ones, bounded shapes, token budgets, and no host reads per step.

The packed layout is what the GPU path runs on (variable-length attention, no padding);
CPU runs the same layout through per-sequence SDPA, so these tests pin what carries over.
"""
from __future__ import annotations

import random

import pytest
import torch

from engine_helpers import assert_rows_close, make_config, train_raw, write_assets
from prefopt.config import validate
from prefopt.data.batching import batch_order, collate, pack, pair_length, pair_tokens, split_by_tokens
from prefopt.data.pairs import Pair
from prefopt.engine.modeling import PreferenceModel, frozen_copy, load_model
from prefopt.losses.base import Feature, LossInputs, Tokens
from prefopt.training.run import use_packed_attention
from prefopt.training.step import loss_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FEATURES = frozenset(Feature)


def _pairs(n: int, vocab: int, seed: int = 0, empty_prompt: bool = False) -> list[Pair]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [] if empty_prompt and i == 0 else [rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))]
        chosen = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))]
        rejected = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 12))]
        out.append(Pair(prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected, row=i))
    return out


def _model(arch: str, vocab: int = 64, seed: int = 0, kv_heads: int | None = None):
    from prefopt.config import ModelConfig
    from prefopt.testing.tiny import model_config

    torch.manual_seed(seed)
    params = model_config(arch, vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, max_position=64)
    if kv_heads is not None:
        params["num_key_value_heads"] = kv_heads
    cfg = ModelConfig(config=params, tokenizer="unused")
    return load_model(cfg)


def _features(model: PreferenceModel, batch: dict, reference: str = "kl") -> tuple[LossInputs, dict]:
    out = model(batch, reference=reference, stats=True)
    return loss_inputs(out, batch, FEATURES), out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_packed_batches_give_the_padded_numbers_and_gradients(arch):
    pairs = _pairs(5, 64, empty_prompt=True)
    idx = list(range(len(pairs)))
    kv = 2 if arch == "qwen2" else None
    padded_policy = _model(arch, kv_heads=kv)
    reference = frozen_copy(_model(arch, seed=1, kv_heads=kv))  # a different reference, so the KL is not zero
    packed_policy = _model(arch, kv_heads=kv)
    packed_ref = frozen_copy(reference)
    use_packed_attention(packed_policy)
    use_packed_attention(packed_ref)
    results = []
    for policy, ref, batch in ((padded_policy, reference, collate(pairs, idx, 2)), (packed_policy, packed_ref, pack(pairs, idx, 2, 16))):
        model = PreferenceModel(policy, ref, chunk_tokens=7)
        inputs, _ = _features(model, batch)
        objective = (inputs.policy_chosen_logps - 0.5 * inputs.policy_rejected_logps).sum() + inputs.token_kl.values.sum() \
            + inputs.token_entropy.values.sum() + 0.3 * inputs.token_logsumsq.values.sum()
        objective.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
        results.append((inputs, grads))
    (a, grads_a), (b, grads_b) = results
    for name in ("policy_chosen_logps", "policy_rejected_logps", "chosen_kl", "rejected_kl"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5, msg=name)
    for name in ("policy_token_logps", "ref_token_logps", "token_kl", "token_entropy", "token_logsumsq"):
        torch.testing.assert_close(getattr(a, name).values, getattr(b, name).values, atol=1e-5, rtol=1e-5, msg=name)
    assert a.policy_token_logps.offsets == b.policy_token_logps.offsets
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_log_probs_are_the_models_own():
    """Each completion token's log-prob equals log_softmax of the model's own logits for that sequence alone."""
    pairs = _pairs(3, 64, seed=3)
    policy = _model("llama")
    own = []
    with torch.no_grad():
        for seq in [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]:
            ids = torch.tensor([seq[0] + seq[1]])
            logp = policy(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            own.append(logp[len(seq[0]) - 1 :])
    use_packed_attention(policy)
    with torch.no_grad():
        out = PreferenceModel(policy)(pack(pairs, range(3), 2, 64))
    torch.testing.assert_close(out["logps"], torch.cat(own), atol=1e-5, rtol=1e-5)


def test_tokens_layout_helpers():
    values = torch.arange(1.0, 8.0)
    t = Tokens.from_lengths(values, [2, 0, 3, 2])  # chosen: 2 and 0 tokens; rejected: 3 and 2
    c, r = t.sum()
    assert c.tolist() == [3.0, 0.0] and r.tolist() == [12.0, 13.0]
    cm, rm = t.mean()
    assert cm.tolist() == [1.5, 0.0] and rm.tolist() == [4.0, 6.5]
    rows, mask = t.padded()
    assert rows.tolist() == [[1, 2, 0], [0, 0, 0], [3, 4, 5], [6, 7, 0]]
    assert mask.sum(1).tolist() == [2, 0, 3, 2]
    assert t.position.tolist() == [0, 1, 0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="lengths sum to 6"):
        Tokens.from_lengths(values, [2, 2, 1, 1])


def test_packed_row_shapes_are_bounded_per_epoch():
    pairs = _pairs(200, 64, seed=5)
    lengths = [pair_length(p) for p in pairs]
    shapes = {tuple(pack([pairs[i] for i in b], b, 2, 64)["input_ids"].shape) for b in batch_order(lengths, 8, 0, 0)}
    widths = {w for _, w in shapes}
    assert all(w % 64 == 0 for w in widths)
    most = max(sum(pair_tokens(p) for p in pairs[i : i + 8]) for i in range(0, 200, 8))
    assert len(widths) <= -(-max(most, max(widths)) // 64)  # at most one shape per 64-token bucket
    padded = {collate([pairs[i] for i in b], b, 2)["input_ids"].shape for b in batch_order(lengths, 8, 0, 0)}
    assert len(shapes) < len(padded)


@pytest.mark.parametrize("tokens", [1, 7, 9, 100, 257, 1000, 6400, 70_000])
def test_default_row_rounding_is_small_and_coarse(tokens):
    from prefopt.data.batching import row_width

    width = row_width(tokens)
    assert tokens <= width < tokens + max(8, tokens / 16)
    octave = [row_width(n) for n in range(max(1, tokens // 2), tokens + 1)]
    assert len(set(octave)) <= 33  # at most 32 widths per doubling (plus the boundary)


def test_split_by_tokens_keeps_pairs_whole_and_within_budget():
    tokens = [10, 30, 25, 5, 50, 8]
    assert split_by_tokens(range(6), tokens, 40) == [[0, 1], [2, 3], [4], [5]]  # 50 > 40: a forward of its own
    assert split_by_tokens(range(3), tokens, None) == [[0, 1, 2]]
    # as many forwards as another process needs: the largest splits first, order kept
    assert split_by_tokens(range(6), tokens, 40, at_least=5) == [[0], [1], [2, 3], [4], [5]]
    assert split_by_tokens(range(6), tokens, None, at_least=3) == [[0, 1], [2], [3, 4, 5]]  # halves by tokens: 65 | 63, then 40 | 25
    for k in range(1, 7):
        groups = split_by_tokens(range(6), tokens, 1000, at_least=k)
        assert len(groups) == k and [i for g in groups for i in g] == list(range(6))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("assets"), n_train=64, n_eval=8)


def test_token_budget_forwards_train_like_one_batch(assets, tmp_path):
    """A step split into token-budget forwards gives the losses, gradients and weights of the unsplit batch."""
    from engine_helpers import assert_weights_close, final_weights, read_metrics

    common = dict(max_steps=3, group_by_length=False, reference__batch_size=32, batch_size=8, schedule="cosine", warmup_steps=1)
    whole = make_config(assets, tmp_path / "whole", **common)
    split = make_config(assets, tmp_path / "split", max_tokens_per_forward=60, **common)
    train_raw(whole)
    train_raw(split)
    a, b = read_metrics(whole["trainer"]["output_dir"]), read_metrics(split["trainer"]["output_dir"])
    assert_rows_close(b, a, ("loss", "rewards/margins", "grad_norm", "lr", "num_tokens"))
    assert_weights_close(final_weights(whole["trainer"]["output_dir"]), final_weights(split["trainer"]["output_dir"]))


def test_packed_and_padded_runs_train_the_same_model(assets, tmp_path):
    from engine_helpers import assert_weights_close, final_weights, read_metrics

    common = dict(max_steps=3, reference__batch_size=8, loss={"name": "tdpo", "variant": "tdpo2"})
    packed = make_config(assets, tmp_path / "packed", **common)
    padded = make_config(assets, tmp_path / "padded", packing=False, **common)
    train_raw(packed)
    train_raw(padded)
    a, b = read_metrics(packed["trainer"]["output_dir"]), read_metrics(padded["trainer"]["output_dir"])
    assert_rows_close(b, a, ("loss", "rewards/margins", "kl/chosen", "grad_norm"))
    for x in a:
        pad = x["padding_fraction"]
        assert x["num_tokens"] * pad / (1 - pad) < 64 + 0.5  # packed: only the rounding tail of one row is padding
    assert_weights_close(final_weights(packed["trainer"]["output_dir"]), final_weights(padded["trainer"]["output_dir"]))


@pytest.mark.parametrize("loss", [{"name": "dpo"}, {"name": "tdpo", "variant": "tdpo1"}], ids=["cached", "live"])
def test_one_host_read_per_optimiser_step(assets, tmp_path, loss):
    """Forward, backward, clipping, the flag read and the optimiser step read the device once."""
    from prefopt.engine.syncs import SyncCounter
    from prefopt.training import health
    from prefopt.training.run import setup
    from prefopt.training.step import forward_backward, read_flags

    run = setup(validate(make_config(assets, tmp_path, loss=loss, max_tokens_per_forward=80)))
    model, acc = run.model, run.accelerator
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)  # as the trainer builds it on CUDA
    model, optimizer = acc.prepare(model, optimizer)
    groups = split_by_tokens(range(8), [pair_tokens(p) for p in run.train_pairs], 80)
    assert len(groups) > 1
    batches = [run.make_batch(run.train_pairs, g, "train") for g in groups]
    weights = [len(g) / 8 for g in groups]
    for _ in range(2):  # the second step runs with warm optimiser state
        with SyncCounter() as syncs:
            result = forward_backward(run, model, batches, weights, params)
            finite, stopping, weights_ok = read_flags(run, result, False, health.weights_finite(params))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert finite and not stopping and weights_ok
        assert syncs.count == 1, dict(syncs.ops)


def test_the_sync_counter_sees_reads_and_blocking_copies_to_a_device():
    """What makes a CUDA host wait: reads, and copies from host memory that are not non-blocking
    (the ``meta`` device stands in for a GPU). In stand-in mode, a tensor made from Python data counts
    too (on a GPU it would be such a copy); one filled on the device does not."""
    from prefopt.engine.syncs import SyncCounter

    host = torch.ones(3)
    with SyncCounter(device_only=True) as c:
        host.to("meta")
        torch.empty(3, device="meta").copy_(host)
        host.to("meta", non_blocking=True)
        host.sum().item()  # a CPU tensor: the GPU is not waited for
    assert dict(c.ops) == {"to_device": 2}
    with SyncCounter() as c:
        torch.tensor(1.0)
        torch.full((), 1.0)
        host.sum().item()
        host.tolist()
    assert dict(c.ops) == {"from_python": 1, "_local_scalar_dense": 1, "tolist": 1}


def test_varlen_branch_lays_out_tensors_as_the_kernel_expects():
    """The CUDA branch through torch's varlen_attn, on CPU kernels that check FlashAttention's input layout."""
    import varlen_cpu

    varlen_cpu.register()
    varlen_cpu.calls.clear()
    pairs = _pairs(4, 64, seed=7)
    policy = _model("qwen2", kv_heads=2)  # grouped-query attention: 4 query heads, 2 key/value heads
    use_packed_attention(policy)
    batch = pack(pairs, range(4), 2, 32)
    from prefopt.errors import ConfigError

    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as on a GPU: q, k, v reach the kernel in bf16
            expected = PreferenceModel(policy, kernel="sdpa")(batch)["logps"]
            got = PreferenceModel(policy, kernel="varlen")(batch)["logps"]
        with pytest.raises(ConfigError, match="varlen .* needs trainer.precision bf16 or fp16"):
            PreferenceModel(policy, kernel="varlen")(batch)  # fp32 without autocast
    assert len(varlen_cpu.calls) == policy.config.num_hidden_layers
    torch.testing.assert_close(got, expected, atol=0.03, rtol=0.03)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"], ids=["grouped-query", "sliding-window"])
def test_the_real_varlen_op_gives_the_per_sequence_log_probs_and_gradients(arch):
    """The GPU branch through torch's own ``varlen_attn`` (its custom op, autograd formula and argument checks),
    with CPU kernels standing in for FlashAttention's (``tests/varlen_cpu.py``), under fp16 autocast."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import varlen_cpu

    varlen_cpu.register()
    if arch == "qwen2":
        policy = _model("qwen2", kv_heads=2)
    else:  # a window of 4 tokens: shorter than most sequences
        torch.manual_seed(0)
        policy = AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "mistral", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, sliding_window=4))
    use_packed_attention(policy)
    batch = pack(_pairs(4, 64, seed=7), range(4), 2, 32)
    got = {}
    for kernel in ("sdpa", "varlen"):
        policy.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            logps = PreferenceModel(policy, kernel=kernel)(batch)["logps"]
        logps.sum().backward()
        got[kernel] = logps.detach(), torch.cat([p.grad.flatten() for p in policy.parameters()])
    (a, grad_a), (b, grad_b) = got["sdpa"], got["varlen"]
    torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-3)
    assert (grad_b - grad_a).norm() < 2e-3 * grad_a.norm()
    if arch == "mistral":  # the window matters here: without it the numbers differ
        policy.config.sliding_window = None
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            unwindowed = PreferenceModel(policy, kernel="varlen")(batch)["logps"]
        assert (unwindowed - b).abs().max() > 1e-2


def test_attention_choice_is_explicit():
    from prefopt.engine.attention import choose_kernel
    from prefopt.errors import ConfigError

    assert choose_kernel("auto", torch.device("cpu"), True)[0] == "sdpa"
    assert choose_kernel("auto", torch.device("cpu"), False)[0] == "sdpa"
    assert choose_kernel("eager", torch.device("cpu"), False)[0] == "eager"
    with pytest.raises(ConfigError, match="varlen needs CUDA"):
        choose_kernel("varlen", torch.device("cpu"), True)
    with pytest.raises(ConfigError, match="eager needs padded"):
        choose_kernel("eager", torch.device("cpu"), True)


def test_gradient_checkpointing_recomputes_packed_attention_exactly(assets, tmp_path):
    """Recomputed layers in backward get the packed-attention arguments again: same losses and gradients."""
    from engine_helpers import read_metrics

    common = dict(max_steps=2, reference__mode="live", loss={"name": "tdpo", "variant": "tdpo1"})
    plain = make_config(assets, tmp_path / "plain", **common)
    checkpointed = make_config(assets, tmp_path / "gc", gradient_checkpointing=True, **common)
    train_raw(plain)
    train_raw(checkpointed)
    a, b = read_metrics(plain["trainer"]["output_dir"]), read_metrics(checkpointed["trainer"]["output_dir"])
    for x, y in zip(a, b, strict=True):
        assert (x["loss"], x["grad_norm"]) == pytest.approx((y["loss"], y["grad_norm"]), abs=1e-6)


def test_a_run_that_picks_varlen_sets_up_checks_caches_and_trains(assets, tmp_path, monkeypatch):
    """What auto picks on a GPU (varlen, bf16), through torch's varlen op on CPU kernels: the cache, training and
    evaluation go through it; so does a live reference with the token KL (TDPO), and gradient checkpointing
    recomputes the varlen layers exactly."""
    import prefopt.engine.attention as attention
    import varlen_cpu
    from engine_helpers import read_metrics

    varlen_cpu.register()
    varlen_cpu.calls.clear()
    monkeypatch.setattr(attention, "choose_kernel", lambda *a: ("varlen", "as on a GPU"))
    raw = make_config(assets, tmp_path / "cached", precision="bf16", max_steps=2, data__eval=assets["eval"])
    summary = train_raw(raw)
    assert summary["steps"] == 2 and varlen_cpu.calls
    live = dict(precision="bf16", max_steps=2, reference__mode="live", loss={"name": "tdpo", "variant": "tdpo1"})
    plain, checkpointed = (make_config(assets, tmp_path / name, gradient_checkpointing=gc, **live)
                           for name, gc in (("plain", False), ("gc", True)))
    train_raw(plain)
    train_raw(checkpointed)
    a, b = read_metrics(plain["trainer"]["output_dir"]), read_metrics(checkpointed["trainer"]["output_dir"])
    assert a[0]["kl/chosen"] == 0.0  # the bf16 reference equals the policy under autocast at step 0
    for x, y in zip(a, b, strict=True):
        assert (x["loss"], x["grad_norm"], x["kl/chosen"]) == pytest.approx((y["loss"], y["grad_norm"], y["kl/chosen"]), abs=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_reference_held_in_bf16_computes_what_the_policy_computes_under_autocast(arch):
    """The live reference keeps its linear layers in the training precision (no casts per forward, less memory)
    and still gives the fp32 policy's numbers under autocast: at step 0, log-ratios and KL are exactly zero."""
    policy = _model(arch)
    reference = frozen_copy(policy, torch.bfloat16)
    linear = [m for m in reference.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    assert linear and all(m.weight.dtype == torch.bfloat16 or m.weight is reference.get_input_embeddings().weight for m in linear)
    held = sum(p.numel() * p.element_size() for p in reference.parameters())
    assert held < 0.8 * sum(p.numel() * 4 for p in reference.parameters())
    use_packed_attention(policy)
    batch = pack(_pairs(4, 64, seed=2), range(4), 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = PreferenceModel(policy, reference)(batch, reference="kl")
    assert torch.equal(out["logps"], out["ref_logps"])
    assert out["kl"].abs().max() < 1e-6


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_completion_tokens_are_the_targets_at_token_index_even_with_empty_sequences(layout):
    """Gathering the targets at token_index gives every completion token in order, whatever the lengths (empty ones too)."""
    pairs = [Pair([5, 6], [7, 8, 9], [10], row=0), Pair([], [11, 12], [13], row=1), Pair([], [], [14, 15, 16], row=2),
             Pair([17], [], [18, 19], row=3)]
    batch = pack(pairs, range(4), 2, 8) if layout == "packed" else collate(pairs, range(4), 2)
    assert batch["targets"].shape == batch["input_ids"].shape
    want = [t for p in pairs for t in (p.chosen_ids if p.prompt_ids else p.chosen_ids[1:])]
    want += [t for p in pairs for t in (p.rejected_ids if p.prompt_ids else p.rejected_ids[1:])]
    assert batch["targets"].reshape(-1)[batch["token_index"]].tolist() == want
    assert batch["completion_lengths"].tolist() == [3, 1, 0, 0, 1, 0, 2, 2]


def test_evaluation_and_the_reference_cache_keep_the_token_budget(assets, tmp_path, monkeypatch):
    """No forward outside training goes over max_tokens_per_forward either (held-out data, cache), and the held-out
    metrics are those of whole batches."""
    from prefopt.engine.modeling import PreferenceModel

    widths = []
    real = PreferenceModel._hidden

    def spy(self, model, batch):
        widths.append(batch["num_tokens"])
        return real(self, model, batch)

    budget = 120
    whole = train_raw(make_config(assets, tmp_path / "whole", max_steps=1, data__eval=assets["eval"]))
    monkeypatch.setattr(PreferenceModel, "_hidden", spy)
    split = train_raw(make_config(assets, tmp_path / "split", max_steps=1, data__eval=assets["eval"], max_tokens_per_forward=budget))
    assert widths and max(widths) <= budget
    for key in ("eval/loss", "eval/rewards/margins", "eval/logps/chosen"):
        assert split["before"][key] == pytest.approx(whole["before"][key], abs=1e-5), key
