"""f-DPO (Wang et al. 2023): the score each completion's log-ratio becomes under another f-divergence.

DPO's reverse KL scores a completion by its log-ratio ``u = log pi - log pi_ref``. Another
f-divergence scores it by ``f'(pi / pi_ref)``, as TRL's ``f_divergence_type`` does; the
losses built on the chosen-minus-rejected score difference take these scores in place of
``u``. One definition here, shared by every loss that offers the option.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from prefopt.losses.base import LossConfig

FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
# exp() of at most this: TRL's clamp for alpha_divergence, here also for forward_kl, whose
# exp(-u) TRL leaves unclamped (inf in float32 below u = -88.7).
EXP_MAX = 80.0


# Config fields of a loss that takes TRL's f_divergence_type: declare both, after the loss's own fields:
#     f_divergence_type: FDivergenceType = "reverse_kl"
#     f_alpha_divergence_coef: FAlphaCoef = 0.5
FDivergenceType = Annotated[FDivergence, Field(
    description="f-divergence to the reference (f-DPO): reverse_kl (DPO), forward_kl, js_divergence or alpha_divergence."
)]
FAlphaCoef = Annotated[float, Field(gt=0, description="alpha of alpha_divergence (alpha -> 1 is reverse_kl); unused by the other divergences.")]


def f_score(logratio: torch.Tensor, kind: FDivergence, alpha: float = 0.5) -> torch.Tensor:
    """``f'(t)`` at ``t = exp(logratio)``, computed without overflow.

    ``exp(x) - 1`` rather than ``expm1``: TRL's form, and expm1's backward loses the gradient
    ``exp(x)`` when ``x`` is very negative (it computes ``expm1(x) + 1``).
    """
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratio  # f'(t) = log t
    if kind == "forward_kl":
        return 1 - torch.exp((-logratio).clamp(max=EXP_MAX))  # f'(t) = 1 - 1/t
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)  # f'(t) = log(2t / (t + 1))
    if kind == "alpha_divergence":
        return (torch.exp(((alpha - 1.0) * logratio).clamp(max=EXP_MAX)) - 1) / (alpha - 1.0)  # (t^(a-1) - 1) / (a-1)
    raise ValueError(f"unknown f_divergence_type {kind!r}")


def f_scores(chosen: torch.Tensor, rejected: torch.Tensor, config: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen and rejected log-ratios as scores under ``config``'s ``f_divergence_type`` (see above)."""
    kind, alpha = config.f_divergence_type, config.f_alpha_divergence_coef
    return f_score(chosen, kind, alpha), f_score(rejected, kind, alpha)
