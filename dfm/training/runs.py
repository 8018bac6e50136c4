"""What a run owns, shared by `dfm train` and `dfm train-vae`: its folder and how a run ends early.

- A fresh run never mixes into another: an output_dir that already holds a run is refused (`check_fresh`) unless
  train.overwrite=true, which moves the old run's entries aside to a sibling `<dir>.old-<time>` (`move_aside`).
  A folder holding only other files is used, and those files are left alone.
- A resumed run writes where it was read from: the run directory of the checkpoint (`run_dir_of`). Resuming an
  earlier step moves the later checkpoints aside (`supersede`), so the folder holds one course of training.
- Nothing is trained into the repository's models/ folder (`check_outside_models`): `dfm export` is the only way a
  folder there changes.
- SIGINT / SIGTERM (`StopSignals`) let the loop finish its step and save a checkpoint; the process then exits with
  128 + the signal number (130, 143). A second signal acts at once.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dfm import distributed as D
from dfm.checkpoint import STEP_DIR, list_checkpoints
from dfm.errors import UserError

RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "checkpoints", "samples", "tb")  # what `dfm train` writes
SHIPPED_MODELS = Path(__file__).resolve().parents[2] / "models"


class RunFolderError(UserError):
    """An output folder that would mix two runs or write where only `dfm export` writes."""


def check_outside_models(path: str | Path, key: str) -> None:
    target = Path(path).resolve()
    if target == SHIPPED_MODELS or SHIPPED_MODELS in target.parents:
        raise RunFolderError(f"{key}={path} is inside the repository's models/ folder, which only `dfm export` "
                             f"writes: train into a run folder (such as runs/NAME), then `dfm export RUN models/NAME`")


def check_fresh(out: Path, overwrite: bool, resume_hint: str, entries=RUN_ENTRIES) -> list[str]:
    """The entries of a run that `out` already holds, to move aside (train.overwrite=true); without overwrite a
    held run is a RunFolderError naming the three ways on."""
    held = [e for e in entries if (out / e).exists()] if out.is_dir() else []
    if held and not overwrite:
        ckpts = list_checkpoints(out / "checkpoints")
        what = f"checkpoints up to {ckpts[-1].name}" if ckpts else ", ".join(held)
        raise RunFolderError(f"train.output_dir={out} already holds a run ({what}); continue it with `{resume_hint}`, "
                             f"choose a new train.output_dir, or pass train.overwrite=true to move the old run aside")
    return held


def _stamped(base: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = base.with_name(f"{base.name}-{stamp}"), 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{stamp}-{n}"), n + 1
    return path


def move_aside(out: Path, held: list[str]) -> Path:
    """Move the run entries `held` of `out` into a new sibling `<out>.old-<time>/` (each an atomic rename)."""
    base = out.resolve()
    aside = _stamped(base.with_name(f"{base.name}.old"))
    aside.mkdir()
    for entry in held:
        os.replace(out / entry, aside / entry)
    return aside


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a step_* folder belongs to (RUN/checkpoints/step_N -> RUN), None for a loose one."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def supersede(root: Path, step: int) -> tuple[list[str], Path | None]:
    """Move the checkpoints under `root` later than `step` into root/superseded-<time>/ (a resumed run replaces
    them): (their names, where they went)."""
    later = [p for p in list_checkpoints(root) if int(STEP_DIR.match(p.name).group(1)) > step]
    if not later:
        return [], None
    dest = _stamped(root / "superseded")
    dest.mkdir()
    for p in later:
        os.replace(p, dest / p.name)
    return [p.name for p in later], dest


class StopSignals:
    """While active, SIGINT and SIGTERM only set `.signum`, so the loop can finish its step, checkpoint and stop;
    a second one does what it would have done (KeyboardInterrupt, termination). `agreed()` is the signal any rank
    got (a collective under torchrun, so every rank stops at the same step). Outside the main thread, inactive."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, device: torch.device):
        self.signum, self.device, self._old = 0, device, {}

    def __enter__(self):
        try:
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread
            self._restore()
        return self

    def __exit__(self, *exc):
        self._restore()

    def _restore(self):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def _handle(self, signum, frame):  # no printing here: the main thread may be inside a write to stderr
        if self.signum:
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def agreed(self) -> int:
        if not dist.is_available() or not dist.is_initialized():
            return self.signum
        got = torch.tensor([self.signum == s for s in self.SIGNALS], dtype=torch.int32, device=self.device)
        got = D.all_reduce_sum(got).tolist()  # [ranks that got SIGINT, ranks that got SIGTERM]
        return int(signal.SIGTERM) if got[1] else int(signal.SIGINT) if got[0] else 0

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
