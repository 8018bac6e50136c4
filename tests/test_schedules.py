import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from dfm.diffusion import schedules as S
from dfm.diffusion.paths import sigma_to_flow_t
from dfm.diffusion.samplers import SamplingError
from dfm.errors import UserError

# diffusers' defaults, plus Stable Diffusion's scaled_linear betas
BETAS = {
    "linear": dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear"),
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}
DISCRETE = [
    (n, spacing, beta, karras)
    for n in (10, 25)
    for spacing in S.SPACINGS
    for beta in BETAS
    for karras in (False, True)
]


def assert_grid(sigmas, n):
    """The grid contract: [n + 1], strictly descending, ending in exactly 0."""
    assert sigmas.shape == (n + 1,)
    assert sigmas[-1].item() == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all()


# --- continuous EDM grids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["karras", "exponential"])
@pytest.mark.parametrize("n", [2, 10, 25])  # n = 1: diffusers' exponential gives sigma_min, k-diffusion's sigma_max
def test_edm_grids_match_diffusers_edm_euler(name, n):
    ref = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_schedule=name)
    ref.set_timesteps(n)
    sigmas = S.sampling_grid(name, n, sigma_min=0.002, sigma_max=80.0).sigmas()
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fn", [S.karras, S.exponential, S.polyexponential])
def test_edm_grid_endpoints_and_order(fn):
    sigmas = fn(12, 0.03, 14.6, dtype=torch.float64)
    assert_grid(sigmas, 12)
    assert sigmas.dtype == torch.float64
    assert sigmas[0].item() == pytest.approx(14.6, rel=1e-12)
    assert sigmas[-2].item() == pytest.approx(0.03, rel=1e-12)


def test_karras_equally_spaced_in_sigma_to_one_over_rho():
    rho = 5.0
    steps = S.karras(9, 0.1, 50.0, rho, dtype=torch.float64)[:-1] ** (1 / rho)  # EDM eq. 5: linear in sigma^(1/rho)
    torch.testing.assert_close(steps.diff(), steps.diff()[:1].expand(8))


def test_polyexponential_rho_one_is_exponential_and_rho_bends_it():
    torch.testing.assert_close(S.polyexponential(10, 0.01, 10.0), S.exponential(10, 0.01, 10.0))
    log_sigmas = S.polyexponential(10, 0.01, 10.0, rho=2.0, dtype=torch.float64)[:-1].log()
    ramp = torch.linspace(1, 0, 10, dtype=torch.float64) ** 2
    torch.testing.assert_close(log_sigmas, math.log(0.01) + ramp * math.log(1000.0))


def test_vp_grid_is_edm_table_1():
    sigmas = S.vp(5, dtype=torch.float64)
    assert_grid(sigmas, 5)
    t = torch.tensor(1e-3, dtype=torch.float64)
    assert sigmas[-2].item() == pytest.approx(math.sqrt(math.exp(19.9 * t**2 / 2 + 0.1 * t) - 1), rel=1e-12)


# --- discrete DDPM schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", list(BETAS))
def test_ddpm_table_matches_diffusers(beta):
    ref = EulerDiscreteScheduler(**BETAS[beta])
    torch.testing.assert_close(S.ddpm_betas(**BETAS[beta]), ref.betas, rtol=1e-6, atol=0)
    sigmas_train = S.ddpm_sigmas(**BETAS[beta])
    torch.testing.assert_close(sigmas_train, ((1 - ref.alphas_cumprod) / ref.alphas_cumprod).sqrt(), rtol=1e-6, atol=0)
    assert (sigmas_train.diff() > 0).all()


@pytest.mark.parametrize("n,spacing,beta,karras", DISCRETE)
def test_discrete_matches_euler_discrete(n, spacing, beta, karras):
    offset = 1 if spacing == "leading" else 0
    ref = EulerDiscreteScheduler(**BETAS[beta], timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras)
    ref.set_timesteps(n)
    sigmas, timesteps = S.discrete_with_timesteps(
        n, **BETAS[beta], spacing=spacing, steps_offset=offset, karras_sigmas=karras, convention="euler"
    )
    assert_grid(sigmas, n)
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=1e-6, atol=0)
    torch.testing.assert_close(timesteps, ref.timesteps, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("n,spacing,beta,karras", DISCRETE)
def test_discrete_matches_dpmsolver_multistep(n, spacing, beta, karras):
    offset = 1 if spacing == "leading" else 0
    ref = DPMSolverMultistepScheduler(
        **BETAS[beta], timestep_spacing=spacing, steps_offset=offset, use_karras_sigmas=karras
    )
    ref.set_timesteps(n)
    sigmas, timesteps = S.discrete_with_timesteps(
        n, **BETAS[beta], spacing=spacing, steps_offset=offset, karras_sigmas=karras, convention="dpmsolver"
    )
    assert_grid(sigmas, n)
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=1e-6, atol=0)
    assert torch.equal(timesteps, ref.timesteps)


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("spacing", S.SPACINGS)
@pytest.mark.parametrize("alpha_to_one", [True, False])
def test_discrete_matches_ddim(n, spacing, alpha_to_one):
    offset = 1 if spacing == "leading" else 0
    ref = DDIMScheduler(**BETAS["scaled_linear"], timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_to_one)
    ref.set_timesteps(n)
    sigmas, timesteps = S.discrete_with_timesteps(
        n, **BETAS["scaled_linear"], spacing=spacing, steps_offset=offset, convention="ddim",
        final="zero" if alpha_to_one else "sigma_min",
    )
    assert torch.equal(timesteps, ref.timesteps)
    # DDIM steps from abar[t] to abar[t_prev], and to final_alpha_cumprod after the last timestep
    abar = torch.cat([ref.alphas_cumprod[ref.timesteps], ref.final_alpha_cumprod.reshape(1)])
    torch.testing.assert_close(sigmas, ((1 - abar) / abar).sqrt(), rtol=1e-6, atol=0)


def test_spaced_timesteps_table_2_of_lin_et_al():
    # the n = 10, T = 1000 rows of Lin et al. 2024, Table 2
    assert S.spaced_timesteps(10, spacing="leading", steps_offset=1).tolist() == list(range(901, 0, -100))
    assert S.spaced_timesteps(10, spacing="trailing").tolist() == list(range(999, 0, -100))
    assert S.spaced_timesteps(10, spacing="linspace", convention="ddim").tolist() == [
        999, 888, 777, 666, 555, 444, 333, 222, 111, 0
    ]
    with pytest.raises(ValueError, match="leading"):
        S.spaced_timesteps(10, spacing="uniform")


def test_t_to_sigma_interpolation_and_sigma_to_t_round_trip():
    table = S.ddpm_sigmas(**BETAS["scaled_linear"], dtype=torch.float64)
    integers = torch.tensor([0.0, 1.0, 500.0, 999.0], dtype=torch.float64)
    for interpolation in ("log", "linear"):  # exact at integer timesteps
        torch.testing.assert_close(S.t_to_sigma(integers, table, interpolation), table[integers.long()])
    half = torch.tensor([10.5], dtype=torch.float64)
    assert S.t_to_sigma(half, table, "log").item() == pytest.approx(math.sqrt(table[10] * table[11]), rel=1e-12)
    assert S.t_to_sigma(half, table, "linear").item() == pytest.approx((table[10] + table[11]).item() / 2, rel=1e-12)
    t = torch.tensor([0.0, 0.25, 17.3, 640.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(S.sigma_to_t(S.t_to_sigma(t, table, "log"), table), t)
    # outside the table: clamped to its ends, as k-diffusion / diffusers
    assert S.sigma_to_t(torch.tensor([0.0, 1e4]), table).tolist() == [0.0, 999.0]


def test_discrete_rejects_ddim_karras_and_bad_names():
    with pytest.raises(ValueError, match="Karras"):
        S.discrete(10, convention="ddim", karras_sigmas=True)
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        S.ddpm_betas(beta_schedule="cosine")


# --- flow grids -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_flow_static_shift_matches_flow_match_euler(n, shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    s = S.flow_match_euler(n, shift=shift)
    assert_grid(s, n)
    torch.testing.assert_close(s, ref.sigmas, rtol=1e-6, atol=0)
    torch.testing.assert_close(1000 * s[:-1], ref.timesteps, rtol=1e-6, atol=0)
    # pipelines that pass sigmas = linspace(1, 1/n, n) get the plain uniform grid, shifted
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))
    torch.testing.assert_close(S.flow_shifted(n, shift=shift), ref.sigmas, rtol=1e-6, atol=0)


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_flow_dynamic_shift_matches_flow_match_euler(n, seq_len):
    mu = S.dynamic_shift_mu(seq_len)
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    ref.set_timesteps(n, mu=mu)
    torch.testing.assert_close(S.flow_match_euler(n, mu=mu), ref.sigmas, rtol=1e-6, atol=0)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)  # what the Flux pipeline does
    torch.testing.assert_close(S.flow_shifted(n, mu=mu), ref.sigmas, rtol=1e-6, atol=0)


def test_dynamic_shift_mu_is_the_line_through_base_and_max():
    assert S.dynamic_shift_mu(256) == pytest.approx(0.5)
    assert S.dynamic_shift_mu(4096) == pytest.approx(1.15)
    assert S.dynamic_shift_mu(2176) == pytest.approx(0.825)  # midpoint
    s = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(S.shift_exponential(s, math.log(3.0)), S.shift_static(s, 3.0))


def test_flow_uniform_and_shift_endpoints():
    s = S.flow_uniform(8)
    assert_grid(s, 8)
    torch.testing.assert_close(s[:-1], torch.linspace(1, 1 / 8, 8))
    s = S.flow_uniform(5, s_max=0.9, s_min=0.1, dtype=torch.float64)
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.5, 0.3, 0.1, 0.0])
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert S.shift_static(ends, 5.0).tolist() == [0.0, 1.0]
    assert S.shift_exponential(ends, 1.1).tolist() == [0.0, 1.0]
    assert (S.shift_static(torch.tensor([0.3]), 3.0) > 0.3).all()  # shift > 1 moves mass to high noise


def test_flow_grid_in_edm_sigmas_round_trips():
    s = S.flow_shifted(20, shift=3.0)
    grid = S.sampling_grid("flow_shifted", 20, shift=3.0)
    assert grid.kind == "flow" and torch.equal(grid.flow_times(), s)
    assert math.isinf(S.flow_to_edm(grid.values)[0].item())  # s = 1 is sigma = inf ...
    sigmas = grid.sigmas()
    assert sigmas[0].item() == S.SIGMA_INF and sigmas[-1].item() == 0.0  # ... evaluated at SIGMA_INF
    assert (sigmas[1:] < sigmas[:-1]).all()
    torch.testing.assert_close(sigmas[1:-1], s[1:-1] / (1 - s[1:-1]))
    torch.testing.assert_close(sigma_to_flow_t(sigmas[1:]), s[1:], rtol=0, atol=1e-6)
    assert sigma_to_flow_t(sigmas[:1].double()).item() == pytest.approx(1 - 1e-6, abs=1e-11)  # s = 1 - 1e-6


@pytest.mark.parametrize("n,shift", [(4, 1.0), (10, 5.0), (25, 3.0)])
def test_flow_unipc_grid_matches_diffusers_unipc_flow_sigmas(n, shift):
    ref = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    ref.set_timesteps(n)
    grid = S.sampling_grid("flow_unipc", n, shift=shift)
    torch.testing.assert_close(grid.flow_times(), ref.sigmas, rtol=0, atol=0)


# --- learned schedule -------------------------------------------------------------------------------------------


def test_learned_schedule_endpoints_monotone_and_grid():
    torch.manual_seed(0)
    sched = S.LearnedSchedule(sigma_min=0.002, sigma_max=80.0)
    t = torch.linspace(0, 1, 1001)
    sigma = sched.sigma(t)
    assert sigma[0].item() == pytest.approx(0.002, rel=1e-4) and sigma[-1].item() == pytest.approx(80.0, rel=1e-4)
    assert (sigma.diff() > 0).all()
    grid = S.sampling_grid("learned", 16, schedule=sched).sigmas()
    assert_grid(grid, 16)
    assert grid[0].item() == pytest.approx(80.0, rel=1e-4) and grid[-2].item() == pytest.approx(0.002, rel=1e-4)


def test_learned_schedule_slope_is_the_derivative():
    torch.manual_seed(1)
    sched = S.LearnedSchedule().double()
    t = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64)
    _, slope = sched.gamma_and_slope(t)
    h = 1e-6
    fd = (sched.gamma(t + h) - sched.gamma(t - h)) / (2 * h)
    torch.testing.assert_close(slope, fd, rtol=1e-6, atol=0)


def _toy_loss(sched, batch, generator):
    """VDM's estimator L = gamma'(t) f(gamma(t)) for a fixed loss profile f; E[L] = int f dgamma for any schedule."""
    sigma, slope = sched.sample(batch, generator, return_weight=True)
    gamma = 2 * sigma.log()
    return slope * (torch.exp(-((gamma - 1) ** 2) / 8) + 0.05)


def test_learned_schedule_trains_by_variance_and_stays_monotone():
    torch.manual_seed(0)
    sched = S.LearnedSchedule(sigma_min=0.002, sigma_max=80.0, hidden=64)
    before = {k: v.detach().clone() for k, v in sched.named_parameters()}
    opt = torch.optim.Adam([p for p in sched.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(0)
    variances = []
    for _ in range(100):
        loss = _toy_loss(sched, 256, g)
        variances.append(loss.detach().var().item())
        opt.zero_grad()
        sched.variance_backward(loss)
        opt.step()
    assert not torch.equal(before["w2"], sched.w2) and not torch.equal(before["w3"], sched.w3)
    assert torch.equal(before["gamma_min"], sched.gamma_min) and torch.equal(before["gamma_max"], sched.gamma_max)
    assert variances[-1] < 0.25 * variances[0]
    sigma = sched.sigma(torch.linspace(0, 1, 2001))
    assert (sigma.diff() > 0).all()
    # the objective itself did not move: E[L] = int_{gamma_min}^{gamma_max} f(gamma) dgamma
    gam = torch.linspace(2 * math.log(0.002), 2 * math.log(80.0), 20001, dtype=torch.float64)
    integral = torch.trapezoid(torch.exp(-((gam - 1) ** 2) / 8) + 0.05, gam).item()
    with torch.no_grad():
        assert _toy_loss(sched, 4096, g).mean().item() == pytest.approx(integral, rel=1e-2)


def test_learned_schedule_sample_is_seeded_and_in_range():
    sched = S.LearnedSchedule()
    a = sched.sample(8, torch.Generator().manual_seed(3))
    b = sched.sample(8, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (8,)
    assert (a >= 0.002 * (1 - 1e-4)).all() and (a <= 80.0 * (1 + 1e-4)).all()


# --- the grid registry -----------------------------------------------------------------------------------------


def grid_params(name):
    """What each grid needs beyond the defaults (the learned one: a schedule)."""
    if name == "learned":
        torch.manual_seed(0)
        return {"schedule": S.LearnedSchedule()}
    return {}


@pytest.mark.parametrize("name", list(S.GRIDS))
@pytest.mark.parametrize("n", [1, 2, 9])
def test_every_grid_is_descending_and_ends_in_zero(name, n):
    grid = S.sampling_grid(name, n, **grid_params(name))
    assert isinstance(grid, S.Grid) and grid.kind in ("flow", "edm") and grid.kind == S.GRIDS[name].kind
    assert grid.values.dtype == torch.float64 and grid.steps == n
    assert_grid(grid.values, n)
    assert_grid(grid.sigmas(), n)
    assert_grid(grid.flow_times(), n)
    if grid.kind == "flow":
        assert grid.values[0].item() <= 1.0


def test_logsnr_grids_are_the_benchmarks_winning_grid():
    """benchmarks/samplers.py's few-step grid: exponential(n, 0.05, 80); for a flow model s = 1, then those levels."""
    for n in (1, 5, 10, 20):
        edm = S.sampling_grid("logsnr", n)
        assert edm.kind == "edm" and torch.equal(edm.sigmas(), S.exponential(n, 0.05, 80.0))
        sig = S.exponential(n, 0.05, 80.0, dtype=torch.float64)[1:]
        ts = torch.cat([torch.ones(1, dtype=torch.float64), sig / (1 + sig)]).float()
        flow = S.sampling_grid("flow_logsnr", n)
        assert flow.kind == "flow" and torch.equal(flow.flow_times(), ts)
        assert torch.equal(flow.values[1:], edm.values[1:] / (1 + edm.values[1:]))  # the same levels below sigma_max
    torch.testing.assert_close(S.sampling_grid("logsnr", 6, sigma_min=0.1, sigma_max=10.0).values,
                               S.exponential(6, 0.1, 10.0, dtype=torch.float64), rtol=0, atol=0)
    start = S.sampling_grid("flow_logsnr", 4).start(torch.ones(1, 2), "flow")
    assert torch.equal(start, torch.ones(1, 2))  # s = 1: the flow state is the noise itself


def test_sampling_grid_dispatches_and_lists_names_on_typo():
    f64 = torch.float64
    torch.testing.assert_close(S.sampling_grid("karras", 7, sigma_min=0.1, sigma_max=10.0).values,
                               S.karras(7, 0.1, 10.0, dtype=f64), rtol=0, atol=0)
    torch.testing.assert_close(S.sampling_grid("discrete", 7, spacing="trailing").values,
                               S.discrete(7, spacing="trailing", dtype=f64), rtol=0, atol=0)
    # a parameter of other grids is ignored (one call passes a recipe's whole set): shift means nothing to karras
    assert torch.equal(S.sampling_grid("karras", 5, shift=3.0, num_train_timesteps=1000).values,
                       S.sampling_grid("karras", 5).values)
    with pytest.raises(SamplingError, match="unknown sampling grid 'karas'; use one of: flow_shifted, .*karras, "
                                            "logsnr, flow_logsnr, exponential, polyexponential") as err:
        S.sampling_grid("karas", 7)
    assert "\n" not in str(err.value) and isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    with pytest.raises(SamplingError, match="no sampling grid takes 'sigma_mn'; 'karras' takes: sigma_min, sigma_max, "
                                            "rho") as err:
        S.sampling_grid("karras", 7, sigma_mn=0.1)
    assert "\n" not in str(err.value)
    with pytest.raises(SamplingError, match="'learned' needs 'schedule'"):
        S.sampling_grid("learned", 7)
