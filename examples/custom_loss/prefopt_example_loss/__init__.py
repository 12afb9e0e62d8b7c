"""DPO with a target margin: the loss stays high until the reward margin exceeds ``margin``."""
from pydantic import Field

import prefopt
from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference, log_ratios, preference_loss, reward_metrics


class MarginConfig(LossConfig):
    beta: float = Field(0.1, gt=0, description="Inverse temperature, as in DPO.")
    margin: float = Field(0.5, ge=0, description="Reward margin the chosen completion should win by.")


class MarginDPO(Loss):
    """``-logsigmoid(beta * h - margin)`` with ``h = (pc - rc) - (pr - rr)``."""

    name = "example_margin"
    Config = MarginConfig
    reference = Reference.LOGPS

    def forward(self, inputs: LossInputs) -> LossOutput:
        beta = self.config.beta
        chosen, rejected = log_ratios(inputs)
        chosen, rejected = beta * chosen, beta * rejected
        losses = preference_loss(chosen - rejected - self.config.margin)
        return LossOutput(losses.mean(), losses, reward_metrics(chosen, rejected, inputs))


@prefopt.hookimpl
def register_losses():
    return [MarginDPO]
