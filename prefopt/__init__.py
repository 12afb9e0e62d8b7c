"""prefopt: preference optimisation for language models, with losses as plugins."""
from prefopt.plugins.hookspecs import hookimpl
from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference
from prefopt.losses.combined import WeightedLoss
from prefopt.plugins.registry import build_loss, get_loss_class

__version__ = "0.1.0"

__all__ = [
    "Loss",
    "LossConfig",
    "LossInputs",
    "LossOutput",
    "Reference",
    "WeightedLoss",
    "build_loss",
    "get_loss_class",
    "hookimpl",
]
