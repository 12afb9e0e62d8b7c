"""A very long row costs what ``max_length`` can keep, and gives exactly the tokens the whole row gives.

The oracle is the same loader with cutting turned off (a window longer than any row).
"""
from __future__ import annotations

import copy
import json
import os
import re
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import prefopt.data.pairs as pairs
import prefopt.data.window as window
from prefopt.data.pairs import load_examples

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _bpe_whole_text(texts):
    """SentencePiece-like: no pre-tokenizer, so BPE merges run over the whole text; byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Metaspace()
    specials = ["<s>", "</s>", "<pad>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _sentencepiece_bpe(texts):
    """Llama-2-like: trained on words (no merge crosses a space), then run as SentencePiece does: no pre-tokenizer,
    spaces made '▁' and one prepended, so the model sees the whole text as one word; byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    specials = ["<s>", "</s>", "<pad>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _wordpiece_deleting(texts):
    """BERT-like: the normalizer deletes control and format characters (e.g. U+200B), unknown words are one [UNK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=40))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"],
                                                             show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")


def _digits_by_three(texts):
    """Llama-3-like: a pre-tokenizer regex that splits numbers into groups of three digits from their left."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _metaspace_unigram(texts):
    """SentencePiece-like Unigram: words split at spaces, a '▁' prepended to the text's first word only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                           unk_token="<unk>", show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


PIECES = ["good", " movie", " the", "  ", "\n", " \n  \n", "\u200b", "aaaa", " ", "é", "e\u0301", "!!", "123", "7", "\t", ".", "x", "="]
run = st.tuples(st.sampled_from(PIECES), st.integers(1, 120)).map(lambda t: t[0] * t[1])
text = st.lists(st.one_of(st.sampled_from(PIECES), run), min_size=1, max_size=30).map("".join).filter(lambda s: s.strip("\u200b \n\t"))


@pytest.fixture(scope="module")
def tokenizers(tokenizer):
    corpus = ["good movie the plot was good and the acting great 123 !!", "aaaa x e\u0301 é. the the movie"] * 20
    out = {"byte-level BPE": copy.deepcopy(tokenizer),  # the session's tokenizer keeps its own template for other files
           "whole-text BPE": _bpe_whole_text(corpus), "deleting WordPiece": _wordpiece_deleting(corpus),
           "digits by three": _digits_by_three(corpus), "Metaspace Unigram": _metaspace_unigram(corpus),
           "SentencePiece BPE": _sentencepiece_bpe(corpus)}
    for tok in out.values():
        tok.chat_template = TEMPLATE
    return out


@contextmanager
def _cutting(on: bool):
    """Cutting with a window of one character per token (so cuts happen on short rows), or none at all."""
    with pytest.MonkeyPatch.context() as mp:
        if on:
            mp.setattr(window, "longest_token", lambda tokenizer: 1)
        else:
            mp.setattr(pairs, "window_for", lambda *a: window.Window(10**18, 0, 0, False))
        yield


def _load(path, tok, **options):
    examples, report, _ = load_examples(str(path), tok, on_error="skip", **options)
    return examples, report.skipped, report.examples


def _row(kind: str, prompt: str, completions: list[str]) -> dict:
    if kind == "messages":
        return {"prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": completions[0]}],
                "rejected": [{"role": "assistant", "content": completions[1]}]}
    if kind == "implicit":
        return {"chosen": prompt + " " + completions[0], "rejected": prompt + " " + completions[1]}
    if kind == "ranking":
        return {"prompt": prompt, "completions": completions, "scores": list(range(len(completions), 0, -1))}
    return {"prompt": prompt, "chosen": completions[0], "rejected": completions[1]}


@pytest.mark.slow
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(["byte-level BPE", "whole-text BPE", "deleting WordPiece", "digits by three", "Metaspace Unigram",
                             "SentencePiece BPE"]),
       kind=st.sampled_from(["text", "trl", "messages", "implicit", "ranking"]),
       rows=st.lists(st.tuples(text, st.lists(text, min_size=3, max_size=3)), min_size=1, max_size=4),
       max_length=st.integers(4, 24), max_prompt=st.sampled_from([None, 3, 8]), max_completion=st.sampled_from([None, 2, 6]))
@example(name="byte-level BPE", kind="messages", rows=[("good", ["good", " \n  \n" * 27 + " movie", "good"])], max_length=4,
         max_prompt=None, max_completion=None)  # the template trims the completion: cut before rendering, it would vanish
def test_cut_rows_give_exactly_the_tokens_of_the_whole_rows(tokenizers, tmp_path_factory, name, kind, rows, max_length, max_prompt,
                                                            max_completion):
    if max_prompt is not None and max_prompt >= max_length:
        max_prompt = max_length - 1
    path = tmp_path_factory.getbasetemp() / "long.jsonl"
    path.write_text("".join(json.dumps(_row(kind, p, cs if kind == "ranking" else cs[:2])) + "\n" for p, cs in rows))
    options = dict(max_length=max_length, max_prompt_length=max_prompt, max_completion_length=max_completion,
                   text_tokenization="trl" if kind == "trl" else "separate")
    with _cutting(False):
        whole = _load(path, tokenizers[name], **options)
    with _cutting(True):
        cut = _load(path, tokenizers[name], **options)
    assert cut[:2] == whole[:2]
    assert cut[2] == _counted_as_cut(whole[2], cut[2], max_length)


def _counted_as_cut(whole: dict, cut: dict, max_length: int) -> dict:
    """``whole``'s messages, with an over-long prompt's count said as the cut row says it when the cut row did."""
    said = f"has more than {max_length} tokens"
    return {reason: [c if said in c and re.sub(r"has \d+ tokens", said, w) == c else w for w, c in zip(msgs, cut.get(reason, []))]
            + msgs[len(cut.get(reason, [])):] for reason, msgs in whole.items()}


def test_a_conversational_row_is_cut_after_its_template(tokenizers, tmp_path, monkeypatch):
    """A chat template may change a message as a whole: this one keeps what follows the last </think>, so the kept
    tokens of a long reasoning completion come from its end. The row is rendered whole, then its text is cut."""
    tok = copy.deepcopy(tokenizers["byte-level BPE"])
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'].split('</think>')[-1] | trim }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    answer = "the plot was good " * 5_000
    row = {"prompt": [{"role": "user", "content": "Review:"}],
           "chosen": [{"role": "assistant", "content": "the movie " * 100_000 + "</think> " + answer}],
           "rejected": [{"role": "assistant", "content": "bad movie"}]}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with _cutting(False):
        whole = _load(path, tok, max_length=64)
    (pair,) = whole[0]
    expected = tok.apply_chat_template([{"role": "assistant", "content": answer}], tokenize=True, return_dict=True)["input_ids"]
    assert pair.chosen_ids == expected[1:len(pair.chosen_ids) + 1]  # after the role token: the answer's first tokens
    seen: list[int] = []
    tokenise = pairs._tokenise

    def recording(prompt, completions, *args, **kw):
        seen.append(max(map(len, completions)))
        return tokenise(prompt, completions, *args, **kw)

    monkeypatch.setattr(pairs, "_tokenise", recording)
    assert _load(path, tok, max_length=64) == whole
    assert max(seen) <= 2 * window.window_for(tok, 64, None, None).chars < len(answer)


@pytest.mark.parametrize("max_prompt", [None, 16])
def test_a_long_row_tokenises_only_what_max_length_can_keep(tokenizer, tmp_path, monkeypatch, max_prompt):
    long_text = " ".join(["the plot was good and the acting great"] * 20_000)  # 780 000 characters
    rows = [{"prompt": long_text, "chosen": " good", "rejected": " bad"},  # over-long prompt: dropped, or its end kept
            {"prompt": "Review:", "chosen": long_text, "rejected": " bad" + long_text},
            {"prompt": "Review:", "chosen": " fine", "rejected": " poor"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = dict(max_length=48, max_prompt_length=max_prompt, on_overlong="drop")
    with _cutting(False):
        whole = _load(path, tokenizer, **options)
    seen: list[int] = []
    tokenise = pairs._tokenise

    def recording(prompt, completions, *args, **kw):
        seen.append((len(prompt), max(map(len, completions))))
        return tokenise(prompt, completions, *args, **kw)

    monkeypatch.setattr(pairs, "_tokenise", recording)
    cut = _load(path, tokenizer, **options)
    assert cut[:2] == whole[:2] and cut[2] == _counted_as_cut(whole[2], cut[2], 48)
    assert len(whole[0]) == (3 if max_prompt else 2)
    bound = 2 * window.window_for(tokenizer, 48, max_prompt, None).chars
    assert max(c for _, c in seen) <= bound < len(long_text) // 20, (seen, bound)
    assert max(p for p, _ in seen) <= bound  # a prompt's start, or with max_prompt_length its end


@pytest.mark.parametrize("unit", ["=", "a", " ", "\r\n"])
def test_the_end_of_a_long_run_in_a_prompt_is_tokenised_as_in_the_whole_row(tmp_path, unit):
    from prefopt.testing.tiny import build_tokenizer

    tok = build_tokenizer(["aa aaaa aaaaaaaa the plot ==== ======== --" + " " * 8 + "\r\n" * 4] * 20, vocab_size=300)
    options = dict(max_length=24, max_prompt_length=8)
    chars = window.window_for(tok, 24, 8, None).chars
    for n in range(3 * chars, 3 * chars + 8):  # BPE merges a run from its left: its last tokens depend on its length
        path = tmp_path / "run.jsonl"
        path.write_text(json.dumps({"prompt": "Review: " + unit * (n // len(unit)), "chosen": " good", "rejected": " bad"}) + "\n")
        with _cutting(False):
            whole = _load(path, tok, **options)
        assert _load(path, tok, **options) == whole, n


def test_the_end_of_a_long_number_is_grouped_as_in_the_whole_row(tokenizers, tmp_path):
    """A pre-tokenizer that groups digits by three from a number's left: the kept end's groups depend on the
    number's length. The window's cuts are 3 x 88 and 6 x 88 characters, so both place the groups in the same
    phase; only the cut one character longer shows that their boundaries are not the whole number's."""
    tok = tokenizers["digits by three"]
    options = dict(max_length=24, max_prompt_length=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(window, "longest_token", lambda tokenizer: 3)
        chars = window.window_for(tok, 24, 8, None).chars
        assert chars % 3 == 0
        kept = set()
        for r in range(3):  # '123123...' grouped as '123', or (one or two leading 9s) as '912', '312', ... or '991', '231', ...
            prompt = "Total: " + "9" * r + "123" * 4 * chars + " the movie"
            path = tmp_path / "digits.jsonl"
            path.write_text(json.dumps({"prompt": prompt, "chosen": " good", "rejected": " bad"}) + "\n")
            cut = _load(path, tok, **options)
            with _cutting(False):
                whole = _load(path, tok, **options)
            assert cut == whole, r
            kept.add(tuple(whole[0][0].prompt_ids))
            assert window.sure_end(tok, prompt, chars) <= 2  # only ' the', ' movie' are sure
    assert len(kept) == 3  # the three phases keep different ids


def test_a_cut_prompt_whose_kept_end_the_completion_moves_into_unsure_tokens_is_widened(tmp_path):
    """TRL's rule puts the prompt's end where prompt and prompt + completion's tokens diverge. Here a completion that
    continues the prompt's last word makes it an over-long word, one [UNK]: the boundary moves back 80 tokens, past
    what the cut vouches for. The cut is not taken; a wider one gives the whole row's ids."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(["review a good bad"] * 5, trainers.WordPieceTrainer(vocab_size=60, show_progress=False,
                                                                             special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"]))
    wp.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=wp, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")
    prompt, completion = "review " * 60 + "a" * 80, "a" * 25 + " good"
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": completion, "rejected": " bad"}) + "\n")
    options = dict(max_length=24, max_prompt_length=8, text_tokenization="trl")
    with _cutting(False):
        whole = _load(path, tok, **options)
    assert tok.convert_ids_to_tokens(whole[0][0].prompt_ids) == ["review"] * 8
    with _cutting(True):
        t = pairs._Tokens(tok, pairs._Format(explicit=True, messages=False), "trl", (24, 8, None), pairs.window_for(tok, 24, 8, None))
        chars = t.window.chars
        cut = window.clip_end(prompt, chars)
        sure = window.sure_end(tok, prompt, chars)
        assert t.window.prompt_tokens <= sure < len(tok(cut[0])["input_ids"])  # the 80 a's and no more are sure
        assert pairs._cut_outcome(*cut, [(completion, False), (" bad", False)], ["chosen", "rejected"], t, sure, False) is None
        assert _load(path, tok, **options) == whole


def _one_prompt(tmp_path, tok, prompt: str, **options):
    """A file of one pair with ``prompt``, and what loading it gives with cutting off."""
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": " good", "rejected": " bad"}) + "\n")
    with _cutting(False):
        return path, _load(path, tok, **options)


def test_a_prompt_with_no_word_boundary_to_trust_is_tokenised_whole_at_once(tokenizers, tmp_path, monkeypatch):
    """Whole-text BPE sees the whole text as one word, and, trained so too, holds every pair of neighbouring characters
    of this text in some token: no boundary can vouch for a cut prompt's end, so the prompt is tokenised whole straight
    away rather than through ever wider cuts."""
    tok, prompt, options = tokenizers["whole-text BPE"], "the movie was good " * 2_000, dict(max_length=24, max_prompt_length=8)
    path, whole = _one_prompt(tmp_path, tok, prompt, **options)
    asked, seen = [], []
    sure, tokenise = pairs.sure_end, pairs._tokenise
    monkeypatch.setattr(pairs, "sure_end", lambda *a: asked.append(a[2]) or sure(*a))
    monkeypatch.setattr(pairs, "_tokenise", lambda p, *a, **kw: seen.append(len(p)) or tokenise(p, *a, **kw))
    assert _load(path, tok, **options) == whole and len(whole[0]) == 1
    assert len(asked) == 1 and seen == [len(prompt)]


def test_a_long_string_is_read_as_datasets_reads_it_without_datasets_holding_it(tmp_path, monkeypatch):
    """Rows still go through ``datasets`` (they come back as it reads them), but a long string goes through as a
    placeholder and comes back as it was, wherever it sits (here a message's content)."""
    import prefopt.data.sources as sources

    long = "the plot was good " * 10_000
    rows = [{"prompt": [{"role": "user", "content": long}], "chosen": [{"role": "assistant", "content": "good", "name": "a"}],
             "rejected": [{"role": "assistant", "content": long + "!"}]},
            {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": long}],
             "rejected": [{"role": "assistant", "content": "bad"}]}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sizes = []
    load = sources._load
    monkeypatch.setattr(sources, "_load", lambda name, label, **kw: sizes.append(os.path.getsize(kw["data_files"])) or load(name, label, **kw))
    held = sources.read_records(str(path), "train", None, check=lambda recs: None)
    monkeypatch.setattr(sources, "HELD", 10**12)
    plain = sources.read_records(str(path), "train", None, check=lambda recs: None)
    assert [r.value for r in held] == [r.value for r in plain]
    assert held[1].value["chosen"][0]["content"] == long and held[0].value["rejected"][0]["content"] == long + "!"
    assert sizes[0] < 2_000 < len(long) < sizes[1]


def test_a_sentencepiece_prompt_is_cut_where_no_token_can_span(tokenizers, tmp_path, monkeypatch):
    """SentencePiece BPE (Llama-2's kind) has no pre-tokenizer, so no words; but no token of its vocabulary holds a
    character followed by '▁', so nothing ever merges across the start of a word: a long prompt cut by
    max_prompt_length is tokenised only as far as it keeps, with the whole prompt's ids."""
    tok, prompt = tokenizers["SentencePiece BPE"], "the plot was good and the acting great " * 20_000
    options = dict(max_length=24, max_prompt_length=8)
    path, whole = _one_prompt(tmp_path, tok, prompt, **options)
    seen = []
    tokenise = pairs._tokenise
    monkeypatch.setattr(pairs, "_tokenise", lambda p, *a, **kw: seen.append(len(p)) or tokenise(p, *a, **kw))
    assert _load(path, tok, **options) == whole and len(whole[0]) == 1
    assert max(seen) <= 2 * window.window_for(tok, 24, 8, None).chars < len(prompt) // 100
