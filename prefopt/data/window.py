"""Character windows that keep tokenising a very long row bounded by ``max_length``, not by the row.

Truncation keeps at most ``max_length`` tokens of a field: the start of a completion, the start
of a prompt that only ``max_length`` cuts, the end of a prompt that ``max_prompt_length`` cuts.
Such a text longer than the window is cut to it (from its start, or to its end) before
tokenising (a conversational row once rendered by its chat template, which may change a
message's text as a whole). :func:`prefopt.data.pairs.load_examples` accepts a cut only when it
changed nothing the truncation keeps (see ``_ids`` there), else it widens the window, up to the
whole row. The window only sets where that search starts: no result depends on it.
"""
from __future__ import annotations

import functools
import re
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
    keep_end: bool  # max_prompt_length keeps a prompt's end, so a prompt is cut to its end


def window_for(tokenizer: Any, max_length: int, max_prompt_length: int | None, max_completion_length: int | None) -> Window:
    """The starting window for ``tokenizer`` and the cuts: enough characters for the kept tokens plus
    ``MARGIN``, each token counted as long as the tokenizer's longest."""
    completion = min(max_length, max_completion_length or max_length) + MARGIN
    prompt = (max_length if max_prompt_length is None else max_prompt_length) + MARGIN
    return Window(max(prompt, completion) * longest_token(tokenizer), prompt, completion, max_prompt_length is not None)


def longest_token(tokenizer: Any) -> int:
    """Characters in the tokenizer's longest vocabulary entry (at least 1)."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


def clip(text: str, chars: int) -> tuple[str, bool]:
    """``text`` cut to its first ``chars`` characters, and whether it was longer."""
    return (text, False) if len(text) <= chars else (text[:chars], True)


def clip_end(text: str, chars: int) -> tuple[str, bool]:
    """``text`` cut to its last ``chars`` characters, and whether it was longer."""
    return (text, False) if len(text) <= chars else (text[-chars:], True)


def sure_end(tokenizer: Any, text: str, chars: int) -> int | None:
    """How many of the last tokens of ``text[-chars:]`` are surely those of the whole ``text``.

    Unlike a text's start, its end has no fixed point to tokenise from: BPE merges a long run of
    one character from the run's left, a pre-tokenizer may group digits by three from a number's
    left. But a fast tokenizer applies its model to each pre-token ("word") on its own, so from a
    word boundary on, the tokens depend only on the words that follow. A tokenizer without a
    pre-tokenizer (SentencePiece BPE or Unigram, whose model sees the whole text as one word) has
    boundaries of its own: between two tokens whose meeting characters no vocabulary entry holds
    side by side, no merge or piece can ever span (:func:`_unspannable`). A boundary is trusted
    when three cuts place one there and agree on every token after it: at ``chars``, at one
    character more (a grouping out of phase moves its boundaries) and at twice the characters (a
    longer left context). None when ``text[-chars:]`` has no boundary: a slow tokenizer, a model
    whose pieces could span anything, or an end that is one word longer than the window; only the
    whole text then tells.
    """
    if not getattr(tokenizer, "is_fast", False):
        return None
    pairs = _vocabulary_pairs(tokenizer)
    cuts, starts = [], []
    for n in (chars, chars + 1, 2 * chars):
        enc = tokenizer(text[-n:], add_special_tokens=False)
        ids, words = enc["input_ids"], enc.word_ids()
        cuts.append(ids)
        starts.append({len(ids) - i for i in range(1, len(ids)) if words[i] is not None and words[i] != words[i - 1]}
                      | (_unspannable(tokenizer, ids, pairs) if pairs is not None else set()))
    if not starts[0]:
        return None
    same = _common_suffix(cuts)
    return max((n for n in set.intersection(*starts) if n <= same), default=0)


def _vocabulary_pairs(tokenizer: Any) -> frozenset[tuple[str, str]] | None:
    """The pairs of characters that some vocabulary entry holds side by side, for a tokenizer whose model sees the
    whole text as one word and builds each token from one stretch of it (BPE, Unigram); else None."""
    backend = tokenizer.backend_tokenizer
    pre, model = backend.pre_tokenizer, backend.model
    if pre is not None and not (type(pre).__name__ == "Metaspace" and pre.split is False):
        return None  # words of its own: their boundaries are found from the words
    if type(model).__name__ == "BPE":
        if model.dropout or model.continuing_subword_prefix or model.end_of_word_suffix:
            return None  # random merges, or a token's text that is not the text it covers
    elif type(model).__name__ != "Unigram":
        return None  # e.g. WordPiece: greedy from the word's start, so any cut changes what follows
    return _pairs(tokenizer)


@functools.lru_cache(maxsize=4)
def _pairs(tokenizer: Any) -> frozenset[tuple[str, str]]:
    # Added tokens are cut out before the model runs, and byte-fallback tokens ("<0x0A>") stand for a byte, not for
    # their letters: any merge with them is itself a vocabulary entry, holding the pair it spans.
    skip = set(tokenizer.get_added_vocab())
    byte = re.compile(r"<0x[0-9A-F]{2}>")
    return frozenset((t[j], t[j + 1]) for t in tokenizer.get_vocab() if t not in skip and not byte.fullmatch(t)
                     for j in range(len(t) - 1))


def _unspannable(tokenizer: Any, ids: list[int], pairs: frozenset[tuple[str, str]]) -> set[int]:
    """Tail lengths at boundaries between tokens whose meeting characters no vocabulary entry holds side by side
    (so no merge or piece spans them, in this text or in any text around it); not within the first two tokens, which
    a cut or a prepended ``▁`` may have changed."""
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return {len(ids) - i for i in range(2, len(ids)) if pieces[i - 1] and pieces[i] and (pieces[i - 1][-1], pieces[i][0]) not in pairs}


def _common_suffix(lists: list[list[int]]) -> int:
    n, shortest = 0, min(map(len, lists))
    while n < shortest and all(x[-1 - n] == lists[0][-1 - n] for x in lists):
        n += 1
    return n
