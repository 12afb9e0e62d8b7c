"""The loss types of TRL's DPOTrainer (1.16) under their TRL names and parameters, for prefopt.

``sigmoid`` and ``ipo`` are built into prefopt, ``hinge`` comes with prefopt-slic and
``robust`` with prefopt-robust; this package adds the rest. Each is checked against TRL's
own code (``prefopt.testing.trl_loss``) in its tests.
"""
from __future__ import annotations

import prefopt
from prefopt_trl_losses.anchored import APODown, APOZero, BCOPair, NCAPair, SPPOHard
from prefopt_trl_losses.aot import AOT, AOTUnpaired
from prefopt_trl_losses.margin import DiscoPOP, EXOPair, SigmoidNorm

LOSSES = [EXOPair, NCAPair, BCOPair, SPPOHard, AOT, AOTUnpaired, APOZero, APODown, DiscoPOP, SigmoidNorm]

__all__ = ["LOSSES", *(cls.__name__ for cls in LOSSES)]


@prefopt.hookimpl
def register_losses() -> list[type]:
    return list(LOSSES)
