"""The demo's models: a SentencePiece tokenizer, a tiny Llama baseline and an oracle, cached by config.

The baseline is pretrained on general text + the saga (it "knows" the saga, like Llama-2 knows
Harry Potter); the oracle on general text only, the model that never saw the target, which the
paper could not afford at 7B and which tells us what "forgotten" should look like. Offset unlearning
needs a smaller model of the same tokenizer, pretrained on the baseline's text: `build_world(small=True)`
adds it to the cached world (its own key, so the world's other models are not rebuilt for it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import reduce
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from configs import RunConfig, WorldConfig, derive
from configs.schema import ModelShape
from engine.data.corpus import make_blocks
from engine.models import save_model
from engine.training.backends import TorchBackend
from engine.training.loop import fit
from engine.data.world import WorldFiles, write_world

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the generator or the pretraining recipe changes (2: saga_heldout.txt, suite.yaml)
SMALL_VERSION = 1  # bump when the small model's recipe changes


@dataclass(frozen=True)
class World:
    files: WorldFiles
    baseline: Path
    oracle: Path
    small: Path | None = None  # offset unlearning's o (o′ trains from it), when built


def world_key(cfg: WorldConfig) -> str:
    fields = {"version": CACHE_VERSION, **asdict(cfg), "cache_dir": None}
    del fields["small"]  # keyed on its own (`small_key`)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def small_key(cfg: WorldConfig) -> str:
    payload = json.dumps({"version": SMALL_VERSION, "shape": asdict(cfg.small), "pretrain": asdict(cfg.pretrain), "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_world(cfg: WorldConfig, small: bool = False) -> World:
    """Return the cached world for this config, building it (≈ minutes on 2 cores) if needed; with `small`,
    the offset pair's model too (≈ a minute more the first time)."""
    root = Path(cfg.cache_dir).expanduser() / f"world-{world_key(cfg)}"
    if not (root / "DONE").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        with _staging(root) as staging:
            _build(cfg, staging)
            (staging / "DONE").write_text("ok\n")
    else:
        log.info("using the cached tiny world at %s", root)
    world = World(files=WorldFiles.at(root / "world"), baseline=root / "baseline", oracle=root / "oracle")
    if not small:
        return world
    small_dir = root / f"small-{small_key(cfg)}"
    if not (small_dir / "config.json").is_file():
        with _staging(small_dir) as staging:
            tokenizer = LlamaTokenizer.from_pretrained(root / "tokenizer")
            files = world.files
            pretrain("small", [files.general.read_text(), files.saga.read_text()], tokenizer, cfg, staging, cfg.small)
    return replace(world, small=small_dir)


@contextmanager
def _staging(final: Path) -> Iterator[Path]:
    """A fresh directory beside `final` that becomes `final` (replacing it) once the body succeeds."""
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield staging
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _build(cfg: WorldConfig, root: Path) -> None:
    log.info("building the tiny world in %s", root)
    files = write_world(root / "world", seed=cfg.seed, size=cfg.size)
    tokenizer = train_tokenizer([files.general, files.saga], cfg.model.vocab_size, root / "tokenizer")
    general = files.general.read_text()
    saga = files.saga.read_text()
    for name, documents in (("baseline", [general, saga]), ("oracle", [general])):
        pretrain(name, documents, tokenizer, cfg, root / name)


def train_tokenizer(texts: list[Path], vocab_size: int, out_dir: Path) -> LlamaTokenizer:
    """A real SentencePiece BPE `.model`, loaded as a transformers Llama tokenizer.

    BPE, not unigram: a unigram model tokenizes differently once converted to transformers.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=",".join(str(p) for p in texts),
        model_prefix=str(out_dir / "sp"),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    shutil.copy(out_dir / "sp.model", out_dir / "tokenizer.model")  # where LlamaTokenizer looks for it
    return LlamaTokenizer.from_pretrained(out_dir)


def tiny_llama(cfg: WorldConfig, vocab_size: int, shape: ModelShape | None = None) -> LlamaForCausalLM:
    """A Llama of `shape` (default the world's baseline shape), initialized from the world's seed."""
    m = shape or cfg.model
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_heads,
        max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def pretrain(name: str, documents: list[str], tokenizer, cfg: WorldConfig, out_dir: Path, shape: ModelShape | None = None) -> None:
    blocks = make_blocks(documents, tokenizer, cfg.context_length, name=f"{name} pretraining text")
    input_ids = torch.tensor([b.input_ids for b in blocks])
    model = tiny_llama(cfg, len(tokenizer), shape)
    backend = TorchBackend(model, cfg.pretrain, save_fn=lambda m, path: save_model(m, tokenizer, path))
    fit(backend, input_ids, input_ids, cfg.pretrain, save_to=out_dir, keep_best=False, desc=f"pretrain {name}")


def use_world(cfg: RunConfig, world: World) -> RunConfig:
    """The run config pointed at the world's models and files where it leaves them empty."""
    wiring = {
        "baseline": world.baseline,
        "oracle": world.oracle,
        "target": world.files.saga,
        "retain": world.files.general,
        "anchors": world.files.anchors,
        "eval.probes": world.files.probes,
        "eval.completions": world.files.completions,
        "eval.general_text": world.files.general_heldout,
        "eval.forget_set": world.files.saga,
        "eval.holdout_set": world.files.saga_heldout,
        **({"offset.small": world.small} if world.small else {}),
    }
    return derive(cfg, **{key: str(path) for key, path in wiring.items() if not reduce(getattr, key.split("."), cfg)})
