"""Logging of a run: metrics.jsonl, TensorBoard and one-line notices, on rank 0 only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dfm.io import write_text_atomic


class Logger:
    """metrics.jsonl, TensorBoard and one-line notices, on rank 0 only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled, self.bar, self.tb = enabled, None, None
        self.path = out / "metrics.jsonl"
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():  # drop records past the checkpoint: they are redone
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and _record_step(ln) <= resume_step]
            write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(out / "tb"))
            except ImportError:
                self.notice("TensorBoard logging skipped: the tensorboard package is not installed "
                            "(pip install tensorboard); metrics.jsonl has the same numbers")

    def notice(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"dfm: {msg}", file=sys.stderr)
        else:
            print(f"dfm: {msg}", file=sys.stderr, flush=True)

    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # unreadable (e.g. cut by a kill): dropped
