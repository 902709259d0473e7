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
    with pytest.raises(DataError, match=r"short.jsonl:2 has 1 token"):
        load_examples(short, tok)


def test_text_that_is_not_utf8_names_file_and_line(tmp_path, tok):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("first story\n\nsecond story\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt:4: not UTF-8 text \(byte 0xe9"):
        read_records(bad)
    binary = tmp_path / "weights.jsonl"
    binary.write_bytes(b'{"text": "ok"}\n{"text": "x"}\x00\x00\n')
    with pytest.raises(DataError, match=r"weights.jsonl:2: a NUL byte: this is a binary file"):
        read_records(binary)
    with pytest.raises(DataError, match="is not a file"):
        read_records(tmp_path)
    crlf = tmp_path / "crlf.txt"  # Windows newlines read as text mode would
    crlf.write_bytes(b"one\r\nline\r\n\r\ntwo\r\n")
    assert read_records(crlf) == ["one\nline", "two"]


def test_pretokenized_ids_are_checked(tmp_path, tok):
    def jsonl(*rows):
        f = tmp_path / "ids.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return f

    with pytest.raises(DataError, match=r"ids.jsonl:2: 'input_ids' .* found true \(a boolean\)"):
        read_records(jsonl({"input_ids": [1, 2]}, {"input_ids": [1, True, 3]}))
    with pytest.raises(DataError, match=r"ids.jsonl:1: .*found 2.5 \(float\)"):
        read_records(jsonl({"input_ids": [1, 2.5]}))
    with pytest.raises(DataError, match=r"ids.jsonl:1: 'input_ids' holds the negative token id -1"):
        read_records(jsonl({"input_ids": [1, -1, 4]}))
    # the vocabulary of the stories tokenizer is 512 ids: 512 is one too many (also past max_length)
    with pytest.raises(DataError, match=r"ids.jsonl:1: token id 512 is outside the tokenizer's vocabulary "
                                        r"\(ids 0 … 511\)"):
        load_examples(jsonl({"input_ids": [1, 2, 3, 512]}), tok, max_length=2)
    assert load_examples(jsonl({"input_ids": [1, 2, 511]}), tok).input_ids == ((1, 2, 511),)


def test_examples_longer_than_the_positions_are_refused(tmp_path, tok):
    """max_length truncates; what is still longer than the model's 512 positions is refused, naming the fix."""
    assert tok.model_max_length == 512
    long = tmp_path / "long.txt"
    long.write_text("short story.\n\n" + "and then the cat sat down " * 120 + "\n")
    n_long = len(tok(read_records(long)[1])["input_ids"])  # (transformers warns: longer than 512)
    assert n_long > 512
    assert [len(x) for x in load_examples(long, tok, max_length=512).input_ids][1] == 512
    with pytest.raises(DataError, match=rf"long.txt: example 1: {n_long} tokens .* more than the model's 512 "
                                        r"positions .* use --max-length 512 or less"):
        load_examples(long, tok, max_length=2000)
    with pytest.raises(DataError, match="more than the model's 100 positions"):
        load_examples(long, tok, max_length=2000, max_positions=100)
    from layerif_plugins.data import load_labelled

    labelled = tmp_path / "l.jsonl"
    labelled.write_text(json.dumps({"text": read_records(long)[1], "label": "a"}) + "\n")
    with pytest.raises(DataError, match=r"l.jsonl:1: .* 512 positions"):
        load_labelled(labelled, tok, max_length=4096)
