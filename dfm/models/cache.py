"""Step caching: reuse the block stack's residual between sampling steps whose inputs barely differ.

A backbone's forward is embed -> block stack -> head. Between neighbouring steps of a sampler the stack's residual
r = stack(h) - h changes slowly, so a step can return h + r_cached instead of running the blocks. Three rules
decide when (each a `StepCache`; the hook is `run_stack`, called by WanModel.forward and DiT._trunk):

  magcache  (Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache"): the magnitude ratio
            gamma = |r(u)| / |r(u_prev)| of consecutive residuals is nearly a function of the noise level alone, so
            it is calibrated once (`NormCurve`); skip while the accumulated error sum_k e_k of the skipped steps
            stays below the threshold and at most `max_skips` steps in a row. MagCache's error of reusing the
            residual cached at level u_c at level u_k is e_k = |1 - prod_{j<=k} gamma_j| (magnitude only); when
            the calibration measured how the residual itself changes along u (`ChangeCurve`, relative L1 change:
            direction and magnitude), dfm uses that measured change e_k = rel_l1(r(u_k), r(u_c)) instead. On the
            shipped WAN the residual changes several times more per step than its magnitude (its direction
            turns), and by a different profile along u (README: the comparison with diffusers' MagCache).
            The first `retention` of the grid's steps always compute (MagCache's retention ratio; for flow models 0.15
            in dfm/pipeline/caching.py): the high-noise steps set the video's layout, errors there do not fade.
  teacache  (Liu et al. 2025, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model"): the relative
            L1 change of the first block's timestep-modulated input LN(h) * (1 + scale) + shift, mapped through a
            polynomial fitted on an uncached run to the relative change of the residual, accumulated until it
            reaches the threshold.
  fbcache   (First-Block Cache, ParaAttention / diffusers): run the first block; reuse the other blocks' residual
            while its residual's relative L1 change since the last full step, accumulated over the skipped steps
            (each skipped step adds its own error, MagCache's and TeaCache's accumulation), stays below the
            threshold. ParaAttention / diffusers compare the current step's change alone; a single skip decides
            the same in both.

A skipped step does not return the cached residual as it is: it forecasts it, to first order, from the last two
computed steps (`Forecast`; the residual as a function of lambda = log sigma, extrapolated along the tangent through
them, as TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting") extrapolates features along the step index;
lambda is the sampler-independent variable, so Heun's half steps and any grid forecast alike). With one computed
step so far it reuses. `forecast = False` on a cache reuses as MagCache / TeaCache / First-Block Cache do (what
dfm/pipeline/caching.py sets for EDM models: `FORECAST`).

Where the sampler is along its grid is told by the caller (`StepCache.at(level)`, level u = sigma / (1 + sigma),
the flow time: 1 is noise). The first call of a generation and every call at or below the grid's last non-zero
level always compute, as does any call whose batch differs from the cached one (a guidance interval switching
between cond + uncond and cond alone). The batch holds both guidance branches (one batched forward), so one
decision and one cache serve both. A threshold of 0 never skips (every rule compares with `<`), and a computed
step is exactly the uncached computation, so threshold 0 gives the uncached video bit for bit.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .layers import modulate

Tensor = torch.Tensor
METHODS = ("magcache", "teacache", "fbcache")


def run_stack(model: nn.Module, h: Tensor, run: Callable[..., Tensor], cond) -> Tensor:
    """The backbone's block stack h [B, L, D] -> [B, L, D]: `run(h, blocks=model.blocks)`, through the step cache
    attached to `model` (`model.step_cache`, see `attach`) when there is one. `cond` is what the first block's
    modulation is computed from (WAN: t_mod [B, 6, D]; DiT: (c [B, D], adaLN-LoRA shared [B, 6D] or None))."""
    cache = getattr(model, "step_cache", None)
    return run(h) if cache is None else cache.step(model, h, run, cond)


def attach(model: nn.Module, cache: "StepCache | None") -> None:
    """Attach `cache` to a backbone (None detaches). Only a flat stack `model.blocks` can be cached."""
    if cache is not None and not isinstance(getattr(model, "blocks", None), nn.ModuleList):
        raise ValueError(f"step caching needs a flat block stack (WAN or a flat DiT); {type(model).__name__} has "
                         f"none: sample it without a cache")
    model.step_cache = cache


def rel_l1(a: Tensor, b: Tensor) -> float:
    """mean |a - b| / mean |b| over the whole batch (both guidance branches)."""
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


def token_norm(r: Tensor) -> float:
    """The residual's magnitude: the mean over tokens (and the batch) of ||r_token||_2; r [B, L, D]."""
    return float(r.float().norm(dim=-1).mean())


def modulated_input(model: nn.Module, h: Tensor, cond) -> Tensor:
    """The first block's timestep-modulated input LN(h) * (1 + scale1) + shift1 [B, L, D] (TeaCache's indicator)."""
    block = model.blocks[0]
    if hasattr(block, "adaln"):  # DiT: shift, scale from adaLN(c)
        c, shared = cond
        m = block.adaln(c, shared)  # [B, 6, D], or per token (frame conditioning) [B, L, 6, D]
        shift, scale = (m.chunk(6, dim=1) if m.ndim == 3 else m.unbind(2))[:2]  # 2 x [B, 1 or L, D] fp32
    else:  # WAN: the block's table + the shared projection of the timestep
        m = block.modulation.float() + cond  # [B, 6, D], or per token (Wan 2.2 TI2V) [B, L, 6, D]
        shift, scale = (m.chunk(6, dim=1) if m.ndim == 3 else m.unbind(2))[:2]  # 2 x [B, 1 or L, D] fp32
    return modulate(block.norm1(h), shift, scale)


def log_sigma(u: float) -> float:
    """lambda = log sigma of the level u = sigma / (1 + sigma): log(u / (1 - u)) (+inf at u = 1, pure noise)."""
    return math.inf if u >= 1.0 else (-math.inf if u <= 0.0 else math.log(u / (1.0 - u)))


class Forecast:
    """The last two computed values of a tensor, f(lambda_1) and f(lambda_2) (lambda_1 the newer), and its first-
    order forecast f(lambda) ~ f_1 + (f_1 - f_2) (lambda - lambda_1) / (lambda_1 - lambda_2): the tangent through
    them. It reuses f_1 when there is one point, or when either point is at sigma = inf (the first call of a flow
    grid) or the two are at one level."""

    def __init__(self):
        self.points: list[tuple[float, Tensor]] = []  # [(lambda, value)], newest last, at most two

    def push(self, lam: float, value: Tensor) -> None:
        if self.points and self.points[-1][1].shape != value.shape:
            self.points = []  # a new batch: the older value is no history of this one
        self.points = (self.points + [(lam, value)])[-2:]

    def __call__(self, lam: float) -> Tensor:
        (lam1, f1) = self.points[-1]
        if len(self.points) < 2:
            return f1
        lam2, f2 = self.points[0]
        if not (math.isfinite(lam) and math.isfinite(lam1) and math.isfinite(lam2)) or lam1 == lam2:
            return f1
        return f1 + (f1 - f2) * ((lam - lam1) / (lam1 - lam2))


class StepCache:
    """One generation's cache (`start` resets it). Counters: `calls` (forwards), `computed` (full block-stack
    evaluations), `blocks_run` (single blocks run, fbcache's probes included)."""

    name = "none"

    def __init__(self, threshold: float = 0.0):
        if not threshold >= 0:
            raise ValueError(f"a cache threshold is a number >= 0 (0: never skip), got {threshold}")
        self.threshold = float(threshold)
        self.start()

    def start(self, last_level: float = 0.0, levels: Sequence[float] | None = None) -> None:
        """Forget everything; `last_level` is the grid's last non-zero level u (calls at or below it compute),
        `levels` the grid's non-zero levels, descending (None: not told)."""
        self.last_level, self.level, self.residual = float(last_level), None, None
        self.levels = None if levels is None else [float(u) for u in levels]
        self.calls = self.computed = self.blocks_run = 0
        self.memory = Forecast()  # the residual's last two computed values
        self.reset()

    def reset(self) -> None:
        """The rule's own state."""

    def at(self, level: float) -> None:
        """The noise level u in [0, 1] of the next forward (u = sigma / (1 + sigma); 1 is noise)."""
        self.level = float(level)

    force_last = True  # the last step(s) compute (False: only for measuring what that costs, benchmarks/)
    forecast = True  # a skipped step forecasts the residual (Forecast); False: reuses the cached one as it is

    def lam(self) -> float:
        return log_sigma(self.level) if self.level is not None else math.nan

    def predicted(self, memory: "Forecast | None" = None) -> Tensor:
        """What a skipped step adds to its input: the residual's forecast at this level (or the cached residual)."""
        memory = self.memory if memory is None else memory
        return memory(self.lam()) if self.forecast else memory.points[-1][1]

    def forced(self, h: Tensor) -> bool:
        """Whether this call must compute: the first one, the last step(s), no level told, or a new batch shape."""
        return (self.residual is None or self.residual.shape != h.shape or self.level is None
                or (self.force_last and self.level <= self.last_level * (1 + 1e-6)))

    def compute(self, model, h: Tensor, run) -> Tensor:
        out = run(h)
        self.residual = out - h  # [B, L, D]
        self.memory.push(self.lam(), self.residual)
        self.computed += 1
        self.blocks_run += len(model.blocks)
        return out

    def step(self, model, h: Tensor, run, cond) -> Tensor:
        self.calls += 1
        return self.compute(model, h, run)

    def summary(self) -> dict:
        return {"name": self.name, "threshold": self.threshold, "calls": self.calls, "computed": self.computed,
                "skipped": self.calls - self.computed, "blocks_run": self.blocks_run}


class NormCurve:
    """The calibrated residual magnitude |r|(u) at noise level u, interpolated linearly in log |r|."""

    def __init__(self, levels: Sequence[float], norms: Sequence[float]):
        order = np.argsort(levels)
        self.u = np.asarray(levels, dtype=np.float64)[order]
        self.log_norm = np.log(np.maximum(np.asarray(norms, dtype=np.float64)[order], 1e-30))

    def __call__(self, u: float) -> float:
        return float(np.exp(np.interp(u, self.u, self.log_norm)))


class ChangeCurve:
    """The calibrated relative change of the residual between two noise levels: rel_l1(r(u1), r(u2)) ~ |C(u1) -
    C(u2)|, C the running sum of the changes measured between consecutive calls of a fine-grid run (interpolated
    linearly in u; the triangle inequality's bound for levels several calls apart)."""

    def __init__(self, levels: Sequence[float], changes: Sequence[float | None]):
        """levels [n] of consecutive calls (descending), changes [n]: rel_l1 of call i's residual vs call i-1's
        (changes[0], the first call's, is not used)."""
        total = np.concatenate([[0.0], np.cumsum(np.asarray(changes[1:], dtype=np.float64))])  # [n], ascending
        order = np.argsort(levels)
        self.u, self.total = np.asarray(levels, dtype=np.float64)[order], total[order]

    def __call__(self, u1: float, u2: float) -> float:
        return float(abs(np.interp(u1, self.u, self.total) - np.interp(u2, self.u, self.total)))


class MagCache(StepCache):
    name = "magcache"

    def __init__(self, threshold: float, curve: NormCurve, max_skips: int = 2, change: ChangeCurve | None = None,
                 retention: float = 0.0):
        """retention: the fraction of the grid's first steps that always compute (MagCache's retention ratio)."""
        self.curve, self.max_skips, self.change, self.retention = curve, int(max_skips), change, float(retention)
        super().__init__(threshold)

    def reset(self) -> None:
        self.ratio, self.error, self.skips, self.prev_level, self.cached_level = 1.0, 0.0, 0, None, None
        k = int(self.retention * len(self.levels) + 0.5) if self.levels else 0  # steps 0 .. k-1 compute
        self.retained_above = self.levels[min(k, len(self.levels) - 1)] if k > 0 else float("inf")

    def forced(self, h: Tensor) -> bool:
        return super().forced(h) or (self.level is not None and self.level > self.retained_above * (1 + 1e-6))

    def step(self, model, h, run, cond):
        self.calls += 1
        skip = False
        if not self.forced(h) and self.prev_level is not None:
            gamma = self.curve(self.level) / self.curve(self.prev_level)  # |r_t| / |r_{t-1}|, calibrated
            self.ratio *= gamma  # |r_t| / |r_cached|
            if self.change is None:  # MagCache's error: the magnitude's
                self.error += abs(1.0 - self.ratio)
            else:  # the measured change of the residual since the cached step
                self.error += self.change(self.cached_level, self.level)
            self.skips += 1
            skip = self.error < self.threshold and self.skips <= self.max_skips
        self.prev_level = self.level
        if skip:
            return h + self.predicted()
        self.ratio, self.error, self.skips, self.cached_level = 1.0, 0.0, 0, self.level
        return self.compute(model, h, run)


class TeaCache(StepCache):
    name = "teacache"

    def __init__(self, threshold: float, coefficients: Sequence[float], x_max: float = float("inf")):
        self.coefficients, self.x_max = [float(c) for c in coefficients], float(x_max)
        super().__init__(threshold)

    def reset(self) -> None:
        self.accumulated, self.prev_input = 0.0, None

    def estimate(self, x: float) -> float:
        """The fitted relative change of the residual for a relative input change x (>= 0; x clamped to the fit's
        range, a polynomial is not trusted outside it)."""
        return max(float(np.polyval(self.coefficients, min(x, self.x_max))), 0.0)

    def step(self, model, h, run, cond):
        self.calls += 1
        probe = modulated_input(model, h, cond)  # [B, L, D]
        skip = False
        if not self.forced(h) and self.prev_input is not None and self.prev_input.shape == probe.shape:
            self.accumulated += self.estimate(rel_l1(probe, self.prev_input))
            skip = self.accumulated < self.threshold
        self.prev_input = probe
        if skip:
            return h + self.predicted()
        self.accumulated = 0.0
        return self.compute(model, h, run)


class FBCache(StepCache):
    name = "fbcache"

    def reset(self) -> None:
        self.first, self.error, self.tails = None, 0.0, Forecast()  # tails: the other blocks' residual out - h1

    def step(self, model, h, run, cond):
        self.calls += 1
        blocks = model.blocks
        h1 = run(h, blocks[:1])  # [B, L, D]: the first block
        self.blocks_run += 1
        r1 = h1 - h
        if not self.forced(h) and self.first is not None:
            self.error += rel_l1(r1, self.first)  # this skip's error, added to the earlier skips'
            if self.error < self.threshold:
                return h1 + self.predicted(self.tails)
        out = run(h1, blocks[1:])  # the same blocks in the same order as run(h): the uncached result
        self.blocks_run += len(blocks) - 1
        self.computed += 1
        self.residual, self.first, self.error = out - h, r1, 0.0
        self.tails.push(self.lam(), out - h1)
        return out


class Recorder(StepCache):
    """Computes every call and records what calibration needs: per call the level u, |r| (`token_norm`), and the
    relative changes from the previous call of the modulated input and of the residual."""

    name = "record"

    def reset(self) -> None:
        self.records, self.prev_input, self.prev_residual = [], None, None

    def step(self, model, h, run, cond):
        self.calls += 1
        probe = modulated_input(model, h, cond)
        out = self.compute(model, h, run)
        same = self.prev_input is not None and self.prev_input.shape == probe.shape
        self.records.append({"level": self.level, "norm": token_norm(self.residual),
                             "input_change": rel_l1(probe, self.prev_input) if same else None,
                             "residual_change": rel_l1(self.residual, self.prev_residual) if same else None})
        self.prev_input, self.prev_residual = probe, self.residual
        return out
