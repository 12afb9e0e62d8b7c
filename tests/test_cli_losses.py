"""`prefopt losses`: every loss with its package, version and documented config fields."""
from __future__ import annotations

import json

import pytest

from prefopt.cli import commands as cli
from prefopt.losses import DPO, IPO, SFT, TDPO
from prefopt.plugins import manager as plugins
from prefopt.plugins.registry import describe

pytestmark = pytest.mark.usefixtures("builtins_only")


def _run(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def test_losses_text(capsys):
    out = _run(capsys, "losses")
    version = plugins.plugin_info("prefopt").version
    assert f"dpo  (prefopt {version}; reference: logps)" in out
    assert f"ipo  (prefopt {version}; reference: logps)" in out
    assert f"tdpo  (prefopt {version}; reference: token_kl)" in out
    assert f"sft  (prefopt {version}; reference: none)" in out
    assert "    beta: float, default 0.1, > 0. Inverse temperature: strength of the implicit KL penalty." in out
    assert "    average_log_probs: bool, default True. Average log-ratios over completion tokens" in out
    assert "    variant: Literal['tdpo1', 'tdpo2'], required. tdpo1:" in out
    assert "CONFLICT" not in out and "BROKEN" not in out


def test_losses_json(capsys):
    data = json.loads(_run(capsys, "losses", "--json"))
    assert data["conflicts"] == {} and data["broken"] == []
    rows = {row["name"]: row for row in data["losses"]}
    assert list(rows) == ["dpo", "ipo", "sft", "sigmoid", "tdpo"]
    version = plugins.plugin_info("prefopt").version
    for cls in (DPO, IPO, SFT, TDPO):
        row = rows[cls.name]
        assert (row["package"], row["version"]) == ("prefopt", version)
        assert row["needs_reference"] == cls.reference.name.lower()
        assert [f["name"] for f in row["fields"]] == list(cls.Config.model_fields)
        for field in row["fields"]:
            assert field["description"], f"{cls.name}.{field['name']} has no description"
            assert set(field) == {"name", "type", "default", "required", "bounds", "description"}
    dpo = {f["name"]: f for f in rows["dpo"]["fields"]}
    assert dpo["beta"] == {
        "name": "beta",
        "type": "float",
        "default": 0.1,
        "required": False,
        "bounds": "> 0",
        "description": DPO.Config.model_fields["beta"].description,
    }
    assert dpo["label_smoothing"]["default"] == 0.0 and dpo["reference_free"]["type"] == "bool"
    variant = {f["name"]: f for f in rows["tdpo"]["fields"]}["variant"]
    assert variant["required"] is True and variant["default"] is None and "tdpo1" in variant["type"]
    assert [f["name"] for f in rows["sft"]["fields"]] == ["normalize"]


def test_describe_matches_json(capsys):
    data = json.loads(_run(capsys, "losses", "--json"))
    ipo = next(row for row in data["losses"] if row["name"] == "ipo")
    assert ipo["fields"] == describe(IPO)


def test_losses_show_needs_per_listed_config(capsys):
    out = _run(capsys, "losses")
    assert "    needs: lengths, policy_logps, ref_logps (default); lengths, policy_logps (reference_free=True); they depend on the config" in out
    assert "    needs: kl, policy_logps, ref_logps\n" in out  # tdpo: declared on the class, whatever the config
    rows = {row["name"]: row for row in json.loads(_run(capsys, "losses", "--json"))["losses"]}
    assert rows["dpo"]["needs_depend_on_config"] and not rows["tdpo"]["needs_depend_on_config"]
    assert [(n["config"], n["reference"]) for n in rows["dpo"]["needs"]] == [({}, "logps"), ({"reference_free": True}, "none")]
    assert rows["tdpo"]["needs"] == [{"config": {}, "features": ["kl", "policy_logps", "ref_logps"], "reference": "token_kl"}]


class _Entropy(DPO):
    """Reads the per-token entropy without declaring it (the under-declared loss of the issue)."""

    name = "entropy_dpo"

    def forward(self, inputs):
        out = super().forward(inputs)
        weight = inputs.token_entropy.mean()[0].detach()
        return type(out)((out.losses * weight).mean(), out.losses * weight, out.metrics)


def _config(tmp_path, loss: str, tokenizer_dir) -> str:
    path = tmp_path / "run.yaml"
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n' * 8)  # one batch
    path.write_text(f"model: {{config: {{model_type: llama}}, tokenizer: {tokenizer_dir}}}\ndata: {{train: pairs.jsonl}}\nloss: {loss}\n")
    return str(path)


def test_validate_runs_the_loss_on_its_declared_inputs(tmp_path, capsys, tokenizer_dir):
    from prefopt.testing import registered

    with registered(_Entropy):
        assert cli.main(["validate", _config(tmp_path, "{name: dpo}", tokenizer_dir)]) == 0
        assert cli.main(["validate", _config(tmp_path, "[{name: dpo}, {name: entropy_dpo, weight: 0.5}]", tokenizer_dir)]) == 2
    err = capsys.readouterr().err
    assert ("error: loss 'entropy_dpo' (" in err and "failed on synthetic inputs, case 'ordinary': AttributeError" in err
            and "it read LossInputs.token_entropy, which its needs do not declare: add Feature.TOKEN_ENTROPY" in err), err
