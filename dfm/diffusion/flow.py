"""Flow-matching training: timestep sampling, static shift, loss weighting and the per-sample loss.

Rectified flow (Liu et al. 2022; Lipman et al. 2022) as used by SD3 (Esser et al. 2024) and Wan:

    x_s = (1 - s) * x0 + s * eps,    s in [0, 1], s = 1 is pure noise           (paths.py, path "flow")
    u   = dx_s/ds = eps - x0                                                     (the velocity target)

Model timestep input: the velocity model is called as ``v(x_s, s * timestep_scale, **cond)``. The default
``timestep_scale = 1`` keeps the convention of ``paths.Velocity`` (s in [0, 1]); Wan and SD3 backbones expect
``s * 1000`` (``timestep_scale=1000``). s is drawn and kept in fp32 even when the network runs in bf16.

Names follow diffusers' ``training_utils`` (``compute_density_for_timestep_sampling``,
``compute_loss_weighting_for_sd3``), which the tests use as the oracle where the two overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from dfm.diffusion.noise import Generator, rand, randn, randn_like
from dfm.diffusion.paths import append_dims
from dfm.diffusion.schedules import shift_static as shift_timesteps  # s' = a*s / (1 + (a-1)*s)

Tensor = torch.Tensor

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode", "mixed")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap", "linear")


@dataclass
class TimestepSampler:
    """Draws flow times s [B] in fp32.

    uniform:       s ~ U(0, 1)
    logit_normal:  s = sigmoid(n), n ~ N(logit_mean, logit_std^2)       (SD3 eq. 19, "lognorm(m, s)")
    mode:          s = 1 - u - mode_scale*(cos^2(pi/2 u) - 1 + u), u ~ U(0, 1)   (SD3 Sec. 3.1, "mode(s)")
    mixed:         each sample is uniform with probability `uniform_ratio`, logit-normal otherwise
                   (a Bernoulli per sample, so a sample does not depend on its batch)
    Then, for every kind, the static shift `shift_timesteps(s, shift)` (shift = 1: none).
    """

    name: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    uniform_ratio: float = 0.1
    shift: float = 1.0

    def __post_init__(self):
        if self.name not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep sampling {self.name!r}; use one of {TIMESTEP_SAMPLINGS}")

    def sample(self, batch: int, generator: Generator = None, device=None) -> Tensor:
        # fp32 throughout (never bf16: it would leave ~8 distinct values near s = 1)
        if self.name == "uniform":
            s = rand(batch, generator, device)
        elif self.name == "logit_normal":
            s = torch.sigmoid(self.logit_mean + self.logit_std * randn(batch, generator, device))
        elif self.name == "mode":
            u = rand(batch, generator, device)
            s = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        else:  # mixed
            pick_uniform = rand(batch, generator, device) < self.uniform_ratio
            u = rand(batch, generator, device)
            ln = torch.sigmoid(self.logit_mean + self.logit_std * randn(batch, generator, device))
            s = torch.where(pick_uniform, u, ln)
        return shift_timesteps(s, self.shift) if self.shift != 1.0 else s


def loss_weight(s: Tensor, weighting: str = "none", shift: float = 1.0) -> Tensor:
    """Per-sample loss weight w(s) [B].

    none:        1
    sigma_sqrt:  s^-2                               (diffusers' "sigma_sqrt", sigma = s)
    cosmap:      2 / (pi * (1 - 2s + 2s^2))        (the density of SD3's CosMap, Sec. 3.1, as a weight: diffusers)
    linear:      1 + shift * s                      (up-weights noisy times, `shift` as given)
    """
    if weighting == "none":
        return torch.ones_like(s)
    if weighting == "sigma_sqrt":
        return s**-2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    if weighting == "linear":
        return 1 + shift * s
    raise ValueError(f"unknown loss weighting {weighting!r}; use one of {LOSS_WEIGHTINGS}")


def flow_loss(
    velocity_model: Callable[..., Tensor],
    x0: Tensor,
    *,
    generator: Generator = None,
    sampling: TimestepSampler | None = None,
    weighting: str = "none",
    weighting_shift: float = 1.0,
    timestep_scale: float = 1.0,
    **cond,
) -> Tensor:
    """Per-sample flow-matching loss [B] = w(s) * mean over non-batch dims of (v(x_s, s) - (eps - x0))^2.

    velocity_model(x_s [B, ...], s * timestep_scale [B] fp32, **cond) -> v [B, ...].
    `sampling` defaults to TimestepSampler() (logit-normal(0, 1), the SD3 choice); `weighting_shift` is the
    slope of the "linear" weighting. Draw order per generator: timesteps, then noise.
    """
    sampling = sampling if sampling is not None else TimestepSampler()
    s = sampling.sample(x0.shape[0], generator, x0.device)  # [B] fp32
    eps = randn_like(x0, generator)  # [B, ...]
    s_ = append_dims(s, x0.ndim)  # [B, 1, ..., 1]
    x_s = ((1 - s_) * x0 + s_ * eps).to(x0.dtype)
    u = eps - x0  # target velocity
    v = velocity_model(x_s, s * timestep_scale, **cond)
    err = (v.float() - u.float()) ** 2  # [B, ...]
    return loss_weight(s, weighting, weighting_shift) * err.mean(dim=tuple(range(1, x0.ndim)))  # [B]
