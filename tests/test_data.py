"""Data files → examples → batches."""

from __future__ import annotations

import json

import pytest

from layerif_plugins.data import IGNORE_INDEX, collate, load_examples, read_records
from layerif_plugins.errors import DataError
from layerif_plugins.models.llama2c import build_llama2c_tokenizer


@pytest.fixture(scope="module")
def tok(shared):
    return build_llama2c_tokenizer(shared / "models" / "stories260K" / "tok512.bin")


def test_endoftext_and_blank_line_separators(tmp_path, tinystories_valid):
    assert len(read_records(tinystories_valid)) == 500
    eot = tmp_path / "a.txt"
    eot.write_text("one\n\nstill one\n<|endoftext|>\ntwo\n<|endoftext|>\n")
    assert read_records(eot) == ["one\n\nstill one", "two"]
    blank = tmp_path / "b.txt"
    blank.write_text("first para\nline\n\n\nsecond\n \nthird\n")
    assert read_records(blank) == ["first para\nline", "second", "third"]


def test_jsonl_text_and_pretokenized(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "Once upon a time"}) + "\n\n" + json.dumps({"input_ids": [1, 5, 6, 7]}) + "\n")
    ex = load_examples(f, tok, max_length=3)
    assert ex.input_ids[0] == tuple(tok("Once upon a time")["input_ids"][:3])
    assert ex.input_ids[1] == (1, 5, 6)


def test_selection_first_n_and_seeded(tinystories_train, tok):
    first = load_examples(tinystories_train, tok, max_length=16, n=5)
    again = load_examples(tinystories_train, tok, max_length=16, n=5)
    assert first.input_ids == again.input_ids and first.digest() == again.digest()
    s1 = load_examples(tinystories_train, tok, max_length=16, n=5, seed=3)
    s2 = load_examples(tinystories_train, tok, max_length=16, n=5, seed=3)
    assert s1.input_ids == s2.input_ids != first.input_ids
    assert all(len(x) == 16 for x in first.input_ids)
    fp = first.fingerprint()
    assert fp["n"] == 5 and fp["num_tokens"] == 80


def test_collate_masks_padding():
    from layerif_plugins.data import Examples

    batch = collate(Examples(((1, 2, 3), (4, 5))), [0, 1], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.labels.tolist() == [[1, 2, 3], [4, 5, IGNORE_INDEX]]


def test_bad_data(tmp_path, tok, tinystories_valid):
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n<|endoftext|>\n\n")
    with pytest.raises(DataError, match="no examples"):
        read_records(empty)
    with pytest.raises(DataError, match="only 500"):
        load_examples(tinystories_valid, tok, n=501)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        read_records(bad)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="--text-field"):
        read_records(nofield)
    short = tmp_path / "short.jsonl"
    short.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1]}\n')
    with pytest.raises(DataError, match="example 1 has 1 token"):
        load_examples(short, tok)
