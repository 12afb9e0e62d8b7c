"""Checks a wrong loss cannot fake: the engine's log-ratio metrics, the end-of-run sign warning,
every kit case before training, and a loss that breaks during training stopping the run by name."""
from __future__ import annotations

import pytest
import torch

from engine_helpers import eval_rows, make_config, read_metrics, train_raw, write_assets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOGRATIOS = ("logratios/chosen", "logratios/rejected", "logratios/margins", "logratios/accuracies")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("assets"), n_train=48, n_eval=16)


# ---------------------------------------------------------------- logratios/* from the log-probs alone


def test_logratios_are_the_dpo_rewards_over_beta(assets, tmp_path):
    """DPO's rewards are beta * (policy - reference) log-ratios: the engine's metrics, computed without the loss, agree."""
    beta = 0.25
    raw = make_config(assets, tmp_path, loss={"name": "dpo", "beta": beta}, max_steps=4, data__eval=assets["eval"])
    train_raw(raw)
    out = raw["trainer"]["output_dir"]
    rows = read_metrics(out)
    evals = eval_rows(out)
    assert len(rows) == 4 and len(evals) == 2
    for row, prefix in [(r, "") for r in rows] + [(r, "eval/") for r in evals]:
        for name in ("chosen", "rejected", "margins"):
            assert row[f"{prefix}logratios/{name}"] * beta == pytest.approx(row[f"{prefix}rewards/{name}"], abs=1e-6)
        assert row[f"{prefix}logratios/accuracies"] == pytest.approx(row[f"{prefix}rewards/accuracies"], abs=1e-6)
    assert evals[0]["eval/logratios/margins"] == 0.0 and evals[0]["eval/logratios/accuracies"] == 0.0  # policy == reference
    assert evals[-1]["eval/logratios/margins"] > 0


@pytest.mark.slow
def test_logratios_come_from_a_reference_the_loss_does_not_read(assets, tmp_path):
    """SFT reads no reference: with reference.mode live the engine still runs one for the metrics, and the loss's
    inputs are unchanged (same losses as a run without a reference); with no reference, no logratios/* at all."""
    sft = {"name": "sft"}
    live = make_config(assets, tmp_path / "live", loss=sft, max_steps=3, data__eval=assets["eval"], reference__mode="live")
    none = make_config(assets, tmp_path / "none", loss=sft, max_steps=3, data__eval=assets["eval"])
    assert train_raw(live)["reference"] == "live" and train_raw(none)["reference"] == "none"
    with_ref, without = read_metrics(live["trainer"]["output_dir"]), read_metrics(none["trainer"]["output_dir"])
    assert [r["loss"] for r in with_ref] == pytest.approx([r["loss"] for r in without], abs=1e-6)
    assert all(set(LOGRATIOS) <= r.keys() for r in with_ref)
    assert not any(k.startswith("logratios/") for r in without for k in r)
    evals = eval_rows(live["trainer"]["output_dir"])
    assert evals[0]["eval/logratios/chosen"] == 0.0 and evals[0]["eval/logratios/rejected"] == 0.0
    assert evals[-1]["eval/logratios/chosen"] > 0  # SFT raises the chosen completions' log-probs


# ---------------------------------------------------------------- the end-of-run sign warning


def _flipped_dpo():
    """DPO with its margin's sign wrong, reporting rewards that look like success (as such a bug would)."""
    from prefopt.losses.base import Loss, LossOutput, log_ratios, preference_loss, reward_metrics
    from prefopt.losses.dpo import DPOConfig

    class FlippedDPO(Loss):
        name = "flipped_dpo"
        Config = DPOConfig

        def forward(self, inputs):
            chosen, rejected = log_ratios(inputs)
            beta = self.config.beta
            losses = preference_loss(beta * (rejected - chosen))
            return LossOutput(losses.mean(), losses, reward_metrics(beta * rejected, beta * chosen, inputs))

    return FlippedDPO


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpo", "flipped_dpo"])
def test_a_sign_flipped_loss_ends_with_a_warning_and_an_honest_one_does_not(assets, tmp_path, name):
    from prefopt.testing import registered
    from prefopt.training.trainer import format_summary

    raw = make_config(assets, tmp_path, loss={"name": name, "beta": 0.1}, max_steps=6, data__eval=assets["eval"])
    with registered(_flipped_dpo()):
        summary = train_raw(raw)
    rows = read_metrics(raw["trainer"]["output_dir"])
    assert rows[-1]["loss"] < rows[0]["loss"]  # both "succeed" by their own loss
    assert summary["after"]["eval/rewards/margins"] > 0  # and by their own rewards
    printed = format_summary(summary)
    if name == "dpo":
        assert summary["after"]["eval/logratios/margins"] > 0
        assert "warnings" not in summary and "WARNING" not in printed
    else:
        assert summary["after"]["eval/logratios/margins"] < 0
        assert len(summary["warnings"]) == 1 and "may have its sign wrong" in summary["warnings"][0]
        assert "WARNING: the loss may have its sign wrong" in printed


def test_the_sign_warning_needs_the_margin_down_and_the_loss_down():
    from prefopt.training.health import sign_warning

    before, down, up = {"eval/logratios/margins": 0.0}, {"eval/logratios/margins": -0.5}, {"eval/logratios/margins": 0.5}
    assert "sign wrong" in sign_warning(before, down, 0.69, 0.4)
    assert sign_warning(before, up, 0.69, 0.4) is None  # the margin rose
    assert sign_warning(before, down, 0.69, 0.8) is None  # the loss rose too: a failed run, not a sign error
    assert sign_warning({}, {}, 0.69, 0.4) is None  # no reference: no log-ratios, nothing to say


# ---------------------------------------------------------------- every kit case before training


def _nan_on_empty():
    """DPO divided by the completion lengths unclamped: NaN (0/0) on an empty completion, fine otherwise."""
    from prefopt.losses.base import Feature, LossOutput, log_ratios, preference_loss, reward_metrics
    from prefopt.losses.dpo import DPO

    class PerTokenDPO(DPO):
        name = "per_token_dpo"
        features = frozenset({Feature.REF_LOGPS, Feature.LENGTHS})

        @property
        def needs(self):
            return frozenset(self.features) | {Feature.POLICY_LOGPS}

        def forward(self, inputs):
            chosen, rejected = log_ratios(inputs)
            chosen, rejected = chosen / inputs.chosen_tokens, rejected / inputs.rejected_tokens
            losses = preference_loss(self.config.beta * (chosen - rejected))
            return LossOutput(losses.mean(), losses, reward_metrics(chosen, rejected, inputs))

    return PerTokenDPO


def test_validate_fails_a_loss_that_is_nan_on_an_empty_completion_naming_the_case(assets, tmp_path, capsys):
    import yaml

    from prefopt.cli import commands as cli
    from prefopt.testing import registered

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(make_config(assets, tmp_path, loss={"name": "per_token_dpo"})))
    with registered(_nan_on_empty()):
        assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error: loss 'per_token_dpo' (" in err and "case 'zero-token completion': non-finite loss" in err, err


# ---------------------------------------------------------------- a loss that breaks during training


def _breaks_in_training(how: str):
    """DPO that passes the pre-training check (its cases have at most 4 pairs) and breaks on a training batch of 8."""
    import sys

    from prefopt.losses.base import LossOutput
    from prefopt.losses.dpo import DPO

    class Breaks(DPO):
        name = f"breaks_{how}"

        def forward(self, inputs):
            out = super().forward(inputs)
            if inputs.policy_chosen_logps.shape[0] <= 4:
                return out
            if how == "exit":
                sys.exit(0)
            return LossOutput(out.loss.detach(), out.losses.detach(), out.metrics)

    return Breaks


@pytest.mark.parametrize("how, message", [("detached", "returned a loss without a gradient"), ("exit", "called sys.exit(0) during training")])
def test_a_loss_that_breaks_during_training_stops_the_run_by_name(assets, tmp_path, capsys, how, message):
    import yaml

    from prefopt.cli import commands as cli
    from prefopt.testing import registered

    cls = _breaks_in_training(how)
    raw = make_config(assets, tmp_path, loss={"name": cls.name}, max_steps=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    with registered(cls):
        assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: loss '{cls.name}' (prefopt.testing-" in err and message in err, err
    assert not (tmp_path / "run" / "model.safetensors").exists()


# ---------------------------------------------------------------- bounds, spelling, plugin selection


def test_the_kit_flags_numeric_config_fields_without_a_bound():
    from pydantic import Field

    from prefopt.losses.base import LossConfig
    from prefopt.losses.dpo import DPO
    from prefopt.testing import check_loss

    class LooseConfig(LossConfig):
        beta: float = Field(0.1, description="Inverse temperature.")
        scale: int | None = Field(None, description="Optional scale.")
        flag: bool = Field(False, description="A switch (not a number).")

    class Loose(DPO):
        name = "loose_dpo"
        Config = LooseConfig

    with pytest.raises(AssertionError, match=r"numeric config fields without a bound: beta, scale;"):
        check_loss(Loose)


@pytest.mark.parametrize("loss, message", [
    ({"name": "dpo", "beta": -0.1}, "loss.beta: loss 'dpo': Input should be greater than 0"),
    ({"name": "tdpo", "variant": "tdpo2", "alpha": -1.0}, "loss.alpha: loss 'tdpo': Input should be greater than or equal to 0"),
    ({"name": "dpo", "betta": 0.1}, "loss.betta: loss 'dpo': Extra inputs are not permitted (got 0.1); did you mean 'beta'?"),
    ([{"name": "dpo"}, {"name": "sft", "weight": -0.2}], "loss[1].weight: must be a number >= 0 (got -0.2)"),
])
def test_bad_loss_parameters_are_refused_by_name(builtins_only, loss, message):
    from prefopt.errors import ConfigError
    from prefopt.plugins.registry import build_loss

    with pytest.raises(ConfigError) as info:
        build_loss(loss)
    assert message in str(info.value)


def test_prefopt_losses_shows_the_bounds(builtins_only, capsys):
    from prefopt.cli import commands as cli

    assert cli.main(["losses"]) == 0
    out = capsys.readouterr().out
    assert "beta: float, default 0.1, > 0. " in out and "label_smoothing: float, default 0.0, >= 0, < 0.5. " in out


def test_an_unknown_plugin_name_in_prefopt_load_plugins_is_an_error_naming_the_installed_ones(tmp_path, monkeypatch, capsys):
    import sys

    from engine_helpers import write_plugin_dist
    from prefopt.cli import commands as cli
    from prefopt.plugins import manager

    site = tmp_path / "site"
    write_plugin_dist(site, "prefopt-margin", {"prefopt_margin_plugin": "import prefopt\n"})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PREFOPT_LOAD_PLUGINS", "prefopt-margni")
    manager.reset()
    try:
        assert cli.main(["losses"]) == 2
        err = capsys.readouterr().err
        assert "PREFOPT_LOAD_PLUGINS names 'prefopt-margni', which no installed plugin has" in err, err
        assert "prefopt-margin (prefopt_margin_plugin)" in err and "did you mean 'prefopt-margin'?" in err, err
        monkeypatch.setenv("PREFOPT_LOAD_PLUGINS", "prefopt-margin")
        manager.reset()
        assert cli.main(["losses"]) == 0
    finally:
        manager.reset()
    assert "prefopt_margin_plugin" in sys.modules


# ---------------------------------------------------------------- TR-DPO: reference.sync


def _tiny_llama(seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from prefopt.testing.tiny import model_config

    torch.manual_seed(seed)
    params = model_config("llama", vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, max_position=32)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(params.pop("model_type"), **params)).double()


@pytest.mark.slow  # importing TRL takes seconds
def test_sync_reference_is_trls_soft_update_in_float64():
    import copy

    from prefopt.engine.modeling import PreferenceModel

    policy, reference = _tiny_llama(0), _tiny_llama(1)
    reference.requires_grad_(False)
    start = {n: p.clone() for n, p in reference.named_parameters()}
    mix = 0.3
    trl_copy = copy.deepcopy(reference)
    PreferenceModel(policy, reference).sync_reference(mix)
    for (name, ref), (_, pol) in zip(reference.named_parameters(), policy.named_parameters(), strict=True):
        assert ref.dtype == torch.float64
        torch.testing.assert_close(ref, mix * pol.detach() + (1 - mix) * start[name], rtol=1e-15, atol=1e-15)
    trl = pytest.importorskip("trl.trainer.callbacks")
    with torch.no_grad():
        trl.SyncRefModelCallback._sync_target_model(policy, trl_copy, mix)
    for a, b in zip(reference.parameters(), trl_copy.parameters(), strict=True):
        assert torch.equal(a, b)


def test_reference_sync_is_refused_where_there_is_nothing_to_sync(assets, tmp_path):
    from prefopt.config import validate
    from prefopt.errors import ConfigError
    from prefopt.training.preflight import preflight

    sync = {"every": 2, "mix": 0.5}
    with pytest.raises(ConfigError, match="reference.sync updates the reference during training, which needs reference.mode live or auto"):
        validate(make_config(assets, tmp_path, reference__mode="cache", reference__sync=sync))
    free = validate(make_config(assets, tmp_path, loss={"name": "dpo", "reference_free": True}, reference__sync=sync))
    with pytest.raises(ConfigError, match="reference.sync: the loss is reference-free"):
        preflight(free, hub=False)
    preflight(validate(make_config(assets, tmp_path, reference__sync=sync)), hub=False)  # auto: a live reference


def _checkpoint(out, step: int) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    path = out / "checkpoints" / f"step-{step:07d}"
    policy = {k.removeprefix("policy."): v for k, v in load_file(str(path / "model.safetensors")).items()}
    return policy, load_file(str(path / "reference.safetensors"))


@pytest.mark.slow
def test_reference_sync_trains_and_resumes_exactly(assets, tmp_path, monkeypatch):
    import prefopt.training.trainer as trainer

    common = dict(max_steps=4, save_every=2, reference__sync={"every": 2, "mix": 0.5})
    whole = make_config(assets, tmp_path / "whole", **common)
    assert train_raw(whole)["reference"] == "live"
    out = tmp_path / "whole" / "run"
    policy2, ref2 = _checkpoint(out, 2)
    policy4, ref4 = _checkpoint(out, 4)
    assert ref2.keys() == policy4.keys()
    for name in ref4:  # the update at step 4, from the step-2 reference and the step-4 policy
        expected = 0.5 * policy4[name].double() + 0.5 * ref2[name].double()
        torch.testing.assert_close(ref4[name].double(), expected, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(ref2[n], policy2[n]) for n in ref2)  # half-way: neither the old reference nor the policy

    broken = make_config(assets, tmp_path / "broken", **common)
    real, calls = trainer.forward_backward, {"n": 0}

    def crash_on_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "forward_backward", crash_on_third_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_raw(broken)
    monkeypatch.setattr(trainer, "forward_backward", real)
    train_raw(broken, resume=True)
    resumed = tmp_path / "broken" / "run"
    assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in read_metrics(out)]
    for a, b in zip(_checkpoint(out, 4), _checkpoint(resumed, 4)):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------- metric conventions: WPO at step 0, LD-DPO's logps


def _plugin_class(monkeypatch, directory: str, module: str, name: str):
    """A first-party plugin's loss class, imported from its directory in this repository."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "plugins" / directory))
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("name, mode", [("wpo", "cache"), ("wpo", "live"), ("dpo", "cache")])
def test_policy_equal_to_reference_gives_exactly_zero_margins_and_accuracy(assets, tmp_path, monkeypatch, name, mode):
    """At step 0 the policy's log-prob sums equal the reference's bit for bit, in held-out rows and in the first
    training row (batched unlike the cache's batches), also for WPO, which reads the policy's per-token statistics."""
    from prefopt.testing import registered

    wpo = _plugin_class(monkeypatch, "wpo", "prefopt_wpo", "WPO")
    raw = make_config(assets, tmp_path, loss={"name": name, "beta": 0.1}, max_steps=1, data__eval=assets["eval"], reference__mode=mode)
    with registered(wpo):
        before = train_raw(raw)["before"]
    first = read_metrics(raw["trainer"]["output_dir"])[0]
    for row, prefix in ((before, "eval/"), (first, "")):
        assert row[f"{prefix}logratios/chosen"] == 0.0 and row[f"{prefix}logratios/rejected"] == 0.0
        assert row[f"{prefix}logratios/accuracies"] == 0.0 and row[f"{prefix}rewards/accuracies"] == 0.0
