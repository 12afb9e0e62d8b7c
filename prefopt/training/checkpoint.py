"""Checkpoints: written to a temporary directory, fsynced, renamed; verified by checksum when loaded."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prefopt.atomic import crash_point, disk_full, fsync_dir, sha256_file
from prefopt.errors import PrefoptError

log = logging.getLogger("prefopt")


class CheckpointError(PrefoptError):
    """A checkpoint is missing, corrupted or does not fit the run."""


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def is_sharded(model: torch.nn.Module) -> bool:
    """The model's parameters are FSDP2 shards (DTensors): its state must be gathered by every process."""
    if not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5: no FSDP2 either
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_options(trainable_only: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # whole tensors, on the first process only; frozen weights (a live reference) are then never gathered
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Whole weights of a sharded ``model`` on the first process (empty elsewhere); ``None`` if not sharded.
    Collective: every process must call it."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def gather(model: torch.nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Trainable weights and optimiser state of a sharded ``model``, whole, on the first process; ``None``
    if not sharded. Collective: every process must call it before the first one saves."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=_full_options(trainable_only=True))
    weights = {n: t.contiguous() for n, t in state.items() if n in names}
    return weights, get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=_full_options())


REQUIRED = ("model.safetensors", "optimizer.pt", "state.json")  # what load_checkpoint reads


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer, scheduler, state: dict[str, Any], keep: int,
                    gathered: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
                    reference: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``root/step-NNNNNNN`` atomically and prune to the last ``keep`` checkpoints.

    ``gathered`` is what :func:`gather` returned for a sharded model (weights and optimiser state);
    ``reference``, the weights of a reference that training changes (``reference.sync``). A complete checkpoint
    already there with these weights (a finished run resumed) is kept, not rewritten; any other is replaced only
    once its replacement is complete (:func:`_put_in_place`)."""
    weights, optimizer_state = gathered or (trainable_state(model), optimizer.state_dict())
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    recover_temporaries(root)  # left by a run killed while saving
    if final.is_dir() and _holds(final, weights):
        prune(root, keep, final)
        return final
    try:
        tmp.mkdir()
        save_file(weights, str(tmp / "model.safetensors"))
        if reference is not None:
            save_file(reference, str(tmp / "reference.safetensors"))
        with open(tmp / "optimizer.pt", "wb") as f:  # a Python file: a full disk surfaces as ENOSPC, not a bare C++ error
            torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, f)
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        sums = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        (tmp / "checksums.json").write_text(json.dumps(sums, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
    except (OSError, SafetensorError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc):
            exc = OSError(errno.ENOSPC, str(exc))
        elif not isinstance(exc, OSError):
            raise
        raise _write_error(exc, root, step, model) from exc
    _put_in_place(tmp, final)
    prune(root, keep, final)
    return final


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``; an old ``final`` is set aside first and removed only after.

    A kill at any point leaves a complete checkpoint that :func:`recover_temporaries` finds."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        crash_point("checkpoint:old-set-aside")
    os.replace(tmp, final)
    fsync_dir(final.parent)
    crash_point("checkpoint:new-in-place")
    shutil.rmtree(old, ignore_errors=True)


def _holds(path: Path, weights: dict[str, torch.Tensor]) -> bool:
    """Whether the checkpoint at ``path`` verifies and holds exactly ``weights``."""
    try:
        verify(path)
        saved = load_file(str(path / "model.safetensors"))
    except (CheckpointError, OSError, SafetensorError):
        return False
    return saved.keys() == weights.keys() and all(torch.equal(saved[k], weights[k].cpu()) for k in weights)


def recover_temporaries(root: Path) -> None:
    """After a kill while saving: promote a complete temporary (or a set-aside old copy) whose checkpoint is
    missing, and remove every other temporary (incomplete ones, and those whose checkpoint is in place)."""
    if not root.is_dir():
        return
    for stale in sorted(root.glob(".step-*.tmp")) + sorted(root.glob(".step-*.old")):
        final = root / stale.name[1:].rsplit(".", 1)[0]
        if not final.exists() and stale.is_dir() and not stale.is_symlink() and is_complete(stale):
            os.replace(stale, final)
            fsync_dir(root)
            log.warning("checkpoint %s: its save was interrupted after it was complete; recovered it", final)
        else:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() and not stale.is_symlink() else stale.unlink(missing_ok=True)


def is_complete(path: Path) -> bool:
    """Whether the checkpoint (or checkpoint temporary) at ``path`` verifies."""
    try:
        verify(path)
        return True
    except CheckpointError:
        return False


def _write_error(exc: OSError, root: Path, step: int, model: torch.nn.Module) -> CheckpointError:
    """A message for a failed checkpoint write; for a full disk, how much space a checkpoint needs."""
    if exc.errno != errno.ENOSPC:
        return CheckpointError(f"checkpoint step {step}: writing to {root} failed: {exc}; the partial checkpoint was removed")
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    need = 3 * params  # weights and AdamW's two moments
    free = shutil.disk_usage(root).free
    return CheckpointError(
        f"checkpoint step {step}: no space left on the device holding {root}; a checkpoint needs about {need / 2**20:.1f} MiB "
        f"and {free / 2**20:.1f} MiB are free. The partial checkpoint was removed, earlier ones are intact; free some space "
        f"(or lower trainer.keep_checkpoints) and resume with --resume"
    )


def prune(root: Path, keep: int, newest: Path | None = None) -> None:
    """Keep the ``keep`` newest checkpoints that verify (``newest``, just written, counts as verified).

    Checkpoints that fail verification are never counted and never make a good one
    go; they are left in place (``--resume`` refuses them), and removed once older
    than every kept checkpoint.
    """
    kept: list[Path] = []
    for path in reversed(list_checkpoints(root)):
        if len(kept) >= keep:
            shutil.rmtree(path, ignore_errors=True)
            continue
        if path == newest:
            kept.append(path)
            continue
        try:
            sig = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir()))
            if _verified.get(path) != sig:
                verify(path)
                _verified[path] = sig
            kept.append(path)
        except CheckpointError as exc:
            log.warning("%s; not counted among trainer.keep_checkpoints", exc)


_verified: dict[Path, tuple] = {}  # checkpoints verified by this process, by the size and mtime of their files


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


MAX_CHECKSUMS_BYTES = 2**20  # a checksums.json lists a handful of files


def verify(path: Path) -> None:
    """Raise :class:`CheckpointError` unless every file matches its recorded checksum.

    The checkpoint must be a real directory and ``checksums.json`` a small regular file in it: a symlink to a
    FIFO or ``/dev/zero`` would otherwise hang ``--resume`` or fill the memory."""
    if path.is_symlink():
        raise CheckpointError(f"checkpoint {path}: is a symbolic link, not a directory prefopt wrote; refusing to read it")
    try:
        st = (path / "checksums.json").lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CHECKSUMS_BYTES:
            raise CheckpointError(f"checkpoint {path}: checksums.json is not a regular file of at most "
                                  f"{MAX_CHECKSUMS_BYTES // 2**20} MiB inside the checkpoint; refusing to read it")
        sums = json.loads((path / "checksums.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: no readable checksums.json ({exc})") from None
    if not isinstance(sums, dict) or not set(REQUIRED) <= set(sums):
        raise CheckpointError(f"checkpoint {path}: checksums.json does not list {', '.join(REQUIRED)}")
    for name, expected in sums.items():
        f = path / str(name)
        if "/" in name or name in (".", "..") or not f.exists() or f.is_symlink() or not stat.S_ISREG(f.lstat().st_mode):
            raise CheckpointError(f"checkpoint {path}: {name!r} is not a regular file inside the checkpoint; refusing to read it")
        if sha256_file(f) != expected:
            raise CheckpointError(f"checkpoint {path}: {name} is truncated or corrupted (checksum mismatch)")


def latest_valid(root: Path) -> Path | None:
    """The newest checkpoint that passes verification; corrupted ones are refused with a warning."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify(path)
            return path
        except CheckpointError as exc:
            log.warning("%s; refusing it", exc)
    return None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    verify(path)
    weights = load_file(str(path / "model.safetensors"))
    missing = set(trainable_state(model)) - set(weights)
    if missing:
        raise CheckpointError(f"checkpoint {path}: does not fit this model (missing {sorted(missing)[:3]} ...)")
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    if is_sharded(model):  # every process reads the whole state and keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), opt["optimizer"], options=options)
    else:
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return json.loads((path / "state.json").read_text())


def reference_state(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A reference model's parameters (tied ones once), on the host, for :func:`save_checkpoint`."""
    return {n: p.detach().cpu().clone() for n, p in reference.named_parameters()}


def load_reference(path: Path, reference: torch.nn.Module) -> None:
    """Restore a synced reference's weights exactly from a checkpoint (verified by :func:`load_checkpoint`, which
    checks the files ``checksums.json`` lists: this one must be among them)."""
    file = path / "reference.safetensors"
    if not file.exists():
        raise CheckpointError(f"checkpoint {path}: holds no reference weights, but reference.sync changes the reference during "
                              f"training; it cannot be resumed with reference.sync")
    if file.name not in json.loads((path / "checksums.json").read_text()):  # only listed files were verified
        raise CheckpointError(f"checkpoint {path}: {file.name} is not listed in its checksums.json; refusing to read it")
    weights = load_file(str(file))
    names = {n for n, _ in reference.named_parameters()}
    if set(weights) != names:
        raise CheckpointError(f"checkpoint {path}: its reference weights do not fit this reference model")
    with torch.no_grad():
        for n, p in reference.named_parameters():
            p.copy_(weights[n])


def save_final_model(out: Path, policy: torch.nn.Module, tokenizer, state_dict: dict[str, torch.Tensor] | None,
                     summary: dict[str, Any]) -> None:
    """Model and tokenizer (``save_pretrained``) written into a hidden folder, then moved in file by file;
    ``summary.json``, written last, marks the run finished. A failed write (a full disk) removes the partial files."""
    from prefopt.atomic import atomic_write, no_space_error
    from prefopt.training.tracking import json_line

    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving it
    try:
        policy.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except (OSError, SafetensorError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not disk_full(exc):
            raise
        need = sum(p.numel() * p.element_size() for p in (state_dict or policy.state_dict()).values())
        raise no_space_error(OSError(errno.ENOSPC, str(exc)), "final model", out, need) from exc
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    tmp.rmdir()
    fsync_dir(out)
    atomic_write(out / "summary.json", lambda p: p.write_text(json_line(summary, indent=1)))
