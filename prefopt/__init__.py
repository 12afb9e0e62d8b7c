"""prefopt: preference optimisation for language models, with losses as plugins.

The public names are imported on first use (a module ``__getattr__``), so ``prefopt --version``
and ``--help`` start without importing torch; ``from prefopt import Loss, hookimpl`` works as usual.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "hookimpl": "prefopt.plugins.hookspecs",
    "Loss": "prefopt.losses.base",
    "LossConfig": "prefopt.losses.base",
    "LossInputs": "prefopt.losses.base",
    "LossOutput": "prefopt.losses.base",
    "Reference": "prefopt.losses.base",
    "WeightedLoss": "prefopt.losses.combined",
    "build_loss": "prefopt.plugins.registry",
    "get_loss_class": "prefopt.plugins.registry",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from prefopt.losses.base import Loss, LossConfig, LossInputs, LossOutput, Reference
    from prefopt.losses.combined import WeightedLoss
    from prefopt.plugins.hookspecs import hookimpl
    from prefopt.plugins.registry import build_loss, get_loss_class


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'prefopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
