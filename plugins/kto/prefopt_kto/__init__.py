"""KTO (Ethayarajh et al. 2024): completions labelled desirable or not, no pairs needed; as TRL 1.16's KTOTrainer."""
from __future__ import annotations

import torch
from pydantic import Field

import prefopt
from prefopt.losses.base import Feature, Loss, LossConfig, LossInputs, LossOutput


class KTOConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implicit reward beta * log(pi / pi_ref).")
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D: weight of the desirable completions' losses.")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U: weight of the undesirable completions' losses.")


class KTO(Loss):
    """``lambda_D (1 - sigmoid(beta (h - z0)))`` for a desirable completion, ``lambda_U (1 - sigmoid(beta (z0 - h)))``
    for an undesirable one, ``h = log pi(y|x) - log pi_ref(y|x)``, averaged over the batch's completions.

    ``z0``, the reference point, is the batch mean of ``log pi - log pi_ref`` over mismatched prompt-completion
    pairs, detached and clamped at 0 (TRL's ``kl``).
    """

    name = "kto"
    Config = KTOConfig
    features = frozenset({Feature.POLICY_LOGPS, Feature.REF_LOGPS, Feature.MISMATCHED_LOGPS})
    takes = frozenset({"labelled"})
    reduction = "mean over the batch's labelled completions (each prompt's loss sums its completions' terms), as TRL"
    couples_pairs = True  # the reference point z0 is the batch mean of the mismatched log-ratios (detached), as in TRL

    def forward(self, inputs: LossInputs) -> LossOutput:
        cfg = self.config
        policy, ref, mask = inputs.groups()
        (labels,) = inputs.require("labels")
        mismatched, ref_mismatched = inputs.require("mismatched_logps", "ref_mismatched_logps")
        z0 = (mismatched - ref_mismatched).mean().detach().clamp(min=0)
        h = policy - ref
        desirable, undesirable = mask & labels, mask & ~labels
        chosen = cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (h - z0)))
        rejected = cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (z0 - h)))
        terms = torch.where(desirable, chosen, torch.where(undesirable, rejected, 0.0))
        losses = terms.sum(-1)
        loss = losses.sum() / mask.sum().clamp(min=1)
        metrics, counts = _metrics(cfg.beta * h.detach(), policy.detach(), desirable, undesirable, z0)
        return LossOutput(loss, losses, metrics, counts)


def _metrics(rewards: torch.Tensor, policy: torch.Tensor, desirable: torch.Tensor, undesirable: torch.Tensor,
             z0: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """TRL's KTO metrics: means over the desirable (chosen) and undesirable (rejected) completions (0 where there are
    none), and their counts, so that the logs average them over those completions."""
    def mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        return torch.where(where, values, 0.0).sum() / where.sum().clamp(min=1)

    chosen, rejected = mean(rewards, desirable), mean(rewards, undesirable)
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
               "logps/chosen": mean(policy, desirable), "logps/rejected": mean(policy, undesirable), "kl": z0}
    n_chosen, n_rejected = desirable.sum(), undesirable.sum()
    counts = {"rewards/chosen": n_chosen, "logps/chosen": n_chosen, "rewards/rejected": n_rejected, "logps/rejected": n_rejected}
    return metrics, counts


@prefopt.hookimpl
def register_losses() -> list[type]:
    return [KTO]
