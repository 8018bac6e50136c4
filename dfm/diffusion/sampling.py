"""Guided sampling shared by the pipeline (`dfm generate`) and the trainer's validation: one `guided_sample`, which
runs any sampler (dfm.diffusion.samplers) on any grid (dfm.diffusion.schedules) with classifier-free guidance.

    sampler = resolve_sampler("flow:unipc", "flow", {"order": 2})  # samplers.Sampler, a bare name: native space first
    grid = sampling_grid("flow_shifted", 20, shift=3.0)             # schedules.Grid("flow", s) or Grid("edm", sigmas)
    cond, uncond = dfm.text.guidance_branches(encode, prompts, None, "empty", True, guidance_scale=4.0)
    x0, nfe = guided_sample(model.denoise, noise, grid, sampler, cond=cond, uncond=uncond, guidance_scale=4.0)

Any sampler runs on any model: `edm:NAME` (samplers.SAMPLERS) integrates in EDM sigma, `flow:NAME`
(samplers.FLOW_SAMPLERS) in flow time s, through the exact adapters of dfm.diffusion.paths; the grid is the model's
own, seen by the other space through sigma = s / (1 - s).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from dfm.diffusion.guidance import CFGDenoiser
from dfm.diffusion.paths import velocity_from_denoiser
from dfm.diffusion.samplers import Sampler
from dfm.diffusion.schedules import SIGMA_INF, Grid

Tensor = torch.Tensor


# ========================================================================================= guided sampling


@torch.no_grad()
def guided_sample(
    denoise: Callable[..., Tensor],
    noise: Tensor,
    grid: Grid,
    sampler: Sampler,
    *,
    cond: dict,
    uncond: dict | None = None,
    guidance_scale: float,
    rescale: float = 0.0,
    rescale_space: str = "x0",
    interval: tuple[float, float] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callable[[dict], None] | None = None,
) -> tuple[Tensor, int]:
    """Sample x0 [B, ...] with classifier-free guidance; returns (x0, NFE).

    denoise(x [B, ...], sigma [B], **cond) -> x0_hat in EDM coordinates (DiffusionModule.denoise for either
    paradigm); cond / uncond: the two branches' keyword tensors (batch B), run as one batched forward by
    CFGDenoiser (guidance_scale w = 1: the conditional branch alone). noise: eps [B, ...] (see Grid.start).
    sampler: a samplers.Sampler from `resolve_sampler` (its fn runs with its options as they are).
    rescale: phi of guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", eq. 15-16; 0 = plain CFG), its stds measured in `rescale_space` ("x0", "eps", "v", "flow").
    interval: (sigma_lo, sigma_hi) in EDM sigma: guidance only where sigma_lo < sigma <= sigma_hi, the conditional
    branch alone elsewhere (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
    Distribution Quality in Diffusion Models"); None = every step. A flow grid's s = 1 is sigma = SIGMA_INF.
    NFE counts guided evaluations: one batched cond + uncond forward is one. callback: the sampler's per-step dict.
    """
    guided = CFGDenoiser(denoise, cond, uncond if guidance_scale != 1 else None, guidance_scale=guidance_scale,
                         rescale=rescale,
                         rescale_space=rescale_space, interval=(0.0, math.inf) if interval is None else interval)
    nfe = 0

    def counted(x: Tensor, sigma: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return guided(x, sigma)

    run, options = sampler.fn, sampler.options
    if sampler.space == "flow":
        velocity = velocity_from_denoiser(counted, sigma_max=SIGMA_INF)
        x0 = run(velocity, grid.start(noise, "flow"), grid.flow_times().to(noise.device), generator=generators,
                 callback=callback, **options)
        return x0, nfe
    sigmas = grid.sigmas().to(noise.device)
    if grid.kind == "flow":
        # A flow grid starts at s_0 ~ 1, sigma_0 ~ 1e6 or inf: x_edm = x_s / (1 - s_0) is that large, and an EDM step
        # x + (sigma_1 - sigma_0) (x - D) / sigma_0 would cancel away D's digits in fp32. The first step is taken in
        # closed form in flow coordinates instead, x_s1 = (s_1 / s_0) x_s0 + (1 - s_1 / s_0) D: the Euler = DDIM
        # step of every first-order method (exact in the limit s_0 -> 1); the sampler runs from sigma_1 on.
        s = grid.values.tolist()
        x_s = grid.start(noise, "flow")
        D0 = counted(x_s * (1 + sigmas[0]), sigmas[0].expand(x_s.shape[0]))  # [B, ...]
        if callback is not None:
            callback({"x": x_s * (1 + sigmas[0]), "i": 0, "sigma": sigmas[0], "sigma_hat": sigmas[0], "denoised": D0})
        x_s = (s[1] / s[0]) * x_s + (1 - s[1] / s[0]) * D0
        if s[1] == 0:
            return x_s, nfe
        inner = callback and (lambda info: callback({**info, "i": info["i"] + 1}))
        x0 = run(counted, x_s / (1 - s[1]), sigmas[1:], generator=generators, callback=inner, **options)
        return x0, nfe
    x0 = run(counted, grid.start(noise, "edm"), sigmas, generator=generators, callback=callback, **options)
    return x0, nfe
