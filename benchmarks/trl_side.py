"""One measured TRL ``DPOTrainer`` run (in its own process)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch


def preload() -> None:
    """Import what a run needs, so the post-import memory baseline includes it."""
    import datasets  # noqa: F401
    import trl  # noqa: F401
    from trl import DPOTrainer  # noqa: F401


def run(spec: dict) -> None:
    """Train TRL's DPO for ``spec['steps']`` steps on the spec's model, data and settings."""
    import datasets
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(spec["seed"])
    cfg = dict(spec["model_config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if spec["reference"] == "live" else None
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    if spec["device"] == "cuda":
        model.cuda()
        ref = ref.cuda() if ref is not None else None
    args = DPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl-out"),
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim=spec["optim"],
        bf16=spec["precision"] == "bf16",
        gradient_checkpointing=False,
        max_length=spec["max_length"],
        beta=spec["beta"],
        loss_type=[{"dpo": "sigmoid"}.get(spec["loss"], spec["loss"])],
        precompute_ref_log_probs=spec["reference"] == "cache",
        precompute_ref_batch_size=spec["batch_size"],
        report_to=[],
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=spec["seed"],
        use_cpu=spec["device"] == "cpu",
        use_liger_kernel=spec.get("liger", False),  # RMSNorm, RoPE, SwiGLU kernels (TRL turns off their fused LM head)
    )
    data = datasets.load_dataset("json", data_files=spec["data"], split="train")
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
