"""A weighted sum of losses, e.g. DPO + 0.2 * SFT (the RPO recipe)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from prefopt.losses.base import Feature, Loss, LossInputs, LossOutput, needs_of, takes_of


class WeightedLoss:
    """``sum_i w_i * loss_i``. Metrics: each term's ``loss/<name>``, and the first term's value of any shared name."""

    def __init__(self, terms: Sequence[tuple[float, Loss]]) -> None:
        if not terms:
            raise ValueError("WeightedLoss needs at least one term")
        self.terms = list(terms)
        names = [loss.name for _, loss in self.terms]
        self.labels = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        self.name = "+".join(self.labels)

    @property
    def needs(self) -> frozenset[Feature]:
        return frozenset().union(*(needs_of(loss) for _, loss in self.terms))

    @property
    def takes(self) -> frozenset[str]:
        """The data every term takes."""
        return takes_of(self)

    @property
    def couples_pairs(self) -> bool:
        return any(loss.couples_pairs for _, loss in self.terms)

    def __call__(self, inputs: LossInputs) -> LossOutput:
        total: torch.Tensor | None = None
        metrics: dict[str, torch.Tensor] = {}
        counts: dict[str, torch.Tensor] = {}
        for (weight, loss), label in zip(self.terms, self.labels):
            out = loss(inputs)
            total = weight * out.losses if total is None else total + weight * out.losses
            metrics[f"loss/{label}"] = out.loss.detach()
            for key, value in out.metrics.items():
                if key not in metrics:
                    metrics[key] = value
                    if key in out.counts:
                        counts[key] = out.counts[key]
        assert total is not None
        return LossOutput(total.mean(), total, metrics, counts)

    def __repr__(self) -> str:
        return " + ".join(f"{w} * {loss!r}" for w, loss in self.terms)
