"""Gaussian paths x_t = alpha * x0 + sigma * eps, and exact conversions between model outputs.

Every model in dfm lives on one of three paths:

    path   alpha                 sigma                  time
    ve     1                     sigma                  sigma in (0, inf)       (EDM, Karras et al. 2022)
    vp     sqrt(abar)            sqrt(1 - abar)         abar = 1 / (1 + sigma_edm^2)
    flow   1 - s                 s                      s in [0, 1], s = 1 is pure noise (rectified flow, Wan, SD3)

The boundary between models and samplers is the EDM denoiser ``D(x, sigma) -> x0_hat`` in EDM coordinates
``x_edm = x_t / alpha``, ``sigma_edm = sigma_t / alpha``. The functions here turn any prediction (x0, eps, v, flow
velocity, score) into x0 and back, exactly, so every sampler can drive every model.
"""

from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor
Denoiser = Callable[[Tensor, Tensor], Tensor]  # D(x_edm [B, ...], sigma [B]) -> x0_hat [B, ...]
Velocity = Callable[[Tensor, Tensor], Tensor]  # v(x_t [B, ...], s [B]) -> dx_t/ds [B, ...]

PATHS = ("ve", "vp", "flow")
PREDICTIONS = ("x0", "eps", "v", "flow", "score")


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] with `ndim` dims in total, for broadcasting per-sample scalars."""
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


# --- time variables --------------------------------------------------------------------------------------------


def flow_t_to_sigma(s: Tensor) -> Tensor:
    """Flow time s in [0, 1] -> EDM sigma = s / (1 - s); s = 1 maps to inf."""
    return s / (1 - s)


def sigma_to_flow_t(sigma: Tensor) -> Tensor:
    """EDM sigma -> flow time s = sigma / (1 + sigma); sigma = inf maps to 1."""
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def alpha_sigma(sigma_edm: Tensor, path: str) -> tuple[Tensor, Tensor]:
    """(alpha, sigma_t) of `path` at the noise level `sigma_edm` (so that sigma_t / alpha == sigma_edm)."""
    if path == "ve":
        alpha = torch.ones_like(sigma_edm)
    elif path == "vp":
        alpha = torch.rsqrt(1 + sigma_edm**2)
    elif path == "flow":
        alpha = 1 / (1 + sigma_edm)
    else:
        raise ValueError(f"unknown path {path!r}; use one of {PATHS}")
    return alpha, alpha * sigma_edm


def log_snr(sigma_edm: Tensor) -> Tensor:
    """lambda = log(alpha / sigma_t) = -log(sigma_edm), the same on every path."""
    return -torch.log(sigma_edm)


# --- predictions -------------------------------------------------------------------------------------------------


def to_x0(pred: Tensor, prediction: str, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0 from a model's `prediction` at x_t = alpha*x0 + sigma*eps (alpha, sigma broadcastable to x).

    eps:   x0 = (x - sigma*eps) / alpha
    v:     v = alpha*eps - sigma*x0 (Salimans & Ho 2022)  =>  x0 = (alpha*x - sigma*v) / (alpha^2 + sigma^2)
    flow:  u = eps - x0 on the flow path (alpha = 1 - s, sigma = s)  =>  x0 = x - s*u
    score: grad log p(x_t) = -eps / sigma  =>  eps = -sigma * score
    """
    if prediction == "x0":
        return pred
    if prediction == "eps":
        return (x - sigma * pred) / alpha
    if prediction == "v":
        return (alpha * x - sigma * pred) / (alpha**2 + sigma**2)
    if prediction == "flow":
        return flow_x0(x, sigma, pred)
    if prediction == "score":
        return (x + sigma**2 * pred) / alpha
    raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")


def flow_x0(x_s: Tensor, s: Tensor | float, v: Tensor) -> Tensor:
    """x0 = x_s - s * v: the data estimate of a flow velocity v = eps - x0 at x_s = (1 - s) x0 + s eps.

    The one place this is written (to_x0, denoiser_from_velocity and the flow samplers call it). `s` is a float or a
    tensor broadcastable to x_s (append_dims a per-sample [B] first); dtypes promote as in `x_s - s * v`.
    """
    return x_s - s * v


def from_x0(x0: Tensor, prediction: str, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The inverse of `to_x0`: the `prediction` that corresponds to the estimate x0 at x_t."""
    if prediction == "x0":
        return x0
    eps = (x - alpha * x0) / sigma
    if prediction == "eps":
        return eps
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "flow":
        return eps - x0
    if prediction == "score":
        return -eps / sigma
    raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")


# --- adapters: any model -> EDM denoiser, EDM denoiser -> flow velocity -----------------------------------------


def as_denoiser(model_fn: Callable[[Tensor, Tensor], Tensor], prediction: str, path: str) -> Denoiser:
    """Wrap `model_fn(x_t, sigma_edm [B]) -> prediction` living on `path` as an EDM denoiser D(x_edm, sigma).

    The model receives x_t = alpha * x_edm in its own path's coordinates and the EDM noise level; it maps that to
    its own time input itself (e.g. ``lambda x, sig: wan(x, 1000 * sig / (1 + sig), ctx)``).
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; use one of {PATHS}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        alpha, sigma_t = alpha_sigma(sigma, path)
        alpha, sigma_t = append_dims(alpha, x.ndim), append_dims(sigma_t, x.ndim)
        x_t = alpha * x
        return to_x0(model_fn(x_t, sigma), prediction, x_t, alpha, sigma_t)

    return denoiser


def denoiser_from_velocity(velocity: Velocity) -> Denoiser:
    """A flow-matching velocity model v(x_s, s) as an EDM denoiser D(x_edm, sigma) = x_s - s * v(x_s, s).

    s = sigma / (1 + sigma) (sigma = inf -> s = 1) and x_s = x_edm / (1 + sigma) = (1 - s) x_edm. sigma: a number,
    [1] or [B]; it is made [B] in float32 at least (fp32 even when the network runs in bf16: the time stays fp32),
    and v comes back as float32 at least. This is the flow paradigm's `denoise` (dfm.model.DiffusionModule), with
    the backbone's timestep scale applied inside `velocity`: ``lambda x_s, s: net(x_s, s * 1000, **cond)``.
    """

    def denoiser(x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.to(torch.promote_types(sigma.dtype, torch.float32)).reshape(-1).expand(x.shape[0])  # [B]
        s = sigma_to_flow_t(sigma)  # [B]
        x_s = x / append_dims(1 + sigma, x.ndim)  # x_edm * (1 - s)
        v = velocity(x_s, s)  # [B, ...]
        return flow_x0(x_s, append_dims(s, x.ndim), v.to(torch.promote_types(v.dtype, torch.float32)))

    return denoiser


def velocity_from_denoiser(denoiser: Denoiser, sigma_max: float = 1e3, s_min: float = 1e-4) -> Velocity:
    """An EDM denoiser as a flow velocity v(x_t, s) = (x_t - x0) / s with x0 = D(x_t / (1 - s), s / (1 - s)).

    At s = 1 (sigma = inf, where x_t is pure noise) the denoiser is evaluated at `sigma_max` with
    x_edm = sigma_max * x_t, which drops an O(x0 / sigma_max) term: D there is the data mean to that precision.
    At s = 0 the quotient is 0/0; s is floored at `s_min` (solvers such as RK4 evaluate the velocity there).
    """

    def velocity(x: Tensor, s: Tensor) -> Tensor:
        s = s.double().clamp(min=s_min)  # fp32: 1/(1-s) loses digits near s = 1
        sigma = flow_t_to_sigma(s).clamp(max=sigma_max)
        scale = append_dims((1 + sigma).to(x.dtype), x.ndim)  # 1 / (1 - s), or 1 + sigma_max at s = 1
        x0 = denoiser(x * scale, sigma.to(x.dtype))
        return (x - x0) / append_dims(s.to(x.dtype), x.ndim)

    return velocity
