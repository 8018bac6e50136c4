"""Scores for generated Moving Digits videos: right digit, right direction, right colour, identity kept over time.

    dfm eval --model PATH                                    # 40 fixed prompts -> a markdown table (+ --json out.json)
    dfm eval --model PATH --sweep-guidance 1,2,4 --sweep-steps 5,10,20      # one row per setting
    dfm eval --reference                                     # real held-out clips: the ceiling of every score

    from dfm.evaluate import evaluate
    result = evaluate(pipeline, num_videos=40, seed=0)       # {"digit_accuracy": ..., "videos": [per-video records]}

Nothing here is learned from generated data. A video is read with a few formulas one can check by hand, plus a
digit classifier fitted on scikit-learn's digits (`digit_classifier`):

1. Foreground. The background level of each frame and channel is its median pixel (the digit covers well under
   half the frame). rgb = (x - background) / 2 clipped to [0, 1]; intensity = max over channels (every colour in
   `COLORS` has a channel at 1, so a red and a white digit have the same intensity); foreground weight
   w = max(0, intensity - FOREGROUND_THRESHOLD).
2. Track. The centroid of w per frame, [F, 2] (row, col); NaN where a frame has no foreground (mass < MIN_MASS).
3. Aligned crops. A digit_size x digit_size window centred on each frame's centroid, sampled bilinearly from the
   intensity, averaged down to 8x8 (the resolution of scikit-learn's scans), divided by its maximum. Centring on
   the centroid is the usual centre-of-mass normalisation of digit recognisers (LeCun et al. 1998, MNIST).
4. Digit: the classifier's prediction per frame; the video's digit is the majority vote (ties: the smaller digit).
5. Direction: `motion_direction`, the direction of travel at frame 0 (the dataset's rule for captions, bounces
   included): the least-squares velocity over the track's opening run, up to its first turn.
6. Colour: the foreground-weighted mean rgb, scaled so its largest channel is 1, matched to the nearest `COLORS`.

Per-video scores, each in [0, 1]:
- temporal consistency (identity kept): the mean over all pairs of frames of max(0, Pearson correlation of their
  aligned crops). Same glyph -> ~1, a digit that changes or dissolves into noise -> low. Crops are aligned, so
  this ignores where the digit is and looks only at what it is.
- frame agreement: the fraction of frames whose predicted digit equals the video's majority digit.
- motion smoothness: 1 - mean |second difference of the track| / (2 mean |first difference|), clipped to [0, 1]:
  1 for constant velocity, ~0.1 for frames in random order, 0 for an object that does not move.
Summary: digit / direction / colour accuracy (fraction of videos that match the prompt; colour only when the
prompts name colours), the means of the three per-video scores, NFE per video and seconds per video.

The ceiling (`dfm eval --reference`: 40 real held-out clips, 2026-12-01). 8 frames of 16x16 (the shipped recipes):
digit 0.975, direction 1.000, temporal consistency 0.993, frame agreement 0.991, smoothness 0.985 (classifier
held-out accuracy 0.978); with all 8 colours: digit 0.925, colour 1.000; 16 frames of 32x32: digit 1.000,
direction 1.000, consistency 1.000. Corrupted clips score low (tests/test_evaluate.py): uniform noise gives digit
~0.1 and consistency ~0.05, frozen frames direction 0 and smoothness 0, time reversed direction 0, shuffled frames
smoothness ~0.17, a digit swapped half-way consistency ~0.8 and frame agreement ~0.56; an untrained model (2
training steps) scores at chance.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dfm.config import load_yaml
from dfm.data.digits import COLORS, DIRECTIONS, DIRECTION_STEPS, MovingDigits, caption_for, parse_caption
from dfm.errors import UserError
from dfm.io import atomic_path
from dfm.pipeline import Generation, Pipeline, load_pipeline
from dfm.pipeline.commands import check_output, resolve_device, set_threads
from dfm.video import write_contact_sheet

FEATURE_SIZE = 8  # classifier input: FEATURE_SIZE x FEATURE_SIZE aligned crops (scikit-learn's digits are 8x8)
FOREGROUND_THRESHOLD = 0.1  # intensity in [0, 1] above the background that counts as the object
MIN_MASS = 0.5  # foreground mass (sum of w) below which a frame shows no object
TURN_FRACTION = 0.5  # a track has turned when it comes back by this fraction of the dataset's speed per frame


class EvalError(UserError, ValueError):
    """Bad input to `dfm eval` (a prompt that is not a Moving Digits caption, a bad list of values, ...)."""


# ------------------------------------------------------------------------------------------ reading videos


def foreground(videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """videos [B, 3, F, H, W] in [-1, 1] -> (rgb [B, 3, F, H, W], intensity [B, F, H, W], weight [B, F, H, W]).

    rgb and intensity are in [0, 1] above each frame's background (the median pixel per channel); weight is the
    foreground weight max(0, intensity - FOREGROUND_THRESHOLD)."""
    videos = videos.float()
    background = videos.flatten(3).median(-1).values[..., None, None]  # [B, 3, F, 1, 1]
    rgb = ((videos - background) / 2).clamp(0, 1)  # [B, 3, F, H, W]
    intensity = rgb.amax(1)  # [B, F, H, W]
    return rgb, intensity, (intensity - FOREGROUND_THRESHOLD).clamp(min=0)


def centroids(weight: torch.Tensor) -> torch.Tensor:
    """Foreground weight [B, F, H, W] -> centroid [B, F, 2] (row, col) in pixels; NaN where the mass < MIN_MASS."""
    H, W = weight.shape[-2:]
    mass = weight.sum((-2, -1))  # [B, F]
    rows = (weight.sum(-1) * torch.arange(H, dtype=weight.dtype)).sum(-1) / mass  # [B, F]
    cols = (weight.sum(-2) * torch.arange(W, dtype=weight.dtype)).sum(-1) / mass  # [B, F]
    track = torch.stack([rows, cols], -1)  # [B, F, 2]
    return track.masked_fill((mass < MIN_MASS)[..., None], float("nan"))


def aligned_crops(intensity: torch.Tensor, track: torch.Tensor, box: int) -> torch.Tensor:
    """Crops [B, F, 8, 8] in [0, 1]: a box x box window of `intensity` [B, F, H, W] centred on `track` [B, F, 2]
    (bilinear, zeros outside the frame), averaged down to FEATURE_SIZE^2 and divided by its maximum. Frames
    without an object (NaN centroid) give zeros."""
    B, Fr, H, W = intensity.shape
    valid = ~track.isnan().any(-1)  # [B, F]
    centre = torch.where(valid[..., None], track, torch.zeros_like(track))  # [B, F, 2]
    k = torch.arange(box, dtype=torch.float32) - (box - 1) / 2  # [box] offsets of the window's pixel centres
    rows = 2 * (centre[..., 0:1] + k) / max(H - 1, 1) - 1  # [B, F, box] in grid_sample's [-1, 1]
    cols = 2 * (centre[..., 1:2] + k) / max(W - 1, 1) - 1  # [B, F, box]
    grid = torch.stack(torch.broadcast_tensors(cols[..., None, :], rows[..., :, None]), -1)  # [B, F, box, box, 2] (x, y)
    crops = F.grid_sample(intensity.reshape(B * Fr, 1, H, W), grid.reshape(B * Fr, box, box, 2),
                          mode="bilinear", padding_mode="zeros", align_corners=True)  # [B*F, 1, box, box]
    if box >= FEATURE_SIZE:
        crops = F.adaptive_avg_pool2d(crops, FEATURE_SIZE)  # [B*F, 1, 8, 8]
    else:
        crops = F.interpolate(crops, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear", align_corners=False)
    crops = crops.reshape(B, Fr, FEATURE_SIZE, FEATURE_SIZE)
    crops = crops / crops.amax((-2, -1), keepdim=True).clamp(min=1e-6)
    return crops * valid[..., None, None]


def motion_direction(track: torch.Tensor, threshold: float) -> Optional[str]:
    """The direction of travel at frame 0, read from a centroid track [F, 2] (NaN rows: frames without an object).

    The dataset's caption names the direction at frame 0; with bounces the digit later reverses (its start always
    leaves room for one full step first). So: the axis of motion is the one with the longer path (sum of |steps|,
    which a bounce does not shorten); along it, the opening run ends at the first turn, the first frame where the
    position has come back by `threshold` from the farthest point reached in the opening direction (smaller
    wiggles are noise); the direction is the sign of the least-squares velocity over the run, frames 0..turn.
    None when fewer than 2 frames show the object or it never moves `threshold` from where it starts.
    """
    frames = torch.nonzero(~track.isnan().any(-1)).flatten()  # [n] frames that show the object
    if len(frames) < 2:
        return None
    points = track[frames].double()  # [n, 2]
    axis = int((points[1:] - points[:-1]).abs().sum(0).argmax())  # 0: rows (up/down), 1: cols (left/right)
    p = points[:, axis].tolist()
    sign, extreme, end = 0.0, p[0], len(p) - 1
    for i in range(1, len(p)):
        if sign == 0.0:
            if abs(p[i] - p[0]) >= threshold:
                sign, extreme, end = math.copysign(1.0, p[i] - p[0]), p[i], i
        elif (p[i] - extreme) * sign > 0:
            extreme, end = p[i], i
        elif (extreme - p[i]) * sign >= threshold:
            break  # turned: the opening run is frames[0..end]
    if sign == 0.0:
        return None
    t, y = frames[: end + 1].double(), points[: end + 1, axis]
    velocity = float(((t - t.mean()) * (y - y.mean())).sum() / ((t - t.mean()) ** 2).sum())  # least-squares slope
    for name, step in DIRECTION_STEPS.items():
        if step[axis] != 0 and math.copysign(1.0, step[axis]) == math.copysign(1.0, velocity):
            return name
    return None


def motion_smoothness(track: torch.Tensor, threshold: float) -> float:
    """1 - mean |acceleration| / (2 mean |velocity|), clipped to [0, 1], over the frames that show the object.

    Constant velocity gives 1; a bounce costs one or two frames of acceleration; frames in random order give about
    0.1 (for independent positions E|a| / E|v| is about sqrt(3)); a track whose path is shorter than `threshold`
    (an object that does not move) gives 0."""
    points = track[~track.isnan().any(-1)].double()  # [n, 2]
    if len(points) < 3:
        return 0.0
    velocity = (points[1:] - points[:-1]).norm(dim=-1)  # [n-1]
    acceleration = (points[2:] - 2 * points[1:-1] + points[:-2]).norm(dim=-1)  # [n-2]
    if float(velocity.sum()) < threshold:
        return 0.0
    return float((1 - acceleration.mean() / (2 * velocity.mean())).clamp(0, 1))


def temporal_consistency(crops: torch.Tensor) -> float:
    """Mean over all pairs of frames i < j of max(0, Pearson correlation) of aligned crops [F, 8, 8]; 1 for F = 1.

    All pairs, not only neighbours: a digit that turns into another half-way, or drifts slowly, keeps high
    neighbour correlations but low ones between the two halves."""
    num = crops.shape[0]
    if num < 2:
        return 1.0
    x = crops.flatten(1).double()  # [F, 64]
    x = x - x.mean(1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)  # a blank crop stays 0 and correlates 0
    i, j = torch.triu_indices(num, num, offset=1)  # [2, F(F-1)/2] the pairs i < j
    return float((x[i] * x[j]).sum(1).clamp(min=0).mean())


def nearest_color(rgb: Sequence[float]) -> str:
    """The name in `COLORS` nearest (Euclidean) to `rgb` scaled so its largest channel is 1."""
    rgb = np.asarray(rgb, dtype=np.float64)
    rgb = rgb / max(rgb.max(), 1e-12)
    names = list(COLORS)
    table = np.asarray([COLORS[n] for n in names])  # [C, 3]
    return names[int(((table - rgb) ** 2).sum(1).argmin())]


def default_digit_size(height: int, width: int) -> int:
    """The digit size Moving Digits uses for a frame of this size (its default: half the frame side)."""
    return min(height, width) // 2


def turn_threshold(num_frames: int, size: int, digit_size: int) -> float:
    """TURN_FRACTION of the speed Moving Digits gives a clip of this shape (pixels per frame)."""
    if num_frames < 2:
        return 0.0
    speed = MovingDigits(num_frames=num_frames, size=size, digit_size=digit_size, length=1).speed
    return TURN_FRACTION * speed


# ------------------------------------------------------------------------------------------ the classifier


@dataclass
class DigitClassifier:
    """An RBF support-vector machine on aligned 8x8 crops; `test_accuracy` is on held-out (test-split) digits."""

    model: object  # sklearn.svm.SVC
    digit_size: int
    test_accuracy: float
    num_train: int
    num_test: int

    def predict(self, crops: torch.Tensor) -> np.ndarray:
        """crops [..., 8, 8] -> digits [...] (int64)."""
        flat = crops.reshape(-1, FEATURE_SIZE * FEATURE_SIZE).double().numpy()
        return self.model.predict(flat).astype(np.int64).reshape(crops.shape[:-2])


def _rendered_crops(split: str, digit_size: int, items: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Aligned crops [N*4, 64] and labels [N*4] of `items` Moving Digits clips (4 frames) of one split's digits."""
    data = MovingDigits(split, num_frames=4, size=2 * digit_size, digit_size=digit_size, length=items, seed=seed)
    batch = [data[i] for i in range(items)]
    videos = torch.stack([b["video"] for b in batch])  # [N, 3, 4, S, S]
    _, intensity, weight = foreground(videos)
    crops = aligned_crops(intensity, centroids(weight), digit_size)  # [N, 4, 8, 8]
    labels = np.repeat(np.asarray([b["digit"] for b in batch]), data.num_frames)  # [N*4]
    return crops.reshape(-1, FEATURE_SIZE * FEATURE_SIZE).double().numpy(), labels


@functools.lru_cache(maxsize=4)
def digit_classifier(digit_size: int) -> DigitClassifier:
    """Fit (once per digit size, about a second) the digit classifier on scikit-learn's digits.

    Training data: the train-split scans drawn by `MovingDigits` itself (upscaled to `digit_size`, placed at
    sub-pixel positions) and read back through `foreground` / `aligned_crops`, so the classifier sees what the
    analysis gives it for a perfect video. Held-out accuracy: the same on test-split scans, which no model trained
    on the train split has seen."""
    from sklearn.svm import SVC

    x_train, y_train = _rendered_crops("train", digit_size, items=1000, seed=1)
    x_test, y_test = _rendered_crops("test", digit_size, items=400, seed=2)
    model = SVC(C=10.0, gamma="scale").fit(x_train, y_train)
    accuracy = float((model.predict(x_test) == y_test).mean())
    return DigitClassifier(model, digit_size, accuracy, len(y_train), len(y_test))


# ------------------------------------------------------------------------------------------ analysis


def analyze(videos: torch.Tensor, digit_size: Optional[int] = None) -> list[dict]:
    """Read each video [B, 3, F, H, W] in [-1, 1]: one record per video with the predicted "digit" (None when no
    frame shows an object), "frame_digits" (-1: no object), "direction" (None: no motion), "color", the scores
    "temporal_consistency", "frame_agreement", "motion_smoothness", and the centroid "track" [[row, col], ...]."""
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise EvalError(f"expected videos [B, 3, F, H, W] in [-1, 1], got shape {tuple(videos.shape)}")
    B, _, Fr, H, W = videos.shape
    digit_size = digit_size or default_digit_size(H, W)
    threshold = turn_threshold(Fr, min(H, W), digit_size)
    rgb, intensity, weight = foreground(videos.detach().cpu())
    track = centroids(weight)  # [B, F, 2]
    crops = aligned_crops(intensity, track, digit_size)  # [B, F, 8, 8]
    visible = ~track.isnan().any(-1)  # [B, F]
    frame_digits = np.where(visible.numpy(), digit_classifier(digit_size).predict(crops), -1)  # [B, F]
    mean_rgb = (rgb * weight[:, None]).sum((2, 3, 4)) / weight.sum((1, 2, 3)).clamp(min=1e-12)[:, None]  # [B, 3]

    records = []
    for b in range(B):
        shown = frame_digits[b][frame_digits[b] >= 0]
        digit = int(np.bincount(shown, minlength=10).argmax()) if len(shown) else None
        records.append({
            "digit": digit,
            "frame_digits": frame_digits[b].tolist(),
            "direction": motion_direction(track[b], threshold),
            "color": nearest_color(mean_rgb[b].tolist()) if bool(visible[b].any()) else None,
            "temporal_consistency": temporal_consistency(crops[b]),
            "frame_agreement": float((frame_digits[b] == digit).mean()) if digit is not None else 0.0,
            "motion_smoothness": motion_smoothness(track[b], threshold),
            "track": [[round(float(v), 3) for v in point] for point in track[b]],
        })
    return records


def score(records: list[dict], expected: list[dict]) -> dict:
    """Summary of `analyze` records against what each prompt asked for (dicts with "digit", "direction" and
    "color"; colour None: not asked). Accuracies are fractions of videos; colour accuracy is None when no prompt
    names a colour. Adds "correct_digit" / "correct_direction" / "correct_color" to each record."""
    if len(records) != len(expected):
        raise ValueError(f"{len(records)} videos for {len(expected)} prompts")
    for record, want in zip(records, expected):
        record["correct_digit"] = record["digit"] == want["digit"]
        record["correct_direction"] = record["direction"] == want["direction"]
        record["correct_color"] = None if want.get("color") is None else record["color"] == want["color"]

    def mean(values):
        values = [float(v) for v in values if v is not None]
        return sum(values) / len(values) if values else None

    accuracies = {f"{k}_accuracy": mean(r[f"correct_{k}"] for r in records) for k in ("digit", "direction", "color")}
    scores = ("temporal_consistency", "frame_agreement", "motion_smoothness")
    return {**accuracies, **{k: mean(r[k] for r in records) for k in scores}}


# ------------------------------------------------------------------------------------------ prompts


def eval_prompts(num: int = 40, colors: Optional[Sequence[str]] = None, seed: int = 0) -> list[dict]:
    """The fixed prompt set: digits 0-9 x the 4 directions (x `colors` when the model was trained with colours),
    in a seeded order; the first `num` (cycling when num is larger). With no colours and num = 40 every pair
    appears once. Each item: {"prompt", "digit", "direction", "color"}."""
    if num < 1:
        raise EvalError(f"need at least one prompt, got --num {num}")
    unknown = [c for c in (colors or ()) if c not in COLORS]
    if unknown:
        raise EvalError(f"unknown colour(s) {unknown}; choose from {', '.join(COLORS)}")
    combos = [(d, direction, c) for d in range(10) for direction in DIRECTIONS for c in (colors or [None])]
    order = torch.randperm(len(combos), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [combos[order[i % len(combos)]] for i in range(num)]
    return [{"prompt": caption_for(d, direction, c), "digit": d, "direction": direction, "color": c}
            for d, direction, c in chosen]


def expected_from_prompt(prompt: str) -> dict:
    """{"prompt", "digit", "direction", "color"} read from a one-digit Moving Digits caption (EvalError otherwise)."""
    try:
        fields = parse_caption(prompt)
    except ValueError as e:
        raise EvalError(f"{e}; dfm eval scores Moving Digits captions") from None
    if isinstance(fields["digit"], list):
        raise EvalError(f"prompt {prompt!r} names {len(fields['digit'])} digits; dfm eval scores one digit per video")
    return {"prompt": prompt, "digit": fields["digit"], "direction": fields["direction"], "color": fields["color"]}


# ------------------------------------------------------------------------------------------ a perfect "model"


Clips = Generation  # what `ReferencePipeline.generate` returns: dfm.pipeline's result, with nfe 0 and no settings


class ReferencePipeline:
    """A stand-in for a perfect model, with the Pipeline interface: for each prompt, a real Moving Digits clip of
    a held-out (test split) scan of that digit, moving that way, in that colour. `dfm eval --reference` scores it
    to give the ceiling of every metric; tests drive `evaluate` with it."""

    def __init__(self, num_frames: int = 8, size: int = 16, fps: float = 8.0):
        self.defaults = {"num_frames": num_frames, "height": size, "width": size, "fps": fps, "steps": 0,
                         "sampler": "reference", "guidance_scale": None, "shift": None, "negative_prompt": None}

    @staticmethod
    def clip(prompt: str, num_frames: int, size: int, seed: int) -> torch.Tensor:
        """[3, F, S, S]: the first test-split clip (MovingDigits seed `seed`) that matches the caption."""
        want = parse_caption(prompt)
        data = MovingDigits("test", num_frames=num_frames, size=size, colors=None if want["color"] is None else
                            [want["color"]], bounce=want["bounces"], directions=(want["direction"],),
                            length=10_000, seed=seed)
        for i in range(len(data)):
            item = data[i]
            if item["digit"] == want["digit"] and item["bounces"] == want["bounces"]:
                return item["video"]
        raise EvalError(f"no held-out clip matches {prompt!r}")

    def generate(self, prompts, negative_prompt=None, num_frames=None, height=None, width=None, steps=None,
                 sampler=None, guidance_scale=None, shift=None, seed=None, seeds=None, progress=True,
                 callback=None) -> Clips:
        start = time.perf_counter()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = list(seeds) if seeds is not None else [(seed or 0) + i for i in range(len(prompts))]
        F_, S = num_frames or self.defaults["num_frames"], height or self.defaults["height"]
        videos = torch.stack([self.clip(p, F_, S, s) for p, s in zip(prompts, seeds)])  # [B, 3, F, S, S]
        return Clips(videos, prompts, seeds, 0, time.perf_counter() - start, self.defaults["fps"])


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(pipeline, prompts: Optional[Sequence[str]] = None, num_videos: int = 40, seed: int = 0,
             steps: Optional[int] = None, sampler: Optional[str] = None, guidance_scale: Optional[float] = None,
             colors: Optional[Sequence[str]] = None, batch_size: int = 8, digit_size: Optional[int] = None,
             num_frames: Optional[int] = None, size: Optional[int] = None, sheet: Optional[str] = None,
             log=None) -> dict:
    """Generate one video per prompt with `pipeline` (dfm.pipeline's interface) and score it.

    prompts: Moving Digits captions (default: `eval_prompts(num_videos, colors, seed)`); video i uses seed + i.
    steps / sampler / guidance_scale / num_frames / size: passed to `pipeline.generate` (None: its defaults).
    sheet: a PNG path for a contact sheet of the videos, each labelled with its prompt and what was read.
    Returns the `score` summary plus "nfe" (denoiser evaluations per video), "seconds_per_video", the settings,
    "classifier_test_accuracy" and "videos" (one record per video: prompt, seed, expected and read values)."""
    if prompts is None:
        expected = eval_prompts(num_videos, colors, seed)
    else:
        expected = [dict(p) if isinstance(p, dict) else expected_from_prompt(p) for p in prompts]  # dicts: known truth
    if not expected:
        raise EvalError("no prompts to evaluate; pass at least one Moving Digits caption")
    batch_size = max(1, int(batch_size))
    seeds = [seed + i for i in range(len(expected))]
    videos, seconds, nfe, settings = [], 0.0, None, {}
    for start in range(0, len(expected), batch_size):
        batch = [e["prompt"] for e in expected[start:start + batch_size]]
        gen = pipeline.generate(batch, num_frames=num_frames, height=size, width=size, steps=steps, sampler=sampler,
                                guidance_scale=guidance_scale, seeds=seeds[start:start + len(batch)], progress=False)
        videos.append(gen.videos.detach().float().cpu())
        if not bool(torch.isfinite(videos[-1]).all()):  # NaN or inf: a broken model, not a score
            raise EvalError(f"videos {start}-{start + len(batch) - 1} hold NaN or inf: broken weights or diverged sampling")
        seconds += float(gen.seconds)
        nfe = gen.nfe if nfe is None else nfe
        settings = getattr(gen, "settings", None) or settings  # the pipeline's resolved arguments, if it says
        if log is not None:
            log(f"{start + len(batch)}/{len(expected)} videos, {seconds:.1f} s")
    videos = torch.cat(videos)  # [N, 3, F, H, W]
    H, W = videos.shape[-2:]
    digit_size = digit_size or default_digit_size(H, W)
    records = analyze(videos, digit_size)
    summary = score(records, expected)
    classifier = digit_classifier(digit_size)
    defaults = getattr(pipeline, "defaults", {}) or {}
    asked = {"steps": steps, "sampler": sampler, "guidance_scale": guidance_scale}
    used = {k: settings.get(k, defaults.get(k) if v is None else v) for k, v in asked.items()}  # pipeline's, else asked
    result = {
        **summary,
        "nfe": nfe,
        "seconds_per_video": seconds / len(expected),
        "num_videos": len(expected),
        "seed": seed,
        **used,
        "video_shape": list(videos.shape[1:]),
        "digit_size": digit_size,
        "classifier_test_accuracy": classifier.test_accuracy,
        # per video: the prompt's fields under "expected_*", what was read under the plain names
        "videos": [{"prompt": want["prompt"], "seed": s, **{f"expected_{k}": want[k] for k in ("digit", "direction", "color")},
                    **record} for want, s, record in zip(expected, seeds, records)],
    }
    if sheet is not None:
        def short(digit, direction, color):  # the contact sheet is narrow: "7 left red"
            return " ".join(str(v) for v in (digit, direction, color) if v is not None) or "-"

        labels = [short(r["expected_digit"], r["expected_direction"], r["expected_color"]) + " -> " +
                  short(r["digit"], r["direction"], r["color"] if r["expected_color"] else None) for r in result["videos"]]
        write_contact_sheet(sheet, videos, labels=labels)
    return result


# ------------------------------------------------------------------------------------------ report


TABLE_COLUMNS = (  # (header, result key, format)
    ("sampler", "sampler", "{}"),
    ("steps", "steps", "{}"),
    ("guidance", "guidance_scale", "{:g}"),
    ("digit acc", "digit_accuracy", "{:.3f}"),
    ("direction acc", "direction_accuracy", "{:.3f}"),
    ("colour acc", "color_accuracy", "{:.3f}"),
    ("temporal consistency", "temporal_consistency", "{:.3f}"),
    ("frame agreement", "frame_agreement", "{:.3f}"),
    ("motion smoothness", "motion_smoothness", "{:.3f}"),
    ("NFE", "nfe", "{}"),
    ("s/video", "seconds_per_video", "{:.3f}"),
)


def format_table(results: Sequence[dict]) -> str:
    """A markdown table, one row per `evaluate` result ("n/a" where a value does not apply)."""
    lines = ["| " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in results:
        cells = ["n/a" if r.get(key) is None else fmt.format(r[key]) for _, key, fmt in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command line


def training_data_config(path: str, pipeline=None) -> tuple[Optional[str], dict]:
    """The `data` section of the model's training config and where it came from: the pipeline's `config_yaml` (a
    dfm model folder or checkpoint keeps it), else a config.yaml in PATH or one or two folders up (a run
    directory); (None, {}) when there is none."""
    text, source = getattr(pipeline, "config_yaml", None), "the model's training config"
    if not text:
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        for candidate in (folder / "config.yaml", folder.parent / "config.yaml", folder.parent.parent / "config.yaml"):
            if candidate.is_file():
                text, source = candidate.read_text(), str(candidate)
                break
    if not text:
        return None, {}
    data = (load_yaml(text, source) or {}).get("data") or {}
    return source, data if isinstance(data, dict) else {}


def _load_pipeline(path: str, device: str):
    return load_pipeline(path, device=resolve_device(device))  # --device cuda without CUDA: one line


def _values(text: Optional[str], kind, flag: str) -> list:
    """"1,2,4" -> [1, 2, 4] (EvalError naming the flag on a bad item)."""
    if text is None:
        return []
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise EvalError(f"{flag} takes a comma-separated list of {kind.__name__}s, e.g. {flag} 1,2,4; got {text!r}") from None


def _colors(text: Optional[str]):
    if text is None or text.strip().lower() == "none":
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in COLORS]
    if unknown or not names:
        raise EvalError(f"--colors takes names from {', '.join(COLORS)} (or none); got {text!r}")
    return names


def run_eval(args) -> int:
    log = functools.partial(print, "dfm eval:", file=sys.stderr)
    if args.num < 1 or args.batch_size < 1:
        raise EvalError("--num and --batch-size must be at least 1")
    set_threads(args.threads)
    [check_output(p, flag, suffix) for flag, p, suffix in (("--sheet", args.sheet, ".png"), ("--json", args.json, ".json")) if p]
    if args.reference:
        pipeline, source = ReferencePipeline(args.frames or 8, args.size or 16), "reference: held-out Moving Digits clips"
        colors = _colors(args.colors)
    else:
        pipeline, source = _load_pipeline(args.model, args.device), args.model
        if not args.threads and isinstance(pipeline, Pipeline) and pipeline.device.type == "cpu" and \
                pipeline.cpu_threads(pipeline.settings(args.frames, args.size, args.size), args.batch_size):
            torch.set_num_threads(1)  # a small model: threads only add waiting
        config_source, data = training_data_config(args.model, pipeline)
        colors = _colors(args.colors) if args.colors is not None else data.get("colors") or None
        if config_source is None and args.colors is None:
            log(f"no training config found with {args.model}; prompts name no colours (pass --colors to add them)")
        if int(data.get("num_digits", 1) or 1) != 1:
            log("the model was trained on clips with several digits; the prompts name one digit each")
    steps_list = _values(args.sweep_steps, int, "--sweep-steps") or [args.steps]
    guidance_list = _values(args.sweep_guidance, float, "--sweep-guidance") or [args.guidance]
    results = []
    for guidance in guidance_list:
        for steps in steps_list:
            log(f"steps={steps if steps is not None else 'default'} guidance={guidance if guidance is not None else 'default'}")
            results.append(evaluate(pipeline, num_videos=args.num, seed=args.seed, steps=steps, sampler=args.sampler,
                                    guidance_scale=guidance, colors=colors, batch_size=args.batch_size,
                                    num_frames=args.frames, size=args.size,
                                    sheet=args.sheet if len(results) == 0 else None, log=log))
    first = results[0]
    print(f"# dfm eval: {source}\n")
    print(format_table(results))
    print(f"\n{first['num_videos']} videos {'x'.join(map(str, first['video_shape']))} (seed {args.seed}); colours: "
          f"{', '.join(colors) if colors else 'none'}; digit classifier (SVM on aligned 8x8 crops of scikit-learn's "
          f"digits): held-out accuracy {first['classifier_test_accuracy']:.3f}")
    if args.json:
        report = {"model": None if args.reference else str(args.model), "reference": bool(args.reference),
                  "colors": colors, "results": results}
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n")
        log(f"wrote {args.json}")
    return 0


def add_commands(sub) -> None:
    """`dfm eval`: score a model (or the real clips) on the fixed Moving Digits prompt set."""
    p = sub.add_parser(
        "eval", help="score a model on Moving Digits prompts (digit, direction, colour, consistency, NFE, speed)",
        description="Generate a fixed, seeded set of Moving Digits prompts (digits 0-9 x 4 directions, x colours when "
                    "the model was trained with colours) and score the videos with a digit classifier fitted on "
                    "scikit-learn's digits: digit, direction and colour accuracy, temporal consistency, NFE and "
                    "seconds per video. Prints a markdown table; --json writes every number and per-video reading.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="PATH", help="a dfm model folder or checkpoint (or a diffusers Wan 2.1 folder)")
    source.add_argument("--reference", action="store_true",
                        help="score real held-out clips instead of a model: the ceiling of every score")
    p.add_argument("--num", type=int, default=40, help="number of prompts/videos (default 40)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--sampler", help="sampler name (default: the model's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="prompt order and the first video's seed (video i: seed + i)")
    p.add_argument("--sweep-guidance", metavar="W,W,...", help="one row per guidance scale, e.g. 1,2,4")
    p.add_argument("--sweep-steps", metavar="N,N,...", help="one row per step count, e.g. 5,10,20")
    p.add_argument("--colors", metavar="C,C,...",
                   help="colours named in the prompts (default: data.colors of the model's training config; 'none')")
    p.add_argument("--frames", type=int, help="frames per video (default: the model's; --reference: 8)")
    p.add_argument("--size", type=int, help="frame height and width (default: the model's; --reference: 16)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per generate call (default 8)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: automatic: one for small "
                   "models, else the cores the machine's load leaves free)")
    p.add_argument("--json", metavar="PATH", help="write the results (settings, scores, per-video readings) as JSON")
    p.add_argument("--sheet", metavar="PNG", help="contact sheet of the (first setting's) videos with their readings")
    p.set_defaults(func=run_eval)
