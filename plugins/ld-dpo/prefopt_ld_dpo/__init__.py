"""LD-DPO (Liu et al. 2024): DPO that discounts the tokens the longer completion has beyond the shorter one."""
from __future__ import annotations

import torch
from pydantic import Field

import prefopt
from prefopt.losses.base import Feature, Loss, LossConfig, LossInputs, LossOutput, Tokens, preference_loss, reward_metrics


class LDDPOConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Inverse temperature, as in DPO.")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the tokens past the shorter completion's length (TRL's ld_alpha); 1 is plain DPO."
    )


def desensitised(tokens: Tokens, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-completion sums with the tokens past the pair's shorter length weighted by ``alpha``: ``(chosen, rejected)``."""
    b = tokens.num_pairs
    shared = torch.minimum(tokens.lengths[:b], tokens.lengths[b:]).repeat(2)  # per completion
    weight = torch.where(tokens.position < shared[tokens.seq], 1.0, alpha).to(tokens.values.dtype)
    return tokens.like(tokens.values * weight).sum()


class LDDPO(Loss):
    """``-logsigmoid(beta * ((pc~ - rc~) - (pr~ - rr~)))``, ``~``: log-probs summed as :func:`desensitised` weights them."""

    name = "ld_dpo"
    Config = LDDPOConfig
    features = frozenset({Feature.POLICY_TOKEN_LOGPS, Feature.REF_TOKEN_LOGPS})

    def forward(self, inputs: LossInputs) -> LossOutput:
        beta, alpha = self.config.beta, self.config.alpha
        pc, pr = desensitised(inputs.policy_token_logps, alpha)
        rc, rr = desensitised(inputs.ref_token_logps, alpha)
        chosen, rejected = beta * (pc - rc), beta * (pr - rr)
        losses = preference_loss(chosen - rejected)
        metrics = reward_metrics(chosen, rejected, inputs)
        # TRL logs the length-desensitised sums as logps/* when ld_alpha is set
        metrics["logps/chosen"], metrics["logps/rejected"] = pc.detach().mean(), pr.detach().mean()
        return LossOutput(losses.mean(), losses, metrics)


@prefopt.hookimpl
def register_losses() -> list[type]:
    return [LDDPO]
