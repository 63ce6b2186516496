"""Reading a corpus and cutting it into the fixed-length token blocks every phase trains on.

Blocks keep their own text and character offsets: the label builder matches anchors on characters
and needs to know which characters each token covers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from configs.errors import UserError

TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = (".jsonl", ".json")


@dataclass
class Block:
    """`context_length` tokens of one document; `offsets` index into `text`, the block's own substring."""

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]


def read_corpus(path: str | Path) -> list[str]:
    """Documents of a .txt file (one document), a .jsonl/.json file ("text" per record) or a folder of those."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"corpus not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES)
        if not files:
            raise UserError(f"no .txt, .jsonl or .json files in corpus folder {path}")
    else:
        files = [path]
    documents = [doc for file in files for doc in _read_file(file)]
    if not any(doc.strip() for doc in documents):
        raise UserError(f"empty corpus: no text in {path}")
    return [doc for doc in documents if doc.strip()]


def _read_file(path: Path) -> list[str]:
    if path.suffix in TEXT_SUFFIXES:
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (byte {e.start})") from None
    if path.suffix not in RECORD_SUFFIXES:
        raise UserError(f"unsupported corpus file {path}: use .txt, .jsonl or .json")
    records = _json_records(path)
    texts = []
    for index, record in enumerate(records):
        if index == 0 and (not isinstance(record, dict) or "text" not in record):
            found = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise UserError(f"{path}: records need a \"text\" field (found: {found or 'nothing'})")
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path}: record {index} has no \"text\" string")
        texts.append(record["text"])
    return texts


def _json_records(path: Path) -> list:
    """The records of a JSON array, a single JSON object, or JSON lines; a syntax error names its line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        return []
    try:
        whole = json.loads(text)
        return whole if isinstance(whole, list) else [whole]
    except json.JSONDecodeError as e:
        if path.suffix == ".json" and e.msg != "Extra data":
            raise UserError(f"cannot read {path}:{e.lineno}:{e.colno} as JSON: {e.msg}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"cannot read {path}:{number}:{e.colno} as a JSON record: {e.msg}") from None
    return records


def stripped_spans(text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token spans without the leading whitespace that SentencePiece ("▁word") and byte-level BPE ("Ġword")
    put inside them, so a span starts where its visible characters do; pure-whitespace tokens keep theirs."""
    spans = []
    for start, end in offsets:
        visible = start + len(text[start:end]) - len(text[start:end].lstrip())
        spans.append((visible if visible < end else start, end))
    return spans


def make_blocks(
    documents: list[str], tokenizer, context_length: int, name: str = "corpus", keep_partial: bool = False
) -> list[Block]:
    """Non-overlapping blocks of exactly `context_length` tokens per document; partial tails are dropped
    unless `keep_partial` (for probing a short text, never for training).

    Blocks never cross documents (the paper's script cuts one long text; a folder of documents should not
    glue unrelated texts into one context).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("a fast tokenizer (tokenizer.json) is required: character offsets come from it")
    blocks, lengths = [], []
    for document in documents:
        encoding = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        lengths.append(len(ids))
        stop = len(ids) if keep_partial else len(ids) - context_length + 1
        for start in range(0, stop, context_length):
            block_offsets = offsets[start : start + context_length]
            text_start, text_end = block_offsets[0][0], block_offsets[-1][1]
            blocks.append(
                Block(
                    text=document[text_start:text_end],
                    input_ids=list(ids[start : start + context_length]),
                    offsets=[(a - text_start, b - text_start) for a, b in block_offsets],
                )
            )
    if not blocks:
        longest = max(lengths, default=0)
        detail = f" (longest of {len(lengths)} documents; blocks do not cross documents)" if len(lengths) > 1 else ""
        raise UserError(f"{name} has {longest} tokens, shorter than one block of {context_length}{detail}")
    return blocks
