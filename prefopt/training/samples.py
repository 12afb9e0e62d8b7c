"""Completions sampled at each evaluation from the policy and the reference, for a person to read.

With ``trainer.sample_prompts: N`` the first N held-out prompts are completed greedily
(so runs are reproducible) by the policy and by the reference; each evaluation appends
one row per prompt to ``samples.jsonl`` in the output directory and, with TensorBoard
in ``report_to``, a text table under ``samples``. Like TRL's ``generate_during_eval``.

The reference's completions come from the reference model when one is in memory (a live
reference, or a LoRA policy with its adapter disabled). When the reference is the initial
policy but not kept in memory (cached or no reference log-probs), the policy's step-0
completions are the reference's: greedy decoding makes them exactly what the reference
would write. When a different reference model was used only to fill the cache, its
completions are left out (``"reference": null``).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from prefopt.engine import attention
from prefopt.training import distributed
from prefopt.training.tracking import log_text

log = logging.getLogger("prefopt")

FILE = "samples.jsonl"


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt_ids: list[int], tokenizer, max_new_tokens: int,
           precision: Callable[[], Any] = nullcontext) -> str:
    """The greedy completion of one prompt, decoded without special tokens.

    ``precision()`` is the run's autocast context, so the policy and a reference held in the
    training precision decode with the numbers they train with (equal at step 0).
    """
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    was_training = model.training
    model.eval()
    try:
        with attention.standard(model), precision():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


def make_sampler(run, unwrapped, out_dir: Path) -> Callable[[int], None]:
    """A ``sample(step)`` callable for the training loop; a no-op when sampling is off."""
    tc = run.config.trainer
    n = min(tc.sample_prompts, len(run.eval_pairs))
    if tc.sample_prompts and not run.eval_pairs:
        log.warning("trainer.sample_prompts: no held-out data to sample prompts from; set data.eval or data.eval_fraction")
    if not n or not run.accelerator.is_main_process:
        return lambda step: None
    if run.accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM") or distributed.sharded(run.accelerator):
        log.warning("trainer.sample_prompts: sampling needs the whole policy on one process; not done with sharded training")
        return lambda step: None
    prompts = [run.eval_pairs[i].prompt_ids for i in range(n)]
    path = out_dir / FILE
    reference_is_initial_policy = not run.config.model.reference and unwrapped.reference is None and not unwrapped.ref_is_adapter
    remembered = _step0_reference(path) if reference_is_initial_policy else {}
    if run.mode == "cache" and run.config.model.reference:
        log.info("samples: the reference model is used only through its cached log-probs; its completions are not sampled")

    def reference_text(i: int, policy_text: str, step: int) -> str | None:
        if unwrapped.reference is not None:
            return greedy(unwrapped.reference, prompts[i], run.tokenizer, tc.sample_max_new_tokens, run.accelerator.autocast)
        if unwrapped.ref_is_adapter:
            with unwrapped.policy.disable_adapter():
                return greedy(unwrapped.policy, prompts[i], run.tokenizer, tc.sample_max_new_tokens, run.accelerator.autocast)
        if reference_is_initial_policy:
            if step == 0:
                remembered[i] = policy_text
            return remembered.get(i)
        return None

    def sample(step: int) -> None:
        rows = []
        for i, ids in enumerate(prompts):
            policy_text = greedy(unwrapped.policy, ids, run.tokenizer, tc.sample_max_new_tokens, run.accelerator.autocast)
            rows.append({"step": step, "prompt": run.tokenizer.decode(ids),
                         "policy": policy_text, "reference": reference_text(i, policy_text, step)})
        with path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        log_text(run.accelerator, "samples", _markdown(rows), step)

    return sample


def _step0_reference(path: Path) -> dict[int, str]:
    """Reference completions written at step 0 by the run being resumed."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {i: r["reference"] for i, r in enumerate(r for r in rows if r["step"] == 0)}


def _markdown(rows: list[dict[str, Any]]) -> str:
    def cell(text: str | None) -> str:
        return "(not sampled)" if text is None else text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| prompt | policy | reference |", "| --- | --- | --- |"]
    lines += [f"| {cell(r['prompt'])} | {cell(r['policy'])} | {cell(r['reference'])} |" for r in rows]
    return "\n".join(lines)
