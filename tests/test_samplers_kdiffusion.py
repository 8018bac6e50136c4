"""Parity with k-diffusion (Crowson's reference implementation of Karras et al. 2022 and the DPM-Solver++ family):
dfm's EDM-space samplers against k_diffusion.sampling on the same grid, with the same noise, on the exact denoiser
of a Gaussian mixture. Until this file, dpmpp_3m_sde had no outside reference (diffusers' 3rd-order SDE solver
weights its terms differently).

The noise: k-diffusion's SDE samplers default to a BrownianTreeNoiseSampler (torchsde) and its ancestral ones to
torch.randn_like. Each takes a `noise_sampler(sigma, sigma_next)`, called once per step that does not end at 0 -
exactly when dfm draws its one randn per step - so it is given a function that draws from its own torch.Generator
with dfm's seed: both then add the same z at every step, and the comparison is exact (float64, ~1e-12). Churn noise
(s_churn > 0) is k-diffusion's torch.randn_like on the global RNG, one draw per step, and dfm's generator=None
draws from the same RNG, so seeding it alike gives the same stream too. A statistical check then runs k-diffusion's
dpmpp_3m_sde with its own default Brownian-tree noise against dfm's: the same distribution of samples.

k-diffusion is installed with --no-deps (Makefile) because its package __init__ imports torchvision, kornia,
skimage, clip ... for its training code. Only k_diffusion/sampling.py (which needs scipy, torchdiffeq, torchsde and
its own utils.py) is loaded here, from its file, as a private package; utils.py's one torchvision import
(`from torchvision.transforms import functional as TF`, used only by image helpers) is served by a stub for the
duration of that import and removed again.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from dfm.diffusion.gmm import GaussianMixture
from dfm.diffusion.samplers import sample

ORACLE = "_kdiffusion_oracle"


def load_kdiffusion_sampling():
    """k_diffusion/sampling.py (and its utils.py) as the package `_kdiffusion_oracle`, without k_diffusion/__init__."""
    for needed in ("torchsde", "scipy", "torchdiffeq"):
        pytest.importorskip(needed)
    spec = importlib.util.find_spec("k_diffusion")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("could not import 'k_diffusion': No module named 'k_diffusion' (make install: pip install "
                    "--no-deps k-diffusion)")
    if f"{ORACLE}.sampling" in sys.modules:
        return sys.modules[f"{ORACLE}.sampling"]
    package = types.ModuleType(ORACLE)
    package.__path__ = list(spec.submodule_search_locations)  # `from . import utils` finds the real utils.py
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        tv, transforms, functional = (types.ModuleType(n) for n in
                                      ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"))
        tv.transforms, transforms.functional = transforms, functional
        stubs = {"torchvision": tv, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}
    sys.modules[ORACLE] = package
    sys.modules.update(stubs)
    try:
        path = f"{package.__path__[0]}/sampling.py"
        module_spec = importlib.util.spec_from_file_location(f"{ORACLE}.sampling", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    finally:
        for name in stubs:  # nothing else may see a fake torchvision (diffusers and transformers probe for it)
            sys.modules.pop(name, None)
    return module


@pytest.fixture(scope="module")
def K():
    return load_kdiffusion_sampling()


MIX = GaussianMixture.random((2, 3), components=3, std=0.3, seed=0)


def start(seed=0, n=4):
    return torch.randn(n, 2, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # [B, 2, 3]


def karras(K, n):
    return K.get_sigmas_karras(n, 0.002, 80.0, rho=7.0).double()  # EDM's grid, ending in 0


def same_noise(x, seed):
    """k-diffusion's noise_sampler(sigma, sigma_next): fresh N(0, I) of x's shape from its own generator."""
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(x.shape, generator=g, dtype=x.dtype)


# (dfm method, dfm options, k-diffusion function, k-diffusion options); dfm's dpmpp_3m(_sde) with solver_type="heun"
# (k-diffusion's 2nd-order warm-up is the phi2 weight) and lower_order_final=False (k-diffusion keeps 3rd order to
# the end) is k-diffusion's dpmpp_3m_sde; its eta = 0 is the ODE solver dpmpp_3m.
DETERMINISTIC = [
    ("euler", {}, "sample_euler", {}),
    ("heun", {}, "sample_heun", {}),
    ("dpm_2", {}, "sample_dpm_2", {}),
    ("lms", {}, "sample_lms", {}),
    ("dpmpp_2m", {}, "sample_dpmpp_2m", {}),
    ("dpmpp_3m", {"solver_type": "heun", "lower_order_final": False}, "sample_dpmpp_3m_sde", {"eta": 0.0}),
    ("dpmpp_2m_sde", {"eta": 0.0}, "sample_dpmpp_2m_sde", {"eta": 0.0}),
]
STOCHASTIC = [  # noise through noise_sampler
    ("euler_ancestral", {}, "sample_euler_ancestral", {}),
    ("euler_ancestral", {"eta": 0.5, "s_noise": 0.9}, "sample_euler_ancestral", {"eta": 0.5, "s_noise": 0.9}),
    ("dpmpp_2s_ancestral", {}, "sample_dpmpp_2s_ancestral", {}),
    ("dpmpp_2s_ancestral", {"eta": 0.7}, "sample_dpmpp_2s_ancestral", {"eta": 0.7}),
    ("dpmpp_2m_sde", {}, "sample_dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5}, "sample_dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5}),
    ("dpmpp_3m_sde", {"solver_type": "heun", "lower_order_final": False}, "sample_dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde", {"solver_type": "heun", "lower_order_final": False, "eta": 0.5, "s_noise": 1.1},
     "sample_dpmpp_3m_sde", {"eta": 0.5, "s_noise": 1.1}),
]
CHURN = [  # noise from the global RNG: EDM Algorithm 2's churn
    ("euler", "sample_euler"),
    ("heun", "sample_heun"),
    ("dpm_2", "sample_dpm_2"),
]
# measured max |dfm - k-diffusion| over these cases (float64): 3.9e-14 (deterministic), 1.4e-14 (same noise and
# churn). Near misses of dpmpp_3m_sde (12 steps) give: the midpoint warm-up 2.2e-5, lower_order_final 0.22, the other
# D2 weight ("taylor") 1.46; another seed's noise 1.9. The tolerance sits between.
TOL = dict(rtol=0, atol=1e-9)


def ids(case):
    return f"{case[0]}{case[1] or ''}"


@pytest.mark.parametrize("case", DETERMINISTIC, ids=ids)
@pytest.mark.parametrize("steps", [6, 12])
def test_deterministic_samplers_match_k_diffusion(K, case, steps):
    method, ours_opts, fn, theirs_opts = case
    sigmas = karras(K, steps)
    x = start() * sigmas[0]
    theirs = getattr(K, fn)(MIX.denoiser, x, sigmas, disable=True, **theirs_opts)
    ours = sample(MIX.denoiser, x, sigmas, method, **ours_opts)
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("case", STOCHASTIC, ids=ids)
@pytest.mark.parametrize("steps", [6, 12])
def test_stochastic_samplers_match_k_diffusion_with_the_same_noise(K, case, steps):
    method, ours_opts, fn, theirs_opts = case
    sigmas = karras(K, steps)
    x = start() * sigmas[0]
    theirs = getattr(K, fn)(MIX.denoiser, x, sigmas, disable=True, noise_sampler=same_noise(x, 7), **theirs_opts)
    ours = sample(MIX.denoiser, x, sigmas, method, generator=torch.Generator().manual_seed(7), **ours_opts)
    torch.testing.assert_close(ours, theirs, **TOL)
    other = sample(MIX.denoiser, x, sigmas, method, generator=torch.Generator().manual_seed(8), **ours_opts)
    assert (other - theirs).abs().max() > 1e-3  # the noise does matter


@pytest.mark.parametrize("method, fn", CHURN)
def test_churn_matches_k_diffusion_on_the_same_global_rng(K, method, fn):
    """k-diffusion draws one randn_like per step whether or not the step churns; dfm draws only where it adds noise.
    With s_tmin = 0 and s_tmax = inf every step churns, so both take one draw per step from the global RNG."""
    sigmas = karras(K, 10)
    x = start() * sigmas[0]
    churn = dict(s_churn=5.0, s_noise=1.003)  # gamma = min(5 / 10, sqrt(2) - 1) at every step
    state = torch.get_rng_state()
    try:
        torch.manual_seed(3)
        theirs = getattr(K, fn)(MIX.denoiser, x, sigmas, disable=True, **churn)
        torch.manual_seed(3)
        ours = sample(MIX.denoiser, x, sigmas, method, **churn)
        torch.manual_seed(4)
        other = sample(MIX.denoiser, x, sigmas, method, **churn)
    finally:
        torch.set_rng_state(state)
    torch.testing.assert_close(ours, theirs, **TOL)
    assert (other - theirs).abs().max() > 1e-3  # the churn noise does matter


def test_dpmpp_3m_sde_with_k_diffusions_brownian_tree_noise_has_the_same_distribution(K):
    """k-diffusion's default noise (a Brownian tree: increments over each step's sigma interval, normalised) and
    dfm's per-step N(0, I) draws are the same law; the samples of both agree in mean and spread per coordinate and in
    how they split among the mixture's components, within sampling error. Measured: means 1.3 and 0.4, stds 0.3
    and 0.4 standard errors apart (bound 5); dfm with s_noise = 1.5 puts the stds 9.7 apart, the ODE (s_noise = 0)
    31."""
    mix = GaussianMixture.random((2,), components=3, std=0.25, seed=1)
    n = 2000
    sigmas = karras(K, 10)
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    # the tree's interval a hair wider than the grid (torchsde keeps its ends in float32 and warns at 0.002 - 4e-10);
    # the normalised increments over each step are N(0, I) all the same
    noise = K.BrownianTreeNoiseSampler(x, 0.999 * sigmas[sigmas > 0].min(), 1.001 * sigmas.max(), seed=1)
    theirs = K.sample_dpmpp_3m_sde(mix.denoiser, x, sigmas, disable=True, noise_sampler=noise)
    x2 = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sigmas[0]
    ours = sample(mix.denoiser, x2, sigmas, "dpmpp_3m_sde", generator=torch.Generator().manual_seed(2),
                  solver_type="heun", lower_order_final=False)
    # 5 standard errors of a difference of two independent means (and, roughly, of two stds)
    se = (2 / n) ** 0.5
    spread = theirs.std(0)
    assert ((ours.mean(0) - theirs.mean(0)).abs() < 5 * se * spread).all(), (ours.mean(0), theirs.mean(0))
    assert ((ours.std(0) - spread).abs() < 5 * se * spread).all(), (ours.std(0), spread)

    def shares(samples):  # the fraction of samples nearest to each component mean
        return torch.bincount(torch.cdist(samples, mix.means).argmin(1), minlength=3).double() / n

    p = shares(theirs)
    assert ((shares(ours) - p).abs() < 5 * (2 * p * (1 - p) / n) ** 0.5 + 1e-9).all(), (shares(ours), p)
