"""Random malformed JSON-lines files: loading either succeeds with consistent counts or raises DataError."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from prefopt.data.pairs import load_pairs
from prefopt.errors import DataError

texts = st.text(max_size=12) | st.sampled_from(["", "  ", "\n", "\ud800", "a b", " good", "<|eos|>", "\x00"])
roles = st.sampled_from(["system", "user", "assistant", "tool", "robot", "", "USER"])
message = st.fixed_dictionaries({}, optional={"role": roles | st.integers(), "content": texts | st.none() | st.integers()})
messages = st.lists(message | texts | st.integers(), max_size=3)
scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | texts
values = scalars | messages | st.dictionaries(st.text(max_size=3), scalars, max_size=2)
records = st.fixed_dictionaries(
    {}, optional={"prompt": values, "chosen": values, "rejected": values, "extra": values}
)
json_lines = records.map(lambda r: json.dumps(r).encode())
good_lines = st.sampled_from(
    [
        {"prompt": "Review:", "chosen": " Lovely.", "rejected": " Awful."},
        {"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]},
    ]
).map(lambda r: json.dumps(r).encode())
odd_lines = st.binary(max_size=20).map(lambda b: b.replace(b"\n", b" ")) | st.sampled_from(
    [b"[1, 2]", b"null", b'"text"', b"{", b"\xff\xfe", b'{"chosen": "a\xe9"}', b"   "]
)
lines = st.lists(good_lines | json_lines | odd_lines, min_size=1, max_size=8)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=lines, max_length=st.sampled_from([3, 8, 64]))
@example(lines=[b"\xef\xbb\xbf"], max_length=3)
def test_malformed_jsonl_is_data_error_or_counted(tokenizer, lines, max_length):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        # A byte-order mark opening the file is not content; anything else non-blank is a row.
        n_rows = sum(1 for i, line in enumerate(lines) if (line.removeprefix(b"\xef\xbb\xbf") if i == 0 else line).strip())
        try:
            load_pairs(str(path), tokenizer, max_length=max_length, on_error="raise")
        except DataError as exc:
            assert "fuzz.jsonl" in str(exc)
        pairs, report = load_pairs(str(path), tokenizer, max_length=max_length, on_error="skip")
        assert report.rows == n_rows
        assert report.kept == len(pairs)
        assert report.kept + sum(report.skipped.values()) == report.rows
        for p in pairs:
            assert p.prompt_ids and p.chosen_ids and p.rejected_ids
            assert len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= max_length
