"""Built-in losses and the loss contract."""
from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference
from prefopt.losses.combined import WeightedLoss
from prefopt.losses.dpo import DPO
from prefopt.losses.ipo import IPO
from prefopt.losses.sft import SFT
from prefopt.losses.tdpo import TDPO

__all__ = ["Loss", "LossConfig", "LossInputs", "LossOutput", "Reference", "WeightedLoss", "DPO", "IPO", "SFT", "TDPO"]
