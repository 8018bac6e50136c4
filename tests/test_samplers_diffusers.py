"""Parity with diffusers' schedulers: the same analytic model on the same grid gives the same samples (fp32, ~1e-5).

The "model" is the exact denoiser of a Gaussian mixture, converted with paths.from_x0 to what each scheduler expects
(eps on the VP path after its scale_model_input, EDM's F with its c_in/c_skip/c_out, flow velocity eps - x0). The grid
is read from the scheduler itself, so the comparison is sampler against sampler. Stochastic schedulers and ours draw
their noise from generators with the same seed, one randn of the sample's shape per step in step order (diffusers
also draws on the last step, after which nothing is drawn any more), so the streams coincide.
"""

import math

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402

from dfm.diffusion import paths  # noqa: E402
from dfm.diffusion.gmm import GaussianMixture  # noqa: E402
from dfm.diffusion.samplers import sample, sample_flow  # noqa: E402

MIX = GaussianMixture.random((2, 3), components=3, std=0.3, seed=0)
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # Stable Diffusion's VP schedule
TOL = dict(rtol=1e-5, atol=1e-5)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes from inside diffusers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention (10x slower softmax on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noise(seed=0):
    return torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(seed))  # [B, 2, 3] fp32


def eps_on_vp(x_t, sigma):
    """The mixture's eps prediction at x_t = alpha * x_edm on the VP path (alpha = 1 / sqrt(1 + sigma^2))."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    alpha = torch.rsqrt(1 + sigma**2)
    x0 = MIX.denoiser(x_t.double() / alpha, sigma.expand(x_t.shape[0]))
    return paths.from_x0(x0, "eps", x_t.double(), alpha, alpha * sigma).float()


def flow_velocity(x, s):
    """The mixture's velocity eps - x0 at x_t = (1 - s) x0 + s eps, s [B] (s = 1: x0_hat is the prior mean)."""
    s64 = s.double()[0]
    sigma = torch.full((x.shape[0],), math.inf if s64 == 1 else float(s64 / (1 - s64)), dtype=torch.float64)
    x0 = MIX.denoiser(x.double() / (1 - s64) if s64 < 1 else x.double(), sigma)
    return paths.from_x0(x0, "flow", x.double(), 1 - s64, s64).float()


def run_k_scheduler(scheduler, x, model_sigma=None, **step_kwargs):
    """diffusers' k-diffusion-style loop (Euler*, Heun, KDPM2, LMS) with the eps model."""
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)  # x_edm / sqrt(1 + sigma^2): the VP x_t
        sigma = model_sigma(scheduler) if model_sigma else scheduler.sigmas[scheduler.step_index]
        x = scheduler.step(eps_on_vp(x_in, sigma), t, x, **step_kwargs).prev_sample
    return x


def grid(scheduler):
    """The scheduler's distinct noise levels (second-order schedulers repeat each one)."""
    return torch.unique_consecutive(scheduler.sigmas)


K_CASES = [
    ("EulerDiscreteScheduler", {}, "euler", {}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler", {}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, "euler", {}),
    ("HeunDiscreteScheduler", {}, "heun", {}),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True}, "heun", {}),
    ("LMSDiscreteScheduler", {}, "lms", {}),
]


@pytest.mark.parametrize("name,config,method,options", K_CASES, ids=lambda v: str(v))
def test_k_diffusion_style_schedulers(name, config, method, options):
    scheduler = getattr(diffusers, name)(**SD, **config)
    scheduler.set_timesteps(12)
    x = noise() * scheduler.sigmas[0]
    theirs = run_k_scheduler(scheduler, x)
    ours = sample(MIX.denoiser, x, grid(scheduler), method, **options)
    torch.testing.assert_close(ours, theirs, **TOL)


def test_kdpm2_is_dpm_2():
    scheduler = diffusers.KDPM2DiscreteScheduler(**SD)
    scheduler.set_timesteps(10)
    x = noise() * scheduler.sigmas[0]

    def model_sigma(s):  # the second stage runs at the log-midpoint sigma_interpol
        return s.sigmas[s.step_index] if s.state_in_first_order else s.sigmas_interpol[s.step_index]

    theirs = run_k_scheduler(scheduler, x, model_sigma)
    ours = sample(MIX.denoiser, x, grid(scheduler), "dpm_2")
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("config", [{}, {"timestep_spacing": "trailing"}])
def test_euler_ancestral_same_noise(config):
    scheduler = diffusers.EulerAncestralDiscreteScheduler(**SD, **config)
    scheduler.set_timesteps(15)
    x = noise() * scheduler.sigmas[0]
    theirs = run_k_scheduler(scheduler, x, generator=torch.Generator().manual_seed(7))
    ours = sample(MIX.denoiser, x, grid(scheduler), "euler_ancestral", generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, theirs, **TOL)
    other = sample(MIX.denoiser, x, grid(scheduler), "euler_ancestral", generator=torch.Generator().manual_seed(8))
    assert (other - theirs).abs().max() > 1e-2  # the noise does matter


def test_edm_euler_scheduler():
    scheduler = diffusers.EDMEulerScheduler()  # Karras grid 80 -> 0.002, sigma_data = 0.5, F is eps-type
    scheduler.set_timesteps(18)
    sd = scheduler.config.sigma_data
    x = noise() * scheduler.sigmas[0]
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)  # c_in * x
        sigma = scheduler.sigmas[scheduler.step_index].double()
        c_in, c_skip = (sigma**2 + sd**2) ** -0.5, sd**2 / (sigma**2 + sd**2)  # EDM Table 1
        c_out = sigma * sd * (sigma**2 + sd**2) ** -0.5
        x_edm = x_in.double() / c_in
        f = (MIX.denoiser(x_edm, sigma.expand(4)) - c_skip * x_edm) / c_out  # D = c_skip x + c_out F
        x = scheduler.step(f.float(), t, x).prev_sample
    ours = sample(MIX.denoiser, noise() * scheduler.sigmas[0], scheduler.sigmas, "euler")
    torch.testing.assert_close(ours, x, **TOL)


def vp_grid(scheduler):
    """sigma_edm = sqrt((1 - abar) / abar) at the scheduler's timesteps, then 0 (final abar = 1)."""
    abar = scheduler.alphas_cumprod[scheduler.timesteps].double()
    return torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])


def run_vp_scheduler(scheduler, x_t, **step_kwargs):
    """diffusers' DDIM/DDPM loop in VP coordinates with the eps model."""
    for t in scheduler.timesteps:
        abar = scheduler.alphas_cumprod[t].double()
        x_t = scheduler.step(eps_on_vp(x_t, ((1 - abar) / abar).sqrt()), t, x_t, **step_kwargs).prev_sample
    return x_t  # at abar = 1: VP and EDM coordinates coincide


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim(eta, spacing):
    scheduler = diffusers.DDIMScheduler(**SD, clip_sample=False, timestep_spacing=spacing)
    scheduler.set_timesteps(20)
    sigmas = vp_grid(scheduler)
    theirs = run_vp_scheduler(scheduler, noise(), eta=eta, generator=torch.Generator().manual_seed(3))
    x = noise() * math.sqrt(1 + sigmas[0].item() ** 2)  # x_T / sqrt(abar_T): the same point in EDM coordinates
    ours = sample(MIX.denoiser, x, sigmas, "ddim", eta=eta, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, theirs, **TOL)


def test_ddpm():
    scheduler = diffusers.DDPMScheduler(**SD, clip_sample=False)  # variance_type "fixed_small"
    scheduler.set_timesteps(25)
    sigmas = vp_grid(scheduler)
    theirs = run_vp_scheduler(scheduler, noise(), generator=torch.Generator().manual_seed(5))
    x = noise() * math.sqrt(1 + sigmas[0].item() ** 2)
    ours = sample(MIX.denoiser, x, sigmas, "ddpm", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_euler(shift):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(16)
    x = noise()
    for k, t in enumerate(scheduler.timesteps):
        x = scheduler.step(flow_velocity(x, scheduler.sigmas[k].expand(4)), t, x).prev_sample
    ours = sample_flow(flow_velocity, noise(), scheduler.sigmas, "euler")
    torch.testing.assert_close(ours, x, **TOL)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_heun(shift):
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(10)
    x = noise()
    for k, t in enumerate(scheduler.timesteps):  # timesteps[k] is sigmas[k] * 1000, Heun's stages interleaved
        x = scheduler.step(flow_velocity(x, scheduler.sigmas[k].expand(4)), t, x).prev_sample
    ours = sample_flow(flow_velocity, noise(), grid(scheduler), "heun")
    torch.testing.assert_close(ours, x, **TOL)
