"""The engine computes exactly the features a loss declares, from the cache or a live reference alike."""
from __future__ import annotations

import pytest
import torch
from pydantic import Field

from engine_helpers import assert_rows_close, make_config, read_metrics, train_raw, write_assets
from prefopt.config import validate
from prefopt.losses.base import Feature, Loss, LossConfig, LossInputs, LossOutput, preference_loss, reward_metrics
from prefopt.testing import registered

pytestmark = pytest.mark.usefixtures("one_torch_thread", "builtins_only")
SEEN: list[dict[str, bool]] = []


class TokenMeanConfig(LossConfig):
    beta: float = Field(1.0, gt=0, description="Inverse temperature.")


class TokenMeanDPO(Loss):
    """DPO on per-token mean log-ratios, built from the per-token features (cacheable reference)."""

    name = "token-mean-dpo"
    Config = TokenMeanConfig
    features = frozenset({Feature.POLICY_TOKEN_LOGPS, Feature.REF_TOKEN_LOGPS})

    def forward(self, inputs: LossInputs) -> LossOutput:
        SEEN.append({f: getattr(inputs, f) is not None for f in ("chosen_tokens", "ref_chosen_logps", "chosen_kl", "token_kl", "token_entropy")})
        ratio = inputs.policy_token_logps.like(inputs.policy_token_logps.values - inputs.ref_token_logps.values)
        chosen, rejected = ratio.mean()
        losses = preference_loss(self.config.beta * (chosen - rejected))
        return LossOutput(losses.mean(), losses, reward_metrics(chosen, rejected, inputs))


class EntropyBonus(Loss):
    """A reference-free loss reading only the policy's per-token entropy."""

    name = "entropy-bonus"
    Config = LossConfig
    features = frozenset({Feature.TOKEN_ENTROPY})

    def forward(self, inputs: LossInputs) -> LossOutput:
        SEEN.append({"ref": inputs.ref_chosen_logps is not None or inputs.ref_token_logps is not None, "tokens": inputs.chosen_tokens is not None})
        c, r = inputs.token_entropy.mean()
        losses = -(c + r)
        return LossOutput(losses.mean(), losses, {"entropy/chosen": c.detach().mean()})


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("assets"), n_train=48, n_eval=8)


def test_per_token_reference_from_the_cache_equals_the_live_one(assets, tmp_path):
    with registered(TokenMeanDPO):
        cached = make_config(assets, tmp_path / "cached", loss={"name": "token-mean-dpo"}, max_steps=3, reference__batch_size=5)
        live = make_config(assets, tmp_path / "live", loss={"name": "token-mean-dpo"}, max_steps=3, reference__mode="live")
        SEEN.clear()
        assert train_raw(cached)["reference"] == "cache"
        assert SEEN and not any(any(s.values()) for s in SEEN)  # nothing undeclared was computed or passed
        assert train_raw(live)["reference"] == "live"
    from safetensors import safe_open

    [cache_file] = (tmp_path / "cached" / "cache").glob("*.safetensors")
    with safe_open(str(cache_file), "pt") as f:
        assert "ref_token_logps" in f.keys()
    a, b = read_metrics(cached["trainer"]["output_dir"]), read_metrics(live["trainer"]["output_dir"])
    assert a[0]["loss"] == pytest.approx(0.6931471, abs=1e-6)  # policy == reference at the first step
    assert_rows_close(b, a, ("loss", "rewards/margins", "grad_norm"))


def test_sum_only_losses_cache_no_per_token_values(assets, tmp_path):
    raw = make_config(assets, tmp_path, max_steps=1)
    train_raw(raw)
    from safetensors import safe_open

    [cache_file] = (tmp_path / "cache").glob("*.safetensors")
    with safe_open(str(cache_file), "pt") as f:
        assert set(f.keys()) == {"ref_logps"}


def test_a_policy_only_feature_loads_no_reference(assets, tmp_path):
    with registered(EntropyBonus):
        raw = make_config(assets, tmp_path, loss={"name": "entropy-bonus"}, max_steps=2, lr=1e-2)
        SEEN.clear()
        summary = train_raw(raw)
    assert summary["reference"] == "none" and not (tmp_path / "cache").exists()
    assert SEEN and not any(s["ref"] or s["tokens"] for s in SEEN)
    rows = read_metrics(raw["trainer"]["output_dir"])
    assert rows[-1]["entropy/chosen"] > rows[0]["entropy/chosen"]  # maximising entropy raises it


def test_a_non_finite_reference_log_prob_is_refused_naming_the_row(assets, tmp_path, monkeypatch):
    from prefopt.engine import reference as ref
    from prefopt.errors import ConfigError
    from prefopt.training.run import setup

    real = ref.compute_ref_logps

    def one_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        out.sums[3, 1] = float("nan")  # as a bf16 overflow on one long row would give
        return out

    monkeypatch.setattr(ref, "compute_ref_logps", one_nan)
    with pytest.raises(ConfigError, match=r"data.train: the reference model's log-probs are not finite for 1 pairs \(first: row \d+\)"):
        setup(validate(make_config(assets, tmp_path)))
    assert not list((tmp_path / "cache").glob("*.safetensors"))  # nothing cached


def test_per_token_cache_shares_of_several_processes_add_up_to_the_whole(assets, tmp_path):
    """fill_cache's collective: each process fills its batches (zeros elsewhere) and the shares are summed."""
    from prefopt.data.batching import completion_tokens
    from prefopt.engine import reference as ref
    from prefopt.training.run import setup

    run = setup(validate(make_config(assets, tmp_path, loss={"name": "sft"})))
    pairs = run.train_pairs[:10]
    counts = [(completion_tokens(p.prompt_ids, p.chosen_ids), completion_tokens(p.prompt_ids, p.rejected_ids)) for p in pairs]
    batches = [run.make_batch(pairs, list(range(s, min(s + 3, 10)))) for s in range(0, 10, 3)]

    def forward(batch):
        with torch.no_grad():
            return run.model(batch)["logps"]

    whole = ref.compute_ref_logps(forward, batches, 10, False, counts)
    shares = [ref.compute_ref_logps(forward, batches[r::2], 10, False, counts) for r in (0, 1)]
    summed = shares[0].tokens + shares[1].tokens
    torch.testing.assert_close(summed, whole.tokens, atol=0, rtol=0)
    torch.testing.assert_close(whole.sums.sum(-1), torch.stack([whole.tokens[a:b].sum() for a, b in zip(whole.offsets[:-1], whole.offsets[1:])]), atol=1e-4, rtol=1e-5)
    tokens = whole.batch_tokens([4, 1], run.make_batch(pairs, [4, 1]))
    c, r = tokens.sum()
    torch.testing.assert_close(torch.stack([c, r], -1), whole.sums[[4, 1]], atol=1e-5, rtol=1e-5)
