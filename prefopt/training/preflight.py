"""Checks of a validated config against the machine: paths, model weights, Hub access, devices, trackers.

``prefopt validate`` runs them, and ``train`` runs them before any expensive work,
so a run fails in seconds, with every problem named by its field, or not at all.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import torch

from prefopt.config import RunConfig
from prefopt.engine.modeling import has_weights, read_chat_template
from prefopt.errors import ConfigError

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt")
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",), "mlflow": ("mlflow",),
                   "aim": ("aim",), "clearml": ("clearml",), "dvclive": ("dvclive",), "swanlab": ("swanlab",), "trackio": ("trackio",)}
HUB_TIMEOUT = 10.0  # seconds for one Hub lookup


def looks_local(value: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether ``value`` is meant as a local path rather than a Hub name like ``org/name``."""
    return (
        os.path.isabs(value) or value.startswith((".", "~")) or "\\" in value or value.endswith("/")
        or value.count("/") > 1 or value.lower().endswith(suffixes)
    )


def preflight(config: RunConfig, hub: bool = True, *, resume: bool = False, overwrite: bool = False,
              protect: list[str] | tuple[str, ...] = (), output: bool = True) -> None:
    """Raise one :class:`ConfigError` listing every problem ``train`` would meet later (with the same flags);
    ``output=False`` leaves out the checks of an existing ``trainer.output_dir`` (for commands that do not train)."""
    from prefopt.training.resume import output_problems

    problems: list[str] = []
    for field, value in (("data.train", config.data.train), ("data.eval", config.data.eval)):
        if value and not Path(value).exists():
            if looks_local(value, DATA_SUFFIXES):
                problems.append(f"{field}: {value} does not exist")
            elif hub:
                problems.extend(_hub(field, value, "dataset"))
    m = config.model
    for field, value in (("model.name_or_path", m.name_or_path), ("model.tokenizer", m.tokenizer), ("model.reference", m.reference)):
        if not value:
            continue
        path = Path(value)
        if path.is_dir():
            if field != "model.tokenizer" and (path / "config.json").exists() and not has_weights(path) and m.init != "random":
                problems.append(
                    f"{field}: {value} has a config.json but no weights (*.safetensors, *.bin); if you mean to train from "
                    f"randomly initialised weights, set model.init: random"
                )
        elif path.exists():
            problems.append(f"{field}: {value} is a file; expected a model directory or a Hub name")
        elif looks_local(value):
            problems.append(f"{field}: {value} does not exist (no such local directory)")
        elif hub:
            problems.extend(_hub(field, value, "model"))
    if config.data.chat_template is not None:  # read by the tokenizer only after the output directory is prepared
        try:
            read_chat_template(config.data.chat_template)
        except ConfigError as exc:
            problems.append(str(exc))
    if config.trainer.precision == "fp16" and not torch.cuda.is_available():
        problems.append("trainer.precision: fp16 needs a CUDA device (it trains with loss scaling); use bf16 or fp32 on CPU")
    for name in config.trainer.report_to:
        modules = TRACKER_MODULES.get(name)
        if modules and not any(importlib.util.find_spec(mod) for mod in modules):
            problems.append(f"trainer.report_to: tracker {name!r} needs the {modules[0]} package (pip install {modules[0]})")
    problems.extend(_data_fits_loss(config))
    problems.extend(_coupled_loss_fits_budget(config))
    problems.extend(_reference(config))
    problems.extend(_writable("trainer.output_dir", config.trainer.output_dir))
    problems.extend(_writable("reference.cache_dir", config.reference.cache_dir))
    if output:
        problems.extend(p for p in output_problems(config, resume, overwrite, protect) if p not in problems)
    problems.extend(shape_problems(config))
    rows = count_rows(config)
    if rows is not None:
        problems.extend(epoch_problems(rows, config, world_size(), "rows in data.train, at most"))
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _coupled_loss_fits_budget(config: RunConfig) -> list[str]:
    """A loss whose pairs interact (``couples_pairs``, e.g. ``aot`` sorts across its batch) needs each micro-batch in
    one forward: a token budget could split it and silently change the loss."""
    budget = config.trainer.max_tokens_per_forward
    loss = config.build_loss()
    if budget is None or not loss.couples_pairs:
        return []
    return [f"trainer.max_tokens_per_forward: loss {loss.name!r} couples the pairs of its batch (its value depends on all of "
            f"them together), so a token budget that splits a batch across forwards would change it; unset "
            f"trainer.max_tokens_per_forward, or lower trainer.batch_size and raise trainer.grad_accum instead"]


def _data_fits_loss(config: RunConfig) -> list[str]:
    """One line if the loss cannot take the kind of data a local ``data.train`` holds (a Hub dataset is checked on loading)."""
    from prefopt.data.examples import plan
    from prefopt.data.pairs import detect_kind
    from prefopt.errors import DataError, PrefoptError
    from prefopt.losses.base import takes_of

    if not Path(config.data.train).exists():
        return []
    try:
        loss = config.build_loss()
        kind = detect_kind(config.data.train, config.data.split, config.data.columns)
        plan(kind, takes_of(loss), loss.name, config.data.pairs_from)
    except DataError as exc:
        return [f"data.train: {exc}"]
    except PrefoptError:  # a bad loss spec is reported by validation
        return []
    return []


def _reference(config: RunConfig) -> list[str]:
    """The reference mode the loss and ``reference`` section give, or why there is none (e.g. sync with a LoRA adapter)."""
    from prefopt.engine.reference import choose_mode
    from prefopt.losses.base import needs_of, reference_for

    sync = config.reference.sync is not None
    try:
        choose_mode(config.reference.mode, reference_for(needs_of(config.build_loss())), sync)
    except ConfigError as exc:
        return [str(exc)]
    if sync and config.model.lora is not None and config.model.reference is None:
        return ["reference.sync: with model.lora the reference is the base model under the adapter, which training never changes "
                "apart from the adapter; reference.sync needs a full model (train without model.lora, or set model.reference)"]
    return []


def shape_problems(config: RunConfig) -> list[str]:
    """Settings whose memory cost has no use: a ``pad_to_multiple_of`` beyond the longest packed row."""
    tc, longest = config.trainer, config.trainer.batch_size * 2 * config.data.max_length
    if tc.max_tokens_per_forward is not None:
        longest = min(longest, max(tc.max_tokens_per_forward, 2 * config.data.max_length))
    if tc.packing and tc.pad_to_multiple_of is not None and tc.pad_to_multiple_of > longest:
        return [f"trainer.pad_to_multiple_of: {tc.pad_to_multiple_of} is longer than any packed row can be ({longest} tokens: "
                f"batch_size x 2 x data.max_length); every row would be padded to it. Use a small multiple such as 64"]
    return []


def epoch_problems(pairs: int, config: RunConfig, processes: int, what: str = "usable pairs") -> list[str]:
    """A step needs ``grad_accum`` micro-batches; an epoch must hold at least that many."""
    tc = config.trainer
    micro = pairs // (tc.batch_size * processes)
    if micro == 0:
        return [f"data.train: {pairs} {what}, fewer than one batch ({tc.batch_size} x {processes} processes)"]
    if tc.grad_accum > micro:
        return [f"trainer.grad_accum: {tc.grad_accum} micro-batches per step, but one epoch holds only {micro} "
                f"({pairs} {what} / batch_size {tc.batch_size} x {processes} processes); lower trainer.grad_accum or "
                f"trainer.batch_size"]
    return []


def count_rows(config: RunConfig) -> int | None:
    """Rows of a local JSON-lines ``data.train`` (an upper bound on its usable pairs), else ``None``; cheap."""
    from prefopt.data.sources import local_files

    try:
        files = local_files(config.data.train, config.data.split) if Path(config.data.train).exists() else None
    except Exception:  # noqa: BLE001 - a layout problem is reported when the data is read
        return None
    if not files or any(f.suffix != ".jsonl" for f in files):
        return None
    rows = 0
    for f in files:
        with open(f, "rb") as fh:
            rows += sum(1 for line in fh if line.strip())
    return min(rows, config.data.max_rows or rows)


def world_size() -> int:
    from prefopt.training.distributed import world_size as size

    return size()


def _writable(field: str, value: str) -> list[str]:
    from prefopt.training.lock import describe_os_error

    path = Path(value)
    try:
        if path.exists() and not path.is_dir():
            return [f"{field}: {value} is a file, not a directory"]
        existing = path
        while not existing.exists():
            existing = existing.parent
        _check_name_lengths(path.absolute(), existing)
    except OSError as exc:
        return [f"{field}: {value} cannot be used: {describe_os_error(exc)}"]
    if not existing.is_dir():
        return [f"{field}: {value} cannot be created: {existing} is a file"]
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return [f"{field}: {value} is not writable ({existing}: {exc.strerror or exc})"]
    return []


def _check_name_lengths(path: Path, existing: Path) -> None:
    """Raise ENAMETOOLONG for a part of ``path`` longer than the filesystem at ``existing`` allows."""
    import errno

    limit = os.pathconf(existing, "PC_NAME_MAX")
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), part[:40] + "...")


def _hub(field: str, name: str, kind: str) -> list[str]:
    """One line if the Hub name cannot be found or reached (and there is no cached copy)."""
    try:
        from huggingface_hub import HfApi, try_to_load_from_cache
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:  # pragma: no cover - a transformers dependency
        return []
    local = f"point {field} at a local copy (a directory saved with save_pretrained, or data files)"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        probe = "config.json" if kind == "model" else "README.md"
        if isinstance(try_to_load_from_cache(name, probe, repo_type=kind), str):
            return []
        return [f"{field}: {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {local}"]
    try:
        HfApi().repo_info(name, repo_type=kind, timeout=HUB_TIMEOUT)
        return []
    except RepositoryNotFoundError:
        return [f"{field}: no {kind} named {name!r} on the Hugging Face Hub (or it is private: log in with `hf auth login`); "
                f"or {local}"]
    except Exception as exc:  # noqa: BLE001 - network errors of any kind
        probe = "config.json" if kind == "model" else "README.md"
        if isinstance(try_to_load_from_cache(name, probe, repo_type=kind), str):
            return []  # reachable later from the cache
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return [f"{field}: cannot reach the Hugging Face Hub for {kind} {name!r} ({reason}); {local}, or set HF_HUB_OFFLINE=1 to use a cached copy"]
