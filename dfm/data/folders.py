"""VideoFolder: captioned clips from a folder of real videos (.mp4, .webm, .gif, ... or png-sequence folders).

Captions come from either
  - `root/meta.json`: a list of {"file_name", "caption", "start_frame", "end_frame"} (the fields NeMo DFM uses;
    file_name is relative to root; start_frame defaults to 0, end_frame (exclusive) to the end of the video), or
  - sidecar text files when there is no meta file: `clip.mp4` + `clip.txt`; a png-sequence folder `clip/`
    (numbered .png files) + `clip.txt` next to it. A video without caption gets "".

Frames are sampled every `stride` frames, or at a target `fps` (step = stream fps / fps), from a start chosen per
item (`temporal_crop`), then resized (shorter side) and centre-cropped. Shapes:
  - size=(H, W): every item is [3, F, H, W];
  - size=[(H1, W1), (H2, W2), ...]: aspect-ratio buckets, each video goes to the size nearest its aspect ratio;
  - size=None: each video keeps its stored size.
  num_frames may also be a list of lengths: each video gets the longest that it can supply.
`dataset.bucket_keys[i] = (F, H, W)` is item i's shape; `BucketBatchSampler` batches by it.

Broken files never stop training. At construction every file's header is probed (cheap, no decoding); unreadable,
empty or too-short files (and captions that are not UTF-8) are skipped, listed in `dataset.skipped` as (path,
reason), and summed up in one warning (clips used, files skipped by reason, the first few names). A meta.json that
cannot be read is a VideoFolderError (a dfm.errors.UserError): it describes the whole folder.
A file that fails later, in `__getitem__`, is recorded the same way and replaced by the next item with the same
bucket key (deterministic, and the batch keeps its shape). With DataLoader workers each worker holds its own copy,
so failures found inside workers are warned about there but not added to the main process's `skipped`.
"""

from __future__ import annotations

import itertools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from torch.utils.data import Dataset

from ..errors import UserError
from ..video import (
    VIDEO_EXTENSIONS,
    VideoInfo,
    decode_frames,
    from_uint8_frames,
    png_sequence_files,
    probe_video,
    resize_center_crop,
)
from .buckets import nearest_bucket


class VideoFolderError(UserError, ValueError):
    """A video folder that cannot be read as a whole (no folder, a broken meta.json); the message names the fix."""


@dataclass(frozen=True)
class Clip:
    """One usable entry: a file, its caption, the frame range to sample from, and its output shape."""

    path: Path
    caption: str
    start: int  # first usable frame
    end: int  # one past the last usable frame
    step: float  # source frames per output frame
    fps: float  # the source stream's frame rate
    shape: tuple  # (F, H, W) of the item


class VideoFolder(Dataset):
    """Captioned video clips from a folder (see the module docstring for layouts and guarantees).

    root: the folder. num_frames: frames per item (int, or a list of lengths for length buckets).
    size: (H, W), a list of (H, W) aspect buckets, or None for the stored size.
    stride: take every stride-th frame. fps: or resample to this rate (exclusive with stride; default stride 1).
    meta: name of the meta file inside root ("meta.json"); when missing, or meta=None, sidecar .txt captions.
    temporal_crop: "random" (start drawn from (seed, epoch, index); call `set_epoch`), "start" or "center".
    default_fps: the frame rate assumed for png sequences (they have none of their own).
    """

    def __init__(
        self,
        root,
        num_frames: Union[int, Sequence[int]] = 16,
        size: Union[Sequence[int], Sequence[Sequence[int]], None] = (256, 256),
        stride: Optional[int] = None,
        fps: Optional[float] = None,
        meta: Optional[str] = "meta.json",
        temporal_crop: str = "random",
        seed: int = 0,
        default_fps: float = 8.0,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder {self.root} does not exist")
        if stride is not None and fps is not None:
            raise ValueError("give either stride or fps, not both")
        if (stride is not None and stride < 1) or (fps is not None and fps <= 0):
            raise ValueError(f"stride must be >= 1 and fps > 0, got stride={stride}, fps={fps}")
        if temporal_crop not in ("random", "start", "center"):
            raise ValueError(f'temporal_crop must be "random", "start" or "center", got {temporal_crop!r}')
        lengths = sorted({int(n) for n in ([num_frames] if isinstance(num_frames, int) else num_frames)})
        if not lengths or lengths[0] < 1:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        if size is not None and isinstance(size[0], int):
            size = [tuple(size)]
        self.lengths, self.sizes = lengths, None if size is None else [tuple(int(v) for v in s) for s in size]
        self.stride, self.fps, self.temporal_crop = stride, fps, temporal_crop
        self.seed, self.epoch, self.default_fps = int(seed), 0, float(default_fps)
        self.skipped: list = []  # (path, reason) for every file left out
        self._failed: set = set()  # item indices whose file failed in __getitem__

        meta_path = None if meta is None else self.root / meta
        entries = self._read_meta(meta_path) if meta_path is not None and meta_path.is_file() else self._scan_sidecars()
        self.clips = [clip for clip in (self._make_clip(*entry) for entry in entries) if clip is not None]
        self.bucket_keys = [clip.shape for clip in self.clips]  # (F, H, W) per item
        if self.skipped:
            warnings.warn(self.summary(), stacklevel=2)

    def summary(self, shown: int = 5) -> str:
        """One line: clips used, files skipped by reason, the first `shown` of them with their reasons."""
        kinds: dict = {}
        for _, reason in self.skipped:
            kind = reason.split(" (")[0].split(":")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        names = "; ".join(f"{Path(path).name} ({' '.join(reason.split())[:100]})"
                          for path, reason in self.skipped[:shown])
        rest = len(self.skipped) - shown
        more = f"; and {rest} more (dataset.skipped lists them)" if rest > 0 else ""
        return (f"VideoFolder {self.root}: {len(self.clips)} clips used, {len(self.skipped)} skipped "
                f"({', '.join(f'{n} {k}' for k, n in kinds.items())}): {names}{more}")

    # ---- construction

    def _skip(self, path, reason: str, warn: bool = False) -> None:
        """Record a file left out; `warn`: say so now (a failure while training; at construction `summary` does)."""
        if warn:
            warnings.warn(f"VideoFolder: skipping {path}: {reason}", stacklevel=3)
        self.skipped.append((str(path), reason))

    def _read_meta(self, meta_path: Path) -> list:
        """(path, caption, start, end) from a meta.json list."""
        try:
            records = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
            raise VideoFolderError(f"{meta_path} is not readable JSON ({type(e).__name__}: {str(e)[:120]}); fix it, "
                                   f"or delete it to use .txt captions beside the videos") from None
        if not isinstance(records, list):
            raise VideoFolderError(f"{meta_path} must hold a list of {{file_name, caption, start_frame, end_frame}}, "
                                   f"got {type(records).__name__}")
        entries = []
        for record in records:
            if not isinstance(record, dict) or "file_name" not in record:
                self._skip(meta_path, f"entry without file_name: {record!r}")
                continue
            end = record.get("end_frame")
            try:
                start, end = int(record.get("start_frame", 0) or 0), None if end is None else int(end)
            except (TypeError, ValueError):
                self._skip(meta_path, f"entry with bad start_frame/end_frame: {record!r}")
                continue
            entries.append((self.root / str(record["file_name"]), str(record.get("caption", "")), start, end))
        return entries

    def _scan_sidecars(self) -> list:
        """(path, caption, 0, None) for every video file and png-sequence folder under root."""
        entries = []
        for path in sorted(self.root.rglob("*")):
            if any(part.startswith(".") for part in path.relative_to(self.root).parts):
                continue  # hidden files, including unfinished atomic writes
            if path.is_dir():
                if not png_sequence_files(path):
                    continue
                caption_file = path.parent / f"{path.name}.txt"
            elif path.suffix.lower() in VIDEO_EXTENSIONS:
                caption_file = path.with_suffix(".txt")
            else:
                continue
            try:
                caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
            except (OSError, UnicodeDecodeError) as e:
                self._skip(path, f"unreadable caption ({caption_file.name}: {type(e).__name__})")
                continue
            entries.append((path, caption, 0, None))
        return entries

    def _make_clip(self, path: Path, caption: str, start: int, end: Optional[int]) -> Optional[Clip]:
        if not path.exists():
            self._skip(path, "file not found")
            return None
        try:
            info: VideoInfo = probe_video(path, default_fps=self.default_fps)
        except Exception as error:  # any decoder error: corrupt, empty, not a video
            self._skip(path, f"unreadable ({type(error).__name__}: {error})")
            return None
        end = info.num_frames if end is None else min(end, info.num_frames)
        if self.fps is not None:
            step = info.fps / self.fps
        else:
            step = float(self.stride or 1)
        span = end - start  # frames available
        fitting = [n for n in self.lengths if (n - 1) * step + 1 <= span + 1e-9]
        if not fitting:
            self._skip(path, f"too short: {max(span, 0)} frames, need {self.lengths[0]} at step {step:g}")
            return None
        height, width = (
            (info.height, info.width) if self.sizes is None else nearest_bucket(info.height, info.width, self.sizes)
        )
        return Clip(path, caption, start, end, step, info.fps, (fitting[-1], height, width))

    # ---- items

    def set_epoch(self, epoch: int) -> None:
        """Change the random temporal crops (temporal_crop="random") for a new epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.clips)

    def frame_indices(self, index: int) -> list:
        """The source frame numbers item `index` decodes (deterministic for seed, epoch, index)."""
        clip = self.clips[index]
        num_frames = clip.shape[0]
        slack = (clip.end - clip.start) - ((num_frames - 1) * clip.step + 1)  # free frames before/after
        first_choices = int(np.floor(slack + 1e-9)) + 1
        if self.temporal_crop == "start":
            offset = 0
        elif self.temporal_crop == "center":
            offset = (first_choices - 1) // 2
        else:
            offset = int(np.random.default_rng([self.seed, self.epoch, index]).integers(first_choices))
        return [clip.start + offset + int(round(k * clip.step)) for k in range(num_frames)]

    def load(self, index: int) -> dict:
        """Decode item `index`; raises whatever the decoder raises (use `dataset[index]` to get the fallback)."""
        clip = self.clips[index]
        frames = decode_frames(clip.path, self.frame_indices(index))  # [F, h, w, 3] uint8
        video = resize_center_crop(from_uint8_frames(frames), clip.shape[1:])  # [3, F, H, W] in [-1, 1]
        return {
            "video": video,
            "caption": clip.caption,
            "path": str(clip.path),
            "index": index,
            "fps": clip.fps / clip.step,  # the frame rate of the returned clip
        }

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.clips):
            raise IndexError(f"index {index} out of range for {len(self.clips)} clips")
        key = self.bucket_keys[index]
        for candidate in itertools.chain(range(index, len(self.clips)), range(index)):  # the item itself, then the next ones with the same shape
            if candidate in self._failed or self.bucket_keys[candidate] != key:
                continue
            try:
                return self.load(candidate)
            except Exception as error:
                self._failed.add(candidate)
                self._skip(self.clips[candidate].path, f"failed to decode ({type(error).__name__}: {error})",
                           warn=True)
        raise RuntimeError(f"VideoFolder: every file with shape {key} failed to decode; see dataset.skipped")
