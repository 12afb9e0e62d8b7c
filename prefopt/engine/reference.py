"""Reference model modes and the on-disk cache of reference log-probs."""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from prefopt.atomic import atomic_write, no_space_error, remove_stale_temporaries
from prefopt.data.groups import grid_sums
from prefopt.errors import ConfigError
from prefopt.losses.base import Reference, Tokens

log = logging.getLogger("prefopt")
CACHE_FORMAT = 2


def choose_mode(requested: str, needs: Reference, sync: bool = False) -> tuple[str, str]:
    """The reference mode to run and why, from the config's request, what the loss declares and ``reference.sync``."""
    if sync:
        if needs == Reference.NONE:
            raise ConfigError("reference.sync: the loss is reference-free, so there is no reference to update; remove reference.sync")
        if requested == "cache":
            raise ConfigError("reference.sync: a cached reference holds fixed log-probs and cannot be updated; use reference.mode live or auto")
        return "live", "reference.sync updates the reference during training, which needs a live reference"
    if requested == "auto":
        if needs == Reference.NONE:
            return "none", "the loss is reference-free"
        if needs == Reference.TOKEN_KL:
            return "live", "the loss needs per-token KL over the vocabulary, which a cache cannot hold"
        return "cache", "the loss needs only reference log-probs, computed once and cached on disk"
    if requested == "cache" and needs == Reference.TOKEN_KL:
        raise ConfigError("reference.mode: cache cannot serve this loss: it needs per-token KL from a live reference")
    if requested == "none" and needs != Reference.NONE:
        raise ConfigError("reference.mode: none, but the loss needs a reference model")
    return requested, "set by reference.mode"


def weights_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text += json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, getattr(tokenizer, "chat_template", None)])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def cache_parts(weights: str, tokenizer: str, data: str, settings: dict) -> dict:
    """What a cache depends on, as the keyword arguments of :func:`cache_key`."""
    return {"weights": weights, "tokenizer": tokenizer, "data": data, "settings": settings}


_PART_NAMES = {"weights": "reference weights", "tokenizer": "tokenizer", "data": "data (token ids)", "settings": "settings"}


def _differences(parts: dict, theirs: dict) -> list[str]:
    out = []
    for k, label in _PART_NAMES.items():
        if theirs.get(k) == parts[k]:
            continue
        if k == "settings" and isinstance(theirs.get(k), dict):
            changed = sorted(n for n in set(parts[k]) | set(theirs[k]) if parts[k].get(n) != theirs[k].get(n))
            label += f" ({', '.join(changed)})"
        out.append(label)
    return out


def _why_new(path: Path, parts: dict) -> str:
    """Why no cache exists for ``parts``: what differs from the closest other cache in the directory."""
    from safetensors import safe_open

    best: tuple | None = None
    for other in path.parent.glob("*.safetensors"):
        try:
            with safe_open(str(other), "pt") as f:
                theirs = json.loads((f.metadata() or {}).get("parts", "null"))
            mtime = other.stat().st_mtime
        except Exception:  # noqa: BLE001 - an unreadable neighbour explains nothing
            continue
        if isinstance(theirs, dict):
            differ = _differences(parts, theirs)
            if len(differ) < len(_PART_NAMES) and (best is None or (len(differ), -mtime) < best[:2]):
                best = (len(differ), -mtime, differ, other.name)
    if best is None:
        return "computing it"
    return f"the most similar cache here, {best[3]}, differs in: {', '.join(best[2])}; computing a new one"


def cache_key(weights: str, tokenizer: str, data: str, settings: dict) -> str:
    """The cache file's name: changes whenever the reference weights, tokenizer, data or settings do."""
    blob = json.dumps({"format": CACHE_FORMAT, "weights": weights, "tokenizer": tokenizer, "data": data, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RefCache:
    """Cached reference log-probs of a data split: per-pair sums, and per-token values when a loss reads them.

    ``sums`` is ``(n, 2)`` (chosen, rejected). Per-token values of pair ``i`` are
    ``tokens[offsets[i]:offsets[i + 1]]``, its chosen completion's first, ``split[i]`` of them.
    """

    def __init__(self, sums: torch.Tensor, tokens: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
                 split: torch.Tensor | None = None) -> None:
        self.sums, self.tokens, self.offsets, self.split = sums, tokens, offsets, split
        self._offsets_host = offsets.tolist() if offsets is not None else None
        self._split_host = split.tolist() if split is not None else None

    @property
    def per_token(self) -> bool:
        return self.tokens is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"ref_logps": self.sums}
        if self.per_token:
            out.update(ref_token_logps=self.tokens, ref_token_offsets=self.offsets, ref_token_split=self.split)
        return out

    def pair_sums(self, index: list[int]) -> torch.Tensor:
        return self.sums[index]

    def batch_tokens(self, index: list[int], like: dict) -> Tokens:
        """Per-token values of a batch's completions (chosen of each pair, then rejected), on the host."""
        assert self._offsets_host is not None and self._split_host is not None
        parts = []
        for side in (0, 1):
            for i in index:
                start, end, k = self._offsets_host[i], self._offsets_host[i + 1], self._split_host[i]
                parts.append(torch.arange(start, start + k) if side == 0 else torch.arange(start + k, end))
        values = self.tokens[torch.cat(parts)] if parts else self.tokens[:0]
        return Tokens(values, like["token_seq"], like["token_position"], like["completion_lengths"], like["cu_completion"])


def load_cache(path: Path, key: str, n: int, parts: dict | None = None, per_token: bool = False) -> RefCache | None:
    """The cached reference log-probs of ``n`` pairs, or ``None`` (logging why) if absent, stale or corrupted.

    With ``parts`` (see :func:`cache_parts`), a missing cache is explained by what differs
    from the closest other cache in the same directory (weights, tokenizer, data, settings).
    """
    if not path.exists():
        why = _why_new(path, parts) if parts is not None and path.parent.is_dir() else "computing it"
        log.info("reference cache: none at %s yet; %s", path, why)
        return None
    read = _read(path, key, "ref_logps", lambda t: t["ref_logps"].shape == (n, 2) and ("ref_token_logps" in t) == per_token)
    if read is None:
        return None
    tensors = read
    sums = tensors["ref_logps"]
    if not per_token:
        return RefCache(sums)
    offsets = tensors["ref_token_offsets"]
    if offsets.shape != (n + 1,) or int(offsets[-1]) != tensors["ref_token_logps"].shape[0]:
        log.warning("reference cache %s has inconsistent per-token offsets; recomputing it", path)
        return None
    return RefCache(sums, tensors["ref_token_logps"], offsets, tensors["ref_token_split"])


def _read(path: Path, key: str, needed: str, fits: Callable[[dict[str, torch.Tensor]], bool]) -> dict[str, torch.Tensor] | None:
    """The tensors of the cache file at ``path`` if readable, for ``key``, of the expected sizes (``fits``) and intact;
    else ``None``, logging why (the caller recomputes)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        tensors[needed]
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as exc:
        log.warning("reference cache %s is unreadable (%s); recomputing it", path, exc)
        return None
    if meta.get("key") != key or not fits(tensors):
        log.warning("reference cache %s is stale (fingerprint or size differs); recomputing it", path)
        return None
    if meta.get("sha256") != _checksum(tensors):
        log.warning("reference cache %s fails its checksum (corrupted); recomputing it", path)
        return None
    return tensors


def save_cache(path: Path, key: str, cache: "RefCache | GroupRefCache | torch.Tensor", parts: dict | None = None) -> None:
    """Write ``cache`` atomically, with its key, checksum and (for explaining a later miss) its fingerprint ``parts``."""
    if isinstance(cache, torch.Tensor):
        cache = RefCache(cache)
    tensors = {k: v.contiguous() for k, v in cache.tensors().items()}
    meta = {"key": key, "sha256": _checksum(tensors), "format": str(CACHE_FORMAT)}
    if parts is not None:
        meta["parts"] = json.dumps(parts, sort_keys=True)
    remove_stale_temporaries(path.parent, ".*.safetensors.*.tmp")  # left by a writer killed mid-write
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    except (OSError, SafetensorError) as exc:
        need = sum(t.numel() * t.element_size() for t in tensors.values()) + 4096
        raise no_space_error(exc, "reference cache", path.parent, need) from exc


@torch.no_grad()
def compute_ref_logps(
    forward: Callable[[dict], torch.Tensor],
    batches: Sequence[dict],
    n: int,
    show_progress: bool = True,
    token_counts: Sequence[tuple[int, int]] | None = None,
) -> RefCache:
    """Reference log-probs of every pair index in ``batches``: sums ``(n, 2)``, NaN for pairs not in them.

    ``forward(batch)`` returns flat per-token log-probs in the batch's layout; a batch marked
    ``filler`` (FSDP: every process runs as many forwards) is run and not recorded. With
    ``token_counts`` (completion tokens of each pair's chosen and rejected) per-token values
    are kept too, zero for pairs not in ``batches`` (so shares of several processes add up).
    """
    sums = torch.full((n, 2), float("nan"))
    tokens = offsets = split = None
    if token_counts is not None:
        offsets = torch.tensor([0] + [c + r for c, r in token_counts]).cumsum(0)
        split = torch.tensor([c for c, _ in token_counts])
        tokens = torch.zeros(int(offsets[-1]))
    for batch in tqdm(batches, desc="reference log-probs", disable=not show_progress):
        values = forward(batch).float()
        if batch.get("filler"):
            continue
        cu, index = batch["cu_completion"], batch["index_host"]
        b = len(index)
        # summed on the device exactly as the engine sums the policy's, so policy == reference gives equal sums
        dev = values.device
        layout = (batch["token_seq"].to(dev), batch["token_position"].to(dev), batch["completion_lengths"].to(dev), cu)
        chosen, rejected = Tokens(values, *layout).sum()
        sums[index, 0], sums[index, 1] = chosen.cpu(), rejected.cpu()
        values = values.cpu()
        for s in range(2 * b):
            pair, side = index[s % b], s // b
            part = values[cu[s] : cu[s + 1]]
            if tokens is not None:
                start = int(offsets[pair]) + (0 if side == 0 else int(split[pair]))
                tokens[start : start + part.shape[0]] = part
    return RefCache(sums, tokens, offsets, split)


class GroupRefCache:
    """Cached reference log-probs of a split of groups, one value per completion of the layout.

    Group ``g``'s completions are ``values[offsets[g]:offsets[g + 1]]``, in order, then its mismatched
    completion (KTO) where it has one. Pairs taken from those groups (``data.pairs_from``) read it too.
    """

    def __init__(self, values: torch.Tensor, offsets: torch.Tensor) -> None:
        self.values, self.offsets = values, offsets
        self._offsets_host = offsets.tolist()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"ref_completion_logps": self.values, "ref_group_offsets": self.offsets}

    def grid(self, index: list[int], counts: list[int], shape: tuple[int, int], mismatched: bool) -> torch.Tensor:
        """The ``(B, W)`` grid of a batch's groups: completion ``k`` in column ``k``, the mismatched one (if asked
        for) in column ``W - 1``. ``counts[b]``: how many own completions group ``index[b]`` has."""
        out = torch.zeros(shape)
        for b, (g, k) in enumerate(zip(index, counts)):
            start = self._offsets_host[g]
            out[b, :k] = self.values[start : start + k]
            if mismatched:
                out[b, -1] = self.values[start + k]
        return out

    def pair_sums(self, sources: list[tuple[int, int, int]]) -> torch.Tensor:
        """``(n, 2)`` sums of pairs given as ``(group, chosen slot, rejected slot)``."""
        at = torch.tensor([[self._offsets_host[g] + i, self._offsets_host[g] + j] for g, i, j in sources], dtype=torch.long)
        return self.values[at.reshape(-1)].reshape(-1, 2) if len(sources) else torch.zeros(0, 2)


def load_group_cache(path: Path, key: str, counts: Sequence[int]) -> GroupRefCache | None:
    """The cached per-completion values of groups with ``counts`` completions each, or ``None`` (logged) if absent,
    stale or corrupted."""
    if not path.exists():
        log.info("reference cache: none at %s yet; computing it", path)
        return None
    expected = torch.tensor([0, *counts]).cumsum(0)

    def fits(t: dict[str, torch.Tensor]) -> bool:
        offsets = t.get("ref_group_offsets")
        return (offsets is not None and offsets.shape == expected.shape and torch.equal(offsets, expected)
                and t["ref_completion_logps"].shape == (int(expected[-1]),))

    tensors = _read(path, key, "ref_completion_logps", fits)
    return None if tensors is None else GroupRefCache(tensors["ref_completion_logps"], tensors["ref_group_offsets"])


@torch.no_grad()
def compute_group_ref(forward: Callable[[dict], torch.Tensor], batches: Sequence[dict], counts: Sequence[int],
                      show_progress: bool = True) -> GroupRefCache:
    """Reference log-probs of every completion of the groups in ``batches`` (laid out with their mismatched
    completion where they have one), zero for groups not in them (so shares of several processes add up).

    ``counts[g]``: completions of group ``g`` in the layout. A ``filler`` batch is run and not recorded."""
    offsets = torch.tensor([0, *counts]).cumsum(0)
    values = torch.zeros(int(offsets[-1]))
    for batch in tqdm(batches, desc="reference log-probs", disable=not show_progress):
        grid = grid_sums(forward(batch).float(), batch).cpu()
        if batch.get("filler"):
            continue
        w = batch["group_shape"][1]
        for b, g in enumerate(batch["index_host"]):
            n = counts[g]
            start = int(offsets[g])
            own = n - batch["has_mismatched"]
            values[start : start + own] = grid[b, :own]
            if batch["has_mismatched"]:
                values[start + own] = grid[b, w - 1]
    return GroupRefCache(values, offsets)
