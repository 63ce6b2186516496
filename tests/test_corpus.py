"""Reading corpora (each error is one line naming the path) and cutting token blocks."""

import json
from types import SimpleNamespace

import pytest

from builders import word_tokenizer
from engine.data.corpus import make_blocks, read_corpus, stripped_spans
from configs.errors import UserError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_txt_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    assert read_corpus(tmp_path / "a.txt") == ["one\n\ntwo\n"]


def test_jsonl_and_json_records(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "first", "id": 1}, {"text": "second", "id": 2}])
    (tmp_path / "b.json").write_text(json.dumps([{"text": "third"}]))
    assert read_corpus(tmp_path / "a.jsonl") == ["first", "second"]
    assert read_corpus(tmp_path / "b.json") == ["third"]


def test_folder_reads_supported_files_sorted_by_name(tmp_path):
    (tmp_path / "b.txt").write_text("from b")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "from a"}])
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "c.txt").write_text("  \n")  # whitespace-only documents carry no tokens: dropped
    assert read_corpus(tmp_path) == ["from a", "from b"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "corpus not found"),
        ("a.csv", "text\nx", "unsupported corpus file"),
        ("a.jsonl", [{"body": "x"}], 'records need a "text" field'),
        ("a.jsonl", [{"text": "x"}, {"other": 1}], 'record 1 has no "text"'),
        ("a.jsonl", "{not json\n", "cannot read"),
        ("a.txt", " \n\t", "empty corpus"),
        ("latin1.txt", b"caf\xe9", "not UTF-8"),
        ("a.jsonl", "", "empty corpus"),
        ("", None, "no .txt, .jsonl or .json files"),  # the (empty) folder itself
    ],
)
def test_errors_are_one_line_and_name_the_path(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, list):
        write_jsonl(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as error:
        read_corpus(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_blocks_are_cut_per_document_and_partial_tails_dropped():
    tokenizer = word_tokenizer("a b c d e f g")
    blocks = make_blocks(["a b c d e f g", "  d e f"], tokenizer, 3)
    assert [block.text for block in blocks] == ["a b c", "d e f", "d e f"]
    assert [block.input_ids for block in blocks] == [[1, 2, 3], [4, 5, 6], [4, 5, 6]]
    assert all(block.offsets == [(0, 1), (2, 3), (4, 5)] for block in blocks)  # relative to the block's text
    tails = make_blocks(["a b c d e f g"], tokenizer, 3, keep_partial=True)
    assert [block.text for block in tails] == ["a b c", "d e f", "g"]


def test_too_short_corpus_and_slow_tokenizer():
    tokenizer = word_tokenizer("a b c")
    with pytest.raises(UserError, match=r"^target has 3 tokens, shorter than one block of 4$"):
        make_blocks(["a b c"], tokenizer, 4, name="target")
    with pytest.raises(UserError, match="blocks do not cross documents"):
        make_blocks(["a b", "c a b"], tokenizer, 4)
    with pytest.raises(UserError, match="fast tokenizer"):
        make_blocks(["a b c"], SimpleNamespace(is_fast=False), 2)


def test_stripped_spans_start_at_visible_characters():
    text = "went to  \n"
    # SentencePiece-style spans include the preceding space; a pure-whitespace token keeps its span.
    assert stripped_spans(text, [(0, 4), (4, 7), (7, 10)]) == [(0, 4), (5, 7), (7, 10)]
