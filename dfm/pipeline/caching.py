"""Step caching in the pipeline: calibration, cache.json, and `Pipeline.generate(..., cache=NAME)`.

The rules live in dfm/models/cache.py. Here: what each needs from a model, measured once on uncached generations
(`calibrate`) and kept as `cache.json`:

    magcache:  the residual magnitude |r| at each noise level u (the flow time, 1 = noise) of a fine-grid run,
               so the ratio |r(u_i)| / |r(u_{i-1})| of any grid (any step count, any sampler) is interpolated,
               and the relative change of the residual between its consecutive calls (`change_curve`, read from
               the recorded runs), so the change between any two levels is too;
    teacache:  a degree-4 polynomial fitted to (relative change of the modulated input, relative change of the
               residual) over consecutive calls of runs at several step counts;
    fbcache:   nothing (its rule measures the first block's residual as it runs).

Where cache.json is read: the model folder's own (`dfm calibrate-cache --model PATH` writes it there), else the
user's calibration store ($DFM_CACHE_DIR, default ~/.cache/dfm/step-cache, one file per model folder and
weights). A model with neither is calibrated on first use, and that goes to the user store: a model folder
(shipped, read-only, or someone else's) is never written without being asked, and nothing is overwritten.
A calibration whose weights fingerprint does not match the model is not used (recalibrated into the store).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dfm.errors import UserError
from dfm.io import atomic_path
from dfm.text import UnknownWordsWarning
from dfm.models.cache import (METHODS, ChangeCurve, FBCache, MagCache, NormCurve, Recorder, StepCache, TeaCache,
                              attach)

CACHE_FILE = "cache.json"
FORMAT = 1
# one threshold per method (`cache_threshold=None`); chosen on the shipped models at 20 steps (README, benchmarks/cache.py)
DEFAULT_THRESHOLDS = {"magcache": 0.65, "teacache": 0.3, "fbcache": 0.1}
# consecutive skipped steps at most (MagCache's K; diffusers' default 3): 4 lets a high threshold reach 7 of 20
# evaluations (seeds 100-139 on the shipped WAN: 35.1 dB at 0.8) and leaves lower thresholds as they were
MAGCACHE_MAX_SKIPS = 4
# the first steps always compute (MagCache's retention ratio, 0.2 in the paper and diffusers): flow models 15 % (3
# of 20 steps, as TaylorSeer's 3 warm-up steps): with the forecast, on the shipped WAN and seeds 100-139 (not the
# benchmark's), 0.15 gave 41.8 dB at 9 block-stack evaluations and 36.9 at 8 against 0.2's 40.7 and 35.7 (README);
# EDM models none: on the shipped DiT (DPM-Solver++(2M), 20 steps, 8 prompts) retention 0.2 cost 4 dB at 10
# evaluations (25.9 vs 30.1 dB) and was behind at every count measured (README, step caching)
MAGCACHE_RETENTION = {"flow": 0.15, "edm": 0.0}
# a skipped step forecasts the residual (dfm.models.cache.Forecast) for flow models; EDM models reuse it: on the
# shipped DiT (DPM-Solver++(2M), 20 steps, dfm eval's 40 prompts) magcache 0.8 (K 3) with the forecast read digit
# 0.875 / 0.900 (seed 0 / 1000) against 0.975 / 0.925 reusing; on the shipped WAN it adds 5-10 dB at equal compute
FORECAST = {"flow": True, "edm": False}
CALIBRATION_STEPS = (10, 20, 50)  # one uncached generation of CALIBRATION_PROMPTS per step count
CALIBRATION_PROMPTS = ("the digit 3 moves to the right", "a red car drives along a street at night")
TEACACHE_DEGREE = 4
CLIP_KEYS = ("num_frames", "height", "width", "guidance_scale")  # what a calibration run is generated at

_DEFAULT = contextvars.ContextVar("dfm_default_cache", default=(None, None, None))


class CacheError(UserError, ValueError):
    """A bad cache name / threshold or an unusable cache.json; one line naming the problem and the fix."""


def check_cache(name, threshold) -> tuple[str | None, float | None]:
    """(method or None for off, threshold or None for its default), or a one-line CacheError."""
    if name in (None, "none", False):
        return None, None
    if name not in METHODS:
        raise CacheError(f"unknown cache {name!r}; use one of {', '.join(METHODS)} (or none)")
    if threshold is not None:
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise CacheError(f"cache threshold must be a number >= 0, got {threshold!r}") from None
        if not (math.isfinite(threshold) and threshold >= 0):
            raise CacheError(f"cache threshold must be a finite number >= 0 (0: never skip; default "
                             f"{DEFAULT_THRESHOLDS[name]} for {name}), got {threshold:g}")
    return name, threshold


@contextlib.contextmanager
def default_cache(name, threshold=None):
    """`Pipeline.generate(cache=None)` calls inside use this cache (what `dfm generate/eval --cache` set); yields
    the list of the StepCaches they used (their counters tell what was skipped)."""
    used = []
    token = _DEFAULT.set((*check_cache(name, threshold), used))
    try:
        yield used
    finally:
        _DEFAULT.reset(token)


# ============================================================================================ calibration


def fingerprint(net: torch.nn.Module) -> str:
    """A short hash of the transformer's weights (its shapes and the sums of its first and last tensors)."""
    params = list(net.parameters())
    h = hashlib.sha1(str([tuple(p.shape) for p in params]).encode())
    for p in params[:3] + params[-3:]:
        h.update(f"{float(p.detach().cpu().double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def calibrate(pipe, steps=CALIBRATION_STEPS, prompts=CALIBRATION_PROMPTS, seed: int = 0, log=None, **clip) -> dict:
    """Uncached generations of `prompts` at each step count, recorded (cache.json); `clip`: num_frames, height,
    width, guidance_scale (None: the model's defaults; a Wan folder's are 81 frames at 480x832), and an
    image-to-video model's image / last_image / guidance_scale_2."""
    net, runs = pipe.transformer, []
    clip = {k: v for k, v in clip.items() if v is not None}
    for k in ("image", "last_image"):  # an image-to-video model calibrates on the asking generation's image
        if isinstance(clip.get(k), (list, tuple)):
            clip[k] = clip[k][0]  # (one for the fixed prompts)
    for n in steps:
        recorder = Recorder()
        start = time.perf_counter()
        with warnings.catch_warnings():  # the fixed prompts need not be words the model knows
            warnings.simplefilter("ignore", UnknownWordsWarning)
            pipe.generate(list(prompts), seed=seed, steps=int(n), progress=False, cache=recorder, **clip)
        runs.append({"steps": int(n), "records": recorder.records})
        if log:
            log(f"calibration: {n} steps, {recorder.calls} forwards, {time.perf_counter() - start:.1f} s")
    finest = max(runs, key=lambda r: r["steps"])["records"]
    pairs = [(r["input_change"], r["residual_change"]) for run in runs for r in run["records"]
             if r["input_change"] is not None]
    x, y = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    degree = min(TEACACHE_DEGREE, max(len(pairs) - 1, 0))
    return {"format": FORMAT, "fingerprint": fingerprint(net),
            "settings": {"steps": list(map(int, steps)), "prompts": list(prompts), "seed": seed,
                         "sampler": pipe.defaults.get("sampler"),
                         **{k: clip.get(k, pipe.defaults.get(k)) for k in CLIP_KEYS}},
            "magcache": {"levels": [r["level"] for r in finest], "norms": [r["norm"] for r in finest]},
            "teacache": {"coefficients": np.polyfit(x, y, degree).tolist(), "x_max": float(x.max())},
            "runs": runs}


def model_key(pipe) -> str | None:
    src = pipe.source.get("folder") or pipe.source.get("checkpoint")
    return str(Path(src).resolve()) if src else None


def folder_file(pipe) -> Path | None:
    key = model_key(pipe)
    if key is None:
        return None
    folder = Path(key)
    return (folder if folder.is_dir() else folder.parent) / CACHE_FILE


def user_file(pipe) -> Path:
    root = Path(os.environ.get("DFM_CACHE_DIR") or Path.home() / ".cache" / "dfm") / "step-cache"
    key = hashlib.sha1(f"{model_key(pipe)}:{fingerprint(pipe.transformer)}".encode()).hexdigest()[:16]
    return root / f"{key}.json"


def read_calibration(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path} is not a readable calibration ({e}); delete it, or run `dfm calibrate-cache` "
                         f"again with --overwrite") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "magcache" not in data or "teacache" not in data:
        raise CacheError(f"{path} is not a dfm step-cache calibration (format {FORMAT}); run `dfm calibrate-cache "
                         f"--overwrite` to replace it")
    return data


def write_calibration(data: dict, path: Path, overwrite: bool = False) -> None:
    if path.exists() and not overwrite:
        raise CacheError(f"{path} exists; pass --overwrite to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    except OSError as e:
        raise CacheError(f"cannot write {path} ({e.strerror or e}); the folder is read-only: use `dfm "
                         f"calibrate-cache --user` (the user's calibration store)") from None


def calibration_for(pipe, log=None, **clip) -> dict:
    """The model's calibration: its folder's cache.json, else the user store's, else one made now at the size of
    the generation that asks (`clip`, see `calibrate`) and saved to the user store, said on stderr."""
    log = log or (lambda msg: print(f"dfm: {msg}", file=sys.stderr))
    fp = fingerprint(pipe.transformer)
    for path in (folder_file(pipe), user_file(pipe)):
        data = read_calibration(path) if path is not None else None
        if data is not None and data.get("fingerprint") == fp:
            return data
        if data is not None:
            log(f"{path} was calibrated for other weights; not used")
    path = user_file(pipe)
    log(f"no step-cache calibration for this model: calibrating now on {len(CALIBRATION_STEPS)} uncached "
        f"generations (once; saved to {path}; `dfm calibrate-cache --model PATH` puts one in the model folder)")
    data = calibrate(pipe, log=log, **clip)
    write_calibration(data, path)
    return data


def backbone(pipe) -> torch.nn.Module:
    """The network with the block stack (a Wan folder's transformer is wrapped in IntegerTimesteps)."""
    net = pipe.transformer
    while not hasattr(net, "blocks"):
        experts = getattr(net, "experts", None)  # a Wan family net (pipeline/wan_family.py): one or two experts
        if isinstance(experts, torch.nn.ModuleList) and len(experts) == 1:
            net = experts[0]
        elif isinstance(getattr(net, "net", None), torch.nn.Module):
            net = net.net
        else:
            break
    return net


def build_cache(pipe, name, threshold, **clip) -> StepCache | None:
    """The StepCache of `generate(cache=name, cache_threshold=threshold)`: name None is the default (off unless
    `default_cache` set one), "none" is off; a StepCache object is used as it is."""
    used = None
    if name is None:
        name, threshold, used = _DEFAULT.get()
    if not isinstance(name, StepCache):
        name, threshold = check_cache(name, threshold)
        if name is None:
            return None
    if len(getattr(backbone(pipe), "experts", ())) > 1:
        raise CacheError("step caching of a two-expert Wan 2.2 folder is not built (each expert would need its own "
                         "cache): generate without a cache")
    if getattr(backbone(pipe), "context_parallel", None) is not None:
        raise CacheError("step caching under context parallelism is not built (each rank would decide on its own "
                         "tokens): generate without --cache or without --context-parallel")
    if not isinstance(getattr(backbone(pipe), "blocks", None), torch.nn.ModuleList):
        raise CacheError(f"step caching needs a flat block stack (WAN or a flat DiT); this model's "
                         f"{type(backbone(pipe)).__name__} has none: generate without a cache")
    cache = name if isinstance(name, StepCache) else _build(pipe, name, threshold, clip)
    if used is not None:
        used.append(cache)
    return cache


def _build(pipe, name: str, threshold: float | None, clip: dict) -> StepCache:
    threshold = DEFAULT_THRESHOLDS[name] if threshold is None else threshold
    paradigm = getattr(pipe, "paradigm", "flow")
    if name == "fbcache":
        cache = FBCache(threshold)
    else:
        data = calibration_for(pipe, **clip)
        if name == "magcache":
            m = data["magcache"]
            cache = MagCache(threshold, NormCurve(m["levels"], m["norms"]), MAGCACHE_MAX_SKIPS, change_curve(data),
                             MAGCACHE_RETENTION.get(paradigm, 0.15))
        else:
            t = data["teacache"]
            cache = TeaCache(threshold, t["coefficients"], t["x_max"])
    cache.forecast = FORECAST.get(paradigm, True)
    return cache


def change_curve(data: dict) -> ChangeCurve | None:
    """magcache's measured residual change along u: the finest calibration run's consecutive changes (None without
    recorded runs: then magcache uses the magnitude ratio alone)."""
    runs = [r for r in data.get("runs") or () if len(r.get("records") or ()) > 1]
    if not runs:
        return None
    finest = max(runs, key=lambda r: r["steps"])["records"]
    return ChangeCurve([r["level"] for r in finest], [r["residual_change"] or 0.0 for r in finest])


@contextlib.contextmanager
def cached_denoiser(pipe, cache: StepCache | None, grid):
    """pipe.denoise with `cache` attached to the transformer for one generation: each call tells the cache its
    noise level first. Detached afterwards, whatever happens."""
    if cache is None:
        yield pipe.denoise
        return
    u = grid.flow_times().double()  # [n + 1], the levels u = sigma / (1 + sigma)
    cache.start(last_level=float(u[u > 0].min()), levels=u[u > 0].tolist())

    def denoise(x, sigma, **cond):
        s = float(torch.as_tensor(sigma).double().max())
        cache.at(1.0 if math.isinf(s) else s / (1 + s))
        return pipe.denoise(x, sigma, **cond)

    net = backbone(pipe)
    attach(net, cache)
    try:
        yield denoise
    finally:
        attach(net, None)
