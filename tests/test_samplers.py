"""Samplers against analytic solutions: convergence order, cross-path agreement, noise handling, adapters, contract.

Float64 throughout unless a test is about dtypes, so that the errors measured are the methods', not rounding's.
"""

import ast
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate

from dfm.diffusion import paths
from dfm.diffusion.gmm import GaussianMixture
from dfm.diffusion.samplers import (
    FLOW_SAMPLERS,
    SAMPLERS,
    SamplingError,
    lms_coefficient,
    resolve_sampler,
    sample,
    sample_flow,
    sampler_names,
)
from dfm.diffusion.sampling import guided_sample
from dfm.diffusion.schedules import sampling_grid
from dfm.errors import UserError

F64 = torch.float64
GAUSS = GaussianMixture(torch.tensor([[0.5, -1.0, 2.0]], dtype=F64), 0.7)  # one Gaussian: exact PF-ODE solution
MIX = GaussianMixture.random((3,), components=3, std=0.4, seed=1)
MULTISTEP = {m for m, fn in SAMPLERS.items() if fn.__module__ == "dfm.diffusion.multistep"}  # in both tables


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention (10x slower softmax on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def normal(n=4, seed=0, shape=(3,)):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def karras(n, sigma_min, sigma_max=80.0, rho=7.0, zero=False):
    """n noise levels of EDM eq. 5 (then 0 if `zero`), float64."""
    ramp = torch.linspace(0, 1, n, dtype=F64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=F64)]) if zero else s


def flow_velocity(gmm):
    """The exact velocity E[eps - x0 | x_t] of a Gaussian mixture on x_t = (1 - s) x0 + s eps, finite on [0, 1].

    Per component x_t ~ N((1 - s) mu_k, V_k I) with V_k = (1 - s)^2 S_k^2 + s^2, and
    E[eps - x0 | x_t, k] = (s - (1 - s) S_k^2) / V_k * (x_t - (1 - s) mu_k) - mu_k.
    """

    def velocity(x, s):
        xf, s = x.double().reshape(x.shape[0], -1), s.double()[:, None]  # [B, D], [B, 1]
        var = (1 - s) ** 2 * gmm.stds[None] ** 2 + s**2  # [B, K]
        centred = xf[:, None] - (1 - s)[:, :, None] * gmm.means[None]  # [B, K, D]
        logp = torch.log(gmm.weights)[None] - 0.5 * (centred**2).sum(-1) / var - 0.5 * gmm.dim * torch.log(var)
        r = torch.softmax(logp, dim=1)  # [B, K]
        v_k = ((s - (1 - s) * gmm.stds[None] ** 2) / var)[:, :, None] * centred - gmm.means[None]  # [B, K, D]
        return (r[:, :, None] * v_k).sum(1).reshape(x.shape).to(x.dtype)

    return velocity


def flow_exact(x, s_from, s_to):
    """GAUSS's exact flow map in flow coordinates (x_flow = (1 - s) x_edm); s_from = 1 is the limit sigma -> inf."""
    mu, std = GAUSS.means[0], float(GAUSS.stds[0])
    if s_from == 1:  # x_edm - mu ~ sigma * x as sigma -> inf
        return (1 - s_to) * mu + math.sqrt(std**2 * (1 - s_to) ** 2 + s_to**2) * x
    sig = lambda s: s / (1 - s)  # noqa: E731
    return (1 - s_to) * GAUSS.exact_solution(x / (1 - s_from), sig(s_from), sig(s_to))


def err(a, b):
    return (a - b).abs().max().item()


# --- convergence --------------------------------------------------------------------------------------------------

# (method, options, order p): the error ratio between n and 2n steps should be about 2^p
EDM_ORDERS = [
    ("euler", {}, 1),
    ("ddim", {}, 1),
    ("euler_ancestral", {"eta": 0.0}, 1),
    ("heun", {}, 2),
    ("dpm_2", {}, 2),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, 2),
    ("lms", {}, 4),
    ("lms", {"order": 2}, 2),
    ("rk4", {}, 4),
]
MULTISTEP_ORDERS = [  # multistep.py: UniPC-2 is third order once its last step is not lowered to first order;
    ("dpmpp_2m", {}, 2),  # 3M with DPM-Solver's D2 weight converges irregularly (order 2, not checked here), and
    ("dpmpp_3m", {"d2": "taylor"}, 2),  # with d2="taylor" measures ratios 5.3-7.5: checked as at least second order
    ("dpmpp_2m_sde", {"eta": 0.0}, 2),
    ("unipc", {"lower_order_final": False}, 3),
]
EDM_ORDERS += MULTISTEP_ORDERS


def ids(case):
    return case[0] + "".join(f"-{k}={v}" for k, v in case[1].items())


@pytest.mark.parametrize("method,options,order", EDM_ORDERS, ids=[ids(c) for c in EDM_ORDERS])
def test_edm_convergence_order(method, options, order):
    """Karras grids 80 -> 0.05 of n and 2n steps against GaussianMixture.exact_solution."""
    x = normal() * 80
    exact = GAUSS.exact_solution(x, 80.0, 0.05)
    n = {"lms": 64}.get(method, 64 if method in MULTISTEP else 16)  # past warm-up / lower-order-final steps
    e1, e2 = (err(sample(GAUSS.denoiser, x, karras(m + 1, 0.05), method, **options), exact) for m in (n, 2 * n))
    ratio = e1 / e2  # at least 2^order (pre-asymptotic ratios of higher-order methods may exceed it)
    high = 1.3 * 2**order if order == 1 else math.inf
    assert 0.8 * 2**order < ratio < high, f"{method}: errors {e1:.2e} -> {e2:.2e}, ratio {ratio:.2f}"


DETERMINISTIC_EDM = [c for c in EDM_ORDERS if not c[1] and c[0] != "ddim"]
DETERMINISTIC_EDM += [("dpmpp_3m", {}, 2)]


@pytest.mark.parametrize("method,options,order", DETERMINISTIC_EDM, ids=[c[0] for c in DETERMINISTIC_EDM])
def test_edm_reaches_exact_solution_at_zero(method, options, order):
    """Full grids ending in 0 (the last step is first order) land on the exact x(0) as steps grow."""
    x = normal() * 80
    exact = GAUSS.exact_solution(x, 80.0, 0.0)
    errors = [err(sample(GAUSS.denoiser, x, karras(n, 0.002, zero=True), method, **options), exact) for n in (16, 64)]
    assert errors[1] < errors[0] / 3.5
    assert errors[1] < {1: 0.1, 2: 1e-2}.get(order, 2e-3)


FLOW_ORDERS = [("euler", {}, 1), ("heun", {}, 2), ("midpoint", {}, 2), ("rk4", {}, 4)]
FLOW_ORDERS += [c for c in MULTISTEP_ORDERS if "sde" not in c[0]]


@pytest.mark.parametrize("method,options,order", FLOW_ORDERS, ids=[ids(c) for c in FLOW_ORDERS])
def test_flow_convergence_order(method, options, order):
    """Uniform grids in s from 0.9 to 0.1 of n and 2n steps against the exact flow map."""
    x = (1 - 0.9) * GAUSS.means[0] + 0.9 * normal()
    exact = flow_exact(x, 0.9, 0.1)
    n = 64 if method in MULTISTEP else 16
    v = flow_velocity(GAUSS)
    grids = [torch.linspace(0.9, 0.1, m + 1, dtype=F64) for m in (n, 2 * n)]
    e1, e2 = (err(sample_flow(v, x, ts, method, **options), exact) for ts in grids)
    ratio = e1 / e2  # at least 2^order (the explicit midpoint rule happens to be third order on one Gaussian)
    high = 1.3 * 2**order if order == 1 else math.inf
    assert 0.8 * 2**order < ratio < high, f"{method}: errors {e1:.2e} -> {e2:.2e}, ratio {ratio:.2f}"


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("method", sorted(m for m in FLOW_SAMPLERS if "sde" not in m))
def test_flow_from_pure_noise(method, shift):
    """From s = 1 (pure noise) to 0 on shifted grids (SD3/Wan's shift): close to the exact end point mu + S x."""
    x = normal()
    ts = torch.linspace(1, 0, 33, dtype=F64)
    ts = shift * ts / (1 + (shift - 1) * ts)
    out = sample_flow(flow_velocity(GAUSS), x, ts, method)
    tol = {"euler": 0.2, "heun": 0.03, "midpoint": 1e-4, "rk4": 5e-6, "dopri5": 1e-3}.get(method, 0.03)  # 2x measured
    assert err(out, flow_exact(x, 1.0, 0.0)) < tol


def test_dopri5_tolerance_and_nfe():
    """Tighter tolerances cost more evaluations (the callback's 'nfe') and give smaller errors."""
    x, ts = normal(), torch.tensor([1.0, 0.0], dtype=F64)
    results = []
    for rtol in (1e-3, 1e-6):
        nfe = []
        out = sample_flow(flow_velocity(GAUSS), x, ts, "dopri5", rtol=rtol, atol=rtol, callback=nfe.append)
        results.append((err(out, flow_exact(x, 1.0, 0.0)), nfe[-1]["nfe"]))
    (e_loose, n_loose), (e_tight, n_tight) = results  # measured: 1.1e-2 with 14, 2.0e-6 with 50
    assert e_loose < 3e-2 and e_tight < 1e-5
    assert 6 <= n_loose < n_tight < 200


# --- agreement across paths and methods ---------------------------------------------------------------------------


def test_first_order_methods_agree_across_paths():
    """EDM Euler == DDIM(eta=0) == flow Euler on the matching grid sigma = s / (1 - s), x_edm = x_flow / (1 - s)."""
    ts = torch.linspace(0.999, 0.0, 13, dtype=F64) ** 1.5
    sigmas = ts / (1 - ts)
    x_flow = normal()
    x_edm = x_flow / (1 - ts[0])
    edm_euler = sample(MIX.denoiser, x_edm, sigmas, "euler")
    ddim = sample(MIX.denoiser, x_edm, sigmas, "ddim", eta=0.0)
    flow_euler = sample_flow(flow_velocity(MIX), x_flow, ts, "euler")
    torch.testing.assert_close(ddim, edm_euler, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flow_euler, edm_euler, rtol=1e-10, atol=1e-10)  # at s = 0 the coordinates coincide


def test_ddpm_is_ddim_eta_one_is_euler_ancestral():
    """DDIM's eta = 1 is DDPM's posterior (Song et al. 2021, Sec. 4.1), which is Euler-ancestral's step."""
    sigmas = karras(10, 0.01, zero=True)
    x = normal() * 80
    out = [sample(MIX.denoiser, x, sigmas, m, generator=torch.Generator().manual_seed(1), **o)
           for m, o in [("ddpm", {}), ("ddim", {"eta": 1.0}), ("euler_ancestral", {})]]
    torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[2], out[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["euler", "heun", "dpm_2", "lms", "dpmpp_2s_ancestral"] + sorted(MULTISTEP))
def test_velocity_model_under_edm_sampler(method):
    """A flow velocity model via paths.denoiser_from_velocity drives EDM samplers exactly like its own denoiser."""
    sigmas = karras(12, 0.002, zero=True)
    x = normal() * 80
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    via_velocity = sample(paths.denoiser_from_velocity(flow_velocity(MIX)), x, sigmas, method, generator=g())
    direct = sample(MIX.denoiser, x, sigmas, method, generator=g())
    torch.testing.assert_close(via_velocity, direct, rtol=1e-9, atol=1e-9)


def test_velocity_model_under_edm_sampler_reaches_exact_solution():
    x = normal() * 80
    out = sample(paths.denoiser_from_velocity(flow_velocity(GAUSS)), x, karras(40, 0.002, zero=True), "heun")
    assert err(out, GAUSS.exact_solution(x, 80.0, 0.0)) < 3e-2  # measured 1.4e-2: Heun's own error at 40 steps


@pytest.mark.parametrize("method", ["euler", "heun", "midpoint"] + sorted(m for m in MULTISTEP if "sde" not in m))
def test_edm_denoiser_under_flow_sampler(method):
    """An EDM denoiser via paths.velocity_from_denoiser drives flow samplers (s = 1 costs an O(1/sigma_max) term)."""
    ts = torch.linspace(1, 0, 25, dtype=F64)
    x = normal()
    via_denoiser = sample_flow(paths.velocity_from_denoiser(MIX.denoiser), x, ts, method)
    direct = sample_flow(flow_velocity(MIX), x, ts, method)
    assert err(via_denoiser, direct) < 1e-3
    if method == "heun":  # measured 2.4e-3: Heun's own error at 24 steps
        out = sample_flow(paths.velocity_from_denoiser(GAUSS.denoiser), x, ts, method)
        assert err(out, flow_exact(x, 1.0, 0.0)) < 5e-3


# --- noise ----------------------------------------------------------------------------------------------------------

STOCHASTIC = [
    ("euler_ancestral", {}),
    ("euler_ancestral", {"eta": 0.5, "s_noise": 1.1}),
    ("dpmpp_2s_ancestral", {}),
    ("ddim", {"eta": 0.7}),
    ("ddpm", {}),
    ("euler", {"s_churn": 10.0}),
    ("heun", {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 10.0}),
    ("dpm_2", {"s_churn": 10.0}),
] + [(m, {}) for m in sorted(MULTISTEP) if "sde" in m]


@pytest.mark.parametrize("method,options", STOCHASTIC, ids=[ids(c) for c in STOCHASTIC])
def test_stochastic_samplers_reproducible_and_batch_independent(method, options):
    sigmas = karras(8, 0.01, zero=True)
    x = normal(3) * 80
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = sample(MIX.denoiser, x, sigmas, method, generator=gens([10, 11, 12]), **options)
    again = sample(MIX.denoiser, x, sigmas, method, generator=gens([10, 11, 12]), **options)
    torch.testing.assert_close(again, batch, rtol=0, atol=0)
    for b in range(3):  # sample b alone, with its own generator, is the same sample
        alone = sample(MIX.denoiser, x[b : b + 1], sigmas, method, generator=gens([10 + b]), **options)
        torch.testing.assert_close(alone, batch[b : b + 1], rtol=1e-12, atol=1e-12)
    other = sample(MIX.denoiser, x, sigmas, method, generator=gens([20, 21, 22]), **options)
    assert err(other, batch) > 1e-2
    with pytest.raises(ValueError, match="one per sample"):
        sample(MIX.denoiser, x, sigmas, method, generator=gens([1, 2]), **options)


@pytest.mark.parametrize("method,steps", [("euler_ancestral", 200), ("dpmpp_2s_ancestral", 30)])
def test_ancestral_samplers_sample_the_data(method, steps):
    """Mean and std of 2000 samples of GAUSS (std 0.7), up to sampling error (~0.015) and the method's bias.

    Euler-ancestral (= DDPM) is first order: its std measures 0.59 / 0.66 / 0.69 at 30 / 100 / 300 steps.
    """
    x = normal(2000, seed=3) * 80
    out = sample(GAUSS.denoiser, x, karras(steps, 0.002, zero=True), method, generator=torch.Generator().manual_seed(4))
    assert err(out.mean(0), GAUSS.means[0]) < 0.05
    assert err(out.std(0), torch.full((3,), 0.7, dtype=F64)) < 0.05


def test_deterministic_samplers_draw_no_noise():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    x = normal() * 80
    for method in ("euler", "heun", "dpm_2", "lms", "rk4", "ddim", "euler_ancestral", "dpmpp_2s_ancestral"):
        eta = {"eta": 0.0} if method in ("ddim", "euler_ancestral", "dpmpp_2s_ancestral") else {}
        sample(MIX.denoiser, x, karras(4, 0.1, zero=True), method, generator=g, **eta)
    assert torch.equal(g.get_state(), state)


# --- the algorithms' structure --------------------------------------------------------------------------------------


def spy(fn, calls):
    def wrapped(x, t):
        calls.append((x.clone(), t.clone()))
        return fn(x, t)

    return wrapped


def test_heun_corrects_at_the_euler_point():
    """EDM Algorithm 1: the second evaluation is at (x_next, sigma_next), not at (x_hat, sigma_hat)."""
    sigmas = torch.tensor([10.0, 2.0, 0.5, 0.0], dtype=F64)
    calls = []
    x = normal() * 10
    sample(spy(MIX.denoiser, calls), x, sigmas, "heun")
    assert [c[1][0].item() for c in calls] == [10.0, 2.0, 2.0, 0.5, 0.5]  # Euler, no evaluation at sigma = 0
    euler_point = x + (2.0 - 10.0) * (x - MIX.denoiser(x, sigmas[:1].expand(4))) / 10.0
    torch.testing.assert_close(calls[1][0], euler_point)
    ts = torch.tensor([1.0, 0.6, 0.2, 0.0], dtype=F64)
    calls = []
    sample_flow(spy(flow_velocity(MIX), calls), normal(), ts, "heun")
    assert [round(c[1][0].item(), 6) for c in calls] == [1.0, 0.6, 0.6, 0.2, 0.2]


def test_churn_follows_edm_algorithm_2():
    sigmas = karras(10, 0.002, zero=True)
    seen = []
    cb = lambda d: seen.append((d["sigma"], d["sigma_hat"]))  # noqa: E731
    sample(MIX.denoiser, normal() * 80, sigmas, "heun", s_churn=4.0, s_tmin=0.05, s_tmax=5.0,
           generator=torch.Generator().manual_seed(0), callback=cb)
    gamma = min(4.0 / 10, math.sqrt(2) - 1)
    for sigma, sigma_hat in seen:
        expected = sigma * (1 + gamma) if 0.05 <= sigma <= 5.0 else sigma
        assert sigma_hat == pytest.approx(expected, rel=1e-12)
    assert any(s != h for s, h in seen) and any(s == h for s, h in seen)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_coefficients_integrate_the_lagrange_basis(order):
    sig = [14.0, 7.0, 3.1, 1.2, 0.4, 0.0]
    i = 4
    coeffs = [lms_coefficient(sig, i, j, order) for j in range(order)]
    assert sum(coeffs) == pytest.approx(sig[i + 1] - sig[i], rel=1e-12)  # the basis sums to 1

    def basis(tau, j):
        return math.prod((tau - sig[i - k]) / (sig[i - j] - sig[i - k]) for k in range(order) if k != j)

    quad = [integrate.quad(basis, sig[i], sig[i + 1], args=(j,), epsabs=1e-13)[0] for j in range(order)]
    np.testing.assert_allclose(coeffs, quad, rtol=1e-10)


def test_callbacks():
    sigmas = karras(5, 0.1, zero=True)
    seen = []
    sample(MIX.denoiser, normal() * 80, sigmas, "dpm_2", callback=seen.append)
    assert [d["i"] for d in seen] == [0, 1, 2, 3, 4]
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert seen[0]["sigma"] == pytest.approx(80.0)
    ts = torch.linspace(1, 0, 6, dtype=F64)
    nfe = {}
    for method in ("euler", "heun", "midpoint", "rk4"):
        seen = []
        sample_flow(flow_velocity(MIX), normal(), ts, method, callback=seen.append)
        assert set(seen[0]) == {"x", "i", "t", "t_next", "denoised", "nfe"} and seen[0]["t"] == 1.0
        nfe[method] = [d["nfe"] for d in seen]
    for method in ("unipc", "dpmpp_2m"):  # the multistep flow solvers report the same keys
        seen = []
        sample_flow(flow_velocity(MIX), normal(), ts, method, callback=seen.append)
        assert set(seen[0]) == {"x", "i", "t", "t_next", "denoised", "nfe"} and seen[-1]["t_next"] == 0.0
        nfe[method] = [d["nfe"] for d in seen]
    assert nfe == {"euler": [1, 2, 3, 4, 5], "heun": [2, 4, 6, 8, 9], "midpoint": [2, 4, 6, 8, 10],
                   "rk4": [4, 8, 12, 16, 20], "unipc": [1, 2, 3, 4, 5], "dpmpp_2m": [1, 2, 3, 4, 5]}


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_bf16_state_and_fp32_time(method):
    """The model sees x in the caller's dtype and sigma in fp32; the result comes back in the caller's dtype."""
    calls = []
    x = (normal() * 80).to(torch.bfloat16)
    out = sample(spy(MIX.denoiser, calls), x, karras(5, 0.01, zero=True).float(), method,
                 generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert all(c[0].dtype == torch.bfloat16 and c[1].dtype == torch.float32 for c in calls)
    ref = sample(MIX.denoiser, x.double(), karras(5, 0.01, zero=True), method,
                 generator=torch.Generator().manual_seed(0))
    if "sde" not in method and method not in ("euler_ancestral", "dpmpp_2s_ancestral", "ddpm"):
        assert err(out.double(), ref) < 0.1  # bf16 inputs, fp32 arithmetic


@pytest.mark.parametrize("method", sorted(FLOW_SAMPLERS))
def test_flow_bf16_state_and_fp32_time(method):
    calls = []
    x = normal().to(torch.bfloat16)
    out = sample_flow(spy(flow_velocity(MIX), calls), x, torch.linspace(1, 0, 5), method)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert all(c[0].dtype == torch.bfloat16 and c[1].dtype == torch.float32 for c in calls)
    assert calls[0][1][0].item() == 1.0


# --- errors ---------------------------------------------------------------------------------------------------------


def test_unknown_method_or_option():
    x, sigmas = normal(), karras(3, 0.1, zero=True)
    with pytest.raises(ValueError, match="unknown sampler 'nope'; use one of: .*euler.*heun") as e:
        sample(MIX.denoiser, x, sigmas, "nope")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="'euler' has no option 'eta'; its options are: s_churn, s_tmin"):
        sample(MIX.denoiser, x, sigmas, "euler", eta=1.0)
    with pytest.raises(ValueError, match="'ddpm' has no option 'eta'; it takes no options"):
        sample(MIX.denoiser, x, sigmas, "ddpm", eta=1.0)
    with pytest.raises(ValueError, match="unknown flow sampler 'dpm_2'; use one of: .*dopri5"):
        sample_flow(flow_velocity(MIX), x, torch.linspace(1, 0, 3), "dpm_2")
    with pytest.raises(ValueError, match="'dopri5' has no option 'tol'; its options are: rtol, atol"):
        sample_flow(flow_velocity(MIX), x, torch.linspace(1, 0, 3), "dopri5", tol=1e-3)


def test_bad_grids():
    x = normal()
    with pytest.raises(ValueError, match="descending"):
        sample(MIX.denoiser, x, torch.tensor([1.0, 2.0, 0.0]), "euler")
    with pytest.raises(ValueError, match="1-D"):
        sample(MIX.denoiser, x, torch.tensor([[1.0, 0.0]]), "euler")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sample_flow(flow_velocity(MIX), x, torch.tensor([1.5, 0.0]), "euler")


# --- the sampler table and resolve_sampler ------------------------------------------------------------------------


def test_one_literal_table_of_every_sampler():
    from dfm.diffusion.samplers import SAMPLER_TABLE

    assert SAMPLER_TABLE["edm"] is SAMPLERS and SAMPLER_TABLE["flow"] is FLOW_SAMPLERS and set(SAMPLER_TABLE) == {"edm", "flow"}
    multistep = {"dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc"}
    assert set(SAMPLERS) == {"euler", "euler_ancestral", "heun", "dpm_2", "lms", "dpmpp_2s_ancestral", "ddim", "ddpm",
                             "rk4"} | multistep
    assert set(FLOW_SAMPLERS) == {"euler", "heun", "midpoint", "rk4", "dopri5"} | multistep
    assert MULTISTEP == multistep
    # written as one dict literal, and no sampler module imports samplers.py back (nothing adds to the table)
    root = Path(__file__).resolve().parents[1] / "dfm" / "diffusion"
    tree = ast.parse((root / "samplers.py").read_text())
    [table] = [n for n in tree.body if isinstance(n, ast.AnnAssign) and n.target.id == "SAMPLER_TABLE"]
    assert isinstance(table.value, ast.Dict) and all(isinstance(v, ast.Dict) for v in table.value.values)
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "update"]
    for name in ("flow_samplers.py", "multistep.py"):
        for node in ast.walk(ast.parse((root / name).read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
                assert not {"samplers", "dfm.diffusion.samplers"} & set(names), (name, node.lineno)


def test_importing_the_other_modules_leaves_the_table_as_it_is():
    code = ("import dfm.diffusion.samplers as s; before = {k: dict(v) for k, v in s.SAMPLER_TABLE.items()}; "
            "import dfm.diffusion.sampling, dfm.diffusion.schedules, dfm.diffusion.guidance, dfm.diffusion.edm, "
            "dfm.diffusion.flow, dfm.diffusion.multistep, dfm.diffusion.flow_samplers; "
            "assert {k: dict(v) for k, v in s.SAMPLER_TABLE.items()} == before; print(sum(map(len, before.values())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["24"]


def test_resolve_sampler_once():
    s = resolve_sampler("flow:unipc", "flow", {"order": 3})
    assert (s.space, s.method, s.options, s.fn, s.name) == ("flow", "unipc", {"order": 3}, FLOW_SAMPLERS["unipc"],
                                                           "flow:unipc")
    assert resolve_sampler("auto", "flow").name == "flow:euler" and resolve_sampler("auto", "edm").name == "edm:heun"
    assert resolve_sampler("euler", "flow").name == "flow:euler" and resolve_sampler("euler", "edm").name == "edm:euler"
    assert resolve_sampler("lms", "flow").name == "edm:lms"  # only in the EDM space
    assert resolve_sampler("midpoint", "edm").name == "flow:midpoint"
    assert resolve_sampler(s.name, "edm") == resolve_sampler("flow:unipc", "flow")  # the name reads back
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.method = "euler"
    assert sampler_names("edm")[0].startswith("edm:") and len(sampler_names("flow")) == 24


def test_resolve_sampler_errors_are_one_line():
    with pytest.raises(SamplingError, match=r"unknown sampler 'flow:lms'; use one of: flow:dopri5, .*edm:unipc \(or a "
                                            r"bare name, looked up in the flow space first\)") as e:
        resolve_sampler("flow:lms", "flow")
    assert "\n" not in str(e.value) and isinstance(e.value, UserError) and isinstance(e.value, ValueError)
    with pytest.raises(SamplingError, match="^edm sampler 'heun' has no option 'eta'; its options are: s_churn, s_tmin, "
                                            "s_tmax, s_noise$") as e:
        resolve_sampler("heun", "edm", {"eta": 1.0})
    assert "\n" not in str(e.value)
    with pytest.raises(SamplingError, match="^flow sampler 'euler' has no option 'order'; it takes no options$"):
        resolve_sampler("auto", "flow", {"order": 2})
    with pytest.raises(SamplingError, match="unknown paradigm 've'; use one of: flow, edm"):
        resolve_sampler("euler", "ve")


# --- guided_sample: CFG, guidance rescale and the guidance interval ---------------------------------------------------

GUIDE_A, GUIDE_B = GaussianMixture.random((2, 3), seed=3), GaussianMixture.random((2, 3), seed=4)


def labelled(x, sigma, label):
    """The exact denoiser of mixture A for label 1 and of mixture B for label 0 (a conditional 'model')."""
    return torch.where(paths.append_dims(label == 1, x.ndim), GUIDE_A.denoiser(x, sigma), GUIDE_B.denoiser(x, sigma))


@pytest.mark.parametrize("paradigm,grid,sampler", [
    ("edm", ("karras", dict(sigma_min=0.002, sigma_max=80.0)), "heun"),
    ("flow", ("flow_shifted", dict(shift=3.0)), "euler"),
    ("flow", ("flow_shifted", dict(shift=3.0)), "edm:dpmpp_2m"),
])
def test_guided_sample_rescale_and_interval(paradigm, grid, sampler):
    noise = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(0))
    cond, uncond = {"label": torch.ones(2)}, {"label": torch.zeros(2)}
    smp, g = resolve_sampler(sampler, paradigm), sampling_grid(grid[0], 8, **grid[1])
    run = lambda **kw: guided_sample(labelled, noise, g, smp, cond=cond, uncond=uncond, guidance_scale=4.0, **kw)  # noqa: E731
    plain, nfe = run()
    assert nfe == {"heun": 15, "euler": 8, "edm:dpmpp_2m": 8}[sampler] and torch.isfinite(plain).all()
    # the defaults are plain CFG, bit for bit
    for kw in ({"rescale": 0.0}, {"interval": (0.0, math.inf)}, {"interval": None, "rescale_space": "eps"}):
        assert torch.equal(run(**kw)[0], plain), kw
    for kw in ({"rescale": 0.7}, {"rescale": 0.7, "rescale_space": "flow"}, {"interval": (0.3, 5.0)}):
        assert (run(**kw)[0] - plain).abs().max() > 1e-3, kw
    # an interval that no step falls into is the conditional model alone (w = 1), one forward of batch 2 per NFE
    calls = []
    spy_model = lambda x, sigma, label: calls.append(x.shape[0]) or labelled(x, sigma, label)  # noqa: E731
    outside, _ = guided_sample(spy_model, noise, g, smp, cond=cond, uncond=uncond, guidance_scale=4.0, interval=(1e7, 1e8))
    alone, _ = guided_sample(labelled, noise, g, smp, cond=cond, guidance_scale=1.0)
    assert torch.equal(outside, alone) and set(calls) == {2}
