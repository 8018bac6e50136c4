import pytest
import torch

from dfm.diffusion import paths
from dfm.diffusion.gmm import GaussianMixture
from dfm.diffusion.guidance import CFGDenoiser

B = 3
PATTERN = torch.linspace(-1, 1, 12).reshape(3, 4)


class Recorder:
    """model(x [B, 3, 4], sigma [B], context [B, L, D], context_mask [B, L]): output depends on all of them."""

    def __init__(self):
        self.batches, self.inputs = [], []

    def __call__(self, x, sigma, context, context_mask):
        self.batches.append(x.shape[0])
        self.inputs.append((x, sigma, context, context_mask))
        feat = (context * context_mask[..., None]).sum((1, 2))  # [B]
        return 0.9 * x / (1 + sigma[:, None, None]) + feat[:, None, None] * PATTERN  # [B, 3, 4]


def cond_dict(seed, L=5, D=2):
    g = torch.Generator().manual_seed(seed)
    return {"context": torch.randn(B, L, D, generator=g), "context_mask": (torch.rand(B, L, generator=g) > 0.3).float()}


POS, UNCOND, NEG = cond_dict(0), cond_dict(1), cond_dict(2)
X = torch.randn(B, 3, 4, generator=torch.Generator().manual_seed(3))
SIGMA = torch.full((B,), 1.5)


def separately(model, cond):
    return model(X, SIGMA, **cond)


def test_cfg_is_one_batched_forward_of_2B():
    model = Recorder()
    out = CFGDenoiser(model, POS, UNCOND, guidance_scale=4.0)(X, SIGMA)
    assert model.batches == [2 * B]
    x, sigma, ctx, mask = model.inputs[0]
    assert torch.equal(x, torch.cat([X, X])) and torch.equal(sigma, torch.cat([SIGMA, SIGMA]))
    assert torch.equal(ctx, torch.cat([UNCOND["context"], POS["context"]]))
    assert torch.equal(mask, torch.cat([UNCOND["context_mask"], POS["context_mask"]]))
    c, u = separately(model, POS), separately(model, UNCOND)
    torch.testing.assert_close(out, u + 4.0 * (c - u))


def test_scale_one_costs_one_conditional_forward():
    model = Recorder()
    out = CFGDenoiser(model, POS, UNCOND, guidance_scale=1.0, rescale=0.7)(X, SIGMA)
    assert model.batches == [B]
    assert torch.equal(out, separately(model, POS))
    CFGDenoiser(model, POS, None, guidance_scale=1.0)(X, 0.3)  # no uncond needed; a scalar sigma is broadcast
    assert model.batches[-1] == B and model.inputs[-1][1].shape == (B,)


def test_negative_prompt_replaces_uncond_and_changes_the_output():
    model = Recorder()
    plain = CFGDenoiser(model, POS, UNCOND, guidance_scale=4.0)(X, SIGMA)
    model.batches.clear()
    neg = CFGDenoiser(model, POS, UNCOND, guidance_scale=4.0, negative=NEG)(X, SIGMA)
    assert model.batches == [2 * B]
    assert (neg - plain).abs().max() > 0.1  # not silently ignored
    c, n = separately(model, POS), separately(model, NEG)
    torch.testing.assert_close(neg, n + 4.0 * (c - n))
    torch.testing.assert_close(CFGDenoiser(model, POS, None, guidance_scale=4.0, negative=NEG)(X, SIGMA), neg)


def test_three_branch_form():
    model = Recorder()
    out = CFGDenoiser(model, POS, UNCOND, guidance_scale=4.0, negative=NEG, three_branch=True)(X, SIGMA)
    assert model.batches == [3 * B]
    c, u, n = separately(model, POS), separately(model, UNCOND), separately(model, NEG)
    torch.testing.assert_close(out, u + 4.0 * (c - n))
    # with negative == uncond it is plain CFG
    same = CFGDenoiser(model, POS, UNCOND, guidance_scale=4.0, negative=UNCOND, three_branch=True)(X, SIGMA)
    torch.testing.assert_close(same, u + 4.0 * (c - u))
    with pytest.raises(ValueError, match="three_branch"):
        CFGDenoiser(model, POS, None, guidance_scale=5.0, negative=NEG, three_branch=True)


def test_rescale():
    model = Recorder()
    plain = CFGDenoiser(model, POS, UNCOND, guidance_scale=6.0)(X, SIGMA)
    torch.testing.assert_close(CFGDenoiser(model, POS, UNCOND, guidance_scale=6.0, rescale=0.0)(X, SIGMA), plain)
    full = CFGDenoiser(model, POS, UNCOND, guidance_scale=6.0, rescale=1.0)(X, SIGMA)
    c = separately(model, POS)
    torch.testing.assert_close(full.std((1, 2)), c.std((1, 2)))  # eq. 15: the guided std brought back to cond's
    assert (full - plain).abs().max() > 0.1
    half = CFGDenoiser(model, POS, UNCOND, guidance_scale=6.0, rescale=0.5)(X, SIGMA)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain)  # eq. 16


def test_rescale_in_eps_space_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    model = Recorder()
    out = CFGDenoiser(model, POS, UNCOND, guidance_scale=6.0, rescale=0.7, rescale_space="eps")(X, SIGMA)
    s = SIGMA[:, None, None]
    eps_c, eps_u = (X - separately(model, POS)) / s, (X - separately(model, UNCOND)) / s
    eps = rescale_noise_cfg(eps_u + 6.0 * (eps_c - eps_u), eps_c, guidance_rescale=0.7)
    torch.testing.assert_close(out, X - s * eps)


def test_guidance_interval():
    model = Recorder()
    D = CFGDenoiser(model, POS, UNCOND, guidance_scale=4.0, interval=(0.5, 2.0))
    c = lambda sig: model(X, torch.full((B,), sig), **POS)
    u = lambda sig: model(X, torch.full((B,), sig), **UNCOND)
    for sig, inside in [(0.3, False), (0.5, False), (0.51, True), (2.0, True), (2.1, False)]:
        model.batches.clear()
        out = D(X, torch.full((B,), sig))
        assert model.batches == ([2 * B] if inside else [B]), sig
        expected = u(sig) + 4.0 * (c(sig) - u(sig)) if inside else c(sig)
        torch.testing.assert_close(out, expected)
    # per-sample sigmas across the boundary: one forward of 2B, guidance only where inside
    model.batches.clear()
    sig = torch.tensor([0.3, 1.0, 3.0])
    out = D(X, sig)
    assert model.batches == [2 * B]
    cs, us = model(X, sig, **POS), model(X, sig, **UNCOND)
    expected = torch.stack([cs[0], us[1] + 4.0 * (cs[1] - us[1]), cs[2]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("path,prediction", [("vp", "eps"), ("flow", "flow"), ("vp", "v")])
def test_cfg_on_x0_equals_cfg_on_eps_or_velocity(path, prediction):
    """The conversions are affine in the prediction at fixed (x, sigma), so guidance commutes with them."""
    x = X.double()
    sigma = torch.tensor([0.2, 1.5, 7.0], dtype=torch.float64)
    alpha, sigma_t = (paths.append_dims(t, 3) for t in paths.alpha_sigma(sigma, path))
    x_t = alpha * x

    def native(x_t, sigma, context, context_mask):  # an eps / velocity / v model in its own coordinates
        feat = (context * context_mask[..., None]).sum((1, 2))
        return torch.sin(x_t) * (1 + sigma[:, None, None]) + feat[:, None, None] * PATTERN

    def x0_model(x, sigma, **cond):
        a, s = (paths.append_dims(t, x.ndim) for t in paths.alpha_sigma(sigma, path))
        return paths.to_x0(native(a * x, sigma, **cond), prediction, a * x, a, s)

    pos, unc = ({k: v.double() for k, v in d.items()} for d in (POS, UNCOND))
    out = CFGDenoiser(x0_model, pos, unc, guidance_scale=5.0)(x, sigma)
    p_c, p_u = native(x_t, sigma, **pos), native(x_t, sigma, **unc)
    expected = paths.to_x0(p_u + 5.0 * (p_c - p_u), prediction, x_t, alpha, sigma_t)
    torch.testing.assert_close(out, expected)


def test_branch_alignment_errors():
    model = Recorder()
    short = cond_dict(4, L=3)
    with pytest.raises(ValueError, match="pad/align"):
        CFGDenoiser(model, POS, short, guidance_scale=3.0)(X, SIGMA)
    with pytest.raises(ValueError, match="needs an uncond"):
        CFGDenoiser(model, POS, None, guidance_scale=3.0)
    with pytest.raises(ValueError, match="unknown rescale_space"):
        CFGDenoiser(model, POS, UNCOND, guidance_scale=5.0, rescale_space="score")


def test_drives_a_sampler():
    samplers = pytest.importorskip("dfm.diffusion.samplers")
    schedules = pytest.importorskip("dfm.diffusion.schedules")
    a, b = GaussianMixture.random((4,), seed=0), GaussianMixture.random((4,), seed=1)
    batches = []

    def model(x, sigma, label):  # label 1: mixture a, label 0: mixture b
        batches.append(x.shape[0])
        return torch.where(label[:, None] == 1, a.denoiser(x, sigma), b.denoiser(x, sigma))

    cond, uncond = {"label": torch.ones(2)}, {"label": torch.zeros(2)}
    sigmas = schedules.karras(8, 0.01, 20.0)
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    one = samplers.sample(CFGDenoiser(model, cond, uncond, guidance_scale=1.0), noise, sigmas, method="euler")
    torch.testing.assert_close(one, samplers.sample(a.denoiser, noise, sigmas, method="euler"))
    assert set(batches) == {2}
    batches.clear()
    guided = samplers.sample(CFGDenoiser(model, cond, uncond, guidance_scale=3.0), noise, sigmas, method="euler")
    assert batches == [4] * 8 and torch.isfinite(guided).all() and (guided - one).abs().max() > 1e-3
