"""Batches of groups (a prompt with K completions) in the engine's layouts, and per-completion sums.

A batch of ``B`` groups is laid out by :func:`prefopt.data.batching.pack_shared` (each prompt once,
``[prompt | c_1 | ... | c_K]``), or unshared by :func:`~prefopt.data.batching.pack_rows` /
:func:`~prefopt.data.batching.collate_rows` (one sequence per completion). Either way the
sequences are numbered completion-major, and ``group_flat`` maps sequence ``s`` to slot
``b * W + k`` of a ``(B, W)`` grid: completion ``k`` of group ``b`` in column ``k``, KTO's
mismatched completion (when included) in the last column ``W - 1``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prefopt.data.batching import collate_rows, completion_tokens, pack_rows, pack_shared
from prefopt.data.examples import Group


def completions_of(g: Group, mismatched: bool) -> list[list[int]]:
    """The completions a group puts in the layout: its own, then its mismatched one if asked for (and present)."""
    return g.completions + ([g.mismatched_ids] if mismatched and g.mismatched_ids is not None else [])


def group_sequences(groups: Sequence[Group], mismatched: bool) -> list[tuple[list[int], list[int]]]:
    """``(prompt, completion)`` of every sequence of a batch of groups, in the engine's (completion-major) order."""
    cs = [completions_of(g, mismatched) for g in groups]
    return [(g.prompt_ids, c[k]) for k in range(max(map(len, cs), default=0)) for g, c in zip(groups, cs) if k < len(c)]


def group_tokens(g: Group, shared: bool, mismatched: bool) -> int:
    """Tokens the group puts in a packed forward (the prompt once with ``shared``, else once per completion)."""
    cs = completions_of(g, mismatched)
    return (1 if shared else len(cs)) * len(g.prompt_ids) + sum(map(len, cs))


def group_length(g: Group) -> int:
    return len(g.prompt_ids) + max(map(len, g.completions))


def pack_groups(groups: Sequence[Group], indices: Sequence[int], pad_id: int, *, packing: bool = True, shared: bool = True,
                mismatched: bool = False, multiple_of: int | None = None) -> dict[str, Any]:
    """A batch of groups (each prompt once with ``shared``; else one sequence per completion, packed or padded),
    with the group fields the step reads: ``group_flat`` (sequence -> grid slot), ``group_shape`` ``(B, W)``,
    ``completion_mask``, ``scores``, ``labels`` ``(B, K)`` and ``has_mismatched``."""
    cs = [completions_of(g, mismatched) for g in groups]
    present = [g.mismatched_ids is not None for g in groups]
    with_mm = mismatched and any(present)
    if with_mm and not all(present):
        raise ValueError("pack_groups: a labelled example has no mismatched completion (see data.pairs.assign_mismatched)")
    k_max = max(len(g.completions) for g in groups)
    width = k_max + with_mm
    if packing and shared:
        batch = pack_shared([(g.prompt_ids, c) for g, c in zip(groups, cs)], indices, pad_id, multiple_of)
    elif packing:
        batch = pack_rows(group_sequences(groups, mismatched), indices, pad_id, multiple_of)
    else:
        batch = collate_rows(group_sequences(groups, mismatched), indices, pad_id)
    flat = [b * width + (width - 1 if with_mm and k == len(c) - 1 else k)
            for k in range(max(map(len, cs))) for b, c in enumerate(cs) if k < len(c)]
    mask = torch.zeros(len(groups), k_max, dtype=torch.bool)
    scores = torch.zeros(len(groups), k_max)
    labels = torch.zeros(len(groups), k_max, dtype=torch.bool)
    for b, g in enumerate(groups):
        mask[b, : len(g.completions)] = True
        if g.scores is not None:
            scores[b, : len(g.scores)] = torch.tensor(g.scores)
        if g.labels is not None:
            labels[b, : len(g.labels)] = torch.tensor(g.labels)
    kind = groups[0].kind
    return batch | {"group_flat": torch.tensor(flat, dtype=torch.long), "group_shape": (len(groups), width),
                    "completion_mask": mask, "scores": scores if kind == "rankings" else None,
                    "labels": labels if kind == "labelled" else None, "has_mismatched": with_mm}


def completion_sums(values: torch.Tensor, seq: torch.Tensor, position: torch.Tensor, cu: Sequence[int]) -> torch.Tensor:
    """Per-sequence sums ``(S,)`` of flat per-token ``values``; deterministic on every device (no atomics),
    summed as :meth:`prefopt.losses.base.Tokens.sum` sums pairs."""
    width = max((b - a for a, b in zip(cu[:-1], cu[1:])), default=0)
    return values.new_zeros(len(cu) - 1, width).index_put((seq, position), values).sum(-1)


def to_grid(sums: torch.Tensor, flat: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Per-sequence ``sums`` scattered into the ``(B, W)`` grid (zeros where no completion)."""
    return sums.new_zeros(shape[0] * shape[1]).index_put((flat.to(sums.device),), sums).view(shape)


def grid_sums(values: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The ``(B, W)`` grid of summed per-token ``values`` of a group batch."""
    sums = completion_sums(values, batch["token_seq"].to(values.device), batch["token_position"].to(values.device),
                           batch["cu_completion"])
    return to_grid(sums, batch["group_flat"], batch["group_shape"])


def group_token_counts(g: Group, mismatched: bool = True) -> list[int]:
    """Completion tokens with a log-prob, per completion of the layout."""
    return [completion_tokens(g.prompt_ids, c) for c in completions_of(g, mismatched)]
