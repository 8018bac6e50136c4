"""Video I/O: read and write clips, and draw contact sheets.

Tensors follow the repo convention: one video is `[3, F, H, W]` float in [-1, 1].
Files on disk are uint8 RGB. Decoding uses PyAV (FFmpeg) for .mp4/.webm/.gif/..., and a folder of
numbered .png files is read as a "png sequence" (frames in natural sort order: 2.png before 10.png).

    video = read_video("clip.mp4", num_frames=16, stride=2)    # [3, 16, H, W]
    write_video("out.mp4", video, fps=8)                       # libx264, yuv420p
    write_video("out.gif", video, fps=8)                       # Pillow
    write_contact_sheet("sheet.png", videos, labels=captions)  # videos [B, 3, F, H, W]

Every write is atomic (`dfm.io.atomic_path`): it goes to a temporary file in the target folder, then
`os.replace`s it, so a crash never leaves half a file under the final name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from dfm.io import PathLike, atomic_path

VIDEO_EXTENSIONS = (".mp4", ".webm", ".gif", ".mov", ".mkv", ".avi", ".m4v")
IMAGE_EXTENSIONS = (".png",)


# ---------------------------------------------------------------------------------------------- conversions


def to_uint8_frames(video) -> np.ndarray:
    """Any accepted video layout -> uint8 numpy `[F, H, W, 3]` (what encoders want).

    Accepts a float tensor/array `[3, F, H, W]` in [-1, 1] (the repo convention; values are clamped),
    or a uint8 tensor/array `[F, H, W, 3]` (what decoders give).
    """
    array = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if array.ndim != 4:
        raise ValueError(f"expected a video [3, F, H, W] (float in [-1, 1]) or [F, H, W, 3] (uint8), got shape {array.shape}")
    if array.dtype == np.uint8:
        if array.shape[-1] != 3:
            raise ValueError(f"a uint8 video must be [F, H, W, 3], got shape {array.shape}")
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"expected float values in [-1, 1] or uint8, got dtype {array.dtype}")
    if array.shape[0] != 3:
        raise ValueError(f"a float video must be [3, F, H, W] in [-1, 1], got shape {array.shape}")
    array = np.clip((array.astype(np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)  # [3, F, H, W]
    return np.ascontiguousarray(array.transpose(1, 2, 3, 0))  # [F, H, W, 3]


def from_uint8_frames(frames: np.ndarray) -> torch.Tensor:
    """uint8 `[F, H, W, 3]` -> float32 tensor `[3, F, H, W]` in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)  # [3, F, H, W]
    return x.float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class VideoInfo:
    """What a header probe tells: frame count, frames per second, frame height and width."""

    num_frames: int
    fps: float
    height: int
    width: int


def natural_key(name: str):
    """Sort key that orders "frame2.png" before "frame10.png"."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def png_sequence_files(folder: PathLike) -> list:
    """The .png files of a png-sequence folder, in natural order (empty if none)."""
    folder = Path(folder)
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.name))


def probe_video(path: PathLike, default_fps: float = 8.0) -> VideoInfo:
    """Read only headers (and, where the header has no frame count, the packet index) of a video.

    Raises on unreadable files (anything PyAV or Pillow raises, or ValueError), so callers can skip them.
    A png sequence has no frame rate of its own: `default_fps` is reported for it.
    """
    path = Path(path)
    if path.is_dir():
        files = png_sequence_files(path)
        if not files:
            raise ValueError(f"{path} is a folder without .png frames")
        from PIL import Image

        with Image.open(files[0]) as image:
            width, height = image.size
        return VideoInfo(len(files), float(default_fps), height, width)

    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:  # webm and some gifs carry no count: count packets (no decoding)
            num_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else float(default_fps)
        height, width = stream.codec_context.height, stream.codec_context.width
    if num_frames <= 0 or height <= 0 or width <= 0:
        raise ValueError(f"{path} has no decodable frames (frames={num_frames}, size={height}x{width})")
    return VideoInfo(num_frames, fps, height, width)


# ---------------------------------------------------------------------------------------------- reading


def frame_indices(
    total: int,
    num_frames: Optional[int] = None,
    start: int = 0,
    stride: Optional[float] = None,
    fps: Optional[float] = None,
    source_fps: Optional[float] = None,
) -> list:
    """Which source frames to take: `start, start + step, start + 2*step, ...` (rounded), inside `total`.

    `step` is `stride` (default 1), or `source_fps / fps` when a target `fps` is given (they are exclusive).
    With `num_frames=None`, takes every frame that fits. Raises ValueError when fewer than `num_frames` fit.
    """
    if stride is not None and fps is not None:
        raise ValueError("give either stride or fps, not both")
    if fps is not None:
        if not source_fps or source_fps <= 0 or fps <= 0:
            raise ValueError(f"sampling by fps needs positive fps and source fps, got fps={fps}, source_fps={source_fps}")
        step = source_fps / fps
    else:
        step = 1.0 if stride is None else float(stride)
    if step <= 0:
        raise ValueError(f"the frame step must be positive, got {step}")
    available = int(math.floor((total - 1 - start) / step + 1e-9)) + 1 if total > start else 0
    count = available if num_frames is None else num_frames
    if count > available or count <= 0:
        raise ValueError(f"need {count} frames at step {step:g} from frame {start}, but the video has {total} frames")
    return [start + int(round(k * step)) for k in range(count)]


def _iter_frames(path: Path) -> Iterator[np.ndarray]:
    """Yield uint8 `[H, W, 3]` frames of a file or png-sequence folder, in order."""
    if path.is_dir():
        from PIL import Image

        for file in png_sequence_files(path):
            with Image.open(file) as image:
                yield np.asarray(image.convert("RGB"))
        return
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")


def decode_frames(path: PathLike, indices: Optional[Sequence[int]] = None) -> np.ndarray:
    """Decode the frames at `indices` (all when None) -> uint8 `[len(indices), H, W, 3]`.

    Decodes sequentially and stops after the last wanted frame (fine for the short clips used in training).
    Indices may repeat. Raises ValueError if the file ends before a wanted frame.
    """
    path = Path(path)
    wanted = None if indices is None else sorted(set(int(i) for i in indices))
    wanted_set = set(wanted or ())
    found = {}
    for i, frame in enumerate(_iter_frames(path)):
        if wanted is None or i in wanted_set:
            found[i] = frame
        if wanted is not None and i >= wanted[-1]:
            break
    if wanted is None:
        if not found:
            raise ValueError(f"{path} decoded to no frames")
        return np.stack([found[i] for i in sorted(found)])
    missing = [i for i in wanted if i not in found]
    if missing:
        raise ValueError(f"{path} ended after {len(found)} wanted frames; frame {missing[0]} is missing")
    return np.stack([found[int(i)] for i in indices])


def resize_center_crop(video: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize `[C, F, h, w]` so it covers `size=(H, W)` (shorter side matched), then crop the centre -> `[C, F, H, W]`.

    Uses bilinear interpolation with antialiasing (so downscaling does not alias).
    """
    height, width = int(size[0]), int(size[1])
    _, _, h, w = video.shape
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
        if (new_h, new_w) != (h, w):
            frames = video.permute(1, 0, 2, 3)  # [F, C, h, w]
            frames = torch.nn.functional.interpolate(
                frames, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
            )
            video = frames.permute(1, 0, 2, 3).clamp_(-1.0, 1.0)  # [C, F, new_h, new_w]
        top, left = (video.shape[2] - height) // 2, (video.shape[3] - width) // 2
        video = video[:, :, top : top + height, left : left + width]
    return video.contiguous()


def read_video(
    path: PathLike,
    num_frames: Optional[int] = None,
    *,
    start: int = 0,
    stride: Optional[float] = None,
    fps: Optional[float] = None,
    size: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Read a video file (.mp4, .webm, .gif, ...) or a png-sequence folder -> `[3, F, H, W]` float in [-1, 1].

    num_frames: how many frames (None: all from `start` on). stride: take every `stride`-th frame.
    fps: instead of stride, resample to this frame rate using the stream's own rate.
    size: (H, W) to resize the shorter side and centre-crop to; None keeps the stored size.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no video at {path}")
    if num_frames is None and stride is None and fps is None and start == 0:
        frames = decode_frames(path)
    else:
        info = probe_video(path)
        indices = frame_indices(info.num_frames, num_frames, start, stride, fps, info.fps)
        frames = decode_frames(path, indices)
    video = from_uint8_frames(frames)  # [3, F, H, W]
    return video if size is None else resize_center_crop(video, size)


# ---------------------------------------------------------------------------------------------- writing


def _write_mp4(path: Path, frames: np.ndarray, fps: float, crf: int) -> None:
    import av
    from fractions import Fraction

    _, height, width, _ = frames.shape
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    # GIF delays are whole centiseconds, so the stored rate is approximate (8 fps -> 12 cs -> 8.33 fps).
    duration = max(20, int(round(100.0 / fps)) * 10)
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)


def write_video(path: PathLike, video, fps: float = 8.0, *, pad_odd: bool = False, crf: int = 12) -> Path:
    """Write a video to .mp4 (libx264, yuv420p, via PyAV), .gif (Pillow), or .png (a png-sequence folder).

    video: `[3, F, H, W]` float in [-1, 1] or `[F, H, W, 3]` uint8.
    mp4 in yuv420p needs even height and width: odd sizes raise ValueError unless `pad_odd=True`, which repeats
    the last row/column. `crf` is x264's quality (0 lossless .. 51 worst; 12 is near-transparent).
    Returns the path written. The write is atomic.
    """
    path = Path(path)
    frames = to_uint8_frames(video)  # [F, H, W, 3]
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        _, height, width, _ = frames.shape
        if height % 2 or width % 2:
            if not pad_odd:
                raise ValueError(
                    f"mp4 (yuv420p) needs even height and width, got {height}x{width}; pass pad_odd=True to pad"
                )
            frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        with atomic_path(path) as tmp:
            _write_mp4(tmp, frames, fps, crf)
    elif suffix == ".gif":
        with atomic_path(path) as tmp:
            _write_gif(tmp, frames, fps)
    elif suffix == "":
        _write_png_sequence(path, frames)
    else:
        raise ValueError(f"cannot write {path.name}: use .mp4, .gif, or a name without suffix for a png sequence")
    return path


def _write_png_sequence(folder: Path, frames: np.ndarray) -> None:
    """Write frames as folder/00000.png, 00001.png, ... (each PNG atomic; the folder is built in place)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        with atomic_path(folder / f"{i:05d}.png") as tmp:
            Image.fromarray(frame).save(tmp, format="PNG")


def write_contact_sheet(
    path: PathLike,
    videos,
    ncols: Optional[int] = None,
    labels: Optional[Sequence[str]] = None,
    pad: int = 2,
) -> Path:
    """Save a PNG grid: one row per video, frames across; an optional caption line above each row.

    videos: `[B, 3, F, H, W]` float in [-1, 1] (or a list of `[3, F, H, W]` of one shape).
    ncols: frames shown per row, evenly spaced over F (default: all F). labels: B strings (Pillow's default font).
    """
    from PIL import Image, ImageDraw, ImageFont

    if isinstance(videos, (list, tuple)):
        videos = torch.stack([torch.as_tensor(v) for v in videos])
    videos = torch.as_tensor(videos)
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"expected videos [B, 3, F, H, W] in [-1, 1], got shape {tuple(videos.shape)}")
    count, _, num_frames, height, width = videos.shape
    if labels is not None and len(labels) != count:
        raise ValueError(f"got {len(labels)} labels for {count} videos")
    ncols = num_frames if ncols is None else max(1, min(int(ncols), num_frames))
    columns = np.linspace(0, num_frames - 1, ncols).round().astype(int)  # frame shown in each column

    font = ImageFont.load_default()
    label_height = 0
    if labels is not None:
        label_height = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), s or " ", font=font)[3] for s in labels) + pad
    row_height = label_height + height + pad
    sheet = Image.new("RGB", (pad + ncols * (width + pad), pad + count * row_height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for b in range(count):
        frames = to_uint8_frames(videos[b].float())  # [F, H, W, 3]
        top = pad + b * row_height
        if labels is not None:
            draw.text((pad, top), str(labels[b]), fill=(0, 0, 0), font=font)
        for c, f in enumerate(columns):
            sheet.paste(Image.fromarray(frames[f]), (pad + c * (width + pad), top + label_height))
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
