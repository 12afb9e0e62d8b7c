"""The loss contract (:mod:`.base`) and the built-in losses: DPO (and its TRL name, sigmoid), IPO, TDPO, SFT, weighted sums.

A loss is a short class that maps per-sequence or per-token log-probs to a scalar. The
built-ins are registered by :mod:`prefopt.plugins.builtin` exactly as plugins register theirs.
May import: ``prefopt.errors`` and torch/pydantic. Nothing else in prefopt.
"""
from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference
from prefopt.losses.combined import WeightedLoss
from prefopt.losses.dpo import DPO, Sigmoid
from prefopt.losses.ipo import IPO
from prefopt.losses.sft import SFT
from prefopt.losses.tdpo import TDPO

__all__ = ["Loss", "LossConfig", "LossInputs", "LossOutput", "Reference", "WeightedLoss", "DPO", "IPO", "SFT", "Sigmoid", "TDPO"]
