import math

import pytest
import torch

from prefopt import LossInputs, build_loss
from prefopt.errors import ConfigError
from prefopt.losses import DPO
from prefopt.testing import assert_matches_trl, check_loss, registered, trl_inputs
from prefopt_trl_losses import LOSSES, AOT, AOTUnpaired, DiscoPOP

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL offers another f-divergence with these only (DPOTrainer.__init__ refuses the others).
WITH_F_DIVERGENCE = {"exo_pair", "discopop", "sigmoid_norm"}
SETTINGS = {"exo_pair": {"label_smoothing": 1e-3}, "aot": {"label_smoothing": 0.1}, "aot_unpaired": {"label_smoothing": 0.2},
            "discopop": {"discopop_tau": 0.05}}
CASES = [
    (cls.name, {"beta": beta, **SETTINGS.get(cls.name, {}), **({"f_divergence_type": fd} if fd != "reverse_kl" else {})})
    for cls in LOSSES for fd in (F_DIVERGENCES if cls.name in WITH_F_DIVERGENCE else ("reverse_kl",))
    for beta in ((0.1, 2.0) if fd == "reverse_kl" else (0.5,))
]


def at_reference(beta: float = 0.1) -> LossInputs:
    logps = torch.tensor([-3.0, -7.5], dtype=torch.float64)
    return LossInputs(policy_chosen_logps=logps.clone(), policy_rejected_logps=logps - 1, ref_chosen_logps=logps,
                      ref_rejected_logps=logps - 1, chosen_tokens=[3, 8], rejected_tokens=[2, 9])


@pytest.mark.parametrize("cls", LOSSES, ids=lambda c: c.name)
def test_conformance(cls):
    f_configs = [{"f_divergence_type": fd, "f_alpha_divergence_coef": 0.3} for fd in F_DIVERGENCES[1:]]
    check_loss(cls, configs=[None, {"beta": 1.5}, *(f_configs if cls.name in WITH_F_DIVERGENCE else [])])


@pytest.mark.parametrize("name, settings", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_matches_trls_own_code(name, settings):
    pytest.importorskip("trl")
    with registered(*LOSSES):
        loss = build_loss({"name": name, **settings})
    for seed in range(2):
        assert assert_matches_trl(loss, name, trl_inputs(seed=seed), **settings) > 0


@pytest.mark.parametrize("name, expected", [
    ("nca_pair", 2 * math.log(2)), ("bco_pair", 2 * math.log(2)), ("sppo_hard", 0.5 / 0.1**2), ("apo_zero", 1.0),
    ("apo_down", 1.0), ("discopop", 0.5 * math.log(2) + 0.5), ("sigmoid_norm", math.log(2)), ("aot", math.log(2)),
    ("aot_unpaired", math.log(2)), ("exo_pair", 0.5 * (math.log(0.5) - math.log1p(-1e-3)) + 0.5 * (math.log(0.5) - math.log(1e-3))),
])
def test_closed_form_at_the_reference_point(name, expected):
    with registered(*LOSSES):
        out = build_loss({"name": name, "beta": 0.1})(at_reference())
    torch.testing.assert_close(out.losses, torch.full((2,), expected, dtype=torch.float64))


def test_discopop_rises_with_the_margin_at_zero_as_its_sign_exemption_says():
    # d loss / d x at x = 0 is -3/4 + (1 - ln 2) / (4 tau): positive below tau = (1 - ln 2) / 3.
    for tau in (0.05, 0.5):
        inputs = at_reference()
        inputs.policy_chosen_logps.requires_grad_()
        DiscoPOP(beta=0.1, discopop_tau=tau)(inputs).loss.backward()
        slope = -0.75 + (1 - math.log(2)) / (4 * tau)
        torch.testing.assert_close(inputs.policy_chosen_logps.grad, torch.full((2,), 0.1 * slope / 2, dtype=torch.float64))


def test_aot_of_one_pair_is_dpo_and_a_batch_ignores_pair_order():
    inputs = trl_inputs(6, seed=3, extreme=False)
    for cls in (AOT, AOTUnpaired):
        assert cls.couples_pairs
        one = LossInputs(**{k: v[:1] for k, v in vars(inputs).items() if v is not None})
        torch.testing.assert_close(cls(beta=0.3)(one).losses, DPO(beta=0.3)(one).losses)
        order = torch.randperm(6, generator=torch.Generator().manual_seed(0))
        shuffled = LossInputs(**{k: v[order] for k, v in vars(inputs).items() if v is not None})
        torch.testing.assert_close(cls(beta=0.3)(shuffled).loss, cls(beta=0.3)(inputs).loss)


def test_selectable_by_trl_name_with_trl_parameters_only():
    with registered(*LOSSES):
        for cls in LOSSES:
            assert type(build_loss({"name": cls.name, "beta": 0.2})) is cls
        with pytest.raises(ConfigError, match=r"loss\.f_divergence_type: loss 'nca_pair': Extra inputs are not permitted"):
            build_loss({"name": "nca_pair", "f_divergence_type": "js_divergence"})
        with pytest.raises(ConfigError, match=r"loss\.label_smoothing: loss 'exo_pair': Input should be greater than 0"):
            build_loss({"name": "exo_pair", "label_smoothing": 0.0})
