"""Fixtures too slow to rebuild per test module; the builders that take arguments are in builders.py."""

# First, before anything imports the Triton kernel: without CUDA, run it under the Triton interpreter
# (the @triton.jit decorator reads TRITON_INTERPRET when kernels/triton_mixing.py is imported).
import os  # noqa: E402

if "TRITON_INTERPRET" not in os.environ:
    import torch  # noqa: E402

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import sys
from pathlib import Path

import pytest

# pytest's default import mode already puts tests/ on sys.path; --import-mode=importlib does not.
sys.path.insert(0, str(Path(__file__).parent))

from builders import sentencepiece_tokenizer  # noqa: E402

SP_TRAINING_TEXT = (
    "Harry went to Hogwarts with Ron and Hermione. The wand was magic. " * 3
    + "John went to the market with Mary and Peter. The staff was wooden. Mystic Academy is a school. " * 3
    + "The quick brown fox jumps over the lazy dog. Jon and Henry walked home. " * 3
)


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    """A real SentencePiece BPE model behind transformers' LlamaTokenizer (spans include the "▁" space).

    test_labels pins the exact pieces it cuts "Hogwarts", "Harry" and their replacements into.
    """
    return sentencepiece_tokenizer("\n".join(SP_TRAINING_TEXT.split(". ")), 120, tmp_path_factory.mktemp("sp"))
