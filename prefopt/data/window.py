"""Character windows that keep tokenising a very long row bounded by ``max_length``, not by the row.

Truncation keeps at most ``max_length`` tokens of a field: the start of a completion, the start
of a prompt that only ``max_length`` cuts. Such a text longer than the window is cut to it before
tokenising (a conversational row once rendered by its chat template, which may change a message's
text as a whole). Never cut: a prompt cut by ``max_prompt_length`` (the tokens of a text's end can
depend on its whole length, e.g. a long run of one character that BPE merges from the left).
:func:`prefopt.data.pairs.load_examples` accepts a cut only when it changed nothing the
truncation keeps (see ``_ids`` there), else it widens the window, up to the whole row. The
window only sets where that search starts: no result depends on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Tokens a cut text must still give beyond what truncation keeps, so that the cut's
# neighbourhood (where a tokeniser may split differently) is never kept.
MARGIN = 64


@dataclass(frozen=True)
class Window:
    """Where cutting starts: ``chars`` per text, and the tokens a cut text must still give."""

    chars: int
    prompt_tokens: int  # a cut text of a prompt must give at least this many tokens
    completion_tokens: int  # a cut text of a completion must give at least this many tokens
    whole_prompt: bool  # max_prompt_length keeps a prompt's end, so the prompt is never cut


def window_for(tokenizer: Any, max_length: int, max_prompt_length: int | None, max_completion_length: int | None) -> Window:
    """The starting window for ``tokenizer`` and the cuts: enough characters for the kept tokens plus
    ``MARGIN``, each token counted as long as the tokenizer's longest."""
    completion = min(max_length, max_completion_length or max_length) + MARGIN
    prompt = max_length + MARGIN  # a prompt is cut only when max_prompt_length is unset
    return Window(max(prompt, completion) * longest_token(tokenizer), prompt, completion, max_prompt_length is not None)


def longest_token(tokenizer: Any) -> int:
    """Characters in the tokenizer's longest vocabulary entry (at least 1)."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


def clip(text: str, chars: int) -> tuple[str, bool]:
    """``text`` cut to its first ``chars`` characters, and whether it was longer."""
    return (text, False) if len(text) <= chars else (text[:chars], True)
