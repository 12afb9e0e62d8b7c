"""LoRA through peft: only adapter weights train; the reference is the base model with the adapter disabled."""
import json
import math

import pytest

pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from prefopt.config import validate  # noqa: E402
from prefopt.testing.tiny import build_tokenizer, model_config  # noqa: E402
from prefopt.training.trainer import train  # noqa: E402


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    rows = [
        {"prompt": f"Review {i % 7}:", "chosen": " good and great.", "rejected": " bad and awful."} for i in range(48)
    ]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tok = build_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], vocab_size=300)
    tok.save_pretrained(root / "tok")
    return root, len(tok)


def _config(root, vocab, mode, out):
    return validate(
        {
            "model": {"config": model_config("llama", vocab_size=vocab, hidden_size=32), "tokenizer": str(root / "tok"),
                      "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
            "data": {"train": str(root / "train.jsonl"), "max_length": 32},
            "loss": {"name": "dpo", "beta": 0.1},
            "reference": {"mode": mode, "cache_dir": str(root / "cache")},
            "trainer": {"output_dir": str(root / out), "batch_size": 8, "max_steps": 3, "lr": 1e-2, "group_by_length": False},
        }
    )


def _first_loss(out):
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_lora_live_reference_is_base_model_and_matches_cache(setup_dir):
    root, vocab = setup_dir
    live = train(_config(root, vocab, "live", "live"))
    cached = train(_config(root, vocab, "cache", "cache"))
    assert live["reference"] == "live" and cached["reference"] == "cache"
    # At step one the adapter is zero-initialised: policy == base model == reference, so the loss is ln 2.
    assert _first_loss(root / "live") == pytest.approx(math.log(2), abs=1e-5)
    assert _first_loss(root / "live") == pytest.approx(_first_loss(root / "cache"), abs=1e-5)
    saved = load_file(str(root / "live" / "adapter_model.safetensors"))
    assert saved and all("lora_" in name for name in saved)
