"""Multistep exponential integrators: DPM-Solver++ (2M, 3M, and their SDE variants) and UniPC.

Each algorithm is written once, in the general Gaussian-path form of its paper. On a path
x_t = alpha_t * x0 + sigma_t * eps with half log-SNR lambda_t = log(alpha_t / sigma_t), the probability-flow ODE
in data prediction has the exact solution (Lu et al. 2022, DPM-Solver++)

    x_t = (sigma_t / sigma_s) * x_s + sigma_t * int_{lambda_s}^{lambda_t} e^lambda x0_hat(lambda) d lambda,

and every method here is a polynomial approximation of x0_hat(lambda) inside that integral, built from the data
predictions of previous grid points. Written this way the methods are invariant under a change of path
(x_vp = alpha * x_edm): the same code serves

    EDM / VE      alpha = 1,      sigma = sigma              (x in EDM coordinates)
    flow          alpha = 1 - t,  sigma = t                  (x_t = (1 - t) x0 + t eps, t = 1 is noise)

and gives the same samples on matching grids (sigma_edm = t / (1 - t)). Two ends of a grid have h = inf:

    * the flow start t = 1 (alpha = 0, lambda = -inf): the first step becomes x = t_next * x + alpha_next * x0_hat,
      and the point t = 1 carries no information for a polynomial in lambda, so it never enters the multistep
      history (the next step is first order again);
    * a final sigma = 0 (lambda = +inf): that step is always first order, x = alpha_next * x0_hat, as diffusers does
      with final_sigmas_type="zero" (k-diffusion: "denoising step").

A grid may also end at sigma > 0 (diffusers' final_sigmas_type="sigma_min"); the sampler then returns x there.

Entry points, one per method and space (sample_<name> and sample_flow_<name> at the bottom; the table that names
them is dfm.diffusion.samplers.SAMPLER_TABLE):

    sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None, **options)
        denoiser(x [B, ...], sigma [B]) -> x0_hat; sigmas 1-D descending (last may be 0); x starts as
        noise * sigmas[0] (k-diffusion's convention). callback receives
        {"x", "i", "sigma", "sigma_hat", "denoised", "nfe"} once per step, before the step is taken.
    sample_flow_<name>(velocity, x, ts, *, generator=None, callback=None, **options)
        velocity(x_t [B, ...], t [B]) -> v = eps - x0; ts 1-D descending from <= 1 to >= 0; x starts as noise when
        ts[0] = 1. callback receives {"x", "i", "t", "t_next", "denoised", "nfe"}, as the single-step flow solvers.

Names: dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, dpmpp_3m_sde, unipc. All noise comes from noise.randn_like(x, generator).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .noise import Generator, randn_like
from .paths import Denoiser, Velocity, append_dims, flow_x0

Tensor = torch.Tensor
Callback = Callable[[dict], None] | None

# diffusers applies `lower_order_final` only to grids with fewer steps than this (DPMSolverMultistepScheduler).
LOWER_ORDER_FINAL_BELOW = 15


# --- one grid on one path -------------------------------------------------------------------------------------


def _log(v: float) -> float:
    return math.log(v) if v > 0 else -math.inf


@dataclass
class _Grid:
    """The ODE on a grid of N + 1 points of a Gaussian path, seen through its data prediction.

    alpha, sigma: per grid point, python floats (fp64 coefficients, one host sync per sampling run).
    x0(x, i): x0_hat [B, ...] of the model at grid point i (the only call into the network).
    report(i, x, x0): the caller's callback.
    """

    alpha: list[float]
    sigma: list[float]
    x0: Callable[[Tensor, int], Tensor]
    report: Callable[[int, Tensor, Tensor], None]

    def __post_init__(self):
        self.lam = [_log(a) - _log(s) for a, s in zip(self.alpha, self.sigma)]  # lambda = log(alpha / sigma)
        self.steps = len(self.sigma) - 1


def _grid_values(grid: Tensor, name: str) -> list[float]:
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {tuple(grid.shape)}")
    values = grid.detach().double().cpu().tolist()
    if not all(a > b for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be strictly decreasing, got {values}")
    if values[-1] < 0 or not math.isfinite(values[0]):
        raise ValueError(f"{name} must be finite and end at >= 0, got {values}")
    return values


def _edm_grid(denoiser: Denoiser, x: Tensor, sigmas: Tensor, callback: Callback) -> _Grid:
    """EDM / VE: alpha = 1, sigma = sigma. x lives in EDM coordinates."""
    values = _grid_values(sigmas, "sigmas")
    sigmas = sigmas.to(x.device)  # fp32 (or the caller's dtype): never cast to the network's bf16

    nfe = [0]

    def x0(x: Tensor, i: int) -> Tensor:
        nfe[0] += 1
        return denoiser(x, sigmas[i].expand(x.shape[0]))  # sigma [B]

    def report(i: int, x: Tensor, x0: Tensor) -> None:
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0, "nfe": nfe[0]})

    return _Grid([1.0] * len(values), values, x0, report)


def _flow_grid(velocity: Velocity, x: Tensor, ts: Tensor, callback: Callback) -> _Grid:
    """Flow matching: alpha = 1 - t, sigma = t, x0_hat = x_t - t * v (v = eps - x0)."""
    values = _grid_values(ts, "ts")
    if values[0] > 1:
        raise ValueError(f"flow time must start at <= 1 (t = 1 is pure noise), got {values[0]}")
    ts = ts.to(x.device)  # fp32: t near 1 needs the digits

    nfe = [0]

    def x0(x: Tensor, i: int) -> Tensor:
        nfe[0] += 1
        t = ts[i].expand(x.shape[0])  # [B]
        return flow_x0(x, append_dims(t, x.ndim).to(x.dtype), velocity(x, t))

    def report(i: int, x: Tensor, x0: Tensor) -> None:
        if callback is not None:  # the keys of the single-step flow solvers (flow_samplers.py)
            callback({"x": x, "i": i, "t": ts[i], "t_next": ts[i + 1], "denoised": x0, "nfe": nfe[0]})

    return _Grid([1.0 - t for t in values], values, x0, report)


# --- DPM-Solver++ ----------------------------------------------------------------------------------------------


def _dpm_solver_pp(
    grid: _Grid,
    x: Tensor,
    *,
    order: int,
    eta: float,
    s_noise: float,
    solver_type: str,
    d2: str,
    lower_order_final: bool,
    euler_at_final: bool,
    generator: Generator,
) -> Tensor:
    """Multistep DPM-Solver++ of `order` 1..3 on the ODE (eta = 0) or the reverse SDE (eta > 0).

    One step s -> t with h = lambda_t - lambda_s, H = (1 + eta) h and the data predictions m0 (at s), m1, m2 (at the
    two previous grid points):

        x_t = (sigma_t / sigma_s) e^{-eta h} x_s
              + alpha_t [ phi1 m0 + c1 D1 + c2 D2 ]
              + sigma_t sqrt(1 - e^{-2 eta h}) s_noise z,           z ~ N(0, I)

    phi1 = 1 - e^{-H} integrates a constant x0_hat (first order, DDIM). D1 ~ h x0_hat' and D2 ~ h^2 x0_hat'' / 2 are
    divided differences in lambda (r0 = h_0 / h, r1 = h_1 / h are the previous step sizes relative to h):

        2M   D1 = (m0 - m1) / r0;                  c1 = phi1 / 2 ("midpoint", DPM-Solver++ Alg. 2)
                                                   or phi2 = 1 - phi1 / H ("heun", the exact weight of D1)
        3M   D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1
             D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),   D2 = (D1_0 - D1_1) / (r0 + r1)
             c1 = phi2,  c2 = 1/2 - phi2 / H        ("dpm_solver": the reference code, diffusers, k-diffusion)
                         c2 = 2 (1/2 - phi2 / H)    ("taylor")

    The exact weight of the Taylor term x0_hat'' (lambda - lambda_s)^2 / 2 is h^2 (1/2 - phi2 / H), i.e.
    2 (1/2 - phi2 / H) per unit of D2; the reference code weights D2 by half that, which leaves an O(h^3) local
    error and makes its "3M" second order asymptotically (tests/test_multistep.py measures both).
    eta = 1 is the reverse diffusion SDE (diffusers' "sde-dpmsolver++"); 0 < eta < 1 interpolates (k-diffusion).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    if d2 not in ("dpm_solver", "taylor"):
        raise ValueError(f"d2 must be 'dpm_solver' or 'taylor', got {d2!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    n = grid.steps
    lower_final = lower_order_final and n < LOWER_ORDER_FINAL_BELOW
    history: list[tuple[float, Tensor]] = []  # (lambda, x0_hat) of previous points with finite lambda, newest last

    for i in range(n):
        m0 = grid.x0(x, i)  # [B, ...]
        grid.report(i, x, m0)
        lam_s, lam_t = grid.lam[i], grid.lam[i + 1]
        sigma_s, sigma_t, alpha_t = grid.sigma[i], grid.sigma[i + 1], grid.alpha[i + 1]
        h = lam_t - lam_s  # inf from alpha_s = 0 (flow t = 1) or to sigma_t = 0

        p = min(order, len(history) + 1)  # warm-up: the history holds p - 1 points
        if i == n - 1 and (sigma_t == 0 or euler_at_final or lower_final):
            p = 1  # lambda_t = inf: no polynomial extrapolates there
        if i == n - 2 and lower_final:
            p = min(p, 2)

        H = (1 + eta) * h
        phi1 = -math.expm1(-H)  # 1 - e^{-H}
        phi2 = 1 - phi1 / H  # (H - 1 + e^{-H}) / H; 1 at H = inf
        decay = sigma_t / sigma_s * (math.exp(-eta * h) if eta > 0 else 1.0)
        x0_hat = phi1 * m0  # alpha_t * x0_hat is the integral term
        if p == 2:
            lam_1, m1 = history[-1]
            d1 = (m0 - m1) / ((lam_s - lam_1) / h)  # D1 = (m0 - m1) / r0
            x0_hat = x0_hat + (0.5 * phi1 if solver_type == "midpoint" else phi2) * d1
        elif p == 3:
            (lam_2, m2), (lam_1, m1) = history[-2], history[-1]
            r0, r1 = (lam_s - lam_1) / h, (lam_1 - lam_2) / h
            d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)  # ~ h x0_hat'(lambda_s)
            dd2 = (d1_0 - d1_1) / (r0 + r1)  # D2 ~ h^2 x0_hat''(lambda_s) / 2
            c2 = (0.5 - phi2 / H) * (2.0 if d2 == "taylor" else 1.0)
            x0_hat = x0_hat + phi2 * d1 + c2 * dd2
        x = decay * x + alpha_t * x0_hat
        if eta > 0 and s_noise > 0 and sigma_t > 0:
            x = x + (sigma_t * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise) * randn_like(x, generator)

        if math.isfinite(lam_s):  # t = 1 (lambda = -inf) holds no information for a polynomial in lambda
            history = (history + [(lam_s, m0)])[-(order - 1) :] if order > 1 else []
    return x


def dpmpp_2m(
    grid: _Grid,
    x: Tensor,
    *,
    generator: Generator = None,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second-order multistep, one model call per step.

    solver_type: "midpoint" (Alg. 2, k-diffusion's dpmpp_2m) or "heun" (exact phi2 weight of the slope).
    lower_order_final: as diffusers, with fewer than 15 steps the last step is first order (it always is when it ends
        at sigma = 0). euler_at_final: first-order last step on any grid (diffusers' option of that name).
    `generator` is unused (deterministic); accepted so all methods share one signature.
    """
    return _dpm_solver_pp(grid, x, order=2, eta=0.0, s_noise=0.0, solver_type=solver_type, d2="dpm_solver",
                          lower_order_final=lower_order_final, euler_at_final=euler_at_final, generator=None)


def dpmpp_3m(
    grid: _Grid,
    x: Tensor,
    *,
    generator: Generator = None,
    d2: str = "dpm_solver",
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
) -> Tensor:
    """Third-order multistep DPM-Solver++ (diffusers' DPMSolverMultistepScheduler, solver_order=3).

    d2: weight of the second divided difference. "dpm_solver" (default) reproduces the reference implementation,
        diffusers and k-diffusion, but weights the x0'' term by half its Taylor coefficient, so it converges with
        order 2 as steps shrink; "taylor" uses the exact coefficient and converges with order 3.
    solver_type: the second-order warm-up step ("midpoint" as diffusers, "heun").
    lower_order_final: with fewer than 15 steps the last two steps use orders 1 and 2 (diffusers); a step to
        sigma = 0 is always first order. euler_at_final: first-order last step on any grid.
    """
    return _dpm_solver_pp(grid, x, order=3, eta=0.0, s_noise=0.0, solver_type=solver_type, d2=d2,
                          lower_order_final=lower_order_final, euler_at_final=euler_at_final, generator=None)


def dpmpp_2m_sde(
    grid: _Grid,
    x: Tensor,
    *,
    generator: Generator = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
) -> Tensor:
    """SDE-DPM-Solver++(2M): the 2M integrator on the reverse SDE, fresh noise each step.

    eta = 1 with s_noise = 1 is diffusers' algorithm_type="sde-dpmsolver++" (and k-diffusion's dpmpp_2m_sde);
    eta = 0 is dpmpp_2m. s_noise scales the injected noise. Noise: one randn_like(x, generator) per step that does
    not end at sigma = 0, drawn in step order — with one generator this is the same stream diffusers draws when
    its `generator` is passed to every `step`.
    """
    return _dpm_solver_pp(grid, x, order=2, eta=eta, s_noise=s_noise, solver_type=solver_type, d2="dpm_solver",
                          lower_order_final=lower_order_final, euler_at_final=euler_at_final, generator=generator)


def dpmpp_3m_sde(
    grid: _Grid,
    x: Tensor,
    *,
    generator: Generator = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    d2: str = "dpm_solver",
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
) -> Tensor:
    """Third-order multistep DPM-Solver++ on the reverse SDE (k-diffusion's dpmpp_3m_sde weights).

    Same options as dpmpp_3m and dpmpp_2m_sde. k-diffusion's sampler is this one with solver_type="heun",
    lower_order_final=False (its noise comes from a Brownian tree, so samples differ). diffusers'
    sde-dpmsolver++ with solver_order=3 weights D2 differently (not of the form above) and is not reproduced.
    """
    return _dpm_solver_pp(grid, x, order=3, eta=eta, s_noise=s_noise, solver_type=solver_type, d2=d2,
                          lower_order_final=lower_order_final, euler_at_final=euler_at_final, generator=generator)


# --- UniPC -----------------------------------------------------------------------------------------------------


def _unipc_update(
    x: Tensor,
    m0: Tensor,
    nodes: Sequence[tuple[float, Tensor]],
    lam_s: float,
    lam_t: float,
    alpha_t: float,
    sigma_s: float,
    sigma_t: float,
    variant: str,
) -> Tensor:
    """One UniP (predictor) or UniC (corrector) update in data prediction, B(h) form (Zhao et al. 2023).

        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) m0 - alpha_t B(h) sum_k rho_k D_k,
        D_k = (m_k - m0) / r_k,   r_k = (lambda_k - lambda_s) / h,

    over `nodes` (lambda_k, m_k): the p - 1 previous points for UniP-p, plus (lambda_t, m_t) with r = 1 for UniC-p.
    With K nodes, rho solves the K x K system  sum_k r_k^(j-1) rho_k = j! hh phi_{j+1}(hh) / B(h),  j = 1..K,
    where hh = -h and phi_1(z) = (e^z - 1) / z, phi_{j+1}(z) = (phi_j(z) - 1/j!) / z; for K = 1 the paper's
    rho = 1/2 is used. B(h) = -h ("bh1") or e^{-h} - 1 ("bh2"). bh1 has no finite B on an infinite step (the flow
    start t = 1); bh2's B = -1 is used there, which makes the order-1 corrector the average of m0 and m_t — exact to
    leading order near alpha = 0, where x0_hat - x0_hat(-inf) grows like e^lambda.
    """
    h = lam_t - lam_s
    hh = -h
    hphi1 = math.expm1(hh)  # hh phi_1(hh) = e^{-h} - 1
    x_t = (sigma_t / sigma_s) * x - (alpha_t * hphi1) * m0
    if not nodes:
        return x_t
    b_h = hh if (variant == "bh1" and math.isfinite(h)) else hphi1
    r = [1.0 if lam_k == lam_t else (lam_k - lam_s) / h for lam_k, _ in nodes]  # exact 1 at t, also for h = inf
    d = [(m_k - m0) / r_k for (_, m_k), r_k in zip(nodes, r)]  # D_k [B, ...]
    if len(nodes) == 1:
        rho = [0.5]
    else:
        g, q, fact = [], hphi1 / hh - 1, 1.0  # q_j = hh phi_{j+1}(hh)
        for j in range(1, len(nodes) + 1):
            g.append(fact * q / b_h)
            fact *= j + 1
            q = q / hh - 1 / fact
        big_r = torch.tensor([[r_k ** (j - 1) for r_k in r] for j in range(1, len(nodes) + 1)], dtype=torch.float64)
        rho = torch.linalg.solve(big_r, torch.tensor(g, dtype=torch.float64)).tolist()
    return x_t - (alpha_t * b_h) * sum(rho_k * d_k for rho_k, d_k in zip(rho, d))


def unipc(
    grid: _Grid,
    x: Tensor,
    *,
    generator: Generator = None,
    order: int = 2,
    variant: str = "bh2",
    corrector: bool = True,
    disable_corrector: Sequence[int] = (),
    lower_order_final: bool = True,
) -> Tensor:
    """UniPC-p (Zhao et al. 2023): UniP-p predictor + UniC-p corrector, one model call per step.

    Step i predicts x_{i+1} with UniP of order p from x_i; the model call at the start of step i + 1 gives
    m_{i+1} = x0_hat(x_{i+1}), and UniC-p re-solves step i with m_{i+1} as an extra node, replacing x_{i+1} before
    it is stepped from (m_{i+1} itself is kept: no second call). The last step has no corrector. The callback
    sees the corrected x_i with m_i, the prediction at the uncorrected x_i (so the result of a last step to
    sigma = 0 is the callback's last "denoised").

    order: 1..3 (UniC raises the accuracy by one: UniPC-p converges with order p + 1).
    variant: "bh1" (B(h) = h; diffusers recommends it below 10 unconditional steps) or "bh2" (B(h) = e^h - 1),
        the paper's names; in data prediction h enters as -h (see _unipc_update).
    corrector: False gives UniP alone.
    disable_corrector: steps i whose correction is skipped, as diffusers' option of that name (0-based; negative
        values count from the end, -1 being the last step, which has no corrector anyway).
    lower_order_final: the last steps use order min(order, steps left) (diffusers, no 15-step limit);
        a step to sigma = 0 is always first order.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    n = grid.steps
    skip = {k + n if k < 0 else k for k in disable_corrector}
    history: list[tuple[float, Tensor]] = []  # (lambda, x0_hat) of previous points with finite lambda, newest last
    last = None  # the previous step, for its correction: (i, x_i, m_i, nodes used by its predictor)

    for i in range(n):
        m0 = grid.x0(x, i)  # [B, ...] at the predicted x_i
        if last is not None and corrector and last[0] not in skip:
            j, x_j, m_j, nodes = last  # UniC-p: redo step j -> i with (lambda_i, m_i) as the extra node
            x = _unipc_update(x_j, m_j, nodes + [(grid.lam[i], m0)], grid.lam[j], grid.lam[i],
                              grid.alpha[i], grid.sigma[j], grid.sigma[i], variant)
        grid.report(i, x, m0)

        p = min(order, len(history) + 1)
        if lower_order_final:
            p = min(p, n - i)
        if grid.sigma[i + 1] == 0:
            p = 1  # lambda_t = inf
        nodes = history[len(history) - (p - 1) :] if p > 1 else []
        nodes = nodes[::-1]  # newest first: r_1 = (lambda_{i-1} - lambda_i) / h, ...
        last = (i, x, m0, nodes)
        x = _unipc_update(x, m0, nodes, grid.lam[i], grid.lam[i + 1], grid.alpha[i + 1], grid.sigma[i],
                          grid.sigma[i + 1], variant)

        if math.isfinite(grid.lam[i]):
            history = (history + [(grid.lam[i], m0)])[-(order - 1) :] if order > 1 else []
    return x


# --- the samplers, one per method and space (their table: dfm.diffusion.samplers.SAMPLER_TABLE) ---------------


def _on_edm(method):
    """method(grid, x, ...) as an EDM sampler (denoiser, x, sigmas, *, generator=None, callback=None, **options)."""

    @functools.wraps(method)  # inspect.signature follows it: the options are the method's keywords
    def sample(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generator: Generator = None,
               callback: Callback = None, **options) -> Tensor:
        return method(_edm_grid(denoiser, x, sigmas, callback), x, generator=generator, **options)

    sample.__name__ = sample.__qualname__ = f"sample_{method.__name__}"
    return sample


def _on_flow(method):
    """method(grid, x, ...) as a flow sampler (velocity, x, ts, *, generator=None, callback=None, **options)."""

    @functools.wraps(method)
    def sample(velocity: Velocity, x: Tensor, ts: Tensor, *, generator: Generator = None,
               callback: Callback = None, **options) -> Tensor:
        return method(_flow_grid(velocity, x, ts, callback), x, generator=generator, **options)

    sample.__name__ = sample.__qualname__ = f"sample_flow_{method.__name__}"
    return sample


sample_dpmpp_2m, sample_flow_dpmpp_2m = _on_edm(dpmpp_2m), _on_flow(dpmpp_2m)
sample_dpmpp_3m, sample_flow_dpmpp_3m = _on_edm(dpmpp_3m), _on_flow(dpmpp_3m)
sample_dpmpp_2m_sde, sample_flow_dpmpp_2m_sde = _on_edm(dpmpp_2m_sde), _on_flow(dpmpp_2m_sde)
sample_dpmpp_3m_sde, sample_flow_dpmpp_3m_sde = _on_edm(dpmpp_3m_sde), _on_flow(dpmpp_3m_sde)
sample_unipc, sample_flow_unipc = _on_edm(unipc), _on_flow(unipc)
