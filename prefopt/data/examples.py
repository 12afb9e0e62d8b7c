"""Preference examples: a prompt with K >= 1 completions, and what a loss takes of them.

Three kinds of data (``KINDS``): ``pairs`` (a chosen and a rejected completion),
``rankings`` (K >= 2 completions with scores, higher is better) and ``labelled``
(completions each marked desirable or not, TRL's unpaired format). A pairwise loss
trains on rankings through :func:`to_pairs` (``data.pairs_from``). See docs/data.md.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prefopt.errors import DataError

KINDS = ("pairs", "rankings", "labelled")
PAIRS_FROM = ("best_worst", "all_pairs", "best_vs_rest")


@dataclass
class Pair:
    """One tokenised preference pair."""

    prompt_ids: list[int]  # with BOS if the tokenizer adds one
    chosen_ids: list[int]  # EOS appended, unless cut by truncation
    rejected_ids: list[int]
    row: int  # 0-based row index in its source
    # from a ranking (data.pairs_from): (its group, chosen slot, rejected slot), so the group's cache serves it
    source: tuple["Group", int, int] | None = field(default=None, repr=False, compare=False)


@dataclass
class Group:
    """One tokenised prompt with K completions.

    A ranking holds its completions best first (a stable sort by score, so tied
    completions keep the order the row lists them in) with their ``scores``; a labelled
    example holds one completion per row (TRL's format) and ``labels`` (True = desirable),
    and ``mismatched_ids``: another example's completion, fixed at load time, whose
    log-ratio after this prompt estimates KTO's reference point.
    """

    prompt_ids: list[int]
    completions: list[list[int]]
    scores: list[float] | None = None
    labels: list[bool] | None = None
    row: int = 0
    mismatched_ids: list[int] | None = None

    @property
    def kind(self) -> str:
        return "labelled" if self.labels is not None else "rankings"


def ranked(completions: list, scores: list[float]) -> tuple[list, list[float]]:
    """Completions and scores best first; ties keep their listed order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return [completions[i] for i in order], [float(scores[i]) for i in order]


def to_pairs(groups: Iterable[Group], how: str) -> list[Pair]:
    """The pairs a ranking gives a pairwise loss (``data.pairs_from``).

    ``best_worst``: the first completion against the last (one pair per prompt);
    ``all_pairs``: every two completions whose scores differ, the higher one chosen;
    ``best_vs_rest``: the first completion against each one scored strictly below it.
    Tied completions never form a pair, except that ``best_worst`` takes the first and
    last in ranked order (a row whose scores all tie is refused when it is read).
    """
    if how not in PAIRS_FROM:
        raise ValueError(f"pairs_from must be one of {', '.join(PAIRS_FROM)}, not {how!r}")
    out = []
    for g in groups:
        if g.scores is None or len(g.completions) < 2:
            raise ValueError(f"row {g.row}: only a ranking of two or more completions gives pairs")
        c, s = g.completions, g.scores
        if how == "best_worst":
            picks = [(0, len(c) - 1)]
        elif how == "best_vs_rest":
            picks = [(0, j) for j in range(1, len(c)) if s[j] < s[0]]
        else:
            picks = [(i, j) for i in range(len(c)) for j in range(i + 1, len(c)) if s[j] < s[i]]
        out.extend(Pair(g.prompt_ids, c[i], c[j], g.row, (g, i, j)) for i, j in picks)
    return out


def as_group(pair: Pair) -> Group:
    """A pair as a ranking of two (scores 1 and 0), for a loss that takes rankings."""
    return Group(pair.prompt_ids, [pair.chosen_ids, pair.rejected_ids], [1.0, 0.0], None, pair.row)


def plan(kind: str, takes: Iterable[str], loss_name: str, pairs_from: str = "best_worst") -> str:
    """What data of ``kind`` becomes for a loss that takes ``takes``: ``"pairs"``, ``"rankings"`` or ``"labelled"``.

    Rankings go to a loss that takes them, else through ``pairs_from`` to a pairwise one; pairs
    go to a loss that takes rankings as rankings of two. Anything else is a :class:`DataError`
    saying what to do.
    """
    takes = set(takes)
    if kind in takes:
        return kind
    if kind == "rankings" and "pairs" in takes:
        return "pairs"
    if kind == "pairs" and "rankings" in takes:
        return "rankings"
    what = {"pairs": "pairs (prompt, chosen, rejected)", "rankings": "rankings (prompt, completions, scores)",
            "labelled": "labelled completions (prompt, completion, label)"}
    advice = {
        "labelled": "choose a loss that takes labelled completions (kto), or pair the data (chosen and rejected per prompt)",
        "pairs": "choose a pairwise loss (dpo, ipo, ...), or unpair the data into prompt, completion, label rows "
                 "(trl.data_utils.unpair_preference_dataset) for kto",
        "rankings": "choose a loss that takes rankings or pairs (plackett_luce, or a pairwise loss with data.pairs_from)",
    }[kind]
    taken = " or ".join(what[k] for k in KINDS if k in takes) or "no data kind"
    raise DataError(f"loss {loss_name!r} takes {taken}, but this data holds {what[kind]}: {advice}")
