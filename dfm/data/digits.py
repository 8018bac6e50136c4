"""Moving Digits: small captioned videos of handwritten digits moving across a plain background.

The digits are scikit-learn's `load_digits` (1797 real 8x8 scans, values 0..16, shipped with the library:
no download). Each clip shows one or two digits, upscaled smoothly to `digit_size` pixels, moving in a straight
line (left, right, up, down) at `speed` pixels per frame, optionally bouncing off the frame edges and optionally
coloured, on black. The caption says what the clip shows.

Caption grammar (what `caption_for` writes and `parse_caption` reads back):

    caption   := clause | clause " and " clause
    clause    := subject " moves " direction [" and bounces"]
    subject   := "the digit " D                       (white digit, colors=None)
               | "a " COLOR " digit " D  /  "an " COLOR " digit " D
    direction := "to the left" | "to the right" | "up" | "down"

    "the digit 7 moves to the left"
    "a red digit 7 moves up"
    "the digit 3 moves to the right and the digit 5 moves down"
    "a blue digit 2 moves down and bounces"          (only when the clip really shows a bounce)

The direction is the direction of travel at frame 0. `parse_caption` also accepts "moves left" / "moves right".

Determinism: item i depends only on (seed, i) through its own generator `numpy.random.default_rng([seed, i])`,
so every process, worker and world size sees the same clip for the same index.
Held-out split: the 1797 images are split once by a fixed permutation (`SPLIT_SEED`), 80% "train", 20% "test";
the split does not depend on `seed`, so evaluation clips use digit images the model never saw.
"""

from __future__ import annotations

import functools
import re
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dfm.data.captions import paraphrase_for

DIRECTIONS = ("left", "right", "up", "down")
# Unit step per direction as (row, column); rows grow downwards, so "up" is -1.
DIRECTION_STEPS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}
# Colour name -> RGB in [0, 1]. The background is black; colors=None draws white digits and names no colour.
COLORS = {
    "red": (1.0, 0.15, 0.15),
    "green": (0.15, 1.0, 0.15),
    "blue": (0.25, 0.35, 1.0),
    "yellow": (1.0, 1.0, 0.1),
    "cyan": (0.1, 1.0, 1.0),
    "magenta": (1.0, 0.2, 1.0),
    "orange": (1.0, 0.55, 0.0),
    "white": (1.0, 1.0, 1.0),
}
SPLIT_SEED = 20240917  # fixed: the train/test split of the 1797 images never changes
TEST_FRACTION = 0.2
NUM_IMAGES = 1797

_DIRECTION_WORDS = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}


# ---------------------------------------------------------------------------------------------- the images


@functools.lru_cache(maxsize=1)
def load_digit_images() -> tuple:
    """All of scikit-learn's digits: (images float32 [1797, 8, 8] in [0, 1], labels int64 [1797])."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0)  # [1797, 8, 8]
    return images, torch.from_numpy(data.target.astype(np.int64))


def split_indices(split: str) -> torch.Tensor:
    """Indices into `load_digit_images()` for "train" (80%) or "test" (20%); disjoint, fixed forever."""
    permutation = torch.randperm(NUM_IMAGES, generator=torch.Generator().manual_seed(SPLIT_SEED))
    num_test = int(round(NUM_IMAGES * TEST_FRACTION))
    if split == "train":
        return permutation[num_test:].sort().values
    if split == "test":
        return permutation[:num_test].sort().values
    raise ValueError(f'split must be "train" or "test", got {split!r}')


def upscale_digits(images: torch.Tensor, digit_size: int) -> torch.Tensor:
    """[N, 8, 8] in [0, 1] -> [N, digit_size, digit_size] in [0, 1], bicubic (smooth, readable strokes)."""
    big = F.interpolate(images[:, None], size=(digit_size, digit_size), mode="bicubic", align_corners=False)
    return big[:, 0].clamp_(0.0, 1.0)


# ---------------------------------------------------------------------------------------------- captions


def _as_list(value, count: Optional[int] = None) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return values if count is None else (values * count if len(values) == 1 else values)


def caption_for(digit, direction, color=None, bounces=False) -> str:
    """The caption for one digit (scalars) or several (lists of equal length), following the module's grammar."""
    digits = _as_list(digit)
    directions, colors, bounce_flags = (_as_list(v, len(digits)) for v in (direction, color, bounces))
    if not (len(digits) == len(directions) == len(colors) == len(bounce_flags)):
        raise ValueError("caption_for needs one direction, colour and bounce flag per digit")
    clauses = []
    for d, direction_name, colour, bounced in zip(digits, directions, colors, bounce_flags):
        if direction_name not in _DIRECTION_WORDS:
            raise ValueError(f"unknown direction {direction_name!r}; expected one of {DIRECTIONS}")
        if colour is None:
            subject = f"the digit {int(d)}"
        elif colour in COLORS:
            subject = f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} digit {int(d)}"
        else:
            raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(COLORS)}")
        clauses.append(f"{subject} moves {_DIRECTION_WORDS[direction_name]}" + (" and bounces" if bounced else ""))
    return " and ".join(clauses)


_CLAUSE = re.compile(
    r"(?:the|an?\s+(?P<color>[a-z]+))\s+digit\s+(?P<digit>\d)\s+moves\s+"
    r"(?:to\s+the\s+)?(?P<direction>left|right|up|down)(?P<bounces>\s+and\s+bounces)?"
)


def parse_caption(caption: str) -> dict:
    """Read a caption back: {"digit", "direction", "color", "bounces"}; lists when the caption names two digits.

    Raises ValueError when the caption does not follow the grammar (see the module docstring).
    """
    text = " ".join(caption.lower().strip().rstrip(".").split())
    clauses, position = [], 0
    for match in _CLAUSE.finditer(text):
        gap = text[position : match.start()]
        if gap != ("" if not clauses else " and "):
            break
        clauses.append(match)
        position = match.end()
    if not clauses or position != len(text):
        raise ValueError(f"cannot parse caption {caption!r}; expected e.g. 'the digit 7 moves to the left'")
    for match in clauses:
        if match["color"] is not None and match["color"] not in COLORS:
            raise ValueError(f"unknown colour {match['color']!r} in caption {caption!r}")
    fields = {
        "digit": [int(m["digit"]) for m in clauses],
        "direction": [m["direction"] for m in clauses],
        "color": [m["color"] for m in clauses],
        "bounces": [m["bounces"] is not None for m in clauses],
    }
    return {key: values[0] for key, values in fields.items()} if len(clauses) == 1 else fields


# ---------------------------------------------------------------------------------------------- the dataset


class MovingDigits(Dataset):
    """Captioned clips of moving handwritten digits, generated on the fly (nothing stored on disk).

    split: "train" or "test" (disjoint digit images; see `split_indices`).
    num_frames, size: clip length F and square frame size H = W.
    digit_size: side of the upscaled digit (default size // 2).
    speed: pixels per frame. Default: 75% of the largest speed that keeps a non-bouncing digit in frame.
    num_digits: 1 or 2 digits per clip (each with its own image, direction and colour).
    colors: None (white digits, no colour in captions) or a list of names from `COLORS` to draw from.
    bounce: reflect off the frame edges (then any speed works; the start leaves room for one step, so every clip
        opens moving the way its caption says). Without it the start is drawn so the digit stays fully inside
        the frame for the whole clip.
    directions: the directions to draw from (default all four).
    length: the number of items (clips are generated, so this is just an epoch length).
    seed: item i is a function of (seed, i) only.
    captions: "template" (the grammar above, what `parse_caption` reads), "paraphrase" (dfm.data.captions' train
        templates: number words, direction synonyms) or "heldout" (its held-out templates, for evaluation); the
        paraphrase is drawn from its own generator (seed, i, 7), so the clip is the same in every mode.

    Item: {"video": [3, F, H, W] float in [-1, 1], "caption": str, "digit", "direction", "color", "bounces"
    (scalars for one digit, lists for two), "index": int, "image_index" (row of `load_digit_images()`),
    "positions": [K, F, 2] float (row, column) of each digit box's centre per frame, K = num_digits,
    "digit_size": int}. Use `dfm.data.collate` to batch (it keeps None colours and lists as lists).
    """

    def __init__(
        self,
        split: str = "train",
        num_frames: int = 16,
        size: int = 32,
        digit_size: Optional[int] = None,
        speed: Optional[float] = None,
        num_digits: int = 1,
        colors: Optional[Sequence[str]] = None,
        bounce: bool = False,
        directions: Sequence[str] = DIRECTIONS,
        length: int = 10_000,
        seed: int = 0,
        ink: float = 1.0,
        captions: str = "template",
    ):
        if not 0 < ink <= 1:
            raise ValueError(f"ink must be in (0, 1] (the digits' brightness; 1: full), got {ink}")
        self.ink = float(ink)  # a style the captions do not name: every digit drawn at this brightness
        if captions not in ("template", "paraphrase", "heldout"):
            raise ValueError(f'captions must be "template", "paraphrase" or "heldout", got {captions!r}')
        self.captions = captions
        self.digit_size = int(digit_size if digit_size is not None else size // 2)
        if num_frames < 1 or size < 2 or not 1 <= self.digit_size <= size:
            raise ValueError(f"need num_frames >= 1 and 1 <= digit_size <= size, got {num_frames}, {self.digit_size}, {size}")
        if num_digits not in (1, 2):
            raise ValueError(f"num_digits must be 1 or 2, got {num_digits}")
        unknown = [c for c in (colors or ()) if c not in COLORS] + [d for d in directions if d not in DIRECTIONS]
        if unknown or (colors is not None and not colors) or not directions:
            raise ValueError(f"unknown or empty colours/directions {unknown}; colours from {tuple(COLORS)}, directions from {DIRECTIONS}")
        self.split, self.num_frames, self.size = split, int(num_frames), int(size)
        self.num_digits, self.bounce, self.length, self.seed = num_digits, bool(bounce), int(length), int(seed)
        self.colors = None if colors is None else tuple(colors)
        self.directions = tuple(directions)
        self.room = float(self.size - self.digit_size)  # top-left positions live in [0, room]
        max_speed = self.room / max(self.num_frames - 1, 1)
        self.speed = float(0.75 * max_speed if speed is None else speed)
        if self.speed < 0 or (not bounce and self.speed > max_speed + 1e-9):
            raise ValueError(
                f"speed {self.speed:g} px/frame leaves the frame within {num_frames} frames (max {max_speed:g} "
                f"for size {size}, digit {self.digit_size}); lower the speed or pass bounce=True"
            )
        if bounce and self.room <= 0 and self.speed > 0:
            raise ValueError("bounce needs digit_size < size")

        images, labels = load_digit_images()
        self.image_indices = split_indices(split)  # [N] rows of the full digit set
        self.labels = labels[self.image_indices]  # [N]
        self.images = upscale_digits(images[self.image_indices], self.digit_size)  # [N, d, d]
        self._glyphs = self.images.numpy()  # [N, d, d] float32, numpy: per-item work is tiny, torch's per-op cost is not
        # pixel p minus glyph pixel j, for the bilinear placement weights in _draw
        self._offsets = (np.arange(self.size, dtype=np.float32)[:, None] - np.arange(self.digit_size, dtype=np.float32))  # [S, d]
        self._frames = np.arange(self.num_frames, dtype=np.float32)[:, None]  # [F, 1]
        self._labels, self._image_rows = self.labels.tolist(), self.image_indices.tolist()  # plain ints, fast to index
        self._rgb = {name: self.ink * np.asarray(rgb, dtype=np.float32).reshape(3, 1, 1, 1) for name, rgb in COLORS.items()}

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (
            f"MovingDigits(split={self.split!r}, num_frames={self.num_frames}, size={self.size}, digit_size={self.digit_size}, "
            f"speed={self.speed:g}, num_digits={self.num_digits}, colors={self.colors}, bounce={self.bounce}, "
            f"length={self.length}, seed={self.seed})"
        )

    # ---- motion

    def _path(self, rng: np.random.Generator, direction: str) -> tuple:
        """Top-left positions [F, 2] (row, col) of one digit, and whether it bounced."""
        step = np.asarray(DIRECTION_STEPS[direction], dtype=np.float32) * self.speed  # [2]
        # Along the motion, start where the path fits (with bounce: where the first step fits, so the clip opens
        # moving the way the caption says); across it, anywhere.
        travel = min(self.speed, self.room) if self.bounce else self.speed * (self.num_frames - 1)
        u = rng.random(2, dtype=np.float32)  # [2] uniform draws for the start
        low = np.where(step < 0, travel, 0.0)
        high = np.where(step > 0, self.room - travel, self.room)
        start = low + u * np.maximum(high - low, 0.0)
        raw = (start + self._frames * step).astype(np.float32)  # [F, 2]
        if not self.bounce or self.room <= 0:
            return raw, False
        bounced = bool((raw < -1e-4).any() or (raw > self.room + 1e-4).any())
        folded = np.remainder(raw, 2 * self.room)  # reflect into [0, room]: a triangle wave
        return np.where(folded > self.room, 2 * self.room - folded, folded), bounced

    # ---- drawing

    def _draw(self, glyph: np.ndarray, tops: np.ndarray) -> np.ndarray:
        """Place one glyph [d, d] at top-left positions [F, 2] -> coverage [F, S, S] in [0, 1].

        Bilinear placement, written as two small matrix products: coverage[f] = Wy[f] @ glyph @ Wx[f]^T with
        W[f, p, j] = max(0, 1 - |p - top[f] - j|) (the weights grid_sample would use, outside the glyph = 0),
        so sub-pixel positions move smoothly.
        """
        weights = np.maximum(0.0, 1.0 - np.abs(self._offsets - tops.T[:, :, None, None]))  # [2, F, S, d]
        return weights[0] @ glyph @ weights[1].transpose(0, 2, 1)  # [F, S, d] @ [d, d] @ [F, d, S] -> [F, S, S]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, int(index)])  # this item's own generator
        picks, tops, directions, colors, bounces = [], [], [], [], []
        for _ in range(self.num_digits):  # fixed draw order: image, direction, colour, start
            picks.append(int(rng.integers(len(self.images))))
            directions.append(self.directions[int(rng.integers(len(self.directions)))])
            colors.append(None if self.colors is None else self.colors[int(rng.integers(len(self.colors)))])
            path, bounced = self._path(rng, directions[-1])
            tops.append(path)
            bounces.append(bounced)
        tops = np.stack(tops)  # [K, F, 2]

        video = None  # [3, F, S, S] in [0, 1] while drawing; the background is black
        for k in range(self.num_digits):  # later digits are drawn over earlier ones
            coverage = self._draw(self._glyphs[picks[k]], tops[k])  # [F, S, S]
            rgb = self._rgb[colors[k] or "white"]  # [3, 1, 1, 1]
            video = coverage * rgb if video is None else video + coverage * (rgb - video)  # alpha blend
        video *= 2.0
        video -= 1.0  # [3, F, S, S] in [-1, 1]
        digits = [self._labels[p] for p in picks]

        def one(values):
            return values[0] if self.num_digits == 1 else values

        return {
            "video": torch.from_numpy(video),  # [3, F, S, S] in [-1, 1]
            "caption": caption_for(digits, directions, colors, bounces) if self.captions == "template" else
            paraphrase_for(digits, directions, colors, bounces, rng=np.random.default_rng([self.seed, int(index), 7]),
                           heldout=self.captions == "heldout"),
            "digit": one(digits),
            "direction": one(directions),
            "color": one(colors),
            "bounces": one(bounces),
            "index": int(index),
            "image_index": one([self._image_rows[p] for p in picks]),
            "positions": torch.from_numpy(tops + (self.digit_size - 1) / 2.0),  # [K, F, 2] box centres (row, col)
            "digit_size": self.digit_size,
        }
