"""Batches of preference pairs, in the one token layout the engine and the losses share.

A batch of ``B`` pairs holds ``2B`` sequences: chosen ``0..B-1`` then rejected ``0..B-1``.
:func:`pack` lays them end to end in one row (no padding; position ids restart per
sequence and attention stays inside each one); :func:`collate` pads them into ``2B`` rows
(for models or kernels that cannot take packed rows); :func:`pack_shared` lays out each
prompt once, followed by its completions (``share_prompt``). Every layout carries
``token_index``: the flat positions that predict completion tokens, in sequence order, and
``token_target``: those tokens (a shared prompt's last position predicts the first token of
each of its completions, so it appears once per completion). Gathering hidden states at
``token_index`` gives exactly the per-token layout of :class:`prefopt.losses.base.Tokens`.
Unshared layouts also carry ``targets`` (the next token at each position, ``IGNORE_INDEX``
where it is not a completion token).
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


def _token_fields(rows: list[tuple[list[int], list[int]]], where: list[tuple[int, int]], indices: Sequence[int]) -> dict[str, Any]:
    """token_index (flat positions predicting completion tokens), token_target (those tokens), token_seq,
    token_position, completion lengths. ``where[s]``: flat positions of sequence ``s``'s last prompt token
    and first completion token (apart in a shared segment, where one prompt token predicts several)."""
    index, target, seq, position, lengths, cu = [], [], [], [], [], [0]
    for s, ((prompt, completion), (prompt_last, start)) in enumerate(zip(rows, where)):
        k = completion_tokens(prompt, completion)
        index.extend(([prompt_last] + list(range(start, start + k - 1))) if prompt and k else range(start, start + k))
        target.extend(completion[len(completion) - k :])
        seq.extend([s] * k)
        position.extend(range(k))
        lengths.append(k)
        cu.append(cu[-1] + k)
    return {
        "cu_completion": cu,
        "token_index": torch.tensor(index, dtype=torch.long),
        "token_target": torch.tensor(target, dtype=torch.long),
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


def pack(pairs: Sequence["Pair"], indices: Sequence[int], pad_id: int, multiple_of: int | None = None,
         share_prompt: bool = False) -> dict[str, Any]:
    """All ``2B`` sequences end to end in one row ``(1, L)``; ``L`` rounded up by :func:`row_width`.

    The rounding tail is one extra dummy sequence of padding that no target reads, so the
    number of distinct shapes stays bounded. ``cu_seqlens`` (an int32 tensor for the device,
    ``cu_host`` a copy that stays on the host) delimit the sequences. With ``share_prompt``,
    each pair is one segment ``[prompt | chosen | rejected]`` (see :func:`pack_shared`).
    """
    if share_prompt:
        return pack_shared([(p.prompt_ids, [p.chosen_ids, p.rejected_ids]) for p in pairs], indices, pad_id, multiple_of)
    return pack_rows(_sequences(pairs), indices, pad_id, multiple_of)


def pack_rows(rows: Sequence[tuple[list[int], list[int]]], indices: Sequence[int], pad_id: int,
              multiple_of: int | None = None) -> dict[str, Any]:
    """Unshared packing of ``(prompt, completion)`` sequences in the given order (see :func:`pack`)."""
    rows = list(rows)
    ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    where, cu = [], [0]
    for prompt, completion in rows:
        where.append((len(ids) + len(prompt) - 1, len(ids) + len(prompt)))
        ids += prompt + completion
        positions += range(len(prompt) + len(completion))
        targets += _targets(prompt, completion)
        cu.append(len(ids))
    out = _row(ids, positions, cu, cu, None, pad_id, multiple_of)
    targets += [IGNORE_INDEX] * (out["input_ids"].shape[1] - len(targets))
    return out | {"targets": torch.tensor([targets], dtype=torch.long)} | _token_fields(rows, where, indices)


def pack_shared(groups: Sequence[tuple[list[int], Sequence[list[int]]]], indices: Sequence[int], pad_id: int,
                multiple_of: int | None = None) -> dict[str, Any]:
    """Each prompt once: group ``g`` (a prompt and its ``K_g >= 1`` completions) is one segment
    ``[prompt | c_1 | ... | c_K]``. Completion ``c_k`` has position ids continuing from the prompt's end and
    attends to the prompt and to itself (causally), never to another completion.

    Sequences are numbered completion-major (``c_1`` of every group, then ``c_2`` of every group that has
    one, ...), as pairs number chosen then rejected. Attention runs over pieces: ``[prompt | c_1]`` (plain causal), then each further
    ``c_k`` whose queries read the keys ``[prompt | c_k]`` gathered by ``kv_index`` (causal aligned to the
    end: all of the prompt, then causal over ``c_k``). ``cu_seqlens``/``cu_seqlens_k`` delimit the query and
    key pieces.
    """
    ids: list[int] = []
    positions: list[int] = []
    kv: list[int] = []
    cu_q, cu_k = [0], [0]
    where: list[list[tuple[int, int]]] = [[] for _ in range(max((len(c) for _, c in groups), default=0))]
    for prompt, completions in groups:
        start, n = len(ids), len(prompt)
        ids += prompt
        positions += range(n)
        for k, completion in enumerate(completions):
            where[k].append((start + n - 1, len(ids)))
            first = len(ids)
            ids += completion
            positions += range(n, n + len(completion))
            if k == 0 and n + len(completion):  # [prompt | c_1]: its own keys
                kv += range(start, len(ids))
            elif k and completion:  # c_k reads [prompt | c_k]
                kv += list(range(start, start + n)) + list(range(first, len(ids)))
            else:
                continue
            cu_q.append(len(ids))
            cu_k.append(len(kv))
    rows = [(prompt, completions[k]) for k in range(len(where)) for prompt, completions in groups if k < len(completions)]
    flat = [w for side in where for w in side]
    gather = kv if len(where) > 1 else None  # one completion per prompt: every piece reads its own keys
    return _row(ids, positions, cu_q, cu_k, gather, pad_id, multiple_of) | _token_fields(rows, flat, indices)


def _row(ids: list[int], positions: list[int], cu_q: list[int], cu_k: list[int], kv: list[int] | None, pad_id: int,
         multiple_of: int | None) -> dict[str, Any]:
    """The packed row's tensors, padded by :func:`row_width` with a dummy tail piece; ``kv``: a gather of the
    keys (``None``: the keys are the queries' own pieces)."""
    real = len(ids)
    width = row_width(real, multiple_of)
    cu_q, cu_k = list(cu_q), list(cu_k)
    if width > real:
        ids, positions = ids + [pad_id] * (width - real), positions + list(range(width - real))
        cu_q.append(width)
        if kv is not None:
            kv = kv + list(range(real, width))
            cu_k.append(len(kv))
    out = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seqlens": torch.tensor(cu_q, dtype=torch.int32),
        "cu_host": torch.tensor(cu_q),
        "max_seqlen": max(b - a for a, b in zip(cu_q[:-1], cu_q[1:])),
        "num_tokens": real,
        "padding": 1.0 - real / width,
    }
    if kv is not None:
        out |= {"kv_index": torch.tensor(kv, dtype=torch.long), "cu_seqlens_k": torch.tensor(cu_k, dtype=torch.int32),
                "cu_k_host": torch.tensor(cu_k), "max_seqlen_k": max(b - a for a, b in zip(cu_k[:-1], cu_k[1:]))}
    return out


def collate(pairs: Sequence["Pair"], indices: Sequence[int], pad_id: int) -> dict[str, Any]:
    """Chosen rows then rejected rows, right-padded to the longest in this batch only."""
    return collate_rows(_sequences(pairs), indices, pad_id)


def collate_rows(rows: Sequence[tuple[list[int], list[int]]], indices: Sequence[int], pad_id: int) -> dict[str, Any]:
    """``(prompt, completion)`` sequences in the given order, one padded row each (see :func:`collate`)."""
    rows = list(rows)
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
        **_token_fields(rows, [(i * width + len(p) - 1, i * width + len(p)) for i, (p, _) in enumerate(rows)], indices),
    }


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors to ``device`` (pinned and non-blocking on CUDA); host values, and tensors named ``*_host``, stay."""
    cuda = torch.device(device).type == "cuda"
    return {k: (v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device))
            if isinstance(v, torch.Tensor) and not k.endswith("_host") else v for k, v in batch.items()}


def pair_length(p: "Pair") -> int:
    return len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))


def pair_tokens(p: "Pair", share_prompt: bool = False) -> int:
    """Tokens the pair puts in a packed forward (both sequences; the prompt once with ``share_prompt``)."""
    return (2 - share_prompt) * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)


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
                  matched: bool = False, sliced: bool = False) -> list[list[list[int] | None]]:
    """Each process's forwards over pairs ``0..len(sizes)-1`` outside training (held-out data, the
    reference cache): its pairs (every ``world``-th), ``batch_size`` at a time, each batch cut to the
    token ``budget``. ``sizes``: every pair's tokens (read only with a budget).

    ``sliced``: as training slices its global batches instead: consecutive global batches of
    ``batch_size * world`` pairs (:func:`global_batch`), process ``r`` taking slice ``r`` of each.
    ``matched`` (FSDP, where every forward gathers shards from all processes): each process gets as
    many forwards as the busiest, the extra ones ``None`` (a filler forward whose results count nothing).
    """
    def forwards(idx: list[int]) -> list[list[int] | None]:
        return [f for s in range(0, len(idx), batch_size) for f in split_by_tokens(idx[s : s + batch_size], sizes, budget)]

    n, span = len(sizes), batch_size * world
    if sliced:
        plans = [forwards([i for s in range(0, n, span) for i in range(s + r * batch_size, min(s + (r + 1) * batch_size, n))])
                 for r in range(world)]
    else:
        plans = [forwards(list(range(rank, n, world))) for rank in range(world)]
    if matched:
        most = max(map(len, plans))
        plans = [plan + [None] * (most - len(plan)) for plan in plans]
    return plans


def global_batch(i: int, batch_size: int, world: int, n: int) -> range:
    """The global batch (``batch_size * world`` consecutive pairs of ``n``) that pair ``i`` is in (see ``sliced``)."""
    start = i - i % (batch_size * world)
    return range(start, min(start + batch_size * world, n))


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
