"""DPM-Solver++ and UniPC (dfm.diffusion.multistep): parity with diffusers' schedulers driven by the same analytic
model on the same grid, convergence orders against the exact probability-flow solution of a Gaussian, the flow
start t = 1, path invariance (flow == EDM on sigma = t / (1 - t)) and seeding of the SDE variants."""

import math

import pytest
import torch

from dfm.diffusion import paths
from dfm.diffusion.gmm import GaussianMixture
from dfm.diffusion.samplers import FLOW_SAMPLERS, SAMPLERS  # multistep.py's methods are in both tables

SHAPE = (3, 4)
GMM = GaussianMixture.random(SHAPE, components=3, std=0.4, seed=1)
GAUSS = GaussianMixture(torch.tensor([[0.5, -1.0, 2.0, 0.3]]), 0.3)  # one Gaussian: exact_solution is known
DIFFUSERS_PRED = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}


def flow_velocity(gmm):
    """The exact velocity v = eps - x0 = (x_t - x0) / t of `gmm` on the flow path, valid at t = 1 (x0 = mean)."""

    def velocity(x, t):
        t64 = paths.append_dims(t.double(), x.ndim)
        x64 = x.double()
        sigma = (t64 / (1 - t64)).flatten()  # inf at t = 1, where the GMM returns its mean whatever x is
        x0 = gmm.denoiser(torch.where(t64 < 1, x64 / (1 - t64), 0.0), sigma)
        return ((x64 - x0) / t64).to(x.dtype)

    return velocity


def noise(batch=2, seed=0, dtype=torch.float32):
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- parity with diffusers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers():
    """The oracle, imported only by the parity tests (the analytic ones run without it)."""
    return pytest.importorskip("diffusers")



def run_scheduler(sched, x, generator=None, flow=False):
    """Drive a diffusers multistep scheduler with the exact GMM model in its own coordinates; returns x on its last
    sigma, divided by alpha there (EDM coordinates, or flow x_t)."""
    prediction = DIFFUSERS_PRED[sched.config.prediction_type]
    for i, t in enumerate(sched.timesteps):
        sig = sched.sigmas[i].double()
        alpha, sigma_t = (1 - sig, sig) if flow else (1 / (1 + sig**2).sqrt(), sig / (1 + sig**2).sqrt())
        x0 = GMM.denoiser(x.double() / alpha, (sigma_t / alpha).expand(x.shape[0]))
        out = paths.from_x0(x0, prediction, x.double(), alpha, sigma_t).float()
        x = sched.step(out, t, x, generator=generator).prev_sample if generator else sched.step(out, t, x).prev_sample
    sig = sched.sigmas[-1].double()
    alpha = 1 - sig if flow else 1 / (1 + sig**2).sqrt()
    return (x.double() / alpha).float() if not flow else x


def ours_edm(method, sched, x_vp, **options):
    """The same run with SAMPLERS on the scheduler's sigmas, starting from the same point in EDM coordinates."""
    sigmas = sched.sigmas.float()
    x = x_vp * (1 + sigmas[0].double() ** 2).sqrt().float()  # x_edm = x_vp / alpha
    return SAMPLERS[method](GMM.denoiser, x, sigmas, **options)


DPM_CASES = [  # (diffusers config, our options), steps
    (dict(solver_order=2), dict(), 10),
    (dict(solver_order=2), dict(), 20),  # >= 15 steps: lower_order_final has no effect in diffusers
    (dict(solver_order=2, solver_type="heun", prediction_type="sample"), dict(solver_type="heun"), 8),
    (dict(solver_order=2, final_sigmas_type="sigma_min"), dict(), 10),
    (dict(solver_order=2, final_sigmas_type="sigma_min", lower_order_final=False), dict(lower_order_final=False), 10),
    (dict(solver_order=2, final_sigmas_type="sigma_min", lower_order_final=False, euler_at_final=True),
     dict(lower_order_final=False, euler_at_final=True), 10),
    (dict(solver_order=3), dict(), 10),
    (dict(solver_order=3, prediction_type="v_prediction"), dict(), 20),
    (dict(solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False), dict(lower_order_final=False), 12),
    (dict(solver_order=3, use_karras_sigmas=True), dict(), 12),
]


@pytest.mark.parametrize("config,options,steps", DPM_CASES)
def test_dpmpp_matches_diffusers(diffusers, config, options, steps):
    sched = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **config)
    sched.set_timesteps(steps)
    x_vp = noise()
    expected = run_scheduler(sched, x_vp.clone())
    method = "dpmpp_3m" if config["solver_order"] == 3 else "dpmpp_2m"
    got = ours_edm(method, sched, x_vp, **options)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_dpmpp_2m_sde_matches_diffusers_with_the_same_noise(diffusers):
    """sde-dpmsolver++, order 2, midpoint: diffusers draws one randn_tensor(shape, generator) per step; ours draws
    one randn_like(x, generator) per step that does not end at 0, in the same order, so one seed gives one stream."""
    sched = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)
    sched.set_timesteps(12)
    x_vp = noise()
    expected = run_scheduler(sched, x_vp.clone(), generator=torch.Generator().manual_seed(7))
    got = ours_edm("dpmpp_2m_sde", sched, x_vp, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    other = ours_edm("dpmpp_2m_sde", sched, x_vp, generator=torch.Generator().manual_seed(8))
    assert (other - expected).abs().max() > 1e-2  # the noise matters


@pytest.mark.parametrize("order,steps", [(2, 10), (3, 12)])
def test_dpmpp_matches_diffusers_edm_scheduler(diffusers, order, steps):
    """EDMDPMSolverMultistepScheduler: x in EDM coordinates, model output preconditioned (EDM Table 1)."""
    sched = diffusers.EDMDPMSolverMultistepScheduler(solver_order=order, sigma_max=80.0, sigma_min=0.002)
    sched.set_timesteps(steps)
    sigma_data = sched.config.sigma_data
    x = noise() * sched.sigmas[0]
    x_ours = x.clone()
    for i, t in enumerate(sched.timesteps):
        sig = sched.sigmas[i]
        c_skip = sigma_data**2 / (sig**2 + sigma_data**2)
        c_out = sig * sigma_data / (sig**2 + sigma_data**2).sqrt()
        f = (GMM.denoiser(x, sig.expand(x.shape[0])) - c_skip * x) / c_out  # the network output F
        x = sched.step(f, t, x).prev_sample
    got = SAMPLERS["dpmpp_3m" if order == 3 else "dpmpp_2m"](GMM.denoiser, x_ours, sched.sigmas)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


UNIPC_CASES = [  # (diffusers config, our options), steps
    (dict(solver_order=2, solver_type="bh2"), dict(order=2, variant="bh2"), 10),
    (dict(solver_order=3, solver_type="bh2", prediction_type="sample"), dict(order=3, variant="bh2"), 12),
    (dict(solver_order=1, solver_type="bh2"), dict(order=1, variant="bh2"), 8),
    # bh1 with final_sigmas_type="zero" is NaN in diffusers (B(h) = -inf times an empty sum): compare at sigma_min
    (dict(solver_order=2, solver_type="bh1", final_sigmas_type="sigma_min"), dict(order=2, variant="bh1"), 10),
    (dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"), dict(order=3, variant="bh1"), 20),
    (dict(solver_order=3, solver_type="bh2", final_sigmas_type="sigma_min", lower_order_final=False),
     dict(order=3, lower_order_final=False), 10),
    (dict(solver_order=2, disable_corrector=[0, 4]), dict(order=2, disable_corrector=[0, 4]), 10),
    (dict(solver_order=3, disable_corrector=[8]), dict(order=3, disable_corrector=[-2]), 10),
]


@pytest.mark.parametrize("config,options,steps", UNIPC_CASES)
def test_unipc_matches_diffusers(diffusers, config, options, steps):
    sched = diffusers.UniPCMultistepScheduler(**config)
    sched.set_timesteps(steps)
    x_vp = noise()
    expected = run_scheduler(sched, x_vp.clone())
    got = ours_edm("unipc", sched, x_vp, **options)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


FLOW_CASES = [  # Wan: UniPC / DPM-Solver++ with flow sigmas, flow_prediction, shift
    ("unipc", "UniPCMultistepScheduler", dict(solver_order=2), dict(order=2), 10),
    # (flow sigmas with final_sigmas_type="sigma_min" repeat the last sigma: a zero step that we reject)
    ("unipc", "UniPCMultistepScheduler", dict(solver_order=3, prediction_type="flow_prediction"),
     dict(order=3), 16),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", dict(solver_order=2), dict(), 10),
    ("dpmpp_3m", "DPMSolverMultistepScheduler", dict(solver_order=3), dict(), 16),
]


@pytest.mark.parametrize("method,cls,config,options,steps", FLOW_CASES)
def test_flow_matches_diffusers_flow_sigmas(diffusers, method, cls, config, options, steps):
    sched = getattr(diffusers, cls)(use_flow_sigmas=True, flow_shift=5.0, **{"prediction_type": "flow_prediction", **config})
    sched.set_timesteps(steps)
    x = noise()
    expected = run_scheduler(sched, x.clone(), flow=True)
    got = FLOW_SAMPLERS[method](flow_velocity(GMM), x, sched.sigmas.float(), **options)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- convergence on one Gaussian ---------------------------------------------------------------------------------

STEPS = [10, 20, 40, 80]


def orders(errors):
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


def edm_errors(method, **options):
    """Max error at sigma_min of a log-uniform grid 80 -> 0.05 (no final step to 0), fp64, vs the exact map."""
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    exact = GAUSS.exact_solution(x, 80.0, 0.05)
    errs = []
    for n in STEPS:
        sigmas = torch.logspace(math.log10(80), math.log10(0.05), n + 1, dtype=torch.float64)
        got = SAMPLERS[method](GAUSS.denoiser, x, sigmas, lower_order_final=False, **options)
        errs.append((got - exact).abs().max().item())
    return errs


@pytest.mark.parametrize(
    "method,options,low,high",
    [
        ("dpmpp_2m", {}, 1.8, 2.3),
        ("dpmpp_2m", dict(solver_type="heun"), 1.8, 2.3),
        ("dpmpp_3m", dict(d2="taylor"), 2.8, 3.6),
        ("unipc", dict(order=1, variant="bh2"), 1.8, 2.3),  # UniPC-p: order p + 1
        ("unipc", dict(order=2, variant="bh2"), 2.8, 3.5),
        ("unipc", dict(order=2, variant="bh1"), 2.8, 3.5),
        ("unipc", dict(order=3, variant="bh2"), 3.5, 4.6),
        ("unipc", dict(order=2, corrector=False), 1.8, 2.3),  # UniP-p alone: order p
        ("unipc", dict(order=3, corrector=False), 2.8, 3.5),
    ],
)
def test_convergence_order(method, options, low, high):
    errs = edm_errors(method, **options)
    assert low < orders(errs)[-1] < high, (errs, orders(errs))


def test_dpm_solver_reference_3m_is_second_order():
    """The reference weighting of D2 (diffusers, k-diffusion, DPM-Solver's code) is half the Taylor coefficient:
    it converges like 2M asymptotically, while d2="taylor" gains an order."""
    ref, taylor = edm_errors("dpmpp_3m"), edm_errors("dpmpp_3m", d2="taylor")
    assert orders(ref)[-1] < 2.4, orders(ref)
    assert taylor[-1] < ref[-1] / 5


def test_unip3_is_dpmpp_3m_with_taylor_weights():
    """Two independent derivations agree: UniP-3 with bh2 (rho from the phi-function linear system, no corrector;
    its order-2 warm-up step has rho = 1/2, i.e. 2M midpoint) is DPM-Solver++(3M) with d2="taylor"."""
    x, sigmas = noise(dtype=torch.float64) * 20, torch.tensor([20.0, 8.0, 3.0, 1.2, 0.5, 0.2, 0.05, 0.0])
    run = lambda m, **o: SAMPLERS[m](GMM.denoiser, x, sigmas, lower_order_final=False, **o)  # noqa: E731
    torch.testing.assert_close(run("unipc", order=3, corrector=False), run("dpmpp_3m", d2="taylor"))
    torch.testing.assert_close(run("unipc", order=2, corrector=False), run("dpmpp_2m"))
    assert (run("dpmpp_3m") - run("dpmpp_3m", d2="taylor")).abs().max() > 1e-4


# --- flow: the start t = 1 and path invariance -------------------------------------------------------------------


def exact_flow_from_noise(eps, t):
    """The PF-ODE map from t = 1 (x = eps) for one Gaussian: x_edm(sigma) - mu = eps * sqrt(s^2 + sigma^2), so
    x_t = (1 - t) x_edm = (1 - t) mu + eps * sqrt(s^2 (1 - t)^2 + t^2)."""
    mu, s = GAUSS.means[0], float(GAUSS.stds[0])
    return (1 - t) * mu + eps * math.sqrt(s**2 * (1 - t) ** 2 + t**2)


@pytest.mark.parametrize(
    "method,options,low",
    [
        ("dpmpp_2m", {}, 1.8),
        ("dpmpp_3m", dict(d2="taylor"), 1.8),
        ("unipc", dict(order=2, variant="bh2"), 1.8),
        ("unipc", dict(order=2, variant="bh1"), 1.8),
        ("unipc", dict(order=3), 1.8),
    ],
)
def test_flow_from_pure_noise_converges_to_exact(method, options, low):
    """ts = linspace(1, 0.02): the first step starts at alpha = 0 (lambda = -inf, h = inf) and must stay finite."""
    eps = torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = exact_flow_from_noise(eps, 0.02)
    errs = []
    for n in STEPS:
        ts = torch.linspace(1, 0.02, n + 1, dtype=torch.float64)
        got = FLOW_SAMPLERS[method](flow_velocity(GAUSS), eps, ts, lower_order_final=False, **options)
        errs.append((got - exact).abs().max().item())
    assert all(math.isfinite(e) for e in errs)
    assert errs[-1] < 3e-3 and orders(errs)[-1] > low, (errs, orders(errs))


def test_flow_first_step_from_t1_is_ddim():
    """From t = 1 the first step is x = t_next * x + alpha_next * x0_hat (exp(-h) = 0)."""
    eps = noise(dtype=torch.float64)
    ts = torch.tensor([1.0, 0.7], dtype=torch.float64)
    got = FLOW_SAMPLERS["dpmpp_2m"](flow_velocity(GMM), eps, ts)
    x0 = eps - flow_velocity(GMM)(eps, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(got, 0.7 * eps + 0.3 * x0)
    torch.testing.assert_close(x0, (GMM.weights @ GMM.means).reshape(SHAPE).expand_as(x0))


@pytest.mark.parametrize(
    "method,options",
    [("dpmpp_2m", {}), ("dpmpp_3m", {}), ("dpmpp_2m_sde", dict(eta=0.7)), ("dpmpp_3m_sde", {}),
     ("unipc", dict(order=3, variant="bh1")), ("unipc", dict(order=2))],
)
def test_flow_equals_edm_on_matching_grid(method, options):
    """Data-prediction exponential integrators are path invariant: flow on ts == EDM on sigma = t / (1 - t), at
    every step (x_flow = (1 - t) x_edm) and at the end, also for the SDEs with the same noise stream."""
    ts = torch.tensor([0.97, 0.9, 0.75, 0.6, 0.45, 0.3, 0.2, 0.1, 0.03, 0.0], dtype=torch.float64)
    sigmas = ts / (1 - ts)
    x_flow = noise(dtype=torch.float64)
    seen = {"flow": [], "edm": []}
    flow = FLOW_SAMPLERS[method](flow_velocity(GMM), x_flow, ts, generator=torch.Generator().manual_seed(1),
                                callback=lambda d: seen["flow"].append(d["x"] / (1 - d["t"])), **options)
    edm = SAMPLERS[method](GMM.denoiser, x_flow / (1 - ts[0]), sigmas, generator=torch.Generator().manual_seed(1),
                              callback=lambda d: seen["edm"].append(d["x"]), **options)
    torch.testing.assert_close(flow, edm, rtol=1e-9, atol=1e-9)
    assert len(seen["flow"]) == len(seen["edm"]) == len(ts) - 1
    for a, b in zip(seen["flow"], seen["edm"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# --- final step, options, SDE seeding ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc"])
def test_last_step_to_zero_returns_the_denoised_estimate(method):
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0])
    last = {}
    got = SAMPLERS[method](GMM.denoiser, noise() * 10, sigmas, generator=torch.Generator().manual_seed(0),
                              callback=last.update, lower_order_final=False)
    assert last["i"] == 3
    torch.testing.assert_close(got, last["denoised"], rtol=0, atol=0)  # alpha = 1, sigma = 0: x = x0_hat


def test_options_change_the_result():
    x, sigmas = noise() * 20, torch.tensor([20.0, 8.0, 3.0, 1.2, 0.5, 0.2, 0.0])
    run = lambda m, **o: SAMPLERS[m](GMM.denoiser, x, sigmas, **o)  # noqa: E731
    assert (run("unipc") - run("unipc", corrector=False)).abs().max() > 1e-4
    assert (run("unipc", variant="bh1") - run("unipc")).abs().max() > 1e-5
    assert (run("unipc", disable_corrector=[2]) - run("unipc")).abs().max() > 1e-5
    assert (run("dpmpp_3m", d2="taylor") - run("dpmpp_3m")).abs().max() > 1e-5
    assert (run("dpmpp_2m", solver_type="heun") - run("dpmpp_2m")).abs().max() > 1e-5
    torch.testing.assert_close(run("dpmpp_2m_sde", eta=0.0), run("dpmpp_2m"))


def test_bad_grids_and_options_raise():
    x = noise()
    with pytest.raises(ValueError):
        SAMPLERS["dpmpp_2m"](GMM.denoiser, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError):
        FLOW_SAMPLERS["unipc"](flow_velocity(GMM), x, torch.tensor([1.5, 0.5, 0.0]))
    with pytest.raises(ValueError):
        SAMPLERS["unipc"](GMM.denoiser, x, torch.tensor([2.0, 0.0]), variant="bh3")
    with pytest.raises(TypeError):
        SAMPLERS["dpmpp_2m"](GMM.denoiser, x, torch.tensor([2.0, 0.0]), etaa=1.0)


@pytest.mark.parametrize("method", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_sde_seeding(method):
    sigmas = torch.tensor([20.0, 8.0, 3.0, 1.2, 0.5, 0.2, 0.0])
    x = noise(3) * 20
    sample = lambda xb, gen: SAMPLERS[method](GMM.denoiser, xb, sigmas, generator=gen)  # noqa: E731
    a = sample(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(sample(x, torch.Generator().manual_seed(5)), a, rtol=0, atol=0)
    assert (sample(x, torch.Generator().manual_seed(6)) - a).abs().max() > 1e-2
    # from t = 1 on the flow path the SDE forgets x at once (exp(-eta h) = 0), stays finite and seeded
    ts = torch.linspace(1, 0, 7)
    flow = lambda gen: FLOW_SAMPLERS[method](flow_velocity(GMM), noise(3), ts, generator=gen)  # noqa: E731
    f = flow(torch.Generator().manual_seed(5))
    assert torch.isfinite(f).all()
    torch.testing.assert_close(flow(torch.Generator().manual_seed(5)), f, rtol=0, atol=0)
    # one generator per sample: a batch gives the samples of separate runs
    batch = sample(x, [torch.Generator().manual_seed(10 + b) for b in range(3)])
    for b in range(3):
        alone = sample(x[b : b + 1], [torch.Generator().manual_seed(10 + b)])
        torch.testing.assert_close(batch[b : b + 1], alone, rtol=1e-6, atol=1e-6)
