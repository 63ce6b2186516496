"""Crash-safe training checkpoints: a resumed run ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import torch

from configs.errors import UserError, first_line
from engine.training.backends import TrainBackend

log = logging.getLogger(__name__)


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint `root/latest` names, if any."""
    pointer = Path(root) / "latest"
    return Path(root) / pointer.read_text().strip() if pointer.is_file() else None


def latest_step(root: Path) -> int:
    """The step `fit(resume=True)` continues from: that of the latest complete checkpoint, else 0."""
    path = latest_checkpoint(root)
    return int(path.name.removeprefix("step-")) if path is not None else 0


def record_path(root: Path) -> Path:
    """What a phase's checkpoints were made from: `checkpoints/PHASE.made-from.json`, beside their folder."""
    return Path(root).with_name(f"{Path(root).name}.made-from.json")


def check_resumable(root: Path, made_from: dict) -> int:
    """The step `--resume` would continue from, after checking — before anything runs — that the latest
    checkpoint is whole and was made from the same inputs (`made_from`: flat, comparable values). 0: none."""
    root = Path(root)
    pointer = root / "latest"
    if not pointer.exists():
        return 0
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"the checkpoint pointer {pointer} is unreadable ({first_line(e)}): rerun without --resume to start the phase over") from None
    step_dir = root / name
    if not name.startswith("step-") or not name.removeprefix("step-").isdigit() or not step_dir.is_dir():
        raise UserError(f"{pointer} names {name[:40]!r}, which is no checkpoint in {root}: rerun without --resume to start the phase over")
    damaged = [f.name for f in step_dir.rglob("*.pt") if not zipfile.is_zipfile(f)]
    if not list(step_dir.glob("loop-*.pt")) or damaged:
        raise UserError(f"the checkpoint {step_dir} is damaged ({', '.join(sorted(damaged)[:3]) or 'no loop state'}): rerun without --resume to start the phase over")
    try:
        recorded = json.loads(record_path(root).read_text())
    except (OSError, ValueError):
        raise UserError(f"{root} does not record what its checkpoints were made from: rerun without --resume to start the phase over") from None
    for key in sorted(set(recorded) | set(made_from)):
        if recorded.get(key) != made_from.get(key):
            raise UserError(
                f"cannot resume from {step_dir}: it was made with {key} = {recorded.get(key)!r}, this run has {made_from.get(key)!r} "
                "(rerun with the same inputs, or without --resume to start the phase over)"
            )
    return int(name.removeprefix("step-"))


def record_inputs(root: Path, made_from: dict) -> None:
    """Write what the phase's checkpoints are made from (before the first one)."""
    record = record_path(root)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f".{record.name}.tmp")
    tmp.write_text(json.dumps(made_from, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, record)


class Checkpoints:
    """`root/step-K/` directories; one is complete only once `root/latest` names it.

    Every rank writes into `step-K.partial/`, then rank 0 renames it and atomically repoints `latest`: a
    crash at any moment leaves `latest` naming a complete checkpoint (or nothing). Other directories are
    leftovers of crashes and are never loaded; the last two checkpoints are kept.
    """

    def __init__(self, root: Path, backend: TrainBackend):
        self.root, self.backend = Path(root), backend

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(self, step: int, loop_state: dict) -> None:
        backend = self.backend
        partial, final = self.root / f"step-{step}.partial", self.root / f"step-{step}"
        if backend.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        backend.barrier()
        backend.save_state(partial)
        torch.save({**loop_state, "rng": torch.get_rng_state()}, partial / f"loop-{backend.rank}.pt")
        backend.barrier()
        if backend.rank == 0:
            previous = self.latest()
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            tmp = self.root / "latest.tmp"
            tmp.write_text(final.name)
            os.replace(tmp, self.root / "latest")
            for old in self.root.glob("step-*"):
                if old not in (final, previous):
                    shutil.rmtree(old)
        backend.barrier()

    def load(self) -> dict | None:
        """Restore the backend and this rank's RNG from the latest checkpoint; return the loop state."""
        path = self.latest()
        if path is None:
            return None
        self.backend.load_state(path)
        state = torch.load(path / f"loop-{self.backend.rank}.pt", weights_only=True)
        torch.set_rng_state(state.pop("rng"))
        log.info("resuming from %s", path)
        return state
