"""Character windows that keep tokenising a very long row bounded by ``max_length``, not by the row.

Truncation keeps at most ``max_length`` tokens of a field: the start of a completion, the end
of a prompt cut by ``max_prompt_length``. A field longer than the window is cut to it before
tokenising; :func:`prefopt.data.pairs.load_examples` accepts the cut only when it provably
changed nothing the truncation keeps (see ``_cut_ids`` there), else it widens the window,
up to the whole row. The window only sets where that search starts: no result depends on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Tokens a cut field must still give beyond what truncation keeps, so that the cut's
# neighbourhood (where a tokeniser may split differently) is never kept.
MARGIN = 64


@dataclass(frozen=True)
class Window:
    """Where cutting starts: ``chars`` per text field, and the tokens a cut field must still give."""

    chars: int
    prompt_tokens: int  # a cut prompt must give at least this many tokens
    completion_tokens: int  # a cut completion must give at least this many tokens
    prompt_end: bool  # keep a prompt's end (max_prompt_length cuts it from the start)


def window_for(tokenizer: Any, max_length: int, max_prompt_length: int | None, max_completion_length: int | None) -> Window:
    """The starting window for ``tokenizer`` and the cuts: enough characters for the kept tokens plus
    ``MARGIN``, each token counted as long as the tokenizer's longest."""
    completion = min(max_length, max_completion_length or max_length) + MARGIN
    prompt = (max_prompt_length or max_length) + MARGIN
    return Window(max(prompt, completion) * longest_token(tokenizer), prompt, completion, max_prompt_length is not None)


def longest_token(tokenizer: Any) -> int:
    """Characters in the tokenizer's longest vocabulary entry (at least 1)."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


def clip(value: Any, chars: int, keep_end: bool) -> tuple[Any, list[str]]:
    """``value`` (a text or a list of messages) with each text cut to ``chars`` characters, keeping its end
    or its start; and the texts that were cut, as cut."""
    if isinstance(value, str):
        if len(value) <= chars:
            return value, []
        cut = value[-chars:] if keep_end else value[:chars]
        return cut, [cut]
    out, cuts = [], []
    for message in value:
        content, was_cut = clip(message["content"], chars, keep_end)
        out.append({**message, "content": content} if was_cut else message)
        cuts += was_cut
    return out, cuts
