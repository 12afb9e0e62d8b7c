"""Reading rows from a data source: local JSON/JSONL/Parquet/CSV files or directories, or a Hub dataset.

Every source is read with ``datasets.load_dataset``. Local JSON and JSON-lines files are
first scanned line by line here, because ``datasets`` cannot say which line is malformed.
"""
from __future__ import annotations

import json
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefopt.errors import DataError

JSON_EXTS = {".json", ".jsonl"}
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

FIELDS = ("prompt", "chosen", "rejected", "completions", "scores", "completion", "label")
MALFORMED = "malformed JSON"
BAD_UTF8 = "invalid UTF-8"
HELD = 1 << 16  # characters: a longer string goes around datasets (see _through_datasets)


@dataclass
class Record:
    """One row of a source, parsed or not."""

    row: int  # 0-based index over the whole source
    where: str  # e.g. "data.jsonl line 8" or "data.parquet row 7 (0-based)"
    value: dict[str, Any] | None  # None when the row could not be parsed
    problem: tuple[str, str] | None = None  # (reason, located message) when value is None


def dataset_splits(path: Path) -> dict[str, list[Path]] | None:
    """The splits of a directory laid out like a Hub dataset (``data/train-00000-of-00001.parquet``...),
    found by the file-name rules of ``datasets``; None for a directory of files without split names."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(path))
    except Exception:  # no data files at all: the caller says so
        return None
    if list(patterns.values()) == [["**"]]:
        return None
    found = DataFilesDict.from_patterns(patterns, str(path))
    splits = {str(k): sorted(Path(f) for f in v if Path(f).suffix.lower() in BUILDERS) for k, v in found.items()}
    return {k: v for k, v in splits.items() if v} or None


def local_files(source: str, split: str | None = None) -> list[Path] | None:
    """The data files of a local source, or None when ``source`` is not a local path.

    A directory laid out in splits gives the files of ``split``; any other directory
    gives all its data files (it is one split).
    """
    path = Path(source).expanduser()
    splits = dataset_splits(path) if path.is_dir() and split is not None else None
    if splits is not None:
        if split not in splits:
            raise DataError(f"{source}: no split {split!r} in this dataset directory (splits: {', '.join(sorted(splits))})")
        files = splits[split]
        if len({BUILDERS[p.suffix.lower()] for p in files}) > 1:
            raise DataError(f"{source}: split {split!r} mixes file types; use one type")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in BUILDERS and not _hidden(p.relative_to(path)))
        if not files:
            raise DataError(f"{source}: directory has no .json, .jsonl, .parquet or .csv files")
        builders = {BUILDERS[p.suffix.lower()] for p in files}
        if len(builders) > 1:
            raise DataError(f"{source}: directory mixes file types ({', '.join(sorted(builders))}); use one type")
        return files
    if path.exists() and not path.is_file():  # a FIFO would hang the reader, a device never ends
        raise DataError(f"{source}: not a regular file or directory")
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise DataError(f"{source}: unsupported file type {path.suffix!r}; use .json, .jsonl, .parquet or .csv")
        return [path]
    if path.suffix.lower() in BUILDERS or source.startswith((".", "/", "~")) or "\\" in source:
        raise DataError(f"{source}: no such file or directory")
    return None


def _hidden(relative: Path) -> bool:
    """A file ``datasets`` leaves out of a directory: hidden (``.ipynb_checkpoints/``, macOS ``._x.jsonl``) or under ``__x/``."""
    return any(part.startswith(".") for part in relative.parts) or any(part.startswith("__") for part in relative.parent.parts)


def read_records(
    source: str,
    split: str,
    max_rows: int | None,
    check: Callable[[list[Record]], None],
    columns: dict[str, str] | None = None,
) -> list[Record]:
    """All rows of ``source`` (at most ``max_rows``).

    ``check`` marks rows that must not reach ``datasets`` (wrong types would break its
    schema inference); it runs on scanned JSON rows before they are loaded. ``columns``
    maps prefopt's fields (``FIELDS``) to the source's column names; the rows come
    back under the standard names.
    """
    files = local_files(source, split)
    if files is None or (files[0].suffix.lower() not in JSON_EXTS and dataset_splits(Path(source).expanduser())):
        # A Hub name, or a local directory laid out like one: the same load_dataset call.
        slice_ = f"{split}[:{max_rows}]" if max_rows else split
        label = f"Hub dataset {source}" if files is None else source
        ds = _load(str(Path(source).expanduser()) if files else source, label, split=slice_)
        return _renamed([Record(i, f"{source} [{split}] row {i} (0-based)", dict(r)) for i, r in enumerate(ds)], columns, source)
    if files[0].suffix.lower() in JSON_EXTS:
        records = _renamed(_scan_json(files, max_rows), columns, source)
        check(records)
        return _through_datasets(records, source)
    records = []
    for path in files:
        if path.suffix.lower() == ".csv":
            _decode(path)
        ds = _load(BUILDERS[path.suffix.lower()], str(path), data_files=str(path), split="train")
        for i, r in enumerate(ds):
            if max_rows is not None and len(records) >= max_rows:
                return _renamed(records, columns, source)
            records.append(Record(len(records), f"{path} row {i} (0-based)", dict(r)))
    return _renamed(records, columns, source)


def _renamed(records: list[Record], columns: dict[str, str] | None, source: str) -> list[Record]:
    """Rows with the source's column names replaced by the standard field names."""
    renames = {col: name for name, col in (columns or {}).items() if col != name}
    if not renames:
        return records
    present = {k for rec in records if rec.value is not None for k in rec.value}
    absent = [f"{name} to {col!r}" for col, name in renames.items() if col not in present]
    if absent and present:  # else every field the mapping replaces would silently read as absent
        raise DataError(f"{source}: data.columns maps {', '.join(absent)}, but the data has no such column "
                        f"(its columns: {', '.join(sorted(present)[:20])})")
    for rec in records:
        if rec.value is not None:
            rec.value = {renames.get(k, k): v for k, v in rec.value.items() if k in renames or k not in renames.values()}
    return records


def _load(name: str, label: str, **kwargs: Any):
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(name, **kwargs)
    except Exception as exc:  # datasets raises many types; the user needs the source named
        cause = f" ({type(exc.__cause__).__name__}: {str(exc.__cause__).strip()})" if exc.__cause__ else ""
        raise DataError(f"{label}: cannot load: {type(exc).__name__}: {exc}{cause}") from exc
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _through_datasets(records: list[Record], source: str) -> list[Record]:
    """Load the scanned rows that passed ``check`` with ``datasets``, keeping their locations.

    A string longer than ``HELD`` characters goes through as a placeholder string (the same type to
    ``datasets``, which returns strings as they are) and is put back after: ``datasets`` holds
    several copies of what it reads, about 8 bytes per byte of a 40 MB text."""
    good = [r for r in records if r.value is not None]
    if not good:
        return records
    held: list[str] = []
    tag = f"\x00prefopt-held-{uuid.uuid4().hex}-"
    hold, put_back = _hold(held, tag), _put_back(held, tag)
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "rows.jsonl"
        with clean.open("w", encoding="utf-8") as f:
            for r in good:
                fields = {k: _strings(v, hold) for k, v in r.value.items() if k in FIELDS}
                f.write(json.dumps({"__row__": r.row, **fields}) + "\n")
        ds = _load("json", source, data_files=str(clean), split="train", cache_dir=str(Path(tmp) / "cache"))
        by_row = {r.row: r for r in good}
        for item in ds:
            item = dict(item)
            rec = by_row[item.pop("__row__")]
            # columns absent from this row come back as null
            rec.value = {k: _strings(v, put_back) if held else v for k, v in item.items() if k in rec.value}
    return records


def _hold(held: list[str], tag: str) -> Callable[[str], str]:
    """A string longer than ``HELD`` appended to ``held`` and replaced by ``tag`` and its index; others as they are."""
    def hold(text: str) -> str:
        if len(text) <= HELD:
            return text
        held.append(text)
        return f"{tag}{len(held) - 1}"
    return hold


def _put_back(held: list[str], tag: str) -> Callable[[str], str]:
    return lambda text: held[int(text[len(tag):])] if text.startswith(tag) else text


def _strings(value: Any, change: Callable[[str], str]) -> Any:
    """``value`` (JSON: dicts, lists, scalars) with ``change`` applied to every string in it."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {k: _strings(v, change) for k, v in value.items()}
    if isinstance(value, list):
        return [_strings(v, change) for v in value]
    return value


def _scan_json(files: list[Path], max_rows: int | None) -> list[Record]:
    records: list[Record] = []
    for path in files:
        for where, value, problem in _scan_file(path):
            if max_rows is not None and len(records) >= max_rows:
                return records
            located = (problem[0], f"{where}: {problem[1]}") if problem else None
            records.append(Record(len(records), where, value, located))
    return records


def _scan_file(path: Path) -> Iterator[tuple[str, dict[str, Any] | None, tuple[str, str] | None]]:
    """(where, value, problem) per row of a JSON array file or a JSON-lines file."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        yield from _scan_array(path)
        return
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, None, (BAD_UTF8, f"invalid UTF-8 at byte {exc.start + 1} of the line")
                continue
            try:
                value = _loads(text)
            except (ValueError, RecursionError) as exc:  # ValueError: also an integer of over 4300 digits, a duplicate key
                yield where, None, (MALFORMED, f"malformed JSON: {getattr(exc, 'msg', exc)}"
                                    + (f" (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""))
                continue
            if not isinstance(value, dict):
                yield where, None, (MALFORMED, f"expected a JSON object, got {kind_name(value)}")
                continue
            yield where, value, None


def _scan_array(path: Path) -> Iterator[tuple[str, dict[str, Any] | None, tuple[str, str] | None]]:
    # A broken array has no rows to skip, so it is an error whatever on_error says.
    text = _decode(path)
    try:
        json.loads(text)
    except (ValueError, RecursionError) as exc:
        where = f" at line {exc.lineno}, column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else f": {exc}"
        raise DataError(f"{path}: malformed JSON{where}") from None
    for i, (value, problem) in enumerate(_array_items(text)):
        where = f"{path} item {i} (0-based)"
        if problem is not None:
            yield where, None, (MALFORMED, f"malformed JSON: {problem}")
        elif isinstance(value, dict):
            yield where, value, None
        else:
            yield where, None, (MALFORMED, f"expected a JSON object, got {kind_name(value)}")


def _array_items(text: str) -> Iterator[tuple[Any, str | None]]:
    """(item, None) for each item of a JSON array that parses, or (None, why) for an item with a duplicate key."""
    strict, plain, space = json.JSONDecoder(object_pairs_hook=_unique_keys), json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    at = space.match(text, text.index("[") + 1).end()
    while text[at] != "]":
        try:
            value, end = strict.raw_decode(text, at)
            yield value, None
        except ValueError as exc:
            end = plain.raw_decode(text, at)[1]
            yield None, str(exc)
        at = space.match(text, end).end()
        at = space.match(text, at + 1).end() if text[at] == "," else at


def _loads(text: str) -> Any:
    """``json.loads``, refusing an object with a key twice (which value a reader keeps is its own choice)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {key[:80]!r}")
    return value


def _decode(path: Path) -> str:
    """The text of a whole-file format; invalid UTF-8 is an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: invalid UTF-8") from None


def kind_name(value: Any) -> str:
    """How a JSON value's type reads in a message: "a string", "a number", "null"..."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(value), type(value).__name__)
