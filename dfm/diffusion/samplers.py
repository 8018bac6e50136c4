"""Samplers in EDM coordinates: plain functions that integrate the probability-flow ODE (or its SDE) with a denoiser.

Every sampler has one signature (k-diffusion's convention, Karras et al. 2022 "Elucidating the Design Space of
Diffusion-Based Generative Models", EDM below):

    sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None, **options) -> x0 sample [B, ...]

- ``denoiser(x [B, ...], sigma [B]) -> x0_hat [B, ...]`` in EDM coordinates (x = x0 + sigma * n).
- ``sigmas`` is a 1-D descending grid, normally ending in 0 (see ``dfm.diffusion.schedules``); x starts as
  ``noise * sigmas[0]``. A grid ending at sigma_min > 0 returns the state at sigma_min.
- All noise goes through ``noise.randn_like(x, generator)``: pass one torch.Generator, or a list of one per sample
  so that a sample does not depend on the batch it sits in.
- ``callback`` gets, once per step, ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` (x before the step, the noise
  levels as floats, the first denoiser output of the step) -- k-diffusion's dict.
- Precision: the grid arithmetic (sigma ratios, log-sigmas, integration weights) runs on float64 Python numbers;
  the state between steps is float32 at least (float64 if x is float64). The denoiser sees x in the caller's dtype
  and sigma as float32 at least; the result comes back in the caller's dtype.

The ODE is dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 3 with s(t) = 1, sigma(t) = t). Methods that would
evaluate D at sigma = 0, where this is 0/0, take a plain Euler step on the last step instead (EDM Algorithm 1/2).

Any model drives any sampler through the exact adapters of ``dfm.diffusion.paths``: a flow-matching velocity model
runs here as ``paths.denoiser_from_velocity(v)`` and an EDM denoiser runs under the flow samplers as
``paths.velocity_from_denoiser(D)``.

The one table of samplers and the one place a name is resolved (bottom of this module):

    SAMPLER_TABLE = {"edm": SAMPLERS, "flow": FLOW_SAMPLERS}       every sampler of both spaces, by name
    sample(denoiser, x, sigmas, method="heun", **options)          EDM space (these, and multistep.py's)
    sample_flow(velocity, x, ts, method="euler", **options)         flow time s (flow_samplers.py, multistep.py's)
    resolve_sampler("flow:unipc", paradigm, options) -> Sampler    a name for a model, validated once
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import flow_samplers, multistep
from .noise import randn_like
from .paths import Denoiser
from .sampler_api import SamplingError, grid_floats, working_dtype

Tensor = torch.Tensor


# --- shared plumbing ---------------------------------------------------------------------------------------------


def _wrap_denoiser(denoiser: Denoiser, dtype: torch.dtype) -> Callable[[Tensor, float], Tensor]:
    """D(x, sigma: float) for the working state: the model sees x in `dtype` and sigma [B] in fp32 at least."""

    def model(x: Tensor, sigma: float) -> Tensor:
        s = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)  # [B], fp32 at least
        return denoiser(x.to(dtype), s).to(x.dtype)

    return model


def _churn(x, sigma, n_steps, s_churn, s_tmin, s_tmax, s_noise, generator):
    """EDM Algorithm 2, lines 4-6: raise sigma to sigma_hat = (1 + gamma) sigma by adding fresh noise."""
    gamma = min(s_churn / n_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        x = x + randn_like(x, generator) * (s_noise * math.sqrt(sigma_hat**2 - sigma**2))
    return x, sigma_hat


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): reach sigma_next as a deterministic step to sigma_down plus fresh noise sigma_up.

    sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2) (capped at sigma_next) is the DDPM posterior
    std for eta = 1 (Ho et al. 2020 eq. 7) and DDIM's sigma_t(eta) (Song et al. 2021 eq. 16), both in EDM units;
    sigma_down^2 + sigma_up^2 = sigma_next^2.
    """
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(1 - sigma_next**2 / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def _callback(callback, x, i, sigma, sigma_hat, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


# --- first order -------------------------------------------------------------------------------------------------


def sample_euler(
    denoiser, x, sigmas, *, generator=None, callback=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0
):
    """Euler on the PF-ODE (EDM Algorithm 2 without the Heun correction); churn adds noise before each step."""
    dtype, sig = x.dtype, grid_floats(sigmas)
    x, D, n = x.to(working_dtype(dtype)), _wrap_denoiser(denoiser, dtype), len(sig) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sig[i], n, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = D(x, sigma_hat)
        _callback(callback, x, i, sig[i], sigma_hat, denoised)
        d = (x - denoised) / sigma_hat  # dx/dsigma, EDM eq. 3
        x = x + d * (sig[i + 1] - sigma_hat)
    return x.to(dtype)


def sample_euler_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, eta=1.0, s_noise=1.0):
    """Euler to sigma_down, then fresh noise of std sigma_up (k-diffusion; DDPM's posterior for eta = 1)."""
    dtype, sig = x.dtype, grid_floats(sigmas)
    x, D = x.to(working_dtype(dtype)), _wrap_denoiser(denoiser, dtype)
    for i in range(len(sig) - 1):
        denoised = D(x, sig[i])
        _callback(callback, x, i, sig[i], sig[i], denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        x = x + (x - denoised) / sig[i] * (sigma_down - sig[i])
        if sigma_up > 0:
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
    return x.to(dtype)


def sample_ddim(denoiser, x, sigmas, *, generator=None, callback=None, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12 with sigma_t(eta) of eq. 16) in EDM coordinates x = x_t / sqrt(abar_t).

    Dividing eq. 12 by sqrt(abar_prev) gives  x_next = x0_hat + sqrt(sigma_next^2 - s_eta^2) * eps_hat + s_eta * z
    with eps_hat = (x - x0_hat) / sigma and s_eta = sigma_t(eta) / sqrt(abar_prev) = `ancestral_step`'s sigma_up.
    eta = 0 is exactly Euler; eta = 1 is DDPM's ancestral sampling. Matches diffusers' DDIMScheduler on the grid
    sigma = sqrt((1 - abar_t) / abar_t) at its timesteps.
    """
    dtype, sig = x.dtype, grid_floats(sigmas)
    x, D = x.to(working_dtype(dtype)), _wrap_denoiser(denoiser, dtype)
    for i in range(len(sig) - 1):
        x0 = D(x, sig[i])
        _callback(callback, x, i, sig[i], sig[i], x0)
        eps = (x - x0) / sig[i]
        sigma_dir, s_eta = ancestral_step(sig[i], sig[i + 1], eta)  # sqrt(sigma_next^2 - s_eta^2), s_eta
        x = x0 + sigma_dir * eps
        if s_eta > 0:
            x = x + randn_like(x, generator) * s_eta
    return x.to(dtype)


def sample_ddpm(denoiser, x, sigmas, *, generator=None, callback=None):
    """Ancestral sampling from the DDPM posterior q(x_next | x, x0_hat) (Ho et al. 2020, eqs. 6-7), EDM coordinates.

    With x = x0 + sigma * n the posterior at sigma_next is N(x0 + r (x - x0), r (sigma^2 - sigma_next^2))
    where r = sigma_next^2 / sigma^2: diffusers' DDPMScheduler with variance_type "fixed_small".
    """
    dtype, sig = x.dtype, grid_floats(sigmas)
    x, D = x.to(working_dtype(dtype)), _wrap_denoiser(denoiser, dtype)
    for i in range(len(sig) - 1):
        x0 = D(x, sig[i])
        _callback(callback, x, i, sig[i], sig[i], x0)
        r = sig[i + 1] ** 2 / sig[i] ** 2
        x = x0 + r * (x - x0)  # posterior mean, eq. 7
        if sig[i + 1] > 0:
            x = x + randn_like(x, generator) * math.sqrt(r * (sig[i] ** 2 - sig[i + 1] ** 2))  # beta_tilde, eq. 7
    return x.to(dtype)


# --- higher order, single step ----------------------------------------------------------------------------------


def sample_heun(
    denoiser, x, sigmas, *, generator=None, callback=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0
):
    """EDM Algorithm 2 (Algorithm 1 when s_churn = 0): Heun's method with the correction at (x_next, sigma_next)."""
    dtype, sig = x.dtype, grid_floats(sigmas)
    x, D, n = x.to(working_dtype(dtype)), _wrap_denoiser(denoiser, dtype), len(sig) - 1
    for i in range(n):
        x_hat, sigma_hat = _churn(x, sig[i], n, s_churn, s_tmin, s_tmax, s_noise, generator)  # lines 4-6
        denoised = D(x_hat, sigma_hat)
        _callback(callback, x_hat, i, sig[i], sigma_hat, denoised)
        d = (x_hat - denoised) / sigma_hat  # line 7
        x = x_hat + (sig[i + 1] - sigma_hat) * d  # line 8: Euler step
        if sig[i + 1] > 0:  # lines 9-11: second-order correction, evaluated at the Euler point
            d_next = (x - D(x, sig[i + 1])) / sig[i + 1]
            x = x_hat + (sig[i + 1] - sigma_hat) * (0.5 * d + 0.5 * d_next)
    return x.to(dtype)


def sample_dpm_2(
    denoiser, x, sigmas, *, generator=None, callback=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0
):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1 with r1 = 1/2) in EDM coordinates, as in k-diffusion.

    The intermediate point is the midpoint in lambda = -log sigma, sigma_mid = sqrt(sigma_hat * sigma_next); with
    alpha = 1 the exponential-integrator updates reduce to Euler steps in sigma: to sigma_mid with the slope at x,
    then from x to sigma_next with the slope at the midpoint.
    """
    dtype, sig = x.dtype, grid_floats(sigmas)
    x, D, n = x.to(working_dtype(dtype)), _wrap_denoiser(denoiser, dtype), len(sig) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sig[i], n, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = D(x, sigma_hat)
        _callback(callback, x, i, sig[i], sigma_hat, denoised)
        d = (x - denoised) / sigma_hat
        if sig[i + 1] == 0:  # Euler on the last step
            x = x + d * (sig[i + 1] - sigma_hat)
            continue
        sigma_mid = math.exp(0.5 * (math.log(sigma_hat) + math.log(sig[i + 1])))
        x_mid = x + d * (sigma_mid - sigma_hat)
        d_mid = (x_mid - D(x_mid, sigma_mid)) / sigma_mid
        x = x + d_mid * (sig[i + 1] - sigma_hat)
    return x.to(dtype)


def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1 with r = 1/2) to sigma_down, then noise sigma_up (k-diffusion).

    Data-prediction exponential integrator in lambda = -log sigma, h = lambda_down - lambda:
        u      = (sigma_mid / sigma) x - (exp(-h/2) - 1) D(x, sigma),      sigma_mid = sigma * exp(-h/2)
        x_down = (sigma_down / sigma) x - (exp(-h) - 1) D(u, sigma_mid)
    """
    dtype, sig = x.dtype, grid_floats(sigmas)
    x, D = x.to(working_dtype(dtype)), _wrap_denoiser(denoiser, dtype)
    for i in range(len(sig) - 1):
        denoised = D(x, sig[i])
        _callback(callback, x, i, sig[i], sig[i], denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        if sigma_down == 0:  # Euler on the last step
            x = x + (x - denoised) / sig[i] * (sigma_down - sig[i])
        else:
            h = math.log(sig[i]) - math.log(sigma_down)
            sigma_mid = sig[i] * math.exp(-0.5 * h)
            u = (sigma_mid / sig[i]) * x - math.expm1(-0.5 * h) * denoised
            x = (sigma_down / sig[i]) * x - math.expm1(-h) * D(u, sigma_mid)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
    return x.to(dtype)


def sample_rk4(denoiser, x, sigmas, *, generator=None, callback=None):
    """Classical fourth-order Runge-Kutta on dx/dsigma = (x - D(x, sigma)) / sigma; Euler on the last step to 0."""
    dtype, sig = x.dtype, grid_floats(sigmas)
    x, D = x.to(working_dtype(dtype)), _wrap_denoiser(denoiser, dtype)
    for i in range(len(sig) - 1):
        sigma, h = sig[i], sig[i + 1] - sig[i]
        denoised = D(x, sigma)
        _callback(callback, x, i, sigma, sigma, denoised)
        k1 = (x - denoised) / sigma
        if sig[i + 1] == 0:
            x = x + h * k1
            continue
        x2 = x + 0.5 * h * k1
        k2 = (x2 - D(x2, sigma + 0.5 * h)) / (sigma + 0.5 * h)
        x3 = x + 0.5 * h * k2
        k3 = (x3 - D(x3, sigma + 0.5 * h)) / (sigma + 0.5 * h)
        x4 = x + h * k3
        k4 = (x4 - D(x4, sig[i + 1])) / sig[i + 1]
        x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return x.to(dtype)


# --- linear multistep --------------------------------------------------------------------------------------------


def lms_coefficient(sig: list[float], i: int, j: int, order: int) -> float:
    """The weight of the derivative at sig[i - j] in a linear multistep step sig[i] -> sig[i + 1].

    The integral over [sig[i], sig[i + 1]] of the Lagrange basis polynomial through sig[i], ..., sig[i - order + 1]
    that is 1 at sig[i - j], integrated exactly as a polynomial (float64).
    """
    nodes = [sig[i - k] for k in range(order)]
    basis = np.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)  # (tau - t_k) / (t_j - t_k)
    antiderivative = basis.integ()
    return float(antiderivative(sig[i + 1]) - antiderivative(sig[i]))


def sample_lms(denoiser, x, sigmas, *, generator=None, callback=None, order=4):
    """Linear multistep (Adams-Bashforth on a non-uniform grid) in sigma, order `order` (k-diffusion, PNDM-like).

    x_next = x + sum_j c_j d_{i-j}, c_j = integral of the Lagrange basis polynomials through the last `order`
    derivatives d = (x - D) / sigma; the first steps use fewer (order min(i + 1, order)).
    """
    dtype, sig = x.dtype, grid_floats(sigmas)
    x, D = x.to(working_dtype(dtype)), _wrap_denoiser(denoiser, dtype)
    ds: list[Tensor] = []  # the last `order` derivatives, newest last
    for i in range(len(sig) - 1):
        denoised = D(x, sig[i])
        _callback(callback, x, i, sig[i], sig[i], denoised)
        ds = (ds + [(x - denoised) / sig[i]])[-order:]
        cur = min(i + 1, order)
        x = x + sum(lms_coefficient(sig, i, j, cur) * d for j, d in enumerate(reversed(ds)))
    return x.to(dtype)


# --- the sampler table, and resolving a name -----------------------------------------------------------------

# Every sampler of both spaces, by space and name: "edm" integrates in EDM sigma (this module, and multistep.py's
# DPM-Solver++ / UniPC on the path alpha = 1), "flow" in flow time s (flow_samplers.py, and multistep.py's on the
# path alpha = 1 - s). The only table: nothing adds to it at import time.
SAMPLER_TABLE: dict[str, dict[str, Callable]] = {
    "edm": {
        "euler": sample_euler,
        "euler_ancestral": sample_euler_ancestral,
        "heun": sample_heun,
        "dpm_2": sample_dpm_2,
        "lms": sample_lms,
        "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
        "ddim": sample_ddim,
        "ddpm": sample_ddpm,
        "rk4": sample_rk4,
        "dpmpp_2m": multistep.sample_dpmpp_2m,
        "dpmpp_3m": multistep.sample_dpmpp_3m,
        "dpmpp_2m_sde": multistep.sample_dpmpp_2m_sde,
        "dpmpp_3m_sde": multistep.sample_dpmpp_3m_sde,
        "unipc": multistep.sample_unipc,
    },
    "flow": {
        "euler": flow_samplers.sample_flow_euler,
        "heun": flow_samplers.sample_flow_heun,
        "midpoint": flow_samplers.sample_flow_midpoint,
        "rk4": flow_samplers.sample_flow_rk4,
        "dopri5": flow_samplers.sample_flow_dopri5,
        "dpmpp_2m": multistep.sample_flow_dpmpp_2m,
        "dpmpp_3m": multistep.sample_flow_dpmpp_3m,
        "dpmpp_2m_sde": multistep.sample_flow_dpmpp_2m_sde,
        "dpmpp_3m_sde": multistep.sample_flow_dpmpp_3m_sde,
        "unipc": multistep.sample_flow_unipc,
    },
}
SAMPLERS = SAMPLER_TABLE["edm"]  # sample(denoiser, x, sigmas, method=NAME)
FLOW_SAMPLERS = SAMPLER_TABLE["flow"]  # sample_flow(velocity, x, ts, method=NAME)
SPACES = ("flow", "edm")
NATIVE_SAMPLER = {"flow": "euler", "edm": "heun"}  # "auto": each paradigm's own (the trainer's validation default)


def _option_names(fn: Callable) -> list[str]:
    """The options a sampler takes: its keyword-only parameters but generator and callback."""
    params = inspect.signature(fn).parameters
    return [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in ("generator", "callback")]


def _check(space: str, method: str, options: dict, kind: str) -> Callable:
    """SAMPLER_TABLE[space][method] with `options` checked, or a one-line SamplingError naming the valid ones."""
    table = SAMPLER_TABLE[space]
    if method not in table:
        raise SamplingError(f"unknown {kind} {method!r}; use one of: {', '.join(sorted(table))}")
    valid = _option_names(table[method])
    unknown = sorted(set(options) - set(valid))
    if unknown:
        takes = f"its options are: {', '.join(valid)}" if valid else "it takes no options"
        raise SamplingError(f"{kind} {method!r} has no option {', '.join(map(repr, unknown))}; {takes}")
    return table[method]


@dataclass(frozen=True)
class Sampler:
    """A sampler resolved once: `fn` = SAMPLER_TABLE[space][method], to be called with `options` (checked).

    space "flow": fn(velocity, x_s, ts, *, generator, callback, **options) integrates in flow time s;
    space "edm":  fn(denoiser, x_edm, sigmas, *, generator, callback, **options) in EDM sigma.
    """

    space: str
    method: str
    options: dict
    fn: Callable

    @property
    def name(self) -> str:
        """SPACE:METHOD, e.g. "flow:euler" (what resolve_sampler reads back to this sampler)."""
        return f"{self.space}:{self.method}"


def sampler_names(paradigm: str = "flow") -> list[str]:
    """Every sampler name as SPACE:METHOD, the model's native space first. A bare METHOD also works (below)."""
    order = [paradigm] + [s for s in SPACES if s != paradigm]
    return [f"{space}:{m}" for space in order for m in sorted(SAMPLER_TABLE[space])]


def resolve_sampler(name: str, paradigm: str, options: dict | None = None) -> Sampler:
    """The Sampler of a name for a model of `paradigm` ("flow" or "edm"), its options checked.

    "flow:unipc" integrates in flow time s, "edm:heun" in EDM sigma; a bare name looks in the model's own space first
    (so "euler" is flow Euler for a flow model), then the other; "auto" is the paradigm's native sampler
    (NATIVE_SAMPLER: flow -> euler, edm -> heun). Any sampler runs on any model through dfm.diffusion.paths.
    Raises a one-line SamplingError listing the valid names, or the sampler's valid options.
    """
    if paradigm not in SPACES:
        raise SamplingError(f"unknown paradigm {paradigm!r}; use one of: {', '.join(SPACES)}")
    options = dict(options or {})
    found = None
    if name == "auto":
        found = paradigm, NATIVE_SAMPLER[paradigm]
    elif ":" in name:
        space, _, method = name.rpartition(":")
        if space in SAMPLER_TABLE and method in SAMPLER_TABLE[space]:
            found = space, method
    else:
        found = next(((s, name) for s in [paradigm] + [s for s in SPACES if s != paradigm]
                      if name in SAMPLER_TABLE[s]), None)
    if found is None:
        raise SamplingError(f"unknown sampler {name!r}; use one of: {', '.join(sampler_names(paradigm))} "
                            f"(or a bare name, looked up in the {paradigm} space first)")
    space, method = found
    return Sampler(space, method, options, _check(space, method, options, f"{space} sampler"))


def sample(denoiser, x, sigmas, method="heun", generator=None, callback=None, **options):
    """Run SAMPLERS[method] from x = noise * sigmas[0] down the EDM grid `sigmas` (see the module docstring)."""
    fn = _check("edm", method, options, "sampler")
    return fn(denoiser, x, sigmas, generator=generator, callback=callback, **options)


def sample_flow(velocity, x, ts, method="euler", generator=None, callback=None, **options):
    """Run FLOW_SAMPLERS[method] from x (pure noise when ts[0] == 1) down the flow-time grid `ts` (flow_samplers.py)."""
    fn = _check("flow", method, options, "flow sampler")
    return fn(velocity, x, ts, generator=generator, callback=callback, **options)
