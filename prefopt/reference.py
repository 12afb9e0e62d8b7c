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

from prefopt.atomic import atomic_write
from prefopt.errors import ConfigError
from prefopt.losses.base import Reference

log = logging.getLogger("prefopt")
CACHE_FORMAT = 1


def choose_mode(requested: str, needs: Reference) -> tuple[str, str]:
    """The reference mode to run and why, from the config's request and what the loss declares."""
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


def _checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def load_cache(path: Path, key: str, n: int, parts: dict | None = None) -> torch.Tensor | None:
    """The cached ``(n, 2)`` reference log-probs, or ``None`` (logging why) if absent, stale or corrupted.

    With ``parts`` (see :func:`cache_parts`), a missing cache is explained by what differs
    from the closest other cache in the same directory (weights, tokenizer, data, settings).
    """
    if not path.exists():
        why = _why_new(path, parts) if parts is not None and path.parent.is_dir() else "computing it"
        log.info("reference cache: none at %s yet; %s", path, why)
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensor = load_file(str(path))["ref_logps"]
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as exc:
        log.warning("reference cache %s is unreadable (%s); recomputing it", path, exc)
        return None
    if meta.get("key") != key or tensor.shape != (n, 2):
        log.warning("reference cache %s is stale (fingerprint or size differs); recomputing it", path)
        return None
    if meta.get("sha256") != _checksum(tensor):
        log.warning("reference cache %s fails its checksum (corrupted); recomputing it", path)
        return None
    return tensor


def save_cache(path: Path, key: str, ref_logps: torch.Tensor, parts: dict | None = None) -> None:
    meta = {"key": key, "sha256": _checksum(ref_logps), "format": str(CACHE_FORMAT)}
    if parts is not None:
        meta["parts"] = json.dumps(parts, sort_keys=True)
    atomic_write(path, lambda tmp: save_file({"ref_logps": ref_logps.contiguous()}, str(tmp), metadata=meta))


@torch.no_grad()
def compute_ref_logps(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    batches: Sequence[dict[str, torch.Tensor]],
    n: int,
    show_progress: bool = True,
) -> torch.Tensor:
    """Summed reference log-probs ``(n, 2)`` (chosen, rejected) for every pair index in ``batches``.

    ``forward(batch)`` returns per-token log-probs of the batch's chosen-then-rejected rows.
    """
    out = torch.full((n, 2), float("nan"))
    for batch in tqdm(batches, desc="reference log-probs", disable=not show_progress):
        sums = forward(batch).sum(-1).float().cpu()
        half = sums.shape[0] // 2
        out[batch["index"], 0] = sums[:half]
        out[batch["index"], 1] = sums[half:]
    return out
