"""Guided sampling shared by the pipeline (`dfm generate`) and the trainer's validation: sampler names in either
space, the sampling grids of each recipe, the two classifier-free-guidance branches, and one `guided_sample`.

    sampler = resolve_sampler("flow:unipc", paradigm="flow")     # (space, method); a bare name: native space first
    grid = sampling_grid("flow_shifted", 20, shift=3.0)          # Grid("flow", s values) or Grid("edm", sigmas)
    cond, uncond = guidance_branches(encode, prompts, None, "empty", True, guidance=4.0)
    x0, nfe = guided_sample(model.denoise, noise, grid, sampler, cond=cond, uncond=uncond, guidance=4.0)

Any sampler runs on any model: `edm:NAME` (dfm.diffusion.samplers.SAMPLERS) integrates in EDM sigma,
`flow:NAME` (FLOW_SAMPLERS) in flow time s, through the exact adapters of dfm.diffusion.paths; the grid is the
model's own, seen by the other space through sigma = s / (1 - s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from dfm.errors import UserError

Tensor = torch.Tensor

# The denoiser is evaluated at flow time s = 1 (sigma = inf, pure noise) as at sigma = SIGMA_INF: the network sees
# x_s and s = 1 - 1e-6 (paths.velocity_from_denoiser's sigma_max; guided_sample's first EDM-space step).
SIGMA_INF = 1e6


class SamplingError(UserError, ValueError):
    """An unknown sampler, grid or sampler option; the message lists the valid ones."""


# ================================================================================================ samplers

NATIVE_SAMPLER = {"flow": "euler", "edm": "heun"}  # "auto": the trainer's validation default per paradigm
SPACES = ("flow", "edm")


def _registries() -> dict[str, dict[str, Callable]]:
    from dfm.diffusion.samplers import FLOW_SAMPLERS, SAMPLERS

    return {"edm": SAMPLERS, "flow": FLOW_SAMPLERS}


def sampler_names(paradigm: str = "flow") -> list[str]:
    """Every sampler name as SPACE:METHOD, the model's native space first. A bare METHOD also works (below)."""
    regs = _registries()
    order = [paradigm] + [s for s in SPACES if s != paradigm]
    return [f"{space}:{m}" for space in order for m in sorted(regs[space])]


def resolve_sampler(name: str, paradigm: str) -> tuple[str, str]:
    """(space, method) of a sampler name: "flow:unipc" integrates in flow time s, "edm:heun" in EDM sigma; a bare
    name looks in the model's native space first (so "euler" is flow Euler for a flow model), then the other;
    "auto" is the trainer's default (flow: euler, edm: heun)."""
    regs = _registries()
    if name == "auto":
        return paradigm, NATIVE_SAMPLER[paradigm]
    space, _, method = name.rpartition(":")
    if space:
        if space in regs and method in regs[space]:
            return space, method
    else:
        for space in [paradigm] + [s for s in SPACES if s != paradigm]:
            if name in regs[space]:
                return space, name
    raise SamplingError(f"unknown sampler {name!r}; use one of: {', '.join(sampler_names(paradigm))} "
                        f"(or a bare name, looked up in the {paradigm} space first)")


def check_sampler_options(sampler: tuple[str, str], options: dict) -> None:
    """A SamplingError naming the valid options when `options` do not fit the sampler."""
    from dfm.diffusion.sampler_api import resolve

    space, method = sampler
    try:
        resolve(_registries()[space], method, dict(options), kind=f"{space} sampler")
    except ValueError as e:
        raise SamplingError(str(e)) from None


# ================================================================================================== grids


@dataclass(frozen=True)
class Grid:
    """A sampling grid in the model's native time, float64, descending and ending in 0.

    kind "flow": flow times s in [0, 1] (s = 1 is pure noise; x_s = eps at s_0, as in Wan and diffusers)
    kind "edm":  EDM sigmas (x = eps * sigma_0, as in EDM and k-diffusion)
    Samplers of the other space see the same grid through s = sigma / (1 + sigma), x_edm = x_s / (1 - s).
    """

    kind: str
    values: Tensor  # [n + 1] float64

    @property
    def steps(self) -> int:
        return self.values.numel() - 1

    def flow_times(self) -> Tensor:
        """[n + 1] fp32 flow times (sigma = inf -> s = 1)."""
        from dfm.diffusion.paths import sigma_to_flow_t

        return (self.values if self.kind == "flow" else sigma_to_flow_t(self.values)).float()

    def sigmas(self) -> Tensor:
        """[n + 1] fp32 EDM sigmas, s = 1 taken at SIGMA_INF."""
        from dfm.diffusion.paths import flow_t_to_sigma

        sig = flow_t_to_sigma(self.values) if self.kind == "flow" else self.values
        return sig.clamp(max=SIGMA_INF).float()

    def start(self, noise: Tensor, space: str) -> Tensor:
        """The initial state in `space`'s coordinates, from standard normal `noise` [B, ...]."""
        sigma0 = float(self.sigmas()[0].double()) if self.kind == "flow" else float(self.values[0])
        if self.kind == "flow":
            return noise if space == "flow" else noise * (1 + sigma0)  # x_edm = x_s / (1 - s)
        return noise * sigma0 if space == "edm" else noise * (sigma0 / (1 + sigma0))  # x_s = x_edm * (1 - s)


GRIDS = ("flow_shifted", "flow_unipc", "flow_match_euler", "karras")


def sampling_grid(kind: str, steps: int, *, shift: float = 1.0, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0, num_train_timesteps: int = 1000) -> Grid:
    """The grid of a model's sampling recipe:

    flow_shifted      levels linspace(1, 1/n, n) shifted s' = a s / (1 + (a - 1) s) (SD3; dfm's trainer)
    flow_unipc        diffusers' UniPC / DPM-Solver with use_flow_sigmas (Wan 2.1's FlowUniPCMultistepScheduler):
                      levels linspace(1, 1/T, n + 1)[:-1], shifted, the first one lowered to 1 - 1e-6
    flow_match_euler  diffusers' FlowMatchEulerDiscreteScheduler (schedules.flow_match_euler)
    karras            EDM eq. 5 (EDM models)
    """
    from dfm.diffusion import schedules as S

    f64 = torch.float64
    if kind == "flow_shifted":
        return Grid("flow", S.flow_shifted(steps, shift=shift, dtype=f64))
    if kind == "flow_unipc":
        levels = S.shift_static(torch.linspace(1, 1 / num_train_timesteps, steps + 1, dtype=f64)[:-1], shift)
        levels[0] = min(float(levels[0]), 1 - 1e-6)  # diffusers: keeps log(alpha) finite at the start
        return Grid("flow", torch.cat([levels, levels.new_zeros(1)]))
    if kind == "flow_match_euler":
        return Grid("flow", S.flow_match_euler(steps, shift=shift, num_train_timesteps=num_train_timesteps, dtype=f64))
    if kind == "karras":
        return Grid("edm", S.karras(steps, sigma_min, sigma_max, rho, dtype=f64))
    raise SamplingError(f"unknown sampling grid {kind!r}; use one of {', '.join(GRIDS)}")


# ========================================================================================= guided sampling


@torch.no_grad()
def guided_sample(
    denoise: Callable[..., Tensor],
    noise: Tensor,
    grid: Grid,
    sampler: tuple[str, str],
    *,
    cond: dict,
    uncond: dict | None = None,
    guidance: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callable[[dict], None] | None = None,
    options: dict | None = None,
) -> tuple[Tensor, int]:
    """Sample x0 [B, ...] with classifier-free guidance; returns (x0, NFE).

    denoise(x [B, ...], sigma [B], **cond) -> x0_hat in EDM coordinates (DiffusionModule.denoise for either
    paradigm); cond / uncond: the two branches' keyword tensors (batch B), run as one batched forward by
    CFGDenoiser (guidance w = 1: the conditional branch alone). noise: eps [B, ...] (see Grid.start).
    sampler: (space, method) from `resolve_sampler`. NFE counts guided evaluations: one batched cond + uncond
    forward is one. callback: the sampler's per-step dict.
    """
    from dfm.diffusion.guidance import CFGDenoiser
    from dfm.diffusion.paths import velocity_from_denoiser
    from dfm.diffusion.samplers import sample, sample_flow

    guided = CFGDenoiser(denoise, cond, uncond if guidance != 1 else None, scale=guidance)
    nfe = 0

    def counted(x: Tensor, sigma: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return guided(x, sigma)

    space, method = sampler
    options = dict(options or {})
    if space == "flow":
        velocity = velocity_from_denoiser(counted, sigma_max=SIGMA_INF)
        x0 = sample_flow(velocity, grid.start(noise, "flow"), grid.flow_times().to(noise.device), method=method,
                         generator=generators, callback=callback, **options)
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
        x0 = sample(counted, x_s / (1 - s[1]), sigmas[1:], method=method, generator=generators, callback=inner,
                    **options)
        return x0, nfe
    x0 = sample(counted, grid.start(noise, "edm"), sigmas, method=method, generator=generators, callback=callback,
                **options)
    return x0, nfe


# ========================================================================================= CFG conditioning


def pad_context(context: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Zero-pad context [B, L, D] and mask [B, L] (False) to `length` tokens."""
    pad = length - context.shape[1]
    if pad <= 0:
        return context, mask
    return (torch.nn.functional.pad(context, (0, 0, 0, pad)),  # [B, length, D]
            torch.nn.functional.pad(mask, (0, pad), value=False))  # [B, length]


def guidance_branches(encode: Callable[[list[str]], tuple[Tensor, Tensor]], prompts: list[str],
                      negative: list[str] | None, null: str = "empty", use_mask: bool = True,
                      guidance: float = 2.0) -> tuple[dict, dict | None]:
    """The cond and uncond keyword dicts of CFGDenoiser for `prompts`.

    encode(prompts) -> (context [B, L, D] float, mask [B, L] bool). The uncond branch is the `negative` prompts
    if given, else the model's null conditioning: "empty" = the empty prompt's encoding (zero-padded past its
    tokens), "zeros" = zero context with the prompts' mask (as in training, dfm.train). Both branches are padded
    to one length. use_mask=False leaves the mask out (Wan attends to all tokens, the zero padding included).
    """
    ctx, mask = encode(prompts)
    ctx = ctx.float()
    if guidance == 1:
        return ({"context": ctx, "context_mask": mask} if use_mask else {"context": ctx}), None
    if negative is not None:
        n_ctx, n_mask = encode(negative)
        n_ctx = n_ctx.float()
    elif null == "zeros":
        n_ctx, n_mask = torch.zeros_like(ctx), mask
    else:
        n_ctx, n_mask = encode([""] * len(prompts))
        n_ctx = n_ctx.float()
    length = max(ctx.shape[1], n_ctx.shape[1])
    ctx, mask = pad_context(ctx, mask, length)
    n_ctx, n_mask = pad_context(n_ctx, n_mask.to(mask.device), length)
    if not use_mask:
        return {"context": ctx}, {"context": n_ctx}
    return {"context": ctx, "context_mask": mask}, {"context": n_ctx, "context_mask": n_mask}
