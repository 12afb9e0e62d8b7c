"""Preference data: read a source, check every row, tokenise into :class:`Pair` or :class:`Group` objects.

All problems are found here, before training starts. Each is either raised as a
:class:`~prefopt.errors.DataError` naming file, row and field, or (``on_error: skip``)
counted by reason in a :class:`DataReport`. See docs/data.md.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prefopt.data.examples import Group, Pair, as_group, plan, ranked, to_pairs
from prefopt.data.sources import BAD_UTF8, FIELDS, MALFORMED, Record, kind_name, read_records
from prefopt.data.window import Window, clip, clip_end, sure_end, window_for
from prefopt.errors import DataError

MISSING = "missing field"
WRONG_TYPE = "wrong type"
EMPTY = "empty completion"
IDENTICAL = "identical completions"
UNKNOWN_ROLE = "unknown role"
TEMPLATE = "chat template"
EMPTY_PROMPT = "empty prompt"
OVERLONG = "overlong"
LENGTH_MISMATCH = "scores and completions differ in length"
TOO_FEW = "fewer than two completions"
TIED = "all scores tied"
BAD_LABEL = "label not a boolean"
REASONS = (MALFORMED, BAD_UTF8, MISSING, WRONG_TYPE, EMPTY, IDENTICAL, UNKNOWN_ROLE, TEMPLATE, EMPTY_PROMPT, OVERLONG,
           LENGTH_MISMATCH, TOO_FEW, TIED, BAD_LABEL)

ROLES = ("system", "user", "assistant", "tool")
_EXAMPLES_PER_REASON = 3
log = logging.getLogger("prefopt")


@dataclass
class DataReport:
    """What loading one source kept and skipped, by reason."""

    source: str
    rows: int
    kept: int
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    format: str = ""  # e.g. "text, explicit prompt"
    derived: str = ""  # e.g. "120 pairs by pairs_from all_pairs"

    def add(self, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < _EXAMPLES_PER_REASON:
            shown.append(message)

    def summary(self) -> str:
        """One short paragraph for the start-up report."""
        fmt = f" ({self.format})" if self.format else ""
        text = f"{self.source}: {self.rows} rows{fmt}, {self.kept} kept" + (f" ({self.derived})" if self.derived else "")
        if not self.skipped:
            return text + "."
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
        first = next(iter(self.examples.values()))[0]
        return f"{text}, {sum(self.skipped.values())} skipped ({counts}); e.g. {first}."


@dataclass(frozen=True)
class _Format:
    explicit: bool  # a prompt field, or the prompt is the common prefix of chosen and rejected
    messages: bool  # conversational message lists, or plain text
    kind: str = "pairs"  # "pairs", "rankings" or "labelled"
    listed: bool = False  # a ranking written as chosen with a list of rejected

    @property
    def fields(self) -> tuple[str, ...]:
        if self.kind == "labelled":
            return ("prompt", "completion", "label")
        if self.kind == "rankings":
            return ("prompt", "chosen", "rejected") if self.listed else ("prompt", "completions", "scores")
        return ("prompt", "chosen", "rejected") if self.explicit else ("chosen", "rejected")

    def field_of(self, i: int) -> str:
        """The field that holds completion ``i`` (in the order the row lists them)."""
        if self.kind == "labelled":
            return "completion"
        if self.kind == "rankings" and not self.listed:
            return "completions"
        return "chosen" if i == 0 else "rejected"

    def __str__(self) -> str:
        kind = "conversational" if self.messages else "text"
        if self.kind == "rankings":
            return f"rankings ({'chosen and a list of rejected' if self.listed else 'completions and scores'}), {kind}"
        if self.kind == "labelled":
            return f"labelled completions, {kind}"
        return f"{kind}, {'explicit' if self.explicit else 'implicit'} prompt"


class _RowError(Exception):
    def __init__(self, reason: str, field: str | None, message: str):
        super().__init__(message)
        self.reason, self.field, self.message = reason, field, message


def load_examples(
    source: str,
    tokenizer,
    *,
    split: str = "train",
    max_length: int,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    on_error: str = "raise",
    on_overlong: str = "drop",
    max_rows: int | None = None,
    columns: dict[str, str] | None = None,
    text_tokenization: str = "separate",
) -> tuple[list, DataReport, str]:
    """Read, check and tokenise one source: ``(examples, report, kind)``.

    ``kind`` is ``"pairs"`` (the examples are :class:`Pair`), ``"rankings"`` or
    ``"labelled"`` (they are :class:`Group`), detected by most rows. ``split`` applies to
    Hub datasets and to local directories laid out in splits like a Hub download (a single
    file is one split). Row numbers in messages are 1-based line numbers for JSON lines
    and 0-based row indices otherwise. ``columns`` maps prefopt's fields (``prompt``,
    ``chosen``, ``rejected``, ``completions``, ``scores``, ``completion``, ``label``) to the
    dataset's own column names. ``text_tokenization`` is ``"separate"`` (prompt and
    completion tokenised apart) or ``"trl"`` (TRL's rule for plain text, see
    docs/data.md); conversational rows always follow TRL. Cuts, in order: the prompt to its
    last ``max_prompt_length`` tokens, each completion to its first ``max_completion_length``,
    then each completion to what ``max_length`` leaves after the prompt.
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
    build = _to_pair if fmt.kind == "pairs" else _to_group
    cuts = (max_length, max_prompt_length, max_completion_length)
    tokens = _Tokens(tokenizer, fmt, text_tokenization, cuts, window_for(tokenizer, *cuts))
    examples: list = []
    for rec in records:
        if rec.problem is not None:
            report.add(*rec.problem)
            continue
        try:
            examples.append(build(rec, tokens))
        except _RowError as err:
            report.add(err.reason, _locate(rec, err, names))
        rec.value = None  # a long row's text is not kept once its tokens are
    report.kept = len(examples)
    _raise_if_needed(report, on_error, on_overlong)
    return examples, report, fmt.kind


def detect_kind(source: str, split: str = "train", columns: dict[str, str] | None = None, max_rows: int = 200) -> str:
    """The kind of data (``pairs``, ``rankings``, ``labelled``) most of the first ``max_rows`` rows of ``source`` hold."""
    names = _column_names(columns)
    detected: list[_Format] = []
    records = read_records(source, split, max_rows, check=lambda recs: detected.append(_check_all(recs, names)), columns=names)
    return (detected[0] if detected else _check_all(records, names)).kind


def load_pairs(source: str, tokenizer, *, pairs_from: str = "best_worst", **options: Any) -> tuple[list[Pair], DataReport]:
    """Read, check and tokenise one source into pairs (see :func:`load_examples` for ``options``).

    Rankings become pairs as ``pairs_from`` says (:func:`prefopt.data.examples.to_pairs`);
    labelled completions cannot, and are an error that says so.
    """
    examples, report, kind = load_examples(source, tokenizer, **options)
    try:
        target = plan(kind, {"pairs"}, "a pairwise loss", pairs_from)
    except DataError as exc:
        raise DataError(f"{source}: {exc}") from None
    return _convert(examples, kind, target, pairs_from, report), report


def load_data(cfg, tokenizer, seed: int, takes: frozenset[str] = frozenset({"pairs"}), loss_name: str = "dpo") -> tuple[list, list, list[DataReport]]:
    """Train examples, eval examples and reports for a :class:`prefopt.config.DataConfig`.

    ``takes`` is what the loss takes (``Loss.takes``): the examples are :class:`Pair` for a
    pairwise loss (rankings converted by ``cfg.pairs_from``), else :class:`Group`. Eval
    examples come from ``cfg.eval``, else a seeded ``cfg.eval_fraction`` hold-out of train
    (drawn by prompt, before a ranking becomes pairs), else there are none.
    """
    opts = dict(tokenizer=tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                max_completion_length=cfg.max_completion_length, on_error=cfg.on_error,
                on_overlong=cfg.on_overlong, columns=cfg.columns, text_tokenization=cfg.text_tokenization)
    train, report, kind = load_examples(cfg.train, split=cfg.split, max_rows=cfg.max_rows, **opts)
    try:
        target = plan(kind, takes, loss_name, cfg.pairs_from)
    except DataError as exc:
        raise DataError(f"data.train: {cfg.train}: {exc}") from None
    reports = [report]
    if not train:
        raise DataError(f"{cfg.train}: no usable {'pairs' if kind == 'pairs' else 'examples'}. {report.summary()}")
    evals: list = []
    if cfg.eval:
        evals, eval_report, eval_kind = load_examples(cfg.eval, split=cfg.eval_split, **opts)
        if eval_kind != kind:
            raise DataError(f"data.eval: {cfg.eval} holds {eval_kind}, but data.train holds {kind}; use data of one kind")
        reports.append(eval_report)
        if not evals:  # configured but nothing to evaluate: never a silent "no eval"
            raise DataError(f"data.eval: {cfg.eval}: no usable pairs. {eval_report.summary()}")
        seen = {_key(x) for x in train}
        shared = sum(_key(x) in seen for x in evals)
        if shared:  # held-out metrics on training rows would read as generalisation
            log.warning("data.eval: %d of %d eval examples are also in data.train (the same token ids); their metrics "
                        "are not held out", shared, len(evals))
    elif cfg.eval_fraction > 0:
        n_eval = max(1, round(cfg.eval_fraction * len(train)))
        if n_eval >= len(train):
            raise DataError(f"{cfg.train}: {len(train)} {'pairs' if kind == 'pairs' else 'examples'} are too few to hold out eval_fraction {cfg.eval_fraction}")
        held = set(random.Random(seed).sample(range(len(train)), n_eval))
        evals = [p for i, p in enumerate(train) if i in held]
        train = [p for i, p in enumerate(train) if i not in held]
    train = _convert(train, kind, target, cfg.pairs_from, report)
    evals = _convert(evals, kind, target, cfg.pairs_from, reports[-1] if cfg.eval else None)
    return train, evals, reports


def _key(x: Pair | Group) -> tuple:
    """An example's token ids, to compare examples."""
    seqs = [x.prompt_ids, *x.completions] if isinstance(x, Group) else [x.prompt_ids, x.chosen_ids, x.rejected_ids]
    return tuple(tuple(ids) for ids in seqs)


def _convert(examples: list, kind: str, target: str, pairs_from: str, report: DataReport | None) -> list:
    """``examples`` of ``kind`` as ``target`` (see :func:`prefopt.data.examples.plan`)."""
    if kind == target:
        if kind == "labelled":
            assign_mismatched(examples)
        return examples
    if target == "pairs":
        pairs = to_pairs(examples, pairs_from)
        if report is not None:
            report.derived = f"{len(pairs)} pairs by pairs_from {pairs_from}"
        return pairs
    return [as_group(p) for p in examples]


def assign_mismatched(groups: list[Group]) -> None:
    """Give each labelled example the previous one's first completion (the first gets the last's), as TRL rotates
    completions by one within a batch: KTO's reference point reads them after the wrong prompt."""
    for i, g in enumerate(groups):
        g.mismatched_ids = groups[i - 1].completions[0]


def fingerprint(examples: list) -> str:
    """sha256 hex of the examples' token ids, in order (a key for cached reference log-probs)."""
    h = hashlib.sha256()
    for p in examples:
        if isinstance(p, Group):
            seqs = [p.prompt_ids, *p.completions] + ([p.mismatched_ids] if p.mismatched_ids is not None else [])
            h.update(array("q", [-1, len(seqs)]).tobytes())  # a group never hashes as pairs do
        else:
            seqs = [p.prompt_ids, p.chosen_ids, p.rejected_ids]
        for ids in seqs:
            h.update(array("q", [len(ids), *ids]).tobytes())
    return h.hexdigest()


# --- checking rows -------------------------------------------------------------------


def _column_names(columns: dict[str, str] | None) -> dict[str, str]:
    """prefopt field -> dataset column, every field named (unmapped ones keep their name)."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise DataError(f"data.columns: unknown field {', '.join(map(repr, unknown))}; map one of {', '.join(FIELDS)} to a column name")
    if len(set(columns.values())) < len(columns):
        raise DataError(f"data.columns: two fields map to one column ({columns})")
    return {f: columns.get(f, f) for f in FIELDS}


def _check_all(records: list[Record], names: dict[str, str]) -> _Format:
    """Detect the dataset's format (by majority of rows) and mark rows that do not fit it."""
    values = [r.value for r in records if r.value is not None]
    kinds = Counter(_kind_of(v) for v in values)
    kind, listed = kinds.most_common(1)[0][0] if kinds else ("pairs", False)
    firsts = [_first_completion(v, kind, listed) for v in values]
    as_list = sum(isinstance(c, list) for c in firsts)
    as_text = sum(isinstance(c, str) for c in firsts)
    with_prompt = sum("prompt" in v for v in values)
    explicit = kind != "pairs" or (with_prompt > 0 and 2 * with_prompt >= len(values))
    fmt = _Format(explicit=explicit, messages=as_list > as_text, kind=kind, listed=listed)
    for rec in records:
        if rec.value is None:
            continue
        try:
            _check_row(rec.value, fmt)
            rec.value = {k: rec.value[k] for k in fmt.fields if k in rec.value}  # other columns are never read, nor loaded
        except _RowError as err:
            rec.value = None
            rec.problem = (err.reason, _locate(rec, err, names))
    return fmt


def _kind_of(v: dict[str, Any]) -> tuple[str, bool]:
    """(kind, listed) a row's fields suggest."""
    if "completions" in v or "scores" in v:
        return "rankings", False
    if "completion" in v or "label" in v:
        return "labelled", False
    rejected = v.get("rejected")
    if isinstance(rejected, list) and (not rejected or not isinstance(rejected[0], dict)):
        return "rankings", True  # a list of completions, not a list of messages
    return "pairs", False


def _first_completion(v: dict[str, Any], kind: str, listed: bool) -> Any:
    if kind == "rankings" and not listed:
        c = v.get("completions")
        return c[0] if isinstance(c, list) and c else None
    return v.get("completion") if kind == "labelled" else v.get("chosen")


def _locate(rec: Record, err: _RowError, names: dict[str, str]) -> str:
    """The message with its place; a field is named by the dataset's own column name."""
    if not err.field:
        return f"{rec.where}: {err.message}"
    column = names.get(err.field, err.field)
    shown = f"'{column}'" if column == err.field else f"'{column}' ({err.field})"
    return f"{rec.where}, field {shown}: {err.message}"


def _check_row(value: dict[str, Any], fmt: _Format) -> None:
    for name in fmt.fields:  # every string, keys of messages too: a lone surrogate would break reading the file later
        if name in value and not _unicode(value[name]):
            raise _RowError(BAD_UTF8, name, "not valid Unicode (a lone surrogate escape such as \\ud800)")
    for name in fmt.fields:
        v = value.get(name)
        if v is None:
            raise _RowError(MISSING, name, "missing" if name not in value else "is null")
        if name == "scores":
            value[name] = _check_scores(v)
        elif name == "label":
            if not isinstance(v, bool):
                raise _RowError(BAD_LABEL, name, f"expected true or false, got {kind_name(v)} ({v!r})")
        elif name == "completions" or (fmt.listed and name == "rejected"):
            if not isinstance(v, list):
                raise _RowError(WRONG_TYPE, name, f"expected a list of completions, got {kind_name(v)}")
            for i, item in enumerate(v):
                _check_value(name, item, fmt, f"completion {i}: ")
        else:
            _check_value(name, v, fmt)
    if fmt.kind != "pairs":
        _check_group(value, fmt)
        return
    if fmt.explicit:
        for name in ("chosen", "rejected"):
            if _blank(value[name]):
                raise _RowError(EMPTY, name, "empty completion")
    if value["chosen"] == value["rejected"]:
        raise _RowError(IDENTICAL, "rejected", "identical to chosen")


def _check_value(name: str, v: Any, fmt: _Format, where: str = "") -> None:
    """One prompt or completion: a string or a list of messages, as most rows have."""
    try:
        if fmt.messages:
            _check_messages(name, v)
        elif not isinstance(v, str):
            raise _RowError(WRONG_TYPE, name, f"expected a string like most rows, got {kind_name(v)}")
    except _RowError as err:
        raise _RowError(err.reason, name, where + err.message) from None


def _check_scores(v: Any) -> list[float]:
    if not isinstance(v, list):
        raise _RowError(WRONG_TYPE, "scores", f"expected a list of numbers, got {kind_name(v)}")
    out = []
    for i, x in enumerate(v):
        try:
            y = float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None
        except OverflowError:  # an integer beyond a float's range
            raise _RowError(WRONG_TYPE, "scores", f"score {i}: expected a finite number, got a number too large for a float") from None
        if y is None or not math.isfinite(y):
            raise _RowError(WRONG_TYPE, "scores", f"score {i}: expected a finite number, got {kind_name(x)} ({x!r:.80})")
        out.append(y)
    return out  # ints and floats alike, so every row has one schema


def _completions(value: dict[str, Any], fmt: _Format) -> list[Any]:
    """A group's completions in the order the row lists them."""
    if fmt.kind == "labelled":
        return [value["completion"]]
    if fmt.listed:
        return [value["chosen"], *value["rejected"]]
    return list(value["completions"])


def _scores(value: dict[str, Any], fmt: _Format) -> list[float]:
    return [1.0] + [0.0] * len(value["rejected"]) if fmt.listed else value["scores"]


def _check_group(value: dict[str, Any], fmt: _Format) -> None:
    completions = _completions(value, fmt)
    for i, c in enumerate(completions):
        if _blank(c):
            index = "" if fmt.kind == "labelled" or (fmt.listed and i == 0) else f"completion {i - fmt.listed}: "
            raise _RowError(EMPTY, fmt.field_of(i), index + "empty completion")
    if fmt.kind != "rankings":
        return
    scores = _scores(value, fmt)
    if len(scores) != len(completions):
        raise _RowError(LENGTH_MISMATCH, "scores", f"{len(scores)} scores for {len(completions)} completions")
    if len(completions) < 2:
        field = "rejected" if fmt.listed else "completions"
        raise _RowError(TOO_FEW, field, f"a ranking needs at least two completions, got {len(completions)}")
    if len(set(scores)) == 1:
        raise _RowError(TIED, "scores", f"all {len(scores)} scores are {scores[0]:g}: they say nothing about which is better")
    for j, c in enumerate(completions):
        if c in completions[:j]:
            i = completions.index(c)
            raise _RowError(IDENTICAL, fmt.field_of(j), f"completion {j - fmt.listed} is identical to "
                            + ("chosen" if fmt.listed and i == 0 else f"completion {i - fmt.listed}"))


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
        if m["role"] not in ROLES:
            raise _RowError(UNKNOWN_ROLE, name, f"message {i}: unknown role {m['role']!r} (allowed: {', '.join(ROLES)})")


def _unicode(v: Any) -> bool:
    """Whether every string in ``v`` (dict keys included) can be written as UTF-8."""
    todo = [v]
    while todo:  # not recursive: a value nested nearly as deep as JSON parsing allows must not overflow the stack
        x = todo.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(x, dict):
            todo.extend(x)
            todo.extend(x.values())
        elif isinstance(x, list):
            todo.extend(x)
    return True


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
    n = _common_prefix(chosen, rejected)
    limit = min(len(chosen), len(rejected))
    if not fmt.messages:
        # Cut back to a whitespace boundary, so a completion starts with its separating space.
        while n > 0 and not (n < limit and chosen[n].isspace() and rejected[n].isspace()):
            n -= 1
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for name, v in (("chosen", chosen), ("rejected", rejected)):
        if _blank(v):
            raise _RowError(EMPTY, name, "empty completion after removing the common prefix (the prompt)")
    return prompt, chosen, rejected


def _render(tokenizer, prompt: list, completions: list[list], names: list[str]) -> tuple[str, list[str]]:
    """A conversational row as text: the template's rendering of the prompt (with the generation prompt), and of
    each completion, as the part of prompt + completion's rendering that follows the prompt's."""
    def render(messages: list, name: str, generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja templates raise their own errors, e.g. on role order
            raise _RowError(TEMPLATE, name, f"chat template failed: {exc}") from None

    head = render(prompt, names[0], generation_prompt=True)
    tails = []
    for completion, name in zip(completions, names):
        full = render(prompt + completion, name)
        if not full.startswith(head):
            raise _RowError(
                TEMPLATE,
                name,
                "the chat template's rendering of prompt + completion does not start with its rendering of the "
                "prompt with add_generation_prompt=True, so the completion cannot be separated",
            )
        tails.append(full[len(head):])
    return head, tails


def _common_prefix(a: Sequence, b: Sequence) -> int:
    """Length of the common prefix of two strings or lists; a long one compared a block at a time."""
    n, block, limit = 0, 1 << 16, min(len(a), len(b))
    while n + block <= limit and a[n:n + block] == b[n:n + block]:
        n += block
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def _split_ids(prompt_ids: list[int], full: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """TRL's boundary: the completions start where the prompt's tokens and prompt + completion's diverge (for all of them)."""
    n = min(_common_prefix(prompt_ids, f) for f in full)
    return prompt_ids[:n], [f[n:] for f in full]


def _tokenise(prompt: Any, completions: list[Any], names: list[str], fmt: _Format, tokenizer,
              text_tokenization: str, bos_given: bool | None = None) -> tuple[list[int], list[list[int]]]:
    """(prompt, completions) ids before truncation; a conversational row comes rendered (:func:`_render`).
    ``bos_given``: whether the whole prompt starts with the BOS text (when ``prompt`` is its cut end)."""
    if fmt.messages:
        # As TRL's DPOTrainer (apply_chat_template's tokens): the template's own tokens only (BOS and end of turn as
        # it writes them), the completion starting where prompt and prompt + completion's tokens diverge.
        def ids(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        return _split_ids(ids(prompt), [ids(prompt + c) for c in completions])
    eos_text = tokenizer.eos_token
    if text_tokenization == "trl":
        # As TRL's DPOTrainer: EOS text appended, prompt + completion tokenised as one string.
        texts = [c if c.endswith(eos_text) else c + eos_text for c in completions]
        return _split_ids(list(tokenizer(prompt)["input_ids"]), [list(tokenizer(prompt + t)["input_ids"]) for t in texts])
    # A text that already holds the BOS text gets no second one.
    add_special = not (_starts_with_bos(prompt, tokenizer) if bos_given is None else bos_given)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=add_special)["input_ids"])
    eos = tokenizer.eos_token_id
    out = []
    for text in completions:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids or ids[-1] != eos:
            ids.append(eos)
        out.append(ids)
    return prompt_ids, out


def _starts_with_bos(prompt: str, tokenizer) -> bool:
    bos = tokenizer.bos_token
    return bool(bos) and prompt.startswith(bos)


def _fit(prompt_ids: list[int], completions: list[list[int]], names: list[str],
         cuts: tuple[int, int | None, int | None], prompt_cut: bool = False) -> tuple[list[int], list[list[int]]]:
    """Cut the prompt to ``max_prompt_length``, each completion to ``max_completion_length`` and to the room
    ``max_length`` leaves; ``cuts`` is ``(max_length, max_prompt_length, max_completion_length)``.
    ``prompt_cut``: the prompt's text was cut before tokenising, so its token count is a lower bound."""
    max_length, max_prompt_length, max_completion_length = cuts
    for name, ids in zip(names, completions):
        if not ids:
            raise _RowError(EMPTY, name, "no completion tokens after the prompt's")
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if not prompt_ids:
        raise _RowError(EMPTY_PROMPT, "prompt", "the prompt has no tokens and the tokenizer adds no BOS")
    room = max_length - len(prompt_ids)
    if room <= 0:
        count = f"more than {max_length}" if prompt_cut and max_prompt_length is None else str(len(prompt_ids))
        raise _RowError(OVERLONG, "prompt", f"the prompt has {count} tokens, leaving no room for a completion within max_length {max_length}")
    if max_completion_length is not None:
        room = min(room, max_completion_length)
    return prompt_ids, [ids[:room] for ids in completions]


@dataclass(frozen=True)
class _Tokens:
    """How one source's rows become token ids."""

    tokenizer: Any
    fmt: _Format
    text_tokenization: str
    cuts: tuple[int, int | None, int | None]
    window: Window


def _ids(prompt: Any, completions: list[Any], names: list[str], t: _Tokens) -> tuple[list[int], list[list[int]]]:
    """The row's (prompt, completions) ids after the cuts: ``_fit`` of ``_tokenise`` of the whole row.

    A text longer than the window is cut to it first (a completion to its start; a prompt to its end when
    ``max_prompt_length`` keeps that, else to its start), so a huge row costs what the cuts can keep.
    The cut row is accepted only when each cut text alone still gives the window's token count (so the
    cut's neighbourhood falls outside what is kept: for a prompt's end, tokens :func:`sure_end` vouches for)
    and a cut at twice the characters gives the same outcome; otherwise the window doubles, up to the whole row.
    """
    chars, previous = t.window.chars, None
    while True:
        prompt_part, prompt_cut = (clip_end if t.window.keep_end else clip)(prompt, chars)
        parts = [clip(c, chars) for c in completions]
        if not prompt_cut and not any(cut for _, cut in parts):
            return _fit(*_tokenise(prompt, completions, names, t.fmt, t.tokenizer, t.text_tokenization), names, t.cuts)
        sure = None
        if prompt_cut and t.window.keep_end:
            sure = sure_end(t.tokenizer, prompt, chars)
            if sure is None:  # no word boundary to trust: only the whole prompt tells its end's tokens
                chars = len(prompt)
                continue
        outcome = _cut_outcome(prompt_part, prompt_cut, parts, names, t, sure, _starts_with_bos(prompt, t.tokenizer))
        if outcome is not None and outcome == previous:
            if isinstance(outcome[0], str):
                raise _RowError(*outcome)
            return outcome
        previous, chars = outcome, 2 * chars


def _cut_outcome(prompt: str, prompt_cut: bool, parts: list[tuple[str, bool]], names: list[str], t: _Tokens,
                 sure: int | None, bos_given: bool) -> tuple | None:
    """``_fit``'s result, or its error as ``(reason, field, message)``, for a cut row; None when a cut text gives
    too few tokens to tell (or the cut row fails, which the cut may have caused). ``sure``: for a prompt cut to its
    end, how many of its last tokens are the whole prompt's (:func:`sure_end`)."""
    def short(text: str, n: int) -> bool:
        return len(t.tokenizer(text, add_special_tokens=False)["input_ids"]) < n

    if prompt_cut and (sure < t.window.prompt_tokens if sure is not None else short(prompt, t.window.prompt_tokens)):
        return None
    if any(cut and short(c, t.window.completion_tokens) for c, cut in parts):
        return None
    try:
        prompt_ids, ids = _tokenise(prompt, [c for c, _ in parts], names, t.fmt, t.tokenizer, t.text_tokenization, bos_given)
        if sure is not None and len(prompt_ids) - t.cuts[1] < _own_length(prompt, t, bos_given) - sure:
            return None  # the completions' boundary moved back so far that the kept prompt reaches unsure tokens
        return _fit(prompt_ids, ids, names, t.cuts, prompt_cut)
    except _RowError as err:
        return None if err.reason != OVERLONG else (err.reason, err.field, err.message)


def _own_length(prompt: str, t: _Tokens, bos_given: bool) -> int:
    """Tokens of ``prompt`` tokenised alone as ``_tokenise`` does, special tokens included."""
    add = False if t.fmt.messages else t.text_tokenization == "trl" or not bos_given
    return len(t.tokenizer(prompt, add_special_tokens=add)["input_ids"])


def _to_pair(rec: Record, t: _Tokens) -> Pair:
    fmt = t.fmt
    prompt, chosen, rejected = _split(rec.value, fmt)
    names = ["chosen", "rejected"]
    completions = [chosen, rejected]
    if fmt.messages:  # rendered first: a template may change a message's text as a whole (trim it, keep what follows a tag)
        prompt, completions = _render(t.tokenizer, prompt, completions, names)
    prompt_ids, (chosen_ids, rejected_ids) = _ids(prompt, completions, names, t)
    if chosen_ids == rejected_ids:  # nothing to prefer: the loss would be constant
        cuts = t.cuts
        raise _RowError(IDENTICAL, "rejected", f"the same tokens as chosen once cut to max_length {cuts[0]}"
                        + (f" and max_completion_length {cuts[2]}" if cuts[2] is not None else ""))
    return Pair(prompt_ids, chosen_ids, rejected_ids, rec.row)


def _to_group(rec: Record, t: _Tokens) -> Group:
    """A ranking (completions best first) or a labelled completion."""
    fmt = t.fmt
    completions = _completions(rec.value, fmt)
    names = [fmt.field_of(i) for i in range(len(completions))]
    prompt = rec.value["prompt"]
    if fmt.messages:
        prompt, completions = _render(t.tokenizer, prompt, completions, names)
    prompt_ids, ids = _ids(prompt, completions, names, t)
    if fmt.kind == "labelled":
        return Group(prompt_ids, ids, labels=[rec.value["label"]], row=rec.row)
    ids, scores = ranked(ids, _scores(rec.value, fmt))
    return Group(prompt_ids, ids, scores=scores, row=rec.row)


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
