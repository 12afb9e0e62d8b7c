"""Preference data: read a source, check every row, tokenise into :class:`Pair` objects.

All problems are found here, before training starts. Each is either raised as a
:class:`~prefopt.errors.DataError` naming file, row and field, or (``on_error: skip``)
counted by reason in a :class:`DataReport`. See docs/data.md.
"""
from __future__ import annotations

import hashlib
import random
from array import array
from dataclasses import dataclass, field
from typing import Any

from prefopt.data.sources import BAD_UTF8, FIELDS, MALFORMED, Record, kind_name, read_records
from prefopt.errors import DataError

MISSING = "missing field"
WRONG_TYPE = "wrong type"
EMPTY = "empty completion"
IDENTICAL = "identical completions"
UNKNOWN_ROLE = "unknown role"
TEMPLATE = "chat template"
EMPTY_PROMPT = "empty prompt"
OVERLONG = "overlong"
REASONS = (MALFORMED, BAD_UTF8, MISSING, WRONG_TYPE, EMPTY, IDENTICAL, UNKNOWN_ROLE, TEMPLATE, EMPTY_PROMPT, OVERLONG)

ROLES = ("system", "user", "assistant", "tool")
_EXAMPLES_PER_REASON = 3


@dataclass
class Pair:
    """One tokenised preference pair."""

    prompt_ids: list[int]  # with BOS if the tokenizer adds one
    chosen_ids: list[int]  # EOS appended, unless cut by truncation
    rejected_ids: list[int]
    row: int  # 0-based row index in its source


@dataclass
class DataReport:
    """What loading one source kept and skipped, by reason."""

    source: str
    rows: int
    kept: int
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    format: str = ""  # e.g. "text, explicit prompt"

    def add(self, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < _EXAMPLES_PER_REASON:
            shown.append(message)

    def summary(self) -> str:
        """One short paragraph for the start-up report."""
        fmt = f" ({self.format})" if self.format else ""
        text = f"{self.source}: {self.rows} rows{fmt}, {self.kept} kept"
        if not self.skipped:
            return text + "."
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
        first = next(iter(self.examples.values()))[0]
        return f"{text}, {sum(self.skipped.values())} skipped ({counts}); e.g. {first}."


@dataclass(frozen=True)
class _Format:
    explicit: bool  # a prompt field, or the prompt is the common prefix of chosen and rejected
    messages: bool  # conversational message lists, or plain text

    @property
    def fields(self) -> tuple[str, ...]:
        return ("prompt", "chosen", "rejected") if self.explicit else ("chosen", "rejected")

    def __str__(self) -> str:
        kind = "conversational" if self.messages else "text"
        return f"{kind}, {'explicit' if self.explicit else 'implicit'} prompt"


class _RowError(Exception):
    def __init__(self, reason: str, field: str | None, message: str):
        super().__init__(message)
        self.reason, self.field, self.message = reason, field, message


def load_pairs(
    source: str,
    tokenizer,
    *,
    split: str = "train",
    max_length: int,
    max_prompt_length: int | None = None,
    on_error: str = "raise",
    on_overlong: str = "drop",
    max_rows: int | None = None,
    columns: dict[str, str] | None = None,
    text_tokenization: str = "separate",
) -> tuple[list[Pair], DataReport]:
    """Read, check and tokenise one source.

    ``split`` applies to Hub datasets and to local directories laid out in splits like a
    Hub download (a single file is one split). Row numbers in messages are 1-based line
    numbers for JSON lines and 0-based row indices otherwise. ``columns`` maps ``prompt``,
    ``chosen``, ``rejected`` to the dataset's own column names. ``text_tokenization`` is
    ``"separate"`` (prompt and completion tokenised apart) or ``"trl"`` (TRL's rule for
    plain text, see docs/data.md); conversational rows always follow TRL.
    """
    if text_tokenization not in ("separate", "trl"):
        raise ValueError(f"text_tokenization must be 'separate' or 'trl', not {text_tokenization!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if on_overlong not in ("drop", "raise"):
        raise ValueError(f"on_overlong must be 'drop' or 'raise', not {on_overlong!r}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; completions need one appended")

    names = _column_names(columns)
    detected: list[_Format] = []  # JSON rows are checked before datasets reads them
    records = read_records(source, split, max_rows, check=lambda recs: detected.append(_check_all(recs, names)), columns=names)
    fmt = detected[0] if detected else _check_all(records, names)
    if fmt.messages and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}: conversational data needs a tokenizer with a chat_template")
    report = DataReport(source=source, rows=len(records), kept=0, format=str(fmt))
    pairs: list[Pair] = []
    for rec in records:
        if rec.problem is not None:
            report.add(*rec.problem)
            continue
        try:
            pairs.append(_to_pair(rec, fmt, tokenizer, max_length, max_prompt_length, text_tokenization))
        except _RowError as err:
            report.add(err.reason, _locate(rec, err, names))
    report.kept = len(pairs)
    _raise_if_needed(report, on_error, on_overlong)
    return pairs, report


def load_data(cfg, tokenizer, seed: int) -> tuple[list[Pair], list[Pair], list[DataReport]]:
    """Train pairs, eval pairs and reports for a :class:`prefopt.config.DataConfig`.

    Eval pairs come from ``cfg.eval``, else a seeded ``cfg.eval_fraction`` hold-out of
    train, else there are none.
    """
    opts = dict(
        tokenizer=tokenizer,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        on_error=cfg.on_error,
        on_overlong=cfg.on_overlong,
        columns=cfg.columns,
        text_tokenization=cfg.text_tokenization,
    )
    train, report = load_pairs(cfg.train, split=cfg.split, max_rows=cfg.max_rows, **opts)
    reports = [report]
    if not train:
        raise DataError(f"{cfg.train}: no usable pairs. {report.summary()}")
    evals: list[Pair] = []
    if cfg.eval:
        evals, eval_report = load_pairs(cfg.eval, split=cfg.eval_split, **opts)
        reports.append(eval_report)
        if not evals:  # configured but nothing to evaluate: never a silent "no eval"
            raise DataError(f"data.eval: {cfg.eval}: no usable pairs. {eval_report.summary()}")
    elif cfg.eval_fraction > 0:
        n_eval = max(1, round(cfg.eval_fraction * len(train)))
        if n_eval >= len(train):
            raise DataError(f"{cfg.train}: {len(train)} pairs are too few to hold out eval_fraction {cfg.eval_fraction}")
        held = set(random.Random(seed).sample(range(len(train)), n_eval))
        evals = [p for i, p in enumerate(train) if i in held]
        train = [p for i, p in enumerate(train) if i not in held]
    return train, evals, reports


def fingerprint(pairs: list[Pair]) -> str:
    """sha256 hex of the pairs' token ids, in order (a key for cached reference log-probs)."""
    h = hashlib.sha256()
    for p in pairs:
        for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
            h.update(array("q", [len(ids), *ids]).tobytes())
    return h.hexdigest()


# --- checking rows -------------------------------------------------------------------


def _column_names(columns: dict[str, str] | None) -> dict[str, str]:
    """prefopt field -> dataset column, every field named (unmapped ones keep their name)."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise DataError(f"data.columns: unknown field {', '.join(map(repr, unknown))}; map prompt, chosen or rejected to a column name")
    if len(set(columns.values())) < len(columns):
        raise DataError(f"data.columns: two fields map to one column ({columns})")
    return {f: columns.get(f, f) for f in FIELDS}


def _check_all(records: list[Record], names: dict[str, str]) -> _Format:
    """Detect the dataset's format (by majority of rows) and mark rows that do not fit it."""
    values = [r.value for r in records if r.value is not None]
    with_prompt = sum("prompt" in v for v in values)
    as_list = sum(isinstance(v.get("chosen"), list) for v in values)
    as_text = sum(isinstance(v.get("chosen"), str) for v in values)
    fmt = _Format(explicit=with_prompt > 0 and 2 * with_prompt >= len(values), messages=as_list > as_text)
    for rec in records:
        if rec.value is None:
            continue
        try:
            _check_row(rec.value, fmt)
        except _RowError as err:
            rec.value = None
            rec.problem = (err.reason, _locate(rec, err, names))
    return fmt


def _locate(rec: Record, err: _RowError, names: dict[str, str]) -> str:
    """The message with its place; a field is named by the dataset's own column name."""
    if not err.field:
        return f"{rec.where}: {err.message}"
    column = names.get(err.field, err.field)
    shown = f"'{column}'" if column == err.field else f"'{column}' ({err.field})"
    return f"{rec.where}, field {shown}: {err.message}"


def _check_row(value: dict[str, Any], fmt: _Format) -> None:
    for name in fmt.fields:
        v = value.get(name)
        if v is None:
            raise _RowError(MISSING, name, "missing" if name not in value else "is null")
        if fmt.messages:
            _check_messages(name, v)
        elif not isinstance(v, str):
            raise _RowError(WRONG_TYPE, name, f"expected a string like most rows, got {kind_name(v)}")
        else:
            _check_text(name, v)
    if fmt.explicit:
        for name in ("chosen", "rejected"):
            if _blank(value[name]):
                raise _RowError(EMPTY, name, "empty completion")
    if value["chosen"] == value["rejected"]:
        raise _RowError(IDENTICAL, "rejected", "identical to chosen")


def _check_messages(name: str, v: Any) -> None:
    if not isinstance(v, list):
        raise _RowError(WRONG_TYPE, name, f"expected a list of messages like most rows, got {kind_name(v)}")
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise _RowError(WRONG_TYPE, name, f"message {i}: expected an object with role and content, got {kind_name(m)}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if m.get(key) is None else f"got {kind_name(m.get(key))}"
                raise _RowError(WRONG_TYPE, name, f"message {i}: '{key}' must be a string ({got})")
        _check_text(name, m["content"])
        if m["role"] not in ROLES:
            raise _RowError(UNKNOWN_ROLE, name, f"message {i}: unknown role {m['role']!r} (allowed: {', '.join(ROLES)})")


def _check_text(name: str, s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _RowError(BAD_UTF8, name, "not valid Unicode (a lone surrogate escape such as \\ud800)") from None


def _blank(v: str | list[dict[str, Any]]) -> bool:
    if isinstance(v, str):
        return not v.strip()
    return all(not m["content"].strip() for m in v)


# --- rendering and tokenising --------------------------------------------------------


def _split(value: dict[str, Any], fmt: _Format) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected); for the implicit form the prompt is the common prefix."""
    chosen, rejected = value["chosen"], value["rejected"]
    if fmt.explicit:
        return value["prompt"], chosen, rejected
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if not fmt.messages:
        # Cut back to a whitespace boundary, so a completion starts with its separating space.
        while n > 0 and not (n < limit and chosen[n].isspace() and rejected[n].isspace()):
            n -= 1
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for name, v in (("chosen", chosen), ("rejected", rejected)):
        if _blank(v):
            raise _RowError(EMPTY, name, "empty completion after removing the common prefix (the prompt)")
    return prompt, chosen, rejected


def _check_template(tokenizer, prompt: list, completion: list, name: str) -> None:
    """A completion can be separated only if the rendered prompt starts the rendered conversation."""
    try:
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    except Exception as exc:  # jinja templates raise their own errors, e.g. on role order
        raise _RowError(TEMPLATE, name, f"chat template failed: {exc}") from None
    if not full.startswith(head):
        raise _RowError(
            TEMPLATE,
            name,
            "the chat template's rendering of prompt + completion does not start with its rendering of the "
            "prompt with add_generation_prompt=True, so the completion cannot be separated",
        )


def _chat_ids(tokenizer, messages: list, generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _split_ids(prompt_ids: list[int], full: tuple[list[int], list[int]]) -> tuple[list[int], list[int], list[int]]:
    """TRL's boundary: the completion starts where the prompt's tokens and prompt + completion's diverge."""
    n = min(_common_prefix(prompt_ids, full[0]), _common_prefix(prompt_ids, full[1]))
    return prompt_ids[:n], full[0][n:], full[1][n:]


def _tokenise(prompt: Any, chosen: Any, rejected: Any, fmt: _Format, tokenizer, text_tokenization: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids before truncation."""
    if fmt.messages:
        # As TRL's DPOTrainer: the template's own tokens only (BOS and end of turn as it writes them).
        _check_template(tokenizer, prompt, chosen, "chosen")
        _check_template(tokenizer, prompt, rejected, "rejected")
        full = (_chat_ids(tokenizer, prompt + chosen), _chat_ids(tokenizer, prompt + rejected))
        return _split_ids(_chat_ids(tokenizer, prompt, generation_prompt=True), full)
    eos_text = tokenizer.eos_token
    if text_tokenization == "trl":
        # As TRL's DPOTrainer: EOS text appended, prompt + completion tokenised as one string.
        texts = [c if c.endswith(eos_text) else c + eos_text for c in (chosen, rejected)]
        full = tuple(list(tokenizer(prompt + t)["input_ids"]) for t in texts)
        return _split_ids(list(tokenizer(prompt)["input_ids"]), full)
    # A text that already holds the BOS text gets no second one.
    bos = tokenizer.bos_token
    add_special = not (bos and prompt.startswith(bos))
    prompt_ids = list(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
    eos = tokenizer.eos_token_id
    completions = []
    for text in (chosen, rejected):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids or ids[-1] != eos:
            ids.append(eos)
        completions.append(ids)
    return prompt_ids, completions[0], completions[1]


def _to_pair(rec: Record, fmt: _Format, tokenizer, max_length: int, max_prompt_length: int | None, text_tokenization: str = "separate") -> Pair:
    prompt, chosen, rejected = _split(rec.value, fmt)
    prompt_ids, chosen_ids, rejected_ids = _tokenise(prompt, chosen, rejected, fmt, tokenizer, text_tokenization)
    for name, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        if not ids:
            raise _RowError(EMPTY, name, "no completion tokens after the prompt's")
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if not prompt_ids:
        raise _RowError(EMPTY_PROMPT, "prompt", "the prompt has no tokens and the tokenizer adds no BOS")
    room = max_length - len(prompt_ids)
    if room <= 0:
        raise _RowError(OVERLONG, "prompt", f"the prompt has {len(prompt_ids)} tokens, leaving no room for a completion within max_length {max_length}")
    if chosen_ids[:room] == rejected_ids[:room]:  # nothing to prefer: the loss would be constant
        raise _RowError(IDENTICAL, "rejected", f"the same tokens as chosen once cut to max_length {max_length}")
    return Pair(prompt_ids, chosen_ids[:room], rejected_ids[:room], rec.row)


def _raise_if_needed(report: DataReport, on_error: str, on_overlong: str) -> None:
    fatal = [r for r in report.skipped if (r == OVERLONG and on_overlong == "raise") or (r != OVERLONG and on_error == "raise")]
    if not fatal:
        return
    lines = [msg for r in fatal for msg in report.examples[r]]
    n = sum(report.skipped[r] for r in fatal)
    hints = []
    if any(r != OVERLONG for r in fatal):
        hints.append("fix the rows or set data.on_error: skip to skip and count them")
    if OVERLONG in fatal:
        hints.append("raise data.max_length, set data.max_prompt_length, or set data.on_overlong: drop")
    counts = ", ".join(f"{report.skipped[r]} {r}" for r in fatal)
    raise DataError(
        f"{report.source}: {n} bad row{'s' if n != 1 else ''} of {report.rows} ({counts}):\n  "
        + "\n  ".join(lines)
        + f"\n({'; or '.join(hints)})"
    )
