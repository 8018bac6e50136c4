import math

import pytest
import torch

from dfm.diffusion import edm
from dfm.diffusion.gmm import GaussianMixture

SIGMAS = torch.tensor([0.003, 0.1, 0.5, 2.0, 30.0, 150.0])


def backbone(x_in, c_noise):
    """A fixed nonlinear F(x_in, c_noise) that depends on both inputs."""
    return torch.tanh(x_in) + 0.1 * c_noise.reshape(-1, *([1] * (x_in.ndim - 1)))


def table1(name, sigma, M=1000, beta_d=19.9, beta_min=0.1, sigma_data=0.5, u=None):
    """(c_skip, c_out, c_in, c_noise) written out from Karras et al. 2022 Table 1, in float64 scalars."""
    if name == "vp":
        t_of_sigma = (math.sqrt(beta_min**2 + 2 * beta_d * math.log(sigma**2 + 1)) - beta_min) / beta_d
        return 1.0, -sigma, 1 / math.sqrt(sigma**2 + 1), (M - 1) * t_of_sigma
    if name == "ve":
        return 1.0, sigma, 1.0, math.log(0.5 * sigma)
    if name == "iddpm":
        j = min(range(len(u)), key=lambda i: abs(u[i] - sigma))
        return 1.0, -sigma, 1 / math.sqrt(sigma**2 + 1), M - 1 - j
    if name == "edm":
        sd = sigma_data
        return sd**2 / (sigma**2 + sd**2), sigma * sd / math.sqrt(sigma**2 + sd**2), 1 / math.sqrt(sigma**2 + sd**2), math.log(sigma) / 4
    raise ValueError(name)


def iddpm_table(M=1000, C_1=0.001, C_2=0.008):
    alpha_bar = lambda j: math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C_1) - 1)
    return u


PRECONDS = {"vp": edm.VPPrecond, "ve": edm.VEPrecond, "iddpm": edm.iDDPMPrecond, "edm": edm.EDMPrecond}


@pytest.mark.parametrize("name", PRECONDS)
def test_preconditioning_matches_table1(name):
    precond = PRECONDS[name](backbone)
    u = iddpm_table() if name == "iddpm" else None
    x = torch.randn(len(SIGMAS), 3, 4, generator=torch.Generator().manual_seed(0))
    D = precond(x, SIGMAS)
    for b, sigma in enumerate(SIGMAS.tolist()):
        c_skip, c_out, c_in, c_noise = table1(name, sigma, u=u)
        expected = c_skip * x[b] + c_out * (torch.tanh(c_in * x[b]) + 0.1 * c_noise)
        torch.testing.assert_close(D[b], expected, rtol=1e-5, atol=1e-5 * max(1, abs(c_out)))


def test_vp_sigma_range_and_inverse():
    p = edm.VPPrecond(backbone)
    sigma = lambda t: math.sqrt(math.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1)
    assert p.sigma_min == pytest.approx(sigma(1e-5), rel=1e-9)
    assert p.sigma_max == pytest.approx(sigma(1.0), rel=1e-9)
    t = torch.tensor([1e-5, 0.01, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(p.sigma_inv(p.sigma(t)), t)


def test_iddpm_table_and_round_sigma():
    p = edm.iDDPMPrecond(backbone)
    u = torch.tensor(iddpm_table())
    torch.testing.assert_close(p.u, u.float(), rtol=1e-5, atol=0)
    assert p.u[-1] == 0 and p.sigma_max == pytest.approx(float(u[0]), rel=1e-5)
    assert p.sigma_min == pytest.approx(float(u[999]), rel=1e-5)
    j = torch.tensor([0, 1, 17, 500, 998, 999])
    near = p.u[j] * torch.tensor([0.9999, 1.0001, 0.9999, 1.0001, 0.9999, 1.0001])  # off the grid, but nearest u_j
    torch.testing.assert_close(p.round_sigma(near), p.u[j])
    assert torch.equal(p.round_sigma(near, return_index=True), j)
    # c_noise is M - 1 - j, and a learned-variance backbone (2C channels) is cut to its first C
    seen = {}

    def net(x_in, c_noise):
        seen["c_noise"] = c_noise
        return torch.cat([x_in, 100 + x_in], dim=1)

    D = edm.iDDPMPrecond(net)(torch.ones(len(j), 2, 3), near)
    torch.testing.assert_close(seen["c_noise"], (999 - j).float())
    assert D.shape == (len(j), 2, 3) and D.abs().max() < 100


def test_continuous_round_sigma_is_identity():
    for cls in (edm.VPPrecond, edm.VEPrecond, edm.EDMPrecond):
        assert torch.equal(cls(backbone).round_sigma(SIGMAS), SIGMAS)


def test_bf16_backbone_keeps_coefficients_and_skip_in_fp32():
    seen = {}

    def net(x_in, c_noise):
        seen["x_in"], seen["c_noise"] = x_in.dtype, c_noise.dtype
        return torch.zeros_like(x_in)

    x = torch.full((2, 3), 1.0 + 2**-12)  # not representable in bf16
    sigma = torch.tensor([0.3, 0.7])
    D = edm.EDMPrecond(net, dtype=torch.bfloat16)(x, sigma)
    assert seen == {"x_in": torch.bfloat16, "c_noise": torch.float32}
    c_skip = 0.25 / (sigma**2 + 0.25)
    assert D.dtype == torch.float32
    torch.testing.assert_close(D, c_skip[:, None] * x, rtol=1e-7, atol=0)  # bf16 would be off by ~1e-3


def test_edm_loss_weight_is_inverse_c_out_squared_and_sigma_lognormal():
    seen = {}

    def zero_denoiser(x, sigma):
        seen["sigma"] = sigma
        return torch.zeros_like(x)

    x0 = torch.ones(20000, 2)
    loss = edm.edm_loss(zero_denoiser, x0, generator=torch.Generator().manual_seed(0))
    sigma = seen["sigma"]
    assert loss.shape == (20000,)
    _, c_out, _, _ = edm.EDMPrecond(backbone).coefficients(sigma)
    torch.testing.assert_close(loss, 1 / c_out**2)  # (D - x0)^2 = 1
    log_sigma = sigma.log()
    assert abs(log_sigma.mean() + 1.2) < 0.03 and abs(log_sigma.std() - 1.2) < 0.03


def test_vp_and_ve_loss_sigma_distributions_and_weights():
    seen = {}

    def zero_denoiser(x, sigma):
        seen["sigma"] = sigma
        return torch.zeros_like(x)

    x0 = torch.ones(20000, 2)
    g = torch.Generator().manual_seed(1)
    loss = edm.vp_loss(zero_denoiser, x0, generator=g)
    t = edm.vp_sigma_inv(seen["sigma"].double())
    torch.testing.assert_close(loss, 1 / seen["sigma"] ** 2)
    assert t.min() >= 1e-5 - 1e-9 and t.max() <= 1 + 1e-6 and abs(t.mean() - 0.5) < 0.01  # t ~ U(eps_t, 1)

    loss = edm.ve_loss(zero_denoiser, x0, generator=g)
    r = (seen["sigma"].log() - math.log(0.02)) / math.log(100 / 0.02)  # ~ U(0, 1)
    torch.testing.assert_close(loss, 1 / seen["sigma"] ** 2)
    assert r.min() >= 0 and r.max() <= 1 + 1e-6 and abs(r.mean() - 0.5) < 0.01 and abs(r.var() - 1 / 12) < 0.003


def test_loss_uses_x0_plus_sigma_noise_and_custom_sigma_sampler():
    class Fixed:
        def sample(self, batch, generator=None):
            return torch.full((batch,), 2.0)

    seen = {}

    def denoiser(x, sigma, context):
        seen["x"], seen["sigma"], seen["context"] = x, sigma, context
        return x

    x0 = torch.randn(5000, 4, generator=torch.Generator().manual_seed(2))
    ctx = torch.zeros(5000, 1)
    loss = edm.edm_loss(denoiser, x0, sigma_sampler=Fixed(), generator=torch.Generator().manual_seed(3), context=ctx)
    assert torch.equal(seen["sigma"], torch.full((5000,), 2.0)) and seen["context"] is ctx
    n = (seen["x"] - x0) / 2  # the noise must be N(0, 1), scaled by sigma
    assert abs(n.mean()) < 0.02 and abs(n.std() - 1) < 0.02
    weight = (4 + 0.25) / (2 * 0.5) ** 2
    torch.testing.assert_close(loss, weight * (4 * n**2).mean(1))


def test_per_sample_generators_make_losses_batch_independent():
    gmm = GaussianMixture.random((2, 3), seed=0)
    x0 = gmm.sample(4, torch.Generator().manual_seed(0)).float()
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(4)]
    for loss_fn in (edm.edm_loss, edm.vp_loss, edm.ve_loss):
        batch = loss_fn(gmm.denoiser, x0, generator=gens())
        single = torch.cat([loss_fn(gmm.denoiser, x0[i : i + 1], generator=[g]) for i, g in enumerate(gens())])
        torch.testing.assert_close(batch, single)


# 1 / sqrt(lambda(sigma)): perturbations of this size cost the same at every sigma, so no few samples dominate
UNIT = {
    edm.edm_loss: lambda s: s * 0.5 / (s**2 + 0.25).sqrt(),  # c_out of EDM
    edm.vp_loss: lambda s: s,
    edm.ve_loss: lambda s: s,
}


@pytest.mark.parametrize("loss_fn", list(UNIT), ids=lambda f: f.__name__)
def test_exact_denoiser_minimises_expected_loss(loss_fn):
    """E[loss] is minimal at D = E[x0 | x]: every perturbation must do worse (common random numbers, fixed seed)."""
    gmm = GaussianMixture.random((8,), components=3, std=0.3, seed=0)
    x0 = gmm.sample(8192, torch.Generator().manual_seed(0))
    D, unit = gmm.denoiser, lambda s: UNIT[loss_fn](s)[:, None]
    perturbed = {
        "sigma*1.3": lambda x, s: D(x, s * 1.3),
        "sigma/1.3": lambda x, s: D(x, s / 1.3),
        "eps*0.8": lambda x, s: D(x, s) + 0.2 * unit(s) * (x - D(x, s)) / s[:, None],  # eps_hat = (x - D) / sigma
        "shifted": lambda x, s: D(x, s) + 0.1 * unit(s),
    }
    best = loss_fn(D, x0, generator=torch.Generator().manual_seed(1))
    assert best.shape == (8192,)
    for name, D_bad in perturbed.items():
        diff = loss_fn(D_bad, x0, generator=torch.Generator().manual_seed(1)) - best  # same sigmas and noise
        stderr = diff.std() / math.sqrt(len(diff))
        assert diff.mean() > 5 * stderr, f"{name}: {diff.mean():.3g} +- {stderr:.3g}"
