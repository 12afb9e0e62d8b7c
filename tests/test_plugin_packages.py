"""The packages in plugins/ and examples/custom_loss, installed with pip as a user would.

They go into a temporary ``--target`` directory put on ``sys.path`` only for the
tests that ask for it, so the environment running the suite is left untouched.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from prefopt import LossInputs, Reference, build_loss
from prefopt.cli import commands as cli
from prefopt.config import load_config
from prefopt.errors import ConfigError
from prefopt.losses.base import reference_for
from prefopt.plugins import manager as plugins
from prefopt.plugins.registry import FIRST_PARTY, get_registry
from prefopt.testing import assert_matches_trl, trl_inputs
from prefopt.testing.trl import F_DIVERGENCE_LOSS_TYPES, TRL_LOSS_TYPES

REPO = Path(__file__).resolve().parents[1]
# package directory -> (distribution, import package, the losses it provides, the first one trained below)
PACKAGES = {
    "plugins/simpo": ("prefopt-simpo", "prefopt_simpo", ["simpo"]),
    "plugins/orpo": ("prefopt-orpo", "prefopt_orpo", ["orpo"]),
    "plugins/slic": ("prefopt-slic", "prefopt_slic", ["slic", "hinge"]),
    "plugins/robust": ("prefopt-robust", "prefopt_robust", ["robust"]),
    "plugins/wpo": ("prefopt-wpo", "prefopt_wpo", ["wpo"]),
    "plugins/ld-dpo": ("prefopt-ld-dpo", "prefopt_ld_dpo", ["ld_dpo"]),
    "plugins/trl-losses": ("prefopt-trl-losses", "prefopt_trl_losses", [
        "aot", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"]),
    "plugins/plackett-luce": ("prefopt-plackett-luce", "prefopt_plackett_luce", ["plackett_luce"]),
    "plugins/kto": ("prefopt-kto", "prefopt_kto", ["kto"]),
    "examples/custom_loss": ("prefopt-example-loss", "prefopt_example_loss", ["example_margin"]),
}
# loss name -> (package directory, distribution, import package)
LOSSES = {name: (directory, dist, module) for directory, (dist, module, names) in PACKAGES.items() for name in names}
REFERENCE_FREE = {"simpo", "orpo"}
PAIRWISE = [names[0] for _, _, names in PACKAGES.values() if names != ["kto"]]  # kto takes labelled completions, not pairs

INPUTS = LossInputs(
    policy_chosen_logps=[-4.0, -10.0, -1.0],
    policy_rejected_logps=[-6.0, -3.0, -21.0],
    chosen_tokens=[2, 5, 4],
    rejected_tokens=[3, 1, 7],
    ref_chosen_logps=[-4.5, -10.1, -0.1],
    ref_rejected_logps=[-5.0, -2.0, -0.1],
)


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every package pip-installed (offline, no dependencies) into one target directory."""
    root = tmp_path_factory.mktemp("plugin-packages")
    sources = []
    for directory in PACKAGES:
        # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
        dest = root / "src" / Path(directory).name
        shutil.copytree(REPO / directory, dest, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
        sources.append(str(dest))
    site = root / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    cmd += ["--disable-pip-version-check", "--target", str(site), *sources]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PIP_NO_INPUT": "1"})
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
    return site


def _reload_plugins() -> None:
    importlib.invalidate_caches()
    plugins.reset()


@pytest.fixture
def installed(plugin_site: Path, monkeypatch: pytest.MonkeyPatch):
    """The packages are importable and their entry points visible, for this test only."""
    monkeypatch.delenv("PREFOPT_LOAD_PLUGINS", raising=False)
    sys.path.insert(0, str(plugin_site))
    _reload_plugins()
    yield plugin_site
    sys.path.remove(str(plugin_site))
    for _, module, _ in PACKAGES.values():
        sys.modules.pop(module, None)
    _reload_plugins()


@pytest.fixture
def not_installed(monkeypatch: pytest.MonkeyPatch):
    """Only the built-in losses, whatever else the environment has installed."""
    monkeypatch.setenv("PREFOPT_LOAD_PLUGINS", "")
    _reload_plugins()
    yield
    monkeypatch.delenv("PREFOPT_LOAD_PLUGINS")
    _reload_plugins()


def test_each_package_provides_its_loss_by_name(installed):
    reg = get_registry()
    for name, (_, dist, module) in LOSSES.items():
        entry = reg.losses[name]
        assert (entry.dist, entry.version, entry.cls.__module__.split(".")[0]) == (dist, "0.1.0", module)
        loss = build_loss({"name": name})
        assert type(loss) is entry.cls
    assert not reg.conflicts and not reg.broken
    assert {name: dist for name, (_, dist, _) in LOSSES.items() if name in FIRST_PARTY} == FIRST_PARTY


def test_reference_free_losses_declare_no_reference(installed):
    for name in LOSSES:
        expected = Reference.NONE if name in REFERENCE_FREE else Reference.LOGPS
        assert reference_for(build_loss({"name": name}).needs) is expected, name
    # Combined with a built-in: the engine serves the most demanding term.
    assert reference_for(build_loss([{"name": "simpo"}, {"name": "orpo"}, {"name": "sft"}]).needs) is Reference.NONE
    assert reference_for(build_loss([{"name": "simpo"}, {"name": "dpo"}]).needs) is Reference.LOGPS


def test_plugins_command_lists_distributions_versions_and_losses(installed, capsys):
    assert cli.main(["plugins", "--json"]) == 0
    rows = {row["package"]: row for row in json.loads(capsys.readouterr().out)}
    for dist, _, names in PACKAGES.values():
        assert rows[dist]["version"] == "0.1.0" and sorted(rows[dist]["losses"]) == sorted(names) and rows[dist]["error"] is None
    assert {"dpo", "ipo", "sft", "tdpo"} <= set(rows["prefopt"]["losses"])
    assert cli.main(["plugins"]) == 0
    text = capsys.readouterr().out
    assert "prefopt-simpo 0.1.0 [simpo]: simpo" in text and "prefopt-example-loss 0.1.0 [example_margin]: example_margin" in text


def test_losses_command_names_the_providing_package(installed, capsys):
    assert cli.main(["losses", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["losses"]}
    assert rows["orpo"]["package"] == "prefopt-orpo" and rows["orpo"]["needs_reference"] == "none"
    assert rows["slic"]["needs_reference"] == "logps"
    assert rows["wpo"]["needs"] == [{"config": {}, "features": ["policy_logps", "policy_token_logps", "ref_logps", "token_logsumsq"], "reference": "logps"}]
    assert rows["ld_dpo"]["needs"][0]["features"] == ["policy_logps", "policy_token_logps", "ref_token_logps"]
    assert [f["name"] for f in rows["simpo"]["fields"]] == ["beta", "gamma"]
    assert (rows["dpo"]["takes"], rows["plackett_luce"]["takes"], rows["kto"]["takes"]) == (["pairs"], ["pairs", "rankings"], ["labelled"])
    assert rows["kto"]["needs"][0]["features"] == ["mismatched_logps", "policy_logps", "ref_logps"]


def test_weighted_combination_across_packages(installed):
    combined = build_loss([{"name": "simpo", "gamma": 1.0}, {"name": "sft", "weight": 0.2}, {"name": "slic", "weight": 0.5}])
    simpo = build_loss({"name": "simpo", "gamma": 1.0})(INPUTS)
    sft = build_loss({"name": "sft"})(INPUTS)
    slic = build_loss({"name": "slic"})(INPUTS)
    out = combined(INPUTS)
    torch.testing.assert_close(out.losses, simpo.losses + 0.2 * sft.losses + 0.5 * slic.losses)
    assert out.loss.item() == pytest.approx(simpo.loss.item() + 0.2 * sft.loss.item() + 0.5 * slic.loss.item())
    assert out.metrics["loss/simpo"].item() == pytest.approx(simpo.loss.item())
    assert out.metrics["loss/sft"].item() == pytest.approx(sft.loss.item())


def test_yaml_config_selects_a_plugin_loss(installed, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {config: {model_type: llama}, tokenizer: tok}\n"
        "data: {train: pairs.jsonl}\n"
        "loss:\n  - {name: orpo, beta: 0.25}\n  - {name: dpo, weight: 0.5}\n"
    )
    loss = load_config(path).build_loss()
    assert [(w, t.name) for w, t in loss.terms] == [(1.0, "orpo"), (0.5, "dpo")]
    assert loss.terms[0][1].config.beta == 0.25


def test_not_installed_loss_names_its_package(not_installed):
    builtin = ", ".join(sorted(get_registry().losses))
    assert "dpo, ipo, sft, sigmoid, tdpo" in builtin and "simpo" not in builtin
    with pytest.raises(ConfigError) as err:
        build_loss({"name": "simpo"})
    message = str(err.value)
    assert f"installed losses: {builtin}" in message
    assert "'simpo' is provided by the first-party package prefopt-simpo (pip install ./plugins/simpo from the prefopt repository)" in message


def test_not_installed_trl_names_point_to_their_packages(not_installed):
    with pytest.raises(ConfigError, match=r"'apo_zero' is provided by the first-party package prefopt-trl-losses \(pip install ./plugins/trl-losses "):
        build_loss({"name": "apo_zero"})
    with pytest.raises(ConfigError, match=r"'hinge' is provided by the first-party package prefopt-slic \(pip install ./plugins/slic "):
        build_loss({"name": "hinge"})


def test_not_installed_message_suggests_the_closest_name(not_installed):
    with pytest.raises(ConfigError, match=r"did you mean 'robust'\?.*prefopt-robust \(pip install ./plugins/robust"):
        build_loss({"name": "robust_dpo"})
    with pytest.raises(ConfigError) as err:
        build_loss({"name": "dpoo"})
    assert str(err.value).endswith(f"installed losses: {', '.join(sorted(get_registry().losses))}; did you mean 'dpo'?")


def test_each_package_passes_its_own_tests(plugin_site):
    dirs = [str(Path(directory) / "tests") for directory in PACKAGES]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), str(REPO)])}
    env.pop("PREFOPT_LOAD_PLUGINS", None)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q", *dirs]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # Only the comparisons with TRL may skip, and only where TRL is not installed.
    assert " passed" in result.stdout and ("skipped" not in result.stdout or importlib.util.find_spec("trl") is None)


def test_every_trl_loss_type_matches_trls_own_code(installed):
    """Each TRL 1.16 loss type, by its TRL name and parameters, against TRL's _compute_loss: float64, within 1e-9."""
    pytest.importorskip("trl")
    extra = {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.2}, "aot": {"label_smoothing": 0.1},
             "aot_unpaired": {"label_smoothing": 0.1}, "discopop": {"discopop_tau": 0.05}}
    inputs = trl_inputs(6, seed=7)
    for loss_type in TRL_LOSS_TYPES:
        divergences = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence") if loss_type in F_DIVERGENCE_LOSS_TYPES else ("reverse_kl",)
        for divergence in divergences:
            settings = {"beta": 0.7, **extra.get(loss_type, {}), "f_divergence_type": divergence, "f_alpha_divergence_coef": 0.4}
            ours = {k: v for k, v in settings.items() if not k.startswith("f_") or loss_type in F_DIVERGENCE_LOSS_TYPES}
            spec = {"name": "sft", "normalize": "token"} if loss_type == "sft" else {"name": loss_type, **ours}
            assert assert_matches_trl(build_loss(spec), loss_type, inputs, **settings) > 0, (loss_type, divergence)


def test_writing_a_loss_page_shows_the_example_package_verbatim():
    page = (REPO / "docs" / "writing-a-loss.md").read_text()
    example = REPO / "examples" / "custom_loss"
    for rel in ["pyproject.toml", "prefopt_example_loss/__init__.py", "tests/test_example_margin.py"]:
        assert (example / rel).read_text().strip() in page, f"docs/writing-a-loss.md is out of step with examples/custom_loss/{rel}"


def test_catalogue_lists_every_loss_with_its_package(installed):
    page = (REPO / "docs" / "loss-catalogue.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in page.splitlines() if line.startswith("| `")}
    for name, entry in get_registry().losses.items():
        row = rows.get(f"`{name}`")
        assert row is not None, f"docs/loss-catalogue.md does not list {name}"
        assert f"`{entry.dist}`" in row and entry.cls.reference.name in row, row


def _train_modules():
    try:
        from prefopt.testing import tiny
        from prefopt.training import trainer
    except ImportError as exc:
        pytest.skip(f"the training engine is not available yet ({exc})")
    return tiny, trainer


@pytest.mark.parametrize("name", PAIRWISE)
def test_trains_a_few_steps_with_each_package(name, installed, tmp_path):
    tiny, trainer = _train_modules()
    rows = [
        {"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.", "rejected": f" Maybe {i + 7}, or not."}
        for i in range(8)
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = tiny.build_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], vocab_size=128)
    tokenizer.save_pretrained(tmp_path / "tok")
    config = {
        "model": {"config": tiny.model_config("llama", vocab_size=len(tokenizer), hidden_size=32), "tokenizer": str(tmp_path / "tok")},
        "data": {"train": str(tmp_path / "pairs.jsonl"), "max_length": 64},
        "loss": {"name": name},
        "reference": {"cache_dir": str(tmp_path / "cache")},
        "trainer": {"max_steps": 2, "batch_size": 2, "output_dir": str(tmp_path / "out"), "lr": 1e-3},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    summary = trainer.train(load_config(path))
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    cache = tmp_path / "cache"
    if name in REFERENCE_FREE:  # no reference model: no reference forward, nothing cached
        assert summary["reference"] == "none"
        assert not cache.exists() or not any(cache.iterdir())
    else:
        assert summary["reference"] == "cache" and any(cache.iterdir())


def test_validate_checks_the_loss_takes_the_data(installed, capsys, tmp_path):
    examples = REPO / "examples"

    def validate(name: str, *sets: str) -> int:  # an output directory of the test's own: the examples' may hold a run
        return cli.main(["validate", str(examples / name), "--set", f"trainer.output_dir={tmp_path / 'run'}", *sets])

    assert validate("ranked.yaml") == 0
    assert validate("ranked.yaml", "--set", "loss.name=plackett_luce") == 0
    assert validate("unpaired.yaml") == 0
    capsys.readouterr()
    assert validate("ranked.yaml", "--set", "loss.name=kto") == 2
    err = capsys.readouterr().err
    assert "data.train: loss 'kto' takes labelled completions (prompt, completion, label), but this data holds rankings" in err
    assert "plackett_luce, or a pairwise loss with data.pairs_from" in err
    assert validate("unpaired.yaml", "--set", "loss.name=dpo") == 2
    assert "loss 'dpo' takes pairs (prompt, chosen, rejected), but this data holds labelled completions" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpo", "plackett_luce"])
def test_ranked_data_trains_a_pairwise_loss_through_pairs_from(name, installed, tmp_path):
    tiny, trainer = _train_modules()
    rows = [{"prompt": f"Question {i}:", "completions": [f" {i + 7}?", f" It is {2 * i}.", " No idea."], "scores": [1, 2, 0]}
            for i in range(6)]
    (tmp_path / "ranked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = tiny.build_tokenizer([r["prompt"] + "".join(r["completions"]) for r in rows], vocab_size=128)
    tokenizer.save_pretrained(tmp_path / "tok")
    config = {
        "model": {"config": tiny.model_config("llama", vocab_size=len(tokenizer), hidden_size=32), "tokenizer": str(tmp_path / "tok")},
        "data": {"train": str(tmp_path / "ranked.jsonl"), "max_length": 64, "pairs_from": "all_pairs"},
        "loss": {"name": name},
        "reference": {"cache_dir": str(tmp_path / "cache")},
        "trainer": {"max_steps": 2, "batch_size": 6, "output_dir": str(tmp_path / "out"), "lr": 1e-3},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    summary = trainer.train(load_config(path))
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # plackett_luce takes the rankings themselves (three completions: log 3! at the reference point), dpo their pairs
    start = math.log(6) if name == "plackett_luce" else math.log(2)
    assert summary["steps"] == 2 and [r["loss"] for r in rows if "loss" in r and "step" in r][0] == pytest.approx(start, abs=1e-4)
