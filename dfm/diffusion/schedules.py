"""Noise schedules: the grids samplers step through, and a learned training noise distribution.

A grid with n steps is a 1-D tensor of n + 1 values, **descending and ending in 0**: n noise levels, then 0
(k-diffusion's ``append_zero``). Values are EDM sigmas (``sigma_t / alpha_t``, see paths.py) unless a name says
otherwise. They are computed in float64 and returned in ``dtype`` (float32 by default: sigmas and timesteps stay
fp32 even when the network runs in bf16: bf16 keeps ~8 distinct values near s = 1).

    continuous EDM grids     karras, exponential, polyexponential, vp        (k-diffusion's get_sigmas_*)
    discrete DDPM schedules  ddpm_betas, ddpm_sigmas (the training table), spaced_timesteps, discrete,
                             discrete_with_timesteps, t_to_sigma, sigma_to_t  (diffusers' Euler / DDIM / DPM-Solver)
    flow grids in s          flow_uniform, shift_static, shift_exponential, dynamic_shift_mu, flow_shifted,
                             flow_match_euler, flow_unipc, flow_to_edm       (SD3, Flux, Wan; s = 1 is pure noise)
                             (diffusers' use_karras_sigmas / shift_terminal for flow are not reproduced)
    few-step log-SNR         logsnr (EDM sigmas), flow_logsnr (flow time)    (exponential from 80 to 0.05)
    learned                  LearnedSchedule                                 (VDM's monotone gamma(t))

The one registry of named grids: ``GRIDS`` and ``sampling_grid(name, steps, **params) -> Grid`` (a kind "flow" or
"edm" and float64 values, with the views `flow_times()`, `sigmas()` and the initial state `start(noise, space)`):

    grid = sampling_grid("flow_shifted", 20, shift=3.0)                           # Grid("flow", s values)
    grid = sampling_grid("karras", 32, sigma_min=0.002, sigma_max=80.0, rho=7.0)  # Grid("edm", sigmas)
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from dfm.diffusion.paths import flow_t_to_sigma, sigma_to_flow_t
from dfm.diffusion.sampler_api import SamplingError

Tensor = torch.Tensor
f64 = torch.float64


def _append_zero(levels: Tensor, dtype: torch.dtype) -> Tensor:
    """[n] noise levels -> [n + 1] grid ending in 0, cast to `dtype` (levels are computed in float64)."""
    return torch.cat([levels, levels.new_zeros(1)]).to(dtype)


# --- continuous EDM grids ---------------------------------------------------------------------------------------


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """EDM eq. 5 (Karras et al. 2022): sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n, dtype=f64)  # i / (n - 1), [n]
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho, dtype)


def exponential(n: int, sigma_min: float, sigma_max: float, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Evenly spaced in log sigma (= in log-SNR lambda = -log sigma): the grid DPM-Solver's analysis favours."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=f64).exp(), dtype)


def polyexponential(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """log sigma = log sigma_min + r^rho (log sigma_max - log sigma_min), r from 1 to 0; rho = 1 is `exponential`."""
    ramp = torch.linspace(1, 0, n, dtype=f64) ** rho  # [n]
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return _append_zero(torch.exp(log_min + ramp * (log_max - log_min)), dtype)


def vp(
    n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Continuous VP (Song et al. 2021) in EDM sigmas, EDM Table 1: sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)."""
    t = torch.linspace(1, eps_s, n, dtype=f64)  # [n]
    return _append_zero(torch.sqrt(torch.expm1(0.5 * beta_d * t**2 + beta_min * t)), dtype)


# --- discrete DDPM schedules ------------------------------------------------------------------------------------

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
CONVENTIONS = ("euler", "ddim", "dpmsolver")


def ddpm_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """beta_t for t = 0 .. T-1, [T]. float32 by default: the table diffusers builds, so grids match its schedulers."""
    T = num_train_timesteps
    if beta_schedule == "linear":  # DDPM, Ho et al. 2020 Sec. 4: 1e-4 .. 0.02
        return torch.linspace(beta_start, beta_end, T, dtype=dtype)
    if beta_schedule == "scaled_linear":  # latent diffusion / Stable Diffusion: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=dtype) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021 eq. 17: abar(t) = f(t)/f(0), offset s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=f64) / T + 0.008) / 1.008 * math.pi / 2) ** 2  # [T + 1]
        return (1 - f[1:] / f[:-1]).clamp(max=0.999).to(dtype)  # beta_t = 1 - abar_{t+1}/abar_t, capped at 0.999
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; use one of {BETA_SCHEDULES}")


def ddpm_sigmas(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The training table in EDM sigmas, [T] ascending in t: abar_t = prod_{i<=t} (1 - beta_i), sigma_t = sqrt((1-abar)/abar)."""
    alphas_cumprod = torch.cumprod(1 - ddpm_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, dtype=dtype), 0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def spaced_timesteps(
    n: int, num_train_timesteps: int = 1000, spacing: str = "linspace", steps_offset: int = 0, convention: str = "euler"
) -> Tensor:
    """n training timesteps to sample at, descending, float64 [n] (Lin et al. 2024, Table 2).

    leading   k * (T // n) + steps_offset for k = n-1 .. 0      (SD 1.x configs use steps_offset = 1)
    trailing  round(T - k T/n) - 1 for k = 0 .. n-1             (always starts at T - 1)
    linspace  n points evenly spaced over [0, T-1]; fractional for "euler", rounded for "ddim"/"dpmsolver"

    convention="dpmsolver" follows DPMSolverMultistepScheduler, which for leading/linspace spaces n + 1 points and
    drops the lowest (its last step then goes straight to sigma = 0).
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; use one of {SPACINGS}")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; use one of {CONVENTIONS}")
    T = num_train_timesteps
    m = n + 1 if convention == "dpmsolver" and spacing != "trailing" else n
    k = torch.arange(m - 1, -1, -1, dtype=f64)  # m-1 .. 0
    if spacing == "leading":
        t = k * (T // m) + steps_offset
    elif spacing == "trailing":
        t = torch.round(T - k.flip(0) * (T / m)) - 1  # torch.round is half-to-even, as numpy's
    else:
        t = torch.linspace(T - 1, 0, m, dtype=f64)
        t = t if convention == "euler" else t.round()
    return t[:n]  # [n], descending


def t_to_sigma(t: Tensor, sigmas_train: Tensor, interpolation: str = "log") -> Tensor:
    """sigma at fractional training timesteps t in [0, T-1] (clamped), interpolating the table between floor and ceil.

    "log": in log sigma, as k-diffusion's DiscreteSchedule; "linear": in sigma, as diffusers' EulerDiscreteScheduler
    (``np.interp``, its default). Both are exact at integer t.
    """
    table = sigmas_train.to(f64)  # [T]
    if interpolation == "log":
        table = table.log()
    elif interpolation != "linear":
        raise ValueError(f"unknown interpolation {interpolation!r}; use 'log' or 'linear'")
    t = t.to(f64).clamp(0, len(table) - 1)
    low = t.floor().long().clamp(max=len(table) - 2)
    w = t - low
    value = (1 - w) * table[low] + w * table[low + 1]
    return value.exp() if interpolation == "log" else value


def sigma_to_t(sigma: Tensor, sigmas_train: Tensor) -> Tensor:
    """The inverse of t_to_sigma(interpolation="log"): fractional timestep of `sigma`, clamped to [0, T-1], float64.

    Lets a discrete-time model be driven at any sigma (k-diffusion's DiscreteSchedule, diffusers' _sigma_to_t).
    sigmas_train must be ascending (every DDPM table is: beta > 0).
    """
    log_table = sigmas_train.log().to(f64)  # [T] ascending; log in the table's own dtype, as k-diffusion and diffusers
    log_sigma = sigma.to(f64).clamp(min=1e-10).log()
    # the last table entry <= sigma (0 if none), so that [low, low + 1] brackets sigma
    low = (torch.searchsorted(log_table, log_sigma, right=True) - 1).clamp(0, len(log_table) - 2)
    w = (log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1])
    return low + w.clamp(0, 1)


def discrete_with_timesteps(
    n: int,
    *,
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    spacing: str = "linspace",
    steps_offset: int = 0,
    convention: str = "euler",
    interpolation: str = "linear",
    karras_sigmas: bool = False,
    rho: float = 7.0,
    final: str = "zero",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """(sigmas [n + 1], timesteps [n]): a DDPM schedule's grid in EDM sigmas, and the model's timestep per level.

    Reproduces ``.sigmas`` / ``.timesteps`` of diffusers' schedulers for the same settings (defaults are diffusers'):
      convention="euler"      EulerDiscreteScheduler: fractional timesteps (float32), sigma by `interpolation`
      convention="ddim"       DDIMScheduler: integer timesteps; sigma_t = sqrt((1-abar_t)/abar_t); final="zero" is
                              its set_alpha_to_one=True, final="sigma_min" its set_alpha_to_one=False
      convention="dpmsolver"  DPMSolverMultistepScheduler: integer timesteps, n+1-point leading/linspace spacing
    karras_sigmas=True is diffusers' use_karras_sigmas: an EDM eq. 5 grid between two endpoints, with timesteps from
    sigma_to_t. Euler takes the endpoints of the *spaced* grid, DPM-Solver those of the whole training table (and
    rounds those timesteps except for the cosine schedule, where the int64 cast truncates them); DDIM has no such option.
    final: the last entry, "zero" or "sigma_min" (sigmas_train[0]), diffusers' final_sigmas_type.
    Not covered: rescale_betas_zero_snr, lambda_min_clipped, use_lu_lambdas, and Euler's interpolation_type="log_linear"
    (which returns n + 2 sigmas for n timesteps; `exponential` between the table's endpoints is the intended grid).
    """
    if karras_sigmas and convention == "ddim":
        raise ValueError("DDIMScheduler has no Karras option; use convention='euler' or 'dpmsolver'")
    sigmas_train = ddpm_sigmas(num_train_timesteps, beta_start, beta_end, beta_schedule)  # [T] float32, as diffusers
    t = spaced_timesteps(n, num_train_timesteps, spacing, steps_offset, convention)  # [n]
    if convention == "euler":
        t = t.float().to(f64)  # diffusers interpolates at the float32 timesteps
    levels = t_to_sigma(t, sigmas_train, interpolation)  # [n] float64
    if karras_sigmas:
        lo, hi = (levels[-1], levels[0]) if convention == "euler" else (sigmas_train[0], sigmas_train[-1])
        levels = karras(n, lo.item(), hi.item(), rho, dtype=f64)[:-1]
        t = sigma_to_t(levels, sigmas_train)
        if convention == "dpmsolver":
            t = t.trunc() if beta_schedule == "squaredcos_cap_v2" else t.round()
    if final not in ("zero", "sigma_min"):
        raise ValueError(f"unknown final {final!r}; use 'zero' or 'sigma_min'")
    sigmas = _append_zero(levels, dtype)
    if final == "sigma_min":
        sigmas[-1] = sigmas_train[0]
    return sigmas, (t.float() if convention == "euler" else t.long())


def discrete(n: int, **kwargs) -> Tensor:
    """The sigma grid of `discrete_with_timesteps` (same keyword arguments)."""
    return discrete_with_timesteps(n, **kwargs)[0]


# --- flow-matching grids, in flow time s (x_s = (1 - s) x0 + s eps, s = 1 is pure noise) -------------------------


def flow_uniform(n: int, s_max: float = 1.0, s_min: float = 0.0, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """n levels evenly spaced from s_max down to s_min, then 0, [n + 1].

    s_min = 0 gives linspace(s_max, 0, n + 1), i.e. levels linspace(1, 1/n, n): what diffusers' Flux (AuraFlow, LTX)
    pipelines pass as `sigmas`. SD3's pipeline passes none and gets `flow_match_euler` instead.
    """
    if s_min == 0:
        return torch.linspace(s_max, 0, n + 1, dtype=f64).to(dtype)
    return _append_zero(torch.linspace(s_max, s_min, n, dtype=f64), dtype)


def shift_static(s: Tensor, shift: float) -> Tensor:
    """s' = a s / (1 + (a - 1) s): SD3's timestep shift (Esser et al. 2024, Sec. 5.3.2), a = sqrt(m/n) there."""
    return shift * s / (1 + (shift - 1) * s)


def shift_exponential(s: Tensor, mu: float, sigma: float = 1.0) -> Tensor:
    """Flux's time shift e^mu / (e^mu + (1/s - 1)^sigma); sigma = 1 is shift_static with a = e^mu. Maps 0 -> 0, 1 -> 1."""
    return 1 / (1 + math.exp(-mu) * (1 / s - 1) ** sigma)  # the same, written so that s = 1 gives exactly 1


def dynamic_shift_mu(
    seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu for the resolution-dependent shift: linear in the image token count through (base_seq_len, base_shift) and
    (max_seq_len, max_shift) (Flux; diffusers' calculate_shift). Larger images -> more mass at high noise."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


def flow_shifted(
    n: int,
    shift: float = 1.0,
    mu: float | None = None,
    s_min: float = 0.0,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """flow_uniform(n, 1, s_min) with each level shifted: static by `shift`, or exponentially by `mu` if given. [n + 1]."""
    levels = flow_uniform(n, 1.0, s_min, dtype=f64)[:-1]  # [n]
    levels = shift_static(levels, shift) if mu is None else shift_exponential(levels, mu)
    return _append_zero(levels, dtype)


def flow_match_euler(
    n: int,
    shift: float = 1.0,
    mu: float | None = None,
    num_train_timesteps: int = 1000,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """diffusers' FlowMatchEulerDiscreteScheduler.sigmas after set_timesteps(n, mu=mu) (dynamic shifting iff mu given).

    Subtlety: with no `sigmas` passed, diffusers spaces its n timesteps linearly from T * s_max down to T * s_min of
    its T-entry training table, whose lowest entry is 1/T, already shifted when shifting is static; it then shifts
    again. So the unshifted levels end at s_min = shift(1/T), not at 1/n as in `flow_shifted(n, ...)` (what pipelines
    passing linspace(1, 1/n, n) get). The model's timestep is T * s for each level; the final 0 is appended.
    """
    T = num_train_timesteps
    s_min = 1 / T if mu is not None else shift_static(1 / T, shift)
    return flow_shifted(n, shift, mu, s_min, dtype=dtype)


def flow_to_edm(s: Tensor) -> Tensor:
    """A flow grid in s as EDM sigmas s / (1 - s): s = 1 -> inf (samplers must treat that first step explicitly)."""
    return flow_t_to_sigma(s)


# --- a learned schedule (VDM) ------------------------------------------------------------------------------------


class LearnedSchedule(nn.Module):
    """VDM's learned noise schedule (Kingma et al. 2021, "Variational Diffusion Models"): a monotone MLP gamma(t).

    gamma(t) = -log SNR(t) = log sigma_edm(t)^2 for t in [0, 1], strictly increasing, gamma(0) = gamma_min,
    gamma(1) = gamma_max (from sigma_min, sigma_max; learnable if learn_endpoints, fixed by default):

        gamma~(t) = l1(t) + l3(sigmoid(l2(l1(t))))               l1: 1 -> 1, l2: 1 -> hidden, l3: hidden -> 1,
        gamma(t)  = gamma_min + (gamma_max - gamma_min) * (gamma~(t) - gamma~(0)) / (gamma~(1) - gamma~(0))

    with the weights of l1, l2, l3 kept positive (softplus), so gamma~ is increasing in t.

    Training (what is implemented, and what is not). Write the per-sample loss at noise level gamma as f(gamma),
    e.g. w(gamma) * ||D(x0 + sigma eps; sigma) - x0||^2 for any weighting w (VDM's continuous-time VLB is w = SNR/2,
    half the eps-MSE). VDM's continuous-time estimator
        L(t) = gamma'(t) * f(gamma(t)),   t ~ U[0, 1]
    has expectation int_{gamma_min}^{gamma_max} f(gamma) dgamma: the interior of the schedule does not change the
    objective, only the variance of its Monte Carlo estimate (VDM, "invariance to the noise schedule in continuous
    time"). VDM therefore trains the interior to minimise that variance, d/d eta Var[L] = d/d eta E[L^2] =
    E[2 L dL/d eta]. Here:
      * `sample(batch, generator, return_weight=True)` gives sigma(t) and the weight gamma'(t), both differentiable in
        the schedule's parameters, with VDM's low-discrepancy t;
      * `variance_backward(per_sample_loss)` accumulates E[2 L dL/d eta] into the interior parameters' .grad;
      * the model takes its gradient of L.mean() alone: `loss.mean().backward(inputs=list(model.parameters()))`.
    Used as a plain noise distribution (no gamma' weight), the schedule does change the objective and variance
    minimisation is the wrong criterion; keep it fixed then. The endpoints are not touched by `variance_backward`:
    VDM learns them on the full VLB (its prior and reconstruction terms, which dfm does not implement), so
    `learn_endpoints=True` only makes sense with such terms added by the caller.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, hidden: int = 64, learn_endpoints: bool = False):
        super().__init__()
        self.gamma_min = nn.Parameter(torch.tensor(2 * math.log(sigma_min)), requires_grad=learn_endpoints)
        self.gamma_max = nn.Parameter(torch.tensor(2 * math.log(sigma_max)), requires_grad=learn_endpoints)
        # raw (pre-softplus) weights; starts close to linear in gamma (= `exponential` grid), as VDM's init
        self.w1 = nn.Parameter(torch.tensor(0.5413))  # softplus -> 1
        self.b1 = nn.Parameter(torch.zeros(()))
        self.w2 = nn.Parameter(torch.randn(hidden))
        self.b2 = nn.Parameter(torch.randn(hidden))
        self.w3 = nn.Parameter(torch.full((hidden,), -4.0))  # softplus -> 0.018

    def _gamma_tilde(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Unnormalised gamma~(t) and d gamma~/dt, both [B], for t [B], in the parameters' dtype (fp32 by default)."""
        a1, a2, a3 = F.softplus(self.w1), F.softplus(self.w2), F.softplus(self.w3)
        h = a1 * t + self.b1  # l1, [B]
        g = torch.sigmoid(h[:, None] * a2 + self.b2)  # l2 + sigmoid, [B, hidden]
        value = h + g @ a3  # [B]
        slope = a1 * (1 + (g * (1 - g)) @ (a2 * a3))  # chain rule, > 0, [B]
        return value, slope

    def gamma_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """gamma(t) and gamma'(t) for t [B] in [0, 1]."""
        t = t.to(self.w1.dtype)  # fp32 unless the module was cast: never bf16 (timesteps stay fp32)
        value, slope = self._gamma_tilde(torch.cat([t, t.new_tensor([0.0, 1.0])]))  # [B + 2]
        value, ends, slope = value[:-2], value[-2:], slope[:-2]
        scale = (self.gamma_max - self.gamma_min) / (ends[1] - ends[0])
        return self.gamma_min + scale * (value - ends[0]), scale * slope

    def gamma(self, t: Tensor) -> Tensor:
        """-log SNR(t) = log sigma_edm(t)^2, [B]."""
        return self.gamma_and_slope(t)[0]

    def sigma(self, t: Tensor) -> Tensor:
        """EDM sigma(t) = exp(gamma(t) / 2), [B]."""
        return torch.exp(0.5 * self.gamma(t))

    def sample(
        self, batch: int, generator: torch.Generator | None = None, return_weight: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Training noise levels sigma [B], t on VDM's low-discrepancy grid (u + i/B) mod 1 with one u ~ U[0, 1).

        With return_weight, also gamma'(t) [B]: the weight that makes E[L] independent of the schedule's interior.
        """
        u = torch.rand((), generator=generator, device=self.w1.device)
        t = torch.remainder(u + torch.arange(batch, device=u.device) / batch, 1.0)  # [B]
        gamma, slope = self.gamma_and_slope(t)
        sigma = torch.exp(0.5 * gamma)
        return (sigma, slope) if return_weight else sigma

    def variance_backward(self, per_sample_loss: Tensor) -> None:
        """Accumulate d/d eta E[L^2] = E[2 L dL/d eta] into the interior parameters' .grad; `per_sample_loss` is L, [B].

        Keeps the graph, so the model's backward of L.mean() can follow.
        """
        params = [p for p in (self.w1, self.b1, self.w2, self.b2, self.w3) if p.requires_grad]  # interior only
        weights = 2 * per_sample_loss.detach() / per_sample_loss.numel()
        grads = torch.autograd.grad(per_sample_loss, params, weights, retain_graph=True, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    @torch.no_grad()
    def grid(self, n: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
        """n levels sigma(t) at t = linspace(1, 0, n), then 0: from sigma_max down to sigma_min, [n + 1]."""
        return _append_zero(self.sigma(torch.linspace(1, 0, n, device=self.w1.device)).to(f64), dtype)


# --- few-step log-SNR grids ---------------------------------------------------------------------------------

# The few-step grid's end: the last step of a data-prediction solver returns D(x, sigma_min), and below ~sigma_data/10
# D is nearly the identity, so an NFE spent there is wasted. Chosen on benchmarks/samplers.py (0.002, 0.01, 0.03,
# 0.06 tried), where this grid with dpmpp_2m / unipc order 2 beats every Karras or shifted grid at 10 NFE.
LOGSNR_SIGMA_MIN, LOGSNR_SIGMA_MAX = 0.05, 80.0


def logsnr(
    n: int, sigma_min: float = LOGSNR_SIGMA_MIN, sigma_max: float = LOGSNR_SIGMA_MAX, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The few-step grid in EDM sigmas: uniform in log-SNR lambda = -log sigma (`exponential`, DPM-Solver's choice,
    Lu et al. 2022 Sec. 3.3) from sigma_max = 80 to sigma_min = 0.05 (not EDM's 0.002, see LOGSNR_SIGMA_MIN), [n + 1]."""
    return exponential(n, sigma_min, sigma_max, dtype=dtype)


def flow_logsnr(
    n: int, sigma_min: float = LOGSNR_SIGMA_MIN, sigma_max: float = LOGSNR_SIGMA_MAX, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """`logsnr` for a flow model, in flow time s, [n + 1]: s = 1 (pure noise, sigma = inf) in place of sigma_max, then
    the other n - 1 levels as s = sigma / (1 + sigma), then 0. The same n steps, from where a flow model starts."""
    sig = logsnr(n, sigma_min, sigma_max, dtype=f64)[1:]  # [n]: levels 1 .. n - 1, then 0
    return torch.cat([sig.new_ones(1), sigma_to_flow_t(sig)]).to(dtype)


def flow_unipc(n: int, shift: float = 1.0, num_train_timesteps: int = 1000, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """diffusers' UniPC / DPM-Solver with use_flow_sigmas (Wan 2.1's FlowUniPCMultistepScheduler), in s, [n + 1]:
    levels linspace(1, 1/T, n + 1)[:-1], shifted by shift_static, the first one lowered to 1 - 1e-6, then 0."""
    levels = shift_static(torch.linspace(1, 1 / num_train_timesteps, n + 1, dtype=f64)[:-1], shift)  # [n]
    levels[0] = min(float(levels[0]), 1 - 1e-6)  # diffusers: keeps log(alpha) finite at the start
    return _append_zero(levels, dtype)


# --- the grid registry: one name -> one Grid ---------------------------------------------------------------------

# Flow time s = 1 (sigma = inf, pure noise) is evaluated as sigma = SIGMA_INF: the network sees x_s and
# s = 1 - 1e-6 (paths.velocity_from_denoiser's sigma_max in guided sampling; its first EDM-space step).
SIGMA_INF = 1e6


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
        return (self.values if self.kind == "flow" else sigma_to_flow_t(self.values)).float()

    def sigmas(self) -> Tensor:
        """[n + 1] fp32 EDM sigmas, s = 1 taken at SIGMA_INF."""
        sig = flow_t_to_sigma(self.values) if self.kind == "flow" else self.values
        return sig.clamp(max=SIGMA_INF).float()

    def start(self, noise: Tensor, space: str) -> Tensor:
        """The initial state in `space`'s coordinates, from standard normal `noise` [B, ...]."""
        sigma0 = float(self.sigmas()[0].double()) if self.kind == "flow" else float(self.values[0])
        if self.kind == "flow":
            return noise if space == "flow" else noise * (1 + sigma0)  # x_edm = x_s / (1 - s)
        return noise * sigma0 if space == "edm" else noise * (sigma0 / (1 + sigma0))  # x_s = x_edm * (1 - s)


@dataclass(frozen=True)
class NamedGrid:
    """An entry of GRIDS: called as (n, **params) -> Grid(kind, fn(n, **defaults, **params, dtype=float64)).

    params: the keyword parameters of `takes` (fn itself unless fn forwards **kwargs to it); defaults: the ones the
    registry adds (e.g. karras' sigma_min / sigma_max, which the plain function requires).
    """

    kind: str
    fn: Callable[..., Tensor]
    defaults: dict = field(default_factory=dict)
    takes: Callable | None = None

    def params(self) -> list[str]:
        """The parameter names this grid takes (n and dtype aside)."""
        items = list(inspect.signature(self.takes or self.fn).parameters.items())[1:]  # n aside
        return [k for k, p in items if k != "dtype" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def required(self) -> list[str]:
        """The parameters without a default, here or in the function."""
        sig = inspect.signature(self.takes or self.fn).parameters
        return [k for k in self.params() if sig[k].default is inspect.Parameter.empty and k not in self.defaults]

    def __call__(self, n: int, **params) -> Grid:
        return Grid(self.kind, self.fn(n, **{**self.defaults, **params}, dtype=f64))


def _learned(n: int, schedule: LearnedSchedule, *, dtype: torch.dtype = torch.float32) -> Tensor:
    return schedule.grid(n, dtype=dtype)


_EDM_RANGE = {"sigma_min": 0.002, "sigma_max": 80.0}  # EDM's (Karras et al. 2022, Sec. 5)

GRIDS: dict[str, NamedGrid] = {
    # the recipes of dfm's models (the pipeline, the trainer's validation)
    "flow_shifted": NamedGrid("flow", flow_shifted),  # linspace(1, 1/n, n) shifted (SD3; dfm's trainer)
    "flow_unipc": NamedGrid("flow", flow_unipc),  # Wan 2.1's FlowUniPCMultistepScheduler grid
    "flow_match_euler": NamedGrid("flow", flow_match_euler),  # diffusers' FlowMatchEulerDiscreteScheduler
    "karras": NamedGrid("edm", karras, _EDM_RANGE),  # EDM eq. 5, rho = 7
    # the few-step grid uniform in log-SNR, for EDM models and (from s = 1) for flow models
    "logsnr": NamedGrid("edm", logsnr),
    "flow_logsnr": NamedGrid("flow", flow_logsnr),
    # more EDM sigma grids (k-diffusion's get_sigmas_*, diffusers' discrete schedules, VDM)
    "exponential": NamedGrid("edm", exponential, _EDM_RANGE),
    "polyexponential": NamedGrid("edm", polyexponential, _EDM_RANGE),
    "vp": NamedGrid("edm", vp),
    "discrete": NamedGrid("edm", discrete, takes=discrete_with_timesteps),
    "learned": NamedGrid("edm", _learned),
}


def sampling_grid(name: str, steps: int, **params) -> Grid:
    """The `steps`-step Grid named `name` in GRIDS, in its kind's time ("flow": s; "edm": sigma), float64.

    params are the plain functions' keywords (shift, num_train_timesteps, sigma_min, sigma_max, rho, ...). A parameter
    that some other grid takes but this one does not is ignored, so one call can pass a recipe's whole set (shift
    means nothing to karras or the log-SNR grids); one that no grid takes is an error.

    "logsnr" vs "flow_logsnr": the same log-SNR levels (80 -> 0.05); "logsnr" is an EDM grid (a flow model sampled on
    it starts at s = 80/81 from x_s = noise * 80/81, EDM's truncation at sigma_max), "flow_logsnr" a flow grid whose
    first point is s = 1, pure noise, as a flow model is trained to start (the grid benchmarks/samplers.py measures).
    Raises a one-line SamplingError naming the valid grids or parameters.
    """
    if name not in GRIDS:
        raise SamplingError(f"unknown sampling grid {name!r}; use one of: {', '.join(GRIDS)}")
    grid = GRIDS[name]
    takes = grid.params()
    unknown = sorted(set(params) - {p for g in GRIDS.values() for p in g.params()})
    if unknown:
        raise SamplingError(f"no sampling grid takes {', '.join(map(repr, unknown))}; {name!r} takes: "
                            f"{', '.join(takes) or 'nothing'}")
    given = {k: v for k, v in params.items() if k in takes}
    missing = [k for k in grid.required() if k not in given]
    if missing:
        raise SamplingError(f"sampling grid {name!r} needs {', '.join(map(repr, missing))}")
    return grid(steps, **given)
