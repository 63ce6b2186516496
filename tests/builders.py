"""Small tokenizers and models that several test modules build with their own arguments.

Plain functions, not fixtures, because each test picks its own words, texts, sizes and seeds.
"""

import shutil
from pathlib import Path

import sentencepiece as spm
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer, PreTrainedTokenizerFast

from engine.training.objectives import causal_lm_loss_sum

TINY_LLAMA = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128,
)


def word_tokenizer(words: str) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word, ids in the order given: hand-checkable positions."""
    vocab = {word: index for index, word in enumerate(["[UNK]", *words.split()])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def byte_bpe_tokenizer(texts: list[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE ("Ġ" marks a space), the other tokenizer family besides SentencePiece."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def sentencepiece_tokenizer(text: str, vocab_size: int, folder: Path) -> LlamaTokenizer:
    """A real SentencePiece BPE `.model` trained on `text`, loaded through transformers' LlamaTokenizer.

    It prepends <s> like Llama's own tokenizer (transformers does not, for a bare `.model`).

    Not `engine.data.tiny.train_tokenizer`: its byte fallback adds 256 pieces, and test_evaluate needs
    at most 128 (its hidden size, for one-hot embeddings) and a uniform model's perplexity exact to 1e-4.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "sp"), vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, minloglevel=2,
    )
    shutil.copy(folder / "sp.model", folder / "tokenizer.model")  # where LlamaTokenizer looks for it
    return LlamaTokenizer.from_pretrained(folder, add_bos_token=True)


def tiny_llama(vocab_size: int, seed: int, **overrides) -> LlamaForCausalLM:
    """A random Llama small enough to run many times per test; `overrides` replace `TINY_LLAMA` entries."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, **{**TINY_LLAMA, **overrides})
    return LlamaForCausalLM(config).eval()


def mean_nll(model, blocks: torch.Tensor) -> float:
    """The model's mean next-token NLL on `blocks` (the relearning attack's text), without gradients."""
    with torch.no_grad():
        loss, count = causal_lm_loss_sum(model(blocks).logits, blocks)
    return float(loss) / count


def obliviate(*argv, capsys):
    """Run the `obliviate` CLI in-process; return (exit code, stdout, stderr)."""
    from launcher.cli import main

    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    """Bad input: exit code 2, exactly one `obliviate: error:` line naming the problem, no traceback."""
    assert code == 2, err
    error_lines = [line for line in err.splitlines() if line.startswith("obliviate: error:")]
    assert len(error_lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]
