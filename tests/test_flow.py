import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from dfm.diffusion import flow


@pytest.mark.parametrize(
    "name,kwargs",
    [("uniform", {}), ("logit_normal", dict(logit_mean=0.3, logit_std=1.2)), ("mode", dict(mode_scale=1.29))],
)
def test_timestep_sampling_matches_diffusers(name, kwargs):
    ours = flow.TimestepSampler(name, **kwargs).sample(1000, torch.Generator().manual_seed(0))
    theirs = compute_density_for_timestep_sampling(
        name, 1000, generator=torch.Generator().manual_seed(0), **{"logit_mean": None, "logit_std": None, "mode_scale": None, **kwargs}
    )
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weighting_matches_diffusers(weighting):
    s = torch.linspace(0.01, 0.99, 50)
    torch.testing.assert_close(flow.loss_weight(s, weighting), compute_loss_weighting_for_sd3(weighting, s))


def test_linear_weighting_and_unknown_names():
    s = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(flow.loss_weight(s, "linear", shift=3.0), torch.tensor([1.0, 2.5, 4.0]))
    with pytest.raises(ValueError, match="unknown loss weighting 'cos'"):
        flow.loss_weight(s, "cos")
    with pytest.raises(ValueError, match="unknown timestep sampling 'lognorm'"):
        flow.TimestepSampler("lognorm")


def test_shift_matches_diffusers_flow_match_scheduler():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unshifted = torch.linspace(1, 1000, 1000).flip(0) / 1000  # the scheduler's training sigmas before the shift
    torch.testing.assert_close(flow.shift_timesteps(unshifted, 3.0), sched.sigmas.float())
    # the sampler applies it to whatever it drew
    plain = flow.TimestepSampler("uniform").sample(64, torch.Generator().manual_seed(0))
    shifted = flow.TimestepSampler("uniform", shift=3.0).sample(64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))


def test_mixed_sampling_ratio():
    # logit-normal squeezed to s = 0.5; the uniform share shows up as samples far from 0.5
    sampler = flow.TimestepSampler("mixed", logit_std=1e-3, uniform_ratio=0.3)
    s = sampler.sample(20000, torch.Generator().manual_seed(0))
    far = ((s - 0.5).abs() > 0.05).float().mean()
    assert abs(far - 0.3 * 0.9) < 0.015
    assert s.min() >= 0 and s.max() <= 1


def test_per_sample_generators_make_sampling_batch_independent():
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(5)]
    for name in flow.TIMESTEP_SAMPLINGS:
        sampler = flow.TimestepSampler(name)
        batch = sampler.sample(5, gens())
        single = torch.cat([sampler.sample(1, [g]) for g in gens()])
        torch.testing.assert_close(batch, single)


def test_flow_loss_target_is_eps_minus_x0():
    x0 = torch.randn(256, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    seen = {}

    def oracle(x_s, t, context):
        # knows x0: on the path x_s = (1 - s) x0 + s eps, (x_s - x0) / s = eps - x0 exactly
        seen["x_s"], seen["t"], seen["context"] = x_s, t, context
        s = (t / 1000)[:, None, None, None]
        return (x_s - x0) / s

    ctx = torch.ones(256, 7)
    loss = flow.flow_loss(oracle, x0, generator=torch.Generator().manual_seed(1), timestep_scale=1000, context=ctx)
    assert loss.shape == (256,) and seen["context"] is ctx
    assert loss.max() < 1e-8
    t = seen["t"]
    assert t.dtype == torch.float32 and 0 < t.min() and t.max() < 1000 and t.max() > 1  # the model sees s * 1000

    # a zero model pays w(s) * mean((eps - x0)^2), with eps recovered from x_s
    s = t / 1000
    loss0 = flow.flow_loss(
        lambda x_s, t_: torch.zeros_like(x_s), x0, generator=torch.Generator().manual_seed(1),
        weighting="cosmap", timestep_scale=1000,
    )
    s_ = s[:, None, None, None]
    eps = (seen["x_s"] - (1 - s_) * x0) / s_
    assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1) < 0.02
    expected = 2 / (math.pi * (1 - 2 * s + 2 * s**2)) * ((eps - x0) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(loss0, expected, rtol=1e-4, atol=1e-5)
