"""Chunked per-token log-probs and KL against the naive full-logits computation."""
from __future__ import annotations

import pytest
import torch

from prefopt.engine.logprobs import IGNORE_INDEX, chunked_token_logps, naive_token_kl, naive_token_logps
from prefopt.engine.modeling import PreferenceModel

N, T, H, V = 4, 9, 16, 37


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _labels(gen: torch.Generator) -> torch.Tensor:
    """Labels with a masked prompt, right padding, one fully masked row and one completion of a single token."""
    labels = torch.randint(0, V, (N, T), generator=gen)
    labels[0, :3] = IGNORE_INDEX  # prompt of 3, completion to the end
    labels[1, :2] = IGNORE_INDEX
    labels[1, 6:] = IGNORE_INDEX  # padding
    labels[2, :] = IGNORE_INDEX  # no completion tokens at all
    labels[3, :-1] = IGNORE_INDEX  # a single completion token, the last position
    return labels


def _setup(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, T, H, generator=gen, dtype=torch.float64)
    ref_hidden = hidden + 0.3 * torch.randn(N, T, H, generator=gen, dtype=torch.float64)
    head = torch.nn.Linear(H, V, bias=True, dtype=torch.float64)
    ref_head = torch.nn.Linear(H, V, bias=True, dtype=torch.float64)
    with torch.no_grad():
        for p in (*head.parameters(), *ref_head.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return hidden, ref_hidden, head, ref_head, _labels(gen)


CHUNKS = [1, 3, 7, 10_000]  # 1, uneven, and more than the number of completion positions


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_logps_match_naive_values_and_gradients(chunk):
    hidden, _, head, _, labels = _setup()
    h1 = hidden.clone().requires_grad_(True)
    got = chunked_token_logps(h1, head, labels, chunk)["logps"]
    assert got.shape == (N, T - 1) and got.dtype == torch.float32
    (got * torch.arange(1, T, dtype=torch.float32)).sum().backward()  # position-weighted, so the gradient is not uniform
    g_hidden, g_weight, g_bias = h1.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    head.zero_grad()

    h2 = hidden.clone().requires_grad_(True)
    want = naive_token_logps(head(h2), labels)
    (want * torch.arange(1, T, dtype=torch.float64)).sum().backward()

    torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_hidden, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_weight, head.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_bias, head.bias.grad, atol=1e-5, rtol=1e-5)
    # masked positions are exactly zero and get no gradient; the row without completion sums to 0
    mask = labels[:, 1:] != IGNORE_INDEX
    assert torch.all(got[~mask] == 0)
    assert got[2].abs().sum() == 0 and torch.all(g_hidden[2] == 0)
    assert torch.all(got[mask] < 0)
    assert int(mask[3].sum()) == 1 and got[3, -1] < 0


def test_chunked_logps_match_explicit_formula():
    hidden, _, head, _, labels = _setup(1)
    got = chunked_token_logps(hidden, head, labels, 4)["logps"]
    logits = head(hidden)
    for i in range(N):
        for t in range(T - 1):
            y = labels[i, t + 1].item()
            want = 0.0 if y == IGNORE_INDEX else (logits[i, t, y] - torch.logsumexp(logits[i, t], -1)).item()
            assert got[i, t].item() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_kl_matches_naive_values_and_gradients(chunk):
    hidden, ref_hidden, head, ref_head, labels = _setup(2)
    h1 = hidden.clone().requires_grad_(True)
    out = chunked_token_logps(h1, head, labels, chunk, ref_hidden, ref_head)
    assert set(out) == {"logps", "kl", "ref_logps"}
    (out["logps"].sum() + 2.0 * out["kl"].sum()).backward()
    g_hidden, g_weight = h1.grad.clone(), head.weight.grad.clone()
    assert ref_head.weight.grad is None  # no gradient ever reaches the reference
    head.zero_grad()

    h2 = hidden.clone().requires_grad_(True)
    pol_logits, ref_logits = head(h2), ref_head(ref_hidden)
    logps, kl = naive_token_logps(pol_logits, labels), naive_token_kl(ref_logits, pol_logits, labels)
    (logps.sum() + 2.0 * kl.sum()).backward()

    torch.testing.assert_close(out["logps"].double(), logps.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["kl"].double(), kl.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["ref_logps"].double(), naive_token_logps(ref_logits, labels).double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_hidden, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_weight, head.weight.grad, atol=1e-5, rtol=1e-5)
    mask = labels[:, 1:] != IGNORE_INDEX
    assert torch.all(out["kl"][mask] > 0) and torch.all(out["kl"][~mask] == 0)


def test_kl_is_zero_when_policy_is_reference_and_never_negative():
    hidden, ref_hidden, head, ref_head, labels = _setup(3)
    same = chunked_token_logps(hidden, head, labels, 5, hidden, head)
    assert same["kl"].abs().max().item() < 1e-6
    torch.testing.assert_close(same["ref_logps"], same["logps"])
    for scale in (0.01, 1.0, 10.0):
        other = chunked_token_logps(hidden, head, labels, 5, hidden + scale * ref_hidden, ref_head)
        assert other["kl"].min().item() >= -1e-6
    assert naive_token_kl(head(hidden), head(hidden), labels).abs().max().item() < 1e-12


def test_all_positions_masked_gives_zeros_and_a_zero_gradient():
    hidden, ref_hidden, head, ref_head, labels = _setup(4)
    labels[:] = IGNORE_INDEX
    h = hidden.clone().requires_grad_(True)
    out = chunked_token_logps(h, head, labels, 3, ref_hidden, ref_head)
    for key in ("logps", "kl", "ref_logps"):
        assert out[key].shape == (N, T - 1) and torch.all(out[key] == 0)
    assert torch.all(chunked_token_logps(hidden, head, labels, 3)["logps"] == 0)


def test_bf16_hidden_states_still_give_fp32_log_probs():
    hidden, _, head, _, labels = _setup(5)
    head_bf16 = torch.nn.Linear(H, V, dtype=torch.bfloat16)
    with torch.no_grad():
        head_bf16.weight.copy_(head.weight)
        head_bf16.bias.copy_(head.bias)
    out = chunked_token_logps(hidden.bfloat16(), head_bf16, labels, 4)["logps"]
    assert out.dtype == torch.float32
    want = naive_token_logps(head_bf16(hidden.bfloat16()), labels)  # same bf16 logits, fp32 log-softmax
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def _tiny_llama(seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from prefopt.testing.tiny import model_config

    torch.manual_seed(seed)
    cfg = model_config("llama", vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, max_position=32)
    params = dict(cfg)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(params.pop("model_type"), **params))
    return model.eval()


def _batch():
    gen = torch.Generator().manual_seed(7)
    input_ids = torch.randint(3, V, (N, T), generator=gen)
    attention_mask = torch.ones(N, T, dtype=torch.long)
    attention_mask[1, 6:] = 0
    input_ids[1, 6:] = 2  # pad
    labels = input_ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[attention_mask == 0] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _engine(batch: dict) -> dict:
    """The padded batch in the engine's layout: per-position targets and the flat index of completion positions."""
    labels = batch["labels"]
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return {**batch, "targets": targets, "token_index": (targets.reshape(-1) != IGNORE_INDEX).nonzero()[:, 0]}


def _dense(flat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Flat per-token values back into the ``(N, T-1)`` layout of the naive functions (zero where masked)."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return torch.zeros(mask.shape).masked_scatter(mask, flat)


@pytest.mark.parametrize("chunk", [1, 512])
def test_preference_model_matches_full_logits_of_a_tiny_llama(chunk):
    policy, reference = _tiny_llama(0), _tiny_llama(1)
    batch = _batch()
    module = PreferenceModel(policy, reference, chunk_tokens=chunk)
    engine = _engine(batch)
    out = {k: _dense(v, batch["labels"]) for k, v in module(engine, reference="kl").items()}
    with torch.no_grad():
        pol_logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(out["logps"], naive_token_logps(pol_logits, batch["labels"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["ref_logps"], naive_token_logps(ref_logits, batch["labels"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["kl"], naive_token_kl(ref_logits, pol_logits, batch["labels"]), atol=1e-5, rtol=1e-5)

    logps_only = module(engine, reference="logps")
    assert set(logps_only) == {"logps", "ref_logps"}
    torch.testing.assert_close(_dense(logps_only["ref_logps"], batch["labels"]), out["ref_logps"], atol=1e-6, rtol=1e-6)
    assert set(module(engine)) == {"logps"}

    # gradients through the chunked path equal those through the full logits
    policy.zero_grad()
    module(engine)["logps"].sum().backward()
    chunked = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    naive_token_logps(logits, batch["labels"]).sum().backward()
    for name, p in policy.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert all(p.grad is None for p in reference.parameters())


def test_padding_does_not_change_a_rows_log_probs():
    policy = _tiny_llama(2)
    batch = _batch()
    module = PreferenceModel(policy)
    full = _dense(module(_engine(batch))["logps"], batch["labels"])
    row = {k: v[1:2, :6] for k, v in batch.items()}  # row 1 without its padding
    alone = _dense(module(_engine(row))["logps"], row["labels"])
    torch.testing.assert_close(full[1, :5], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.all(full[1, 5:] == 0)
