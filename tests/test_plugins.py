"""The plugin system: entry points, pluggy hooks, the registry and its error messages."""
from __future__ import annotations

import importlib
import itertools
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import prefopt
from prefopt.cli import commands as cli
from prefopt.errors import ConfigError, PluginError
from prefopt.losses import DPO, LossInputs, Reference
from prefopt.plugins import manager as plugins
from prefopt.plugins import registry
from prefopt.plugins.registry import build_loss, get_loss_class, get_registry

_counter = itertools.count()

HINGE_PLUGIN = """
import torch
from pydantic import Field

import prefopt
from prefopt.losses.base import Loss, LossConfig, LossOutput, Reference, ref_logps, reward_metrics


class HingeConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Scale of the log-ratio margin.")


class Hinge(Loss):
    name = "{loss}"
    Config = HingeConfig
    reference = Reference.LOGPS

    def forward(self, inputs):
        rc, rr = ref_logps(inputs)
        chosen = inputs.policy_chosen_logps - rc
        rejected = inputs.policy_rejected_logps - rr
        losses = torch.relu(1 - self.config.beta * (chosen - rejected))
        return LossOutput(losses.mean(), losses, reward_metrics(chosen, rejected, inputs))


@prefopt.hookimpl
def register_losses():
    return [Hinge]
"""


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    """Every test starts and ends with no cached plugin manager or registry."""
    monkeypatch.delenv("PREFOPT_LOAD_PLUGINS", raising=False)
    before = set(sys.modules)
    importlib.invalidate_caches()
    plugins.reset()
    yield
    for name in set(sys.modules) - before:
        if name.startswith("fakeplug_"):
            del sys.modules[name]
    plugins.reset()
    importlib.invalidate_caches()


def fake_dist(root: Path, dist: str, entry_point: str, source: str, version: str = "1.0") -> str:
    """Write a module and a ``dist-info`` declaring it under the ``prefopt`` entry-point group."""
    module = f"fakeplug_{next(_counter)}_{dist.replace('-', '_')}"
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[prefopt]\n{entry_point} = {module}\n")
    return module


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on sys.path to write fake distributions into."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _reload() -> None:
    importlib.invalidate_caches()
    plugins.reset()


def _pair() -> LossInputs:
    return LossInputs(
        torch.tensor([-1.0, -2.0]),
        torch.tensor([-3.0, -1.0]),
        ref_chosen_logps=torch.tensor([-1.5, -2.0]),
        ref_rejected_logps=torch.tensor([-2.0, -2.0]),
    )


# ---------------------------------------------------------------- registering directly


class _Throwaway:
    def __init__(self, *classes):
        self.classes = list(classes)

    @prefopt.hookimpl
    def register_losses(self):
        return self.classes


def _loss_class(name: str, base=DPO):
    return type(f"Loss_{name}", (base,), {"name": name})


def test_throwaway_plugin_is_selectable_by_name(monkeypatch):
    monkeypatch.setenv("PREFOPT_LOAD_PLUGINS", "")
    cls = _loss_class("throwaway_dpo")
    plugins.get_plugin_manager().register(_Throwaway(cls), name="throwaway")
    registry.reset()
    loss = build_loss({"name": "throwaway_dpo", "beta": 0.5})
    assert type(loss) is cls and loss.config.beta == 0.5
    assert get_loss_class("throwaway_dpo") is cls
    torch.testing.assert_close(loss(_pair()).losses, DPO(beta=0.5)(_pair()).losses)
    assert get_registry().losses["throwaway_dpo"].dist == "throwaway"


def test_duplicate_loss_name_names_both_providers(site):
    fake_dist(site, "fake-one", "one", HINGE_PLUGIN.format(loss="clash"), version="1.2")
    fake_dist(site, "fake-two", "two", HINGE_PLUGIN.format(loss="clash"), version="3.4")
    _reload()
    assert "clash" in get_registry().conflicts and "clash" not in get_registry().losses
    with pytest.raises(PluginError) as err:
        get_loss_class("clash")
    assert "fake-one 1.2" in str(err.value) and "fake-two 3.4" in str(err.value)
    with pytest.raises(ConfigError, match=r"loss\.name: .*fake-one 1\.2.*fake-two 3\.4"):
        build_loss({"name": "clash"})


def test_duplicate_of_a_builtin_name_is_reported(site):
    fake_dist(site, "fake-shadow", "shadow", HINGE_PLUGIN.format(loss="dpo"))
    _reload()
    with pytest.raises(PluginError) as err:
        get_loss_class("dpo")
    message = str(err.value)
    assert "prefopt" in message and "fake-shadow 1.0" in message and "PREFOPT_LOAD_PLUGINS" in message
    assert get_loss_class("ipo").name == "ipo"  # the rest still work


def test_restricting_plugins_resolves_a_clash(site, monkeypatch):
    fake_dist(site, "fake-one", "one", HINGE_PLUGIN.format(loss="clash"))
    fake_dist(site, "fake-two", "two", HINGE_PLUGIN.format(loss="clash"))
    monkeypatch.setenv("PREFOPT_LOAD_PLUGINS", "two")
    _reload()
    assert get_registry().losses["clash"].dist == "fake-two"


def test_import_failure_names_distribution_and_entry_point(site, capsys):
    fake_dist(site, "fake-good", "good", HINGE_PLUGIN.format(loss="good_hinge"))
    fake_dist(site, "fake-broken", "brokenloss", "import not_a_real_module_xyz\n", version="0.3")
    _reload()
    [info] = [p for p in plugins.plugins() if p.error]
    assert (info.name, info.dist, info.version) == ("brokenloss", "fake-broken", "0.3")
    assert "'brokenloss'" in info.error and "fake-broken 0.3" in info.error and "not_a_real_module_xyz" in info.error
    # the others load; selecting the broken one raises its error
    assert get_loss_class("good_hinge").name == "good_hinge"
    with pytest.raises(ConfigError, match="fake-broken 0.3.*not_a_real_module_xyz"):
        build_loss({"name": "brokenloss"})
    with pytest.raises(ConfigError, match="plugins that failed to load: brokenloss"):
        build_loss({"name": "nonexistent"})
    # `prefopt losses` still lists the others and flags the broken one
    assert cli.main(["losses"]) == 0
    out = capsys.readouterr().out
    assert "dpo  (prefopt" in out and "good_hinge  (fake-good 1.0; reference: logps)" in out
    assert "BROKEN brokenloss (fake-broken 0.3)" in out and "not_a_real_module_xyz" in out


def test_misspelled_hook_is_caught_and_reported(site):
    fake_dist(
        site,
        "fake-typo",
        "typo",
        """
        import prefopt
        from prefopt.losses import DPO

        class Typo(DPO):
            name = "typo_dpo"

        @prefopt.hookimpl
        def register_loss():
            return [Typo]
        """,
    )
    _reload()
    [info] = [p for p in plugins.plugins() if p.error]
    assert info.dist == "fake-typo" and "register_loss" in info.error
    assert plugins.get_plugin_manager().get_plugin("typo") is None
    assert "typo_dpo" not in get_registry().losses
    assert "typo" in [p.name for p in get_registry().broken]


def test_a_hook_returning_a_non_loss_is_flagged(monkeypatch):
    monkeypatch.setenv("PREFOPT_LOAD_PLUGINS", "")
    plugins.get_plugin_manager().register(_Throwaway(object), name="junk")
    registry.reset()
    [bad] = get_registry().broken
    assert bad.name == "junk" and "not a prefopt.Loss subclass" in bad.error
    assert sorted(get_registry().losses) == ["dpo", "ipo", "sft", "sigmoid", "tdpo"]


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "spec,pattern",
    [
        ({"name": "dpo", "beta": -1}, r"loss\.beta: loss 'dpo': .*greater than 0"),
        ({"name": "dpo", "bta": 0.1}, r"loss\.bta: loss 'dpo': Extra inputs are not permitted"),
        ({"name": "dpo", "beta": "high"}, r"loss\.beta: loss 'dpo': .*valid number.*'high'"),
        ({"name": "tdpo"}, r"loss\.variant: loss 'tdpo': Field required"),
        ({"name": "tdpo", "variant": "tdpo3"}, r"loss\.variant: loss 'tdpo'"),
        ({"name": "dpo", "reference_free": "yes"}, r"loss\.reference_free: loss 'dpo'"),
        ({"beta": 0.1}, r"loss\.name: required"),
        ({"name": "dpo", "weight": 0.5}, r"loss\.weight: weights apply to a list"),
        ([{"name": "dpo"}, {"name": "sft", "weight": "x"}], r"loss\[1\]\.weight: must be a number"),
        ([{"name": "dpo", "beta": 0}, {"name": "ipo", "tau": -1}], r"loss\[0\]\.beta: .*\n.*loss\[1\]\.tau"),
        ([], r"loss: the list of losses is empty"),
        ("dpo", r"loss: expected a mapping"),
    ],
)
def test_bad_loss_config_names_loss_and_field(spec, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_loss(spec)


def test_plugin_loss_config_errors_name_the_plugin_loss(site):
    fake_dist(site, "fake-hinge", "hinge", HINGE_PLUGIN.format(loss="fake_hinge"))
    _reload()
    with pytest.raises(ConfigError, match=r"loss\.beta: loss 'fake_hinge': .*greater than 0"):
        build_loss({"name": "fake_hinge", "beta": -1})
    loss = build_loss({"name": "fake_hinge", "beta": 0.5})
    # relu(1 - beta * h) with h = [0.5 - (-1), 0 - 1]
    torch.testing.assert_close(loss(_pair()).losses, torch.tensor([0.25, 1.5]))


def test_unknown_name_lists_installed_and_suggests_closest(monkeypatch):
    monkeypatch.setenv("PREFOPT_LOAD_PLUGINS", "")
    with pytest.raises(ConfigError) as err:
        build_loss({"name": "tdpoo"})
    message = str(err.value)
    assert "unknown loss 'tdpoo'" in message
    assert "installed losses: dpo, ipo, sft, sigmoid, tdpo" in message
    assert "did you mean 'tdpo'?" in message


def test_unknown_name_with_nothing_close(monkeypatch):
    monkeypatch.setenv("PREFOPT_LOAD_PLUGINS", "")
    with pytest.raises(ConfigError) as err:
        build_loss({"name": "zzzzzz"})
    assert "installed losses: dpo, ipo, sft, sigmoid, tdpo" in str(err.value) and "did you mean" not in str(err.value)


# ---------------------------------------------------------------- PREFOPT_LOAD_PLUGINS


@pytest.fixture
def two_plugins(site):
    fake_dist(site, "fake-alpha", "alpha", HINGE_PLUGIN.format(loss="alpha_loss"))
    fake_dist(site, "fake-beta", "beta", HINGE_PLUGIN.format(loss="beta_loss"))


@pytest.mark.parametrize(
    "value,expected",
    [
        (None, {"alpha_loss", "beta_loss"}),
        ("", set()),
        ("alpha", {"alpha_loss"}),
        ("fake-beta", {"beta_loss"}),  # a distribution name selects too
        (" alpha , fake-beta ,", {"alpha_loss", "beta_loss"}),
        ("nothing-like-it", None),  # an error naming the installed plugins
    ],
)
def test_load_plugins_env(two_plugins, monkeypatch, value, expected):
    if value is not None:
        monkeypatch.setenv("PREFOPT_LOAD_PLUGINS", value)
    _reload()
    if expected is None:
        with pytest.raises(PluginError, match=r"'nothing-like-it', which no installed plugin has; .*fake-alpha \(alpha\), fake-beta \(beta\)"):
            get_registry()
        return
    names = set(get_registry().losses)
    assert names & {"alpha_loss", "beta_loss"} == expected
    assert {"dpo", "ipo", "sft", "tdpo"} <= names  # built-ins are always there


def test_same_entry_point_name_in_two_distributions_loads_both(site):
    fake_dist(site, "fake-left", "shared", HINGE_PLUGIN.format(loss="left_loss"))
    fake_dist(site, "fake-right", "shared", HINGE_PLUGIN.format(loss="right_loss"))
    _reload()
    loaded = sorted((p.name, p.dist) for p in plugins.plugins() if p.name == "shared")
    assert loaded == [("shared", "fake-left"), ("shared", "fake-right")]
    assert get_registry().losses["left_loss"].dist == "fake-left"
    assert get_registry().losses["right_loss"].dist == "fake-right"


def test_same_entry_point_name_and_same_loss_is_a_reported_clash(site):
    fake_dist(site, "fake-left", "shared", HINGE_PLUGIN.format(loss="same_loss"))
    fake_dist(site, "fake-right", "shared", HINGE_PLUGIN.format(loss="same_loss"), version="2.0")
    _reload()
    with pytest.raises(PluginError, match="fake-left 1.0.*fake-right 2.0"):
        get_loss_class("same_loss")


def test_reference_needs_of_the_builtins(monkeypatch):
    from prefopt.losses.base import reference_for

    monkeypatch.setenv("PREFOPT_LOAD_PLUGINS", "")
    needs = {name: e.cls.reference for name, e in get_registry().losses.items()}
    assert needs == {"dpo": Reference.LOGPS, "sigmoid": Reference.LOGPS, "ipo": Reference.LOGPS, "tdpo": Reference.TOKEN_KL, "sft": Reference.NONE}
    assert reference_for(build_loss({"name": "dpo", "reference_free": True}).needs) is Reference.NONE
