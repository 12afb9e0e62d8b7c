"""prefopt.testing.losscheck: synthetic inputs of exactly the declared features, and the check run before training."""
from __future__ import annotations

import pytest
import torch

from prefopt import LossOutput, build_loss
from prefopt.losses import DPO
from prefopt.losses.base import TOKEN_FEATURES, Feature, Tokens
from prefopt.testing.losscheck import CASES, LossCheckError, smoke_test, synthetic_inputs


def test_inputs_hold_exactly_the_declared_features_with_sums_equal_to_token_sums():
    case = CASES["zero-token completion"]
    syn = synthetic_inputs(case, frozenset({Feature.REF_LOGPS, Feature.POLICY_TOKEN_LOGPS, Feature.TOKEN_ENTROPY}))
    inputs = syn.inputs
    assert inputs.chosen_tokens is None and inputs.chosen_kl is None and inputs.ref_token_logps is None
    assert inputs.token_kl is None and inputs.token_logsumsq is None
    assert isinstance(inputs.policy_token_logps, Tokens) and inputs.policy_token_logps.lengths.tolist() == [0, 0, 2, 0, 1, 0]
    c, r = inputs.policy_token_logps.sum()
    torch.testing.assert_close((c, r), (inputs.policy_chosen_logps, inputs.policy_rejected_logps))
    torch.testing.assert_close(torch.cat([c, r]), torch.tensor(case.policy))
    torch.testing.assert_close(inputs.ref_chosen_logps, torch.tensor(case.ref[:3]))
    values = inputs.policy_token_logps.values
    assert values[0] != values[1]  # the tokens of a completion differ: a per-token loss sees structure


def test_perturbing_a_pair_leaves_the_others_alone():
    case = CASES["ordinary"]
    full = frozenset({Feature.LENGTHS, Feature.REF_LOGPS, Feature.KL, *TOKEN_FEATURES})
    before, after = synthetic_inputs(case, full).inputs, synthetic_inputs(case.perturbed(0), full).inputs
    for name in ("policy_token_logps", "ref_token_logps", "token_kl", "token_entropy", "token_logsumsq"):
        a, b = getattr(before, name), getattr(after, name)
        for s in (1, 2, 3, 5, 6, 7):
            torch.testing.assert_close(a.values[a.offsets[s]:a.offsets[s + 1]], b.values[b.offsets[s]:b.offsets[s + 1]])
        assert a.lengths[0] != b.lengths[0] and a.lengths[4] != b.lengths[4]


def test_builtin_losses_pass():
    smoke_test(build_loss([{"name": "dpo"}, {"name": "tdpo", "variant": "tdpo2"}, {"name": "ipo"}, {"name": "sft", "weight": 0.1}]))


class _Scalar(DPO):
    name = "scalar_dpo"

    def forward(self, inputs):
        out = super().forward(inputs)
        return LossOutput(out.loss, out.loss, out.metrics)


class _Overflow(DPO):
    name = "overflow_dpo"

    def forward(self, inputs):
        out = super().forward(inputs)
        losses = out.losses * torch.exp(-10 * inputs.policy_chosen_logps)  # exp(500): inf in fp32
        return LossOutput(losses.mean(), losses, out.metrics)


@pytest.mark.parametrize("cls, message", [
    (_Scalar, r"loss 'scalar_dpo' \(test_losscheck\) failed on synthetic inputs, case 'ordinary': per-pair losses must have shape \(4,\), got \(\)"),
    (_Overflow, r"loss 'overflow_dpo' \(test_losscheck\) failed on synthetic inputs, case 'ordinary': non-finite loss: per-pair losses \["),
])
def test_a_broken_loss_is_named(cls, message):
    with pytest.raises(LossCheckError, match=message):
        smoke_test(cls())


def test_train_runs_the_check_before_loading_any_model(tmp_path, monkeypatch):
    """The Python API checks the loss as `prefopt train` does: before any model or data is loaded."""
    import prefopt.training.run
    from engine_helpers import make_config, write_assets
    from prefopt.config import validate
    from prefopt.testing import registered
    from prefopt.training.trainer import train

    assets = write_assets(tmp_path / "assets", n_train=16, n_eval=0)
    monkeypatch.setattr(prefopt.training.run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with registered(_Scalar), pytest.raises(LossCheckError, match=r"loss 'scalar_dpo' .* failed on synthetic inputs"):
        train(validate(make_config(assets, tmp_path, loss={"name": "scalar_dpo"})))
    assert not (tmp_path / "run").exists()
