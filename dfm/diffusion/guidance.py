"""Classifier-free guidance as one wrapper around a denoiser: the result is a plain ``D(x, sigma)`` for any sampler.

Wrapped model: ``model(x [B, ...], sigma [B], **cond) -> x0_hat [B, ...]`` (e.g. an EDM `Precond`, or any model put
through `paths.as_denoiser`), where `cond` is a dict whose tensors have batch dim 0 (context [B, L, D],
context_mask [B, L], ...). All branches run as ONE batched forward: x, sigma and every cond tensor are concatenated
along dim 0. Padding and aligning the branches' tensors (same L, masks) is the caller's job; a shape mismatch
raises. Non-tensor cond values must be equal across branches and are passed through once.

    plain / negative (two branches):  D = D_u + w * (D_c - D_u)        D_u = negative prompt if given, else uncond
    three branches (concept doc):     D = D_u + w * (D_c - D_n)        uncond, positive and negative in one batch
    rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16):
        D_rescaled = D * std(D_c) / std(D)    (per sample, over all non-batch dims)
        D          = phi * D_rescaled + (1 - phi) * D
    interval (Kynkäänniemi et al. 2024): guidance only for sigma in (sigma_lo, sigma_hi]; outside, D = D_c from
        one conditional forward of batch B. w = 1 also costs exactly one forward of batch B.

Guidance acts on the x0 (denoiser) output. For an eps, v or flow-velocity model this is the same thing: at fixed
(x, sigma) each prediction is an affine function a + b * x0 of x0 (paths.from_x0), and
u + w (c - u) commutes with affine maps, so CFG on eps or velocity gives exactly the x0 computed here. Rescale is
not affine (it divides by a std), so `rescale_space` picks where it is measured: "x0" (default), "eps"
(diffusers' `rescale_noise_cfg`), "v" (v-prediction on the VP path, as Lin et al. trained) or "flow" (velocity).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dfm.diffusion.paths import alpha_sigma, append_dims, from_x0, to_x0

Tensor = torch.Tensor

RESCALE_SPACES = {"x0": "ve", "eps": "ve", "v": "vp", "flow": "flow"}  # prediction -> path it is measured on


def _concat_cond(branches: list[dict]) -> dict:
    """Concatenate each cond tensor of the branches along dim 0; other values must agree and pass through."""
    keys = set(branches[0])
    for b in branches[1:]:
        if set(b) != keys:
            raise ValueError(f"guidance branches have different cond keys: {sorted(keys)} vs {sorted(b)}")
    out = {}
    for k in branches[0]:
        vals = [b[k] for b in branches]
        if isinstance(vals[0], Tensor):
            shapes = {tuple(v.shape[1:]) for v in vals}
            if len(shapes) > 1:
                raise ValueError(f"cond {k!r} has shapes {sorted(shapes)} across branches; pad/align them first")
            out[k] = torch.cat(vals, dim=0)  # [n_branches * B, ...]
        else:
            if any(v != vals[0] for v in vals[1:]):
                raise ValueError(f"non-tensor cond {k!r} differs across branches: {vals}")
            out[k] = vals[0]
    return out


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2023 eq. 15-16: rescale `guided` [B, ...] to the per-sample std of `cond`, then mix by phi."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))  # eq. 15
    return phi * rescaled + (1 - phi) * guided  # eq. 16


class CFGDenoiser:
    """A guided denoiser D(x, sigma) around `model(x, sigma, **cond)`.

    cond:          the positive conditioning (batch B)
    uncond:        the unconditional one (empty prompt / null label, batch B); needed unless a two-branch
                   `negative` takes its place, or w = 1
    guidance_scale: w; w = 1 is the conditional model (one forward). Or a function sigma [B] -> w (a float or [B]):
                   a scale per noise level (Wan 2.2's two experts, each with its own w)
    negative:      a negative prompt's conditioning (batch B): it replaces `uncond` (as in diffusers), or, with
                   `three_branch=True`, forms D_u + w (D_c - D_n) with uncond, cond and negative in one batch of 3B
    rescale:       phi of Lin et al. 2023 (0 = plain CFG), measured in `rescale_space`
    interval:      (sigma_lo, sigma_hi): guidance where sigma_lo < sigma <= sigma_hi, plain D_c elsewhere
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        cond: dict,
        uncond: dict | None = None,
        *,
        guidance_scale: float,
        negative: dict | None = None,
        three_branch: bool = False,
        rescale: float = 0.0,
        rescale_space: str = "x0",
        interval: tuple[float, float] = (0.0, math.inf),
    ):
        if rescale_space not in RESCALE_SPACES:
            raise ValueError(f"unknown rescale_space {rescale_space!r}; use one of {tuple(RESCALE_SPACES)}")
        if three_branch and (uncond is None or negative is None):
            raise ValueError("three_branch guidance needs both uncond and negative")
        if guidance_scale != 1 and uncond is None and negative is None:
            raise ValueError(f"guidance scale {guidance_scale} needs an uncond (or negative) conditioning")
        self.model, self.cond, self.uncond, self.negative = model, cond, uncond, negative
        self.scale, self.three_branch = guidance_scale, three_branch
        self.rescale, self.rescale_space = rescale, rescale_space
        self.sigma_lo, self.sigma_hi = interval

    def branches(self) -> list[dict]:
        """The cond dicts of the batched forward; the last one is the positive branch."""
        if self.three_branch:
            return [self.uncond, self.negative, self.cond]
        return [self.negative if self.negative is not None else self.uncond, self.cond]

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """x [B, ...], sigma [B] or scalar -> guided x0_hat [B, ...]."""
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(B)  # [B] fp32
        active = (sigma > self.sigma_lo) & (sigma <= self.sigma_hi)  # [B] guidance interval
        w = self.scale(sigma) if callable(self.scale) else self.scale  # a float, or [B] per sample
        if (not torch.is_tensor(w) and w == 1) or not bool(active.any()):
            return self.model(x, sigma, **self.cond)  # one conditional forward of batch B
        if torch.is_tensor(w):
            w = append_dims(w.to(device=x.device, dtype=torch.float32), x.ndim)

        branches = self.branches()
        n = len(branches)
        out = self.model(x.repeat(n, *([1] * (x.ndim - 1))), sigma.repeat(n), **_concat_cond(branches))  # [n*B, ...]
        outs = out.chunk(n, dim=0)
        D_c = outs[-1]
        if self.three_branch:
            D_u, D_n = outs[0], outs[1]
            guided = D_u + w * (D_c - D_n)
        else:
            D_u = outs[0]
            guided = D_u + w * (D_c - D_u)

        if self.rescale != 0:
            guided = self._rescale(guided, D_c, x, sigma)
        return torch.where(append_dims(active, x.ndim), guided, D_c)  # [B, ...]

    def _rescale(self, guided: Tensor, D_c: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        if self.rescale_space == "x0":
            return rescale_guidance(guided, D_c, self.rescale)
        # measure the stds in another prediction space, converted exactly at this (x, sigma)
        alpha, sigma_t = (append_dims(t, x.ndim) for t in alpha_sigma(sigma, RESCALE_SPACES[self.rescale_space]))
        x_t = alpha * x
        pred = from_x0(guided, self.rescale_space, x_t, alpha, sigma_t)
        pred_c = from_x0(D_c, self.rescale_space, x_t, alpha, sigma_t)
        return to_x0(rescale_guidance(pred, pred_c, self.rescale), self.rescale_space, x_t, alpha, sigma_t)

