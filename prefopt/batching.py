"""Batches of preference pairs: one padded tensor of chosen then rejected rows, and a length-grouped order."""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from prefopt.logprobs import IGNORE_INDEX

if TYPE_CHECKING:
    from prefopt.data import Pair


def collate(pairs: Sequence["Pair"], indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded to the longest in this batch only."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion)
        labels[i, len(prompt) : n] = torch.tensor(completion)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": torch.tensor(list(indices))}


def pair_length(p: "Pair") -> int:
    return len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))


def batch_order(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True, mega: int = 64
) -> list[list[int]]:
    """Indices in batches of ``batch_size``, reshuffled per (seed, epoch); incomplete last batch dropped.

    With ``group_by_length``, each window of ``mega`` batches is sorted by length before being cut,
    so a batch holds pairs of similar length, and the batches are then shuffled.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * mega
        order = [i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=lambda i: -lengths[i])]
    batches = [order[s : s + batch_size] for s in range(0, len(order) - batch_size + 1, batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def padding_fraction(batch: dict[str, torch.Tensor]) -> float:
    """Fraction of padded positions in a collated batch."""
    return 1.0 - batch["attention_mask"].float().mean().item()
