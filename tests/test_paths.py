import math

import pytest
import torch

from dfm.diffusion import paths
from dfm.diffusion.gmm import GaussianMixture


# flow velocity eps - x0 is the derivative of the flow path only
COMBOS = [(p, k) for p in paths.PATHS for k in paths.PREDICTIONS if k != "flow" or p == "flow"]


@pytest.mark.parametrize("path,prediction", COMBOS)
def test_prediction_round_trip(path, prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    sigma_edm = torch.tensor([0.01, 0.5, 3.0, 40.0], dtype=torch.float64)
    alpha, sigma = (paths.append_dims(t, 3) for t in paths.alpha_sigma(sigma_edm, path))
    x = alpha * x0 + sigma * eps
    pred = paths.from_x0(x0, prediction, x, alpha, sigma)
    torch.testing.assert_close(paths.to_x0(pred, prediction, x, alpha, sigma), x0)
    # the targets the literature defines
    expected = {"x0": x0, "eps": eps, "v": alpha * eps - sigma * x0, "flow": eps - x0, "score": -eps / sigma}
    torch.testing.assert_close(pred, expected[prediction])


def test_paths_share_edm_coordinates():
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    for path in paths.PATHS:
        alpha, sigma_t = paths.alpha_sigma(sigma, path)
        torch.testing.assert_close(sigma_t / alpha, sigma)
    alpha, sigma_t = paths.alpha_sigma(sigma, "vp")
    torch.testing.assert_close(alpha**2 + sigma_t**2, torch.ones_like(sigma))
    s = paths.sigma_to_flow_t(sigma)
    torch.testing.assert_close(paths.flow_t_to_sigma(s), sigma)
    assert paths.sigma_to_flow_t(torch.tensor([math.inf])).item() == 1.0


@pytest.mark.parametrize("path", paths.PATHS)
@pytest.mark.parametrize("prediction", ["x0", "eps", "v", "score"])
def test_as_denoiser_recovers_exact_denoiser(path, prediction):
    """A model that outputs the exact `prediction` of a GMM on `path` becomes the exact EDM denoiser."""
    gmm = GaussianMixture.random((6,), components=3, std=0.4)
    x = torch.randn(5, 6, dtype=torch.float64) * 2
    sigma = torch.tensor([0.05, 0.3, 1.0, 4.0, 20.0], dtype=torch.float64)

    def model(x_t, sig):  # the exact prediction in `path` coordinates
        alpha, sigma_t = (paths.append_dims(t, x_t.ndim) for t in paths.alpha_sigma(sig, path))
        x0 = gmm.denoiser(x_t / alpha, sig)
        return paths.from_x0(x0, prediction, x_t, alpha, sigma_t)

    torch.testing.assert_close(paths.as_denoiser(model, prediction, path)(x, sigma), gmm.denoiser(x, sigma))


def test_velocity_adapters_round_trip():
    gmm = GaussianMixture.random((6,), components=3, std=0.4)
    velocity = paths.velocity_from_denoiser(gmm.denoiser)
    x = torch.randn(4, 6, dtype=torch.float64)
    s = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    sigma = paths.flow_t_to_sigma(s)
    # v = eps_hat - x0_hat at x_t = (1-s) x0 + s eps
    x0 = gmm.denoiser(x / (1 - s)[:, None], sigma)
    torch.testing.assert_close(velocity(x, s), (x - x0) / s[:, None])
    torch.testing.assert_close(paths.denoiser_from_velocity(velocity)(x, sigma), gmm.denoiser(x, sigma))
    assert torch.isfinite(velocity(x, torch.zeros(4, dtype=torch.float64))).all()  # s = 0 (RK4 evaluates there)
    # s = 1 is finite: the data mean, to O(1/sigma_max)
    v1 = velocity(x, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(v1, x - gmm.weights @ gmm.means, atol=1e-2, rtol=0)


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
def test_denoiser_from_velocity_is_the_flow_denoise_bit_for_bit(v_dtype):
    """The shipped flow models' D(x, sigma) (DiffusionModule.denoise, as written before it called the adapter)."""
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 6))
    velocity = lambda x_s, t: (net(x_s) * t[:, None, None] / 1000).to(v_dtype)  # noqa: E731  a "network" fed s * 1000

    def shipped(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        s = paths.sigma_to_flow_t(sigma)  # [B] fp32
        x_s = x / paths.append_dims(1 + sigma, x.ndim)  # x_edm * (1 - s)
        v = velocity(x_s, s * 1000.0)
        return x_s - paths.append_dims(s, x.ndim) * v.float()

    ours = paths.denoiser_from_velocity(lambda x_s, s: velocity(x_s, s * 1000.0))
    x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(0)) * 5
    with torch.no_grad():
        for sigma in (0.3, 7, 1e6, math.inf, torch.tensor(2.5), torch.tensor([0.01, 1.0, 80.0, 1e6]),
                      torch.tensor([0.5, 2.0, 8.0, 30.0], dtype=torch.bfloat16)):
            got, want = ours(x, sigma), shipped(x, sigma)
            assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want), sigma


def test_flow_x0_is_the_flow_prediction():
    x, v = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    s = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    x0 = paths.flow_x0(x, paths.append_dims(s, 2), v)
    torch.testing.assert_close(x0, x - s[:, None] * v, rtol=0, atol=0)
    alpha, sigma = (paths.append_dims(t, 2) for t in paths.alpha_sigma(paths.flow_t_to_sigma(s), "flow"))
    torch.testing.assert_close(paths.to_x0(v, "flow", x, alpha, sigma), x0)


def test_gmm_exact_solution_matches_reference():
    g = GaussianMixture(torch.full((1, 4), 0.3), 0.6)
    x = torch.randn(3, 4, dtype=torch.float64) * 10
    torch.testing.assert_close(g.reference_solution(x, 10.0, 0.0), g.exact_solution(x, 10.0, 0.0), rtol=1e-8, atol=1e-8)


def test_randn_like_per_sample_generators_are_batch_independent():
    from dfm.diffusion.noise import randn_like

    x = torch.empty(3, 2, 4)
    batch = randn_like(x, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    single = randn_like(x[:1], [torch.Generator().manual_seed(2)])
    torch.testing.assert_close(batch[1:2], single)
    torch.testing.assert_close(randn_like(x, torch.Generator().manual_seed(5)), torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="one per sample"):
        randn_like(x, [torch.Generator()])
