"""Crash-safe training checkpoints: a resumed run ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

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
