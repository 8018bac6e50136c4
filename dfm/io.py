"""Atomic file writes: every file dfm writes goes to a temporary file in the target folder, then `os.replace`s it,
so a crash never leaves half a file under the final name; and written files get the mode a new file normally gets.

    with atomic_path("out/index.json") as tmp:      # tmp: out/.index.<random>.tmp.json
        tmp.write_text(text)                         # renamed onto out/index.json on success, deleted on error
    write_text_atomic("run/config.yaml", text)
    save_safetensors(tensors, path, metadata)       # safetensors' save_file + the usual file mode
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import save_file as _save_file

PathLike = Union[str, os.PathLike]


def written_file_mode() -> int:
    """The mode a newly written file normally gets (0o666 less the umask), for files that tools create private."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: PathLike):
    """Yield a temporary path next to `path` (same suffix); on success move it onto `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    os.chmod(tmp, written_file_mode())  # mkstemp makes the file private (0600)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write a text file all at once (temp file, then rename): a crash leaves the old file or the new, never half."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, then the file mode a written file normally gets (save_file leaves it 0600, private).
    Not atomic by itself: write into `atomic_path(...)`'s temporary path, or into a folder renamed into place."""
    _save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, written_file_mode())
