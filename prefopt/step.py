"""One forward of a batch through the policy, the reference and the loss plugin; evaluation."""
from __future__ import annotations

import torch

from prefopt.batching import collate
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.run import Run


def compute_loss(run: Run, model: torch.nn.Module, batch: dict[str, torch.Tensor], split: str) -> tuple[LossOutput, int]:
    """One forward on a collated batch through the loss plugin; returns its output and token count."""
    device = run.accelerator.device
    batch = {k: v.to(device) for k, v in batch.items()}
    with run.accelerator.autocast():
        out = model(batch, reference=run.ref_kind)
    tokens = (batch["labels"][:, 1:] != -100).sum(-1)
    half = tokens.shape[0] // 2
    sums = out["logps"].sum(-1)
    inputs = LossInputs(sums[:half], sums[half:], tokens[:half], tokens[half:])
    if run.mode == "cache":
        cached = run.caches[split][batch["index"].cpu()].to(device)
        inputs.ref_chosen_logps, inputs.ref_rejected_logps = cached[:, 0], cached[:, 1]
    elif "ref_logps" in out:
        ref_sums = out["ref_logps"].sum(-1)
        inputs.ref_chosen_logps, inputs.ref_rejected_logps = ref_sums[:half], ref_sums[half:]
    if "kl" in out:
        kl = out["kl"].sum(-1)
        inputs.chosen_kl, inputs.rejected_kl = kl[:half], kl[half:]
    return run.loss(inputs), int(batch["attention_mask"].sum())


@torch.no_grad()
def evaluate(run: Run, model: torch.nn.Module) -> dict[str, float]:
    """Loss and reward metrics on the held-out pairs (``eval/`` prefixed), averaged over pairs."""
    if len(run.eval_pairs) < run.accelerator.num_processes:  # every process needs a share
        return {}
    model.eval()
    bs, pad = run.config.trainer.batch_size, run.tokenizer.pad_token_id
    idx = list(range(len(run.eval_pairs)))[run.accelerator.process_index :: run.accelerator.num_processes]
    totals: dict[str, torch.Tensor] = {}
    count = torch.zeros((), device=run.accelerator.device)
    for s in range(0, len(idx), bs):
        b = idx[s : s + bs]
        out, _ = compute_loss(run, model, collate([run.eval_pairs[i] for i in b], b, pad), "eval")
        for key, value in {"loss": out.loss.detach(), **out.metrics}.items():
            totals[key] = totals.get(key, 0) + value.float() * len(b)
        count += len(b)
    model.train()
    count = run.accelerator.reduce(count, "sum")
    return {f"eval/{k}": (run.accelerator.reduce(v, "sum") / count).item() for k, v in sorted(totals.items())}
