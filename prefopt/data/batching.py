"""Batches of preference pairs, in the one token layout the engine and the losses share.

A batch of ``B`` pairs holds ``2B`` sequences: chosen ``0..B-1`` then rejected ``0..B-1``.
:func:`pack` lays them end to end in one row (no padding; position ids restart per
sequence and attention stays inside each one); :func:`collate` pads them into ``2B`` rows
(for models or kernels that cannot take packed rows). Either way the batch carries
``targets`` (the next token of the same sequence at each position, ``IGNORE_INDEX``
where it is not a completion token) and ``token_index``: the flat positions whose
target is a completion token, in sequence order. Gathering hidden states at
``token_index`` gives exactly the per-token layout of :class:`prefopt.losses.base.Tokens`.
Everything here is built on the host, so the step needs no device-to-host reads.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

IGNORE_INDEX = -100  # a target position that is not a completion token

if TYPE_CHECKING:
    from prefopt.data.pairs import Pair


def _sequences(pairs: Sequence["Pair"]) -> list[tuple[list[int], list[int]]]:
    return [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]


def _targets(prompt: list[int], completion: list[int]) -> list[int]:
    """Per position: the next token if it is a completion token, else IGNORE_INDEX (the last position has none)."""
    ids = prompt + completion
    return [ids[i + 1] if i + 1 >= len(prompt) else IGNORE_INDEX for i in range(len(ids) - 1)] + [IGNORE_INDEX] * bool(ids)


def _token_fields(rows: list[tuple[list[int], list[int]]], starts: list[int], indices: Sequence[int]) -> dict[str, Any]:
    """token_index (flat positions predicting completion tokens), token_seq, token_position, completion lengths."""
    index, seq, position, lengths, cu = [], [], [], [], [0]
    for s, ((prompt, completion), start) in enumerate(zip(rows, starts)):
        first = start + max(len(prompt) - 1, 0)
        k = completion_tokens(prompt, completion)
        index.extend(range(first, first + k))
        seq.extend([s] * k)
        position.extend(range(k))
        lengths.append(k)
        cu.append(cu[-1] + k)
    return {
        "cu_completion": cu,
        "token_index": torch.tensor(index, dtype=torch.long),
        "token_seq": torch.tensor(seq, dtype=torch.long),
        "token_position": torch.tensor(position, dtype=torch.long),
        "completion_lengths": torch.tensor(lengths, dtype=torch.long),
        "index_host": list(indices),
    }


def completion_tokens(prompt: Sequence[int], completion: Sequence[int]) -> int:
    """Completion tokens that get a log-prob: all of them, less the first when there is no prompt to predict it."""
    return max(len(completion) if prompt else len(completion) - 1, 0)


def row_width(tokens: int, multiple_of: int | None = None) -> int:
    """``tokens`` rounded up to ``multiple_of``; by default to a step of 1/32 of the next power of two (at least 8).

    The default keeps the rounding under 1/16 of the row (8 tokens for short rows) while
    allowing at most 32 widths per doubling of length: few distinct shapes, little padding.
    """
    if multiple_of is None:
        multiple_of = max(8, (1 << max(tokens - 1, 1).bit_length()) // 32)
    return -(-tokens // multiple_of) * multiple_of


def pack(pairs: Sequence["Pair"], indices: Sequence[int], pad_id: int, multiple_of: int | None = None) -> dict[str, Any]:
    """All ``2B`` sequences end to end in one row ``(1, L)``; ``L`` rounded up by :func:`row_width`.

    The rounding tail is one extra dummy sequence of padding that no target reads, so the
    number of distinct shapes stays bounded. ``cu_seqlens`` (an int32 tensor for the device,
    ``cu_host`` a copy that stays on the host) delimit the sequences.
    """
    rows = _sequences(pairs)
    ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    starts, cu = [], [0]
    for prompt, completion in rows:
        starts.append(len(ids))
        ids += prompt + completion
        positions += range(len(prompt) + len(completion))
        targets += _targets(prompt, completion)
        cu.append(len(ids))
    real = len(ids)
    width = row_width(real, multiple_of)
    if width > real:
        ids += [pad_id] * (width - real)
        positions += range(width - real)
        targets += [IGNORE_INDEX] * (width - real)
        cu.append(width)
    max_len = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "targets": torch.tensor([targets], dtype=torch.long),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "cu_host": torch.tensor(cu),
        "max_seqlen": max_len,
        "num_tokens": real,
        "padding": 1.0 - real / width,
        **_token_fields(rows, starts, indices),
    }


def collate(pairs: Sequence["Pair"], indices: Sequence[int], pad_id: int) -> dict[str, Any]:
    """Chosen rows then rejected rows, right-padded to the longest in this batch only."""
    rows = _sequences(pairs)
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion)
        targets[i, :n] = torch.tensor(_targets(prompt, completion))
        attention_mask[i, :n] = 1
    real = int(attention_mask.sum())
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": targets,
        "num_tokens": real,
        "padding": 1.0 - real / attention_mask.numel(),
        **_token_fields(rows, [i * width for i in range(len(rows))], indices),
    }


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors to ``device`` (pinned and non-blocking on CUDA); host values, and tensors named ``*_host``, stay."""
    cuda = torch.device(device).type == "cuda"
    return {k: (v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device))
            if isinstance(v, torch.Tensor) and not k.endswith("_host") else v for k, v in batch.items()}


def pair_length(p: "Pair") -> int:
    return len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))


def pair_tokens(p: "Pair") -> int:
    """Tokens the pair puts in a packed forward (both sequences)."""
    return 2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)


def split_by_tokens(indices: Sequence[int], tokens: Sequence[int] | Mapping[int, int], budget: int | None,
                    at_least: int = 1) -> list[list[int]]:
    """Cut a step's pairs into consecutive forwards of at most ``budget`` tokens (a pair is never split).

    A pair longer than the budget gets a forward of its own. With ``at_least``, forwards are
    split further (the one with most tokens first) until there are that many, so processes
    can all run the same number of forwards; it cannot exceed the number of pairs.
    """
    if budget is None and at_least <= 1:
        return [list(indices)]
    out: list[list[int]] = [[]]
    used = 0
    for i in indices:
        if budget is not None and out[-1] and used + tokens[i] > budget:
            out.append([])
            used = 0
        out[-1].append(i)
        used += tokens[i]
    while len(out) < at_least:
        g = max((g for g in out if len(g) > 1), key=lambda g: sum(tokens[i] for i in g))
        total, half = sum(tokens[i] for i in g), 0
        cut = 1
        while cut < len(g) - 1 and half + tokens[g[cut - 1]] < total / 2:
            half += tokens[g[cut - 1]]
            cut += 1
        at = out.index(g)
        out[at : at + 1] = [g[:cut], g[cut:]]
    return out


def forward_plans(sizes: Sequence[int], batch_size: int, budget: int | None, world: int,
                  matched: bool = False) -> list[list[list[int] | None]]:
    """Each process's forwards over pairs ``0..len(sizes)-1`` outside training (held-out data, the
    reference cache): its pairs (every ``world``-th), ``batch_size`` at a time, each batch cut to the
    token ``budget``. ``sizes``: every pair's tokens (read only with a budget).

    ``matched`` (FSDP, where every forward gathers shards from all processes): each process gets as
    many forwards as the busiest, the extra ones ``None`` (a filler forward whose results count nothing).
    """
    plans: list[list[list[int] | None]] = []
    for rank in range(world):
        idx = list(range(rank, len(sizes), world))
        plans.append([f for s in range(0, len(idx), batch_size) for f in split_by_tokens(idx[s : s + batch_size], sizes, budget)])
    if matched:
        most = max(map(len, plans))
        plans = [plan + [None] * (most - len(plan)) for plan in plans]
    return plans


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
