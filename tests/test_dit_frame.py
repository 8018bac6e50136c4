"""Frame conditioning (conditioning.mode=frame) on the DiT: per-token noise levels through adaLN.

c_noise [B, L] gives each token its own conditioning vector c [B, L, D] (time embedding + pooled text + fps), so its
shift / scale / gate are its own. A constant [B, L] is the [B] call; a token's noise level acts on that token's
modulation (checked against the model run with that level for every token, the token's first-block input), and a
frame-conditioned DiT/flow run trains, resumes exactly and keeps the given first frame in image-to-video."""

from __future__ import annotations

import pytest
import torch

from dfm.checkpoint import latest_checkpoint, load_checkpoint
from dfm.config import ConfigError
from dfm.models import DiT
from dfm.models.dit import config
from dfm.pipeline.folders import pipeline_from_checkpoint
from dfm.training import train
from dfm.training.trainer import Trainer
from tests.test_train import losses, tiny

DIT = {"arch": "dit", "overrides": {"dim": 32, "heads": 2, "freq_dim": 32, "depth": 1}}


def lively(net):
    """Random weights everywhere (adaLN-Zero starts at zero, where every noise level looks the same)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net.eval()


@pytest.mark.parametrize("kw", [{}, {"adaln_lora_rank": 4, "pooled_text": True, "context_dim": 8, "fps_embedding": True}])
@torch.no_grad()
def test_constant_per_token_noise_is_the_per_sample_call(kw):
    net = lively(DiT(config("tiny", in_channels=3, **kw)))
    x = torch.randn(2, 3, 3, 4, 4)  # 3 frames x 2 x 2 tokens = 12 tokens
    t = torch.tensor([300.0, 800.0])
    cond = {}
    if "context_dim" in kw:
        cond = {"context": torch.randn(2, 5, 8), "context_mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool()}
    if "fps_embedding" in kw:
        cond["fps"] = torch.tensor([8.0, 12.0])
    a = net(x, t, **cond)
    b = net(x, t[:, None].expand(2, 12), **cond)
    # fp32 rounding of the modulation path (kept fp32), here |out| ~ 25: measured 1.7e-5 (7e-7 of the scale)
    torch.testing.assert_close(a, b, atol=2e-6 * float(a.abs().max()), rtol=0)


@torch.no_grad()
def test_each_token_is_modulated_by_its_own_noise_level():
    """The first block's modulation (shift, scale, gate) of token i under per-token levels equals the modulation
    of the model called with token i's level for every token."""
    net = lively(DiT(config("tiny", in_channels=3)))
    x = torch.randn(1, 3, 3, 4, 4)
    levels = torch.tensor([0.0] * 4 + [500.0] * 4 + [900.0] * 4)[None]  # [1, 12]: frame 0 at 0
    mods = []
    handle = net.blocks[0].adaln.register_forward_hook(lambda m, i, o: mods.append(o))
    net(x, levels)
    for level in (0.0, 500.0, 900.0):
        net(x, torch.tensor([level]))
    handle.remove()
    per_token = mods[0][0]  # [12, 6, D]
    for k, level in enumerate((0.0, 500.0, 900.0)):
        tokens = slice(4 * k, 4 * k + 4)
        want = mods[k + 1][0].expand(4, -1, -1)  # fp32 matmuls of other shapes: rounding only
        torch.testing.assert_close(per_token[tokens], want, atol=1e-6 * float(want.abs().max()), rtol=0)
    assert not torch.allclose(mods[1], mods[3])  # the levels differ in their modulation


def resumes_exactly_and_keeps_the_first_frame(tmp_path, model, *args):
    """A frame-conditioned run of 4 steps = 2 + 2 resumed (losses, weights); its image-to-video keeps frame 0 (the
    decode of the image's latents). Returns the pipeline and that video."""
    args = ("conditioning.mode=frame", "conditioning.probability=0.5", "data.num_frames=3") + args
    train(tiny(tmp_path, "full", "train.max_steps=4", *args, model=model))
    train(tiny(tmp_path, "part", "train.max_steps=2", *args, model=model))
    train(tiny(tmp_path, "part", "train.max_steps=4", *args, model=model), resume="latest")
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    a = load_checkpoint(latest_checkpoint(tmp_path / "full" / "checkpoints"))["model"]
    b = load_checkpoint(latest_checkpoint(tmp_path / "part" / "checkpoints"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    pipe = pipeline_from_checkpoint(tmp_path / "full")
    image = torch.rand(3, 8, 8) * 2 - 1
    out = pipe.generate(["the digit 3 moves up"], image=image, steps=3, seeds=[1], progress=False)
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # the uint8 picture the pipeline reads
    want = pipe.vae.decode(pipe.vae.encode(pixels[None, :, None]))[0, :, 0]  # identity autoencoder
    torch.testing.assert_close(out.videos[0, :, 0], want, atol=1e-6, rtol=0)
    return pipe, out.videos


def test_dit_frame_training_resumes_exactly_and_keeps_the_first_frame(tmp_path):
    resumes_exactly_and_keeps_the_first_frame(tmp_path, DIT)


def test_frame_conditioning_refuses_the_hourglass_and_temporal_patches(tmp_path):
    hourglass = {"arch": "dit", "overrides": {"dim": 32, "heads": 2, "freq_dim": 32, "depths": [1, 1]}}
    with pytest.raises(ConfigError, match="hourglass"):
        Trainer(tiny(tmp_path, "a", "conditioning.mode=frame", model=hourglass))
    with pytest.raises(ConfigError, match=r"patch_size must be \[1, ph, pw\]"):
        Trainer(tiny(tmp_path, "b", "conditioning.mode=frame", model={**DIT, "overrides": {**DIT["overrides"],
                                                                                         "patch_size": [2, 1, 1]}}))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------ EDM


class Recorder(torch.nn.Module):
    """A backbone that records its inputs and outputs `value` on latent frame 0, else 0 (patch (1, 1, 1))."""

    def __init__(self, value: float):
        super().__init__()
        self.value, self.seen = value, {}
        self.config = type("C", (), {"patch_size": (1, 1, 1)})()

    def forward(self, x, c_noise, **cond):
        self.seen.update(x=x.clone(), c_noise=c_noise.clone())
        out = torch.zeros_like(x)
        out[:, :, 0] = self.value
        return out


def test_frame_edm_loss_gives_clean_frames_sigma_0_and_no_weight():
    from dfm.conditioning import GIVEN_SIGMA, ConditioningConfig, FrameEDM, frame_edm_loss
    from dfm.diffusion.edm import EDMPrecond, edm_loss

    torch.manual_seed(0)
    x0 = torch.randn(3, 2, 4, 2, 3)  # [B, C, f, h, w]
    conditioned = torch.tensor([True, False, True])
    c = ConditioningConfig(mode="frame")

    def gens():
        return [torch.Generator().manual_seed(i) for i in range(3)]

    losses_ = {}
    for value in (0.0, 1e3):
        net = Recorder(value)
        losses_[value] = frame_edm_loss(FrameEDM(EDMPrecond(net, sigma_data=0.5), c), x0, conditioned,
                                        generator=gens(), sigma_data=0.5)
    seen = net.seen
    lo = torch.tensor(GIVEN_SIGMA).log() / 4
    tokens = seen["c_noise"].view(3, 4, 6)  # [B, f, h*w]
    assert torch.allclose(tokens[0, 0], lo) and torch.allclose(tokens[2, 0], lo)  # given: the lowest level
    assert torch.allclose(seen["x"][0, :, 0], x0[0, :, 0] / 0.5)  # c_in(0) x0 = x0 / sigma_data
    # the given frame's D is x0 whatever the model says there; the unconditioned sample's frame 0 counts
    assert torch.equal(losses_[0.0][[0, 2]], losses_[1e3][[0, 2]]) and losses_[1e3][1] > 100 * losses_[0.0][1]
    ref = edm_loss(EDMPrecond(Recorder(0.0), sigma_data=0.5), x0, generator=gens(), sigma_data=0.5)
    torch.testing.assert_close(losses_[0.0][1], ref[1], atol=0, rtol=1e-6)
    sigma = torch.stack([(-1.2 + 1.2 * torch.randn(1, generator=g)).exp()[0] for g in gens()])
    assert torch.allclose(tokens[1, 0], sigma[1].log() / 4)  # the unconditioned sample: its own sigma everywhere
    # output 0: D = c_skip x; the conditioned sample's loss only over frames 1..3 (exact, from the same draws)
    g = gens()
    s = torch.stack([(-1.2 + 1.2 * torch.randn(1, generator=gi)).exp()[0] for gi in g])
    n = torch.cat([torch.randn((1, *x0.shape[1:]), generator=gi) for gi in g])
    x = x0 + s.view(3, 1, 1, 1, 1) * n
    c_skip = 0.25 / (s**2 + 0.25)
    err = ((c_skip.view(3, 1, 1, 1, 1) * x - x0) ** 2)[:, :, 1:].mean(dim=(1, 2, 3, 4))
    weight = (s**2 + 0.25) / (s * 0.5) ** 2
    torch.testing.assert_close(losses_[0.0][[0, 2]], (weight * err)[[0, 2]], atol=0, rtol=1e-5)


@pytest.mark.parametrize("arch", ["dit", "wan"])
def test_edm_frame_training_resumes_exactly_and_keeps_the_first_frame(tmp_path, arch):
    model = DIT if arch == "dit" else {"arch": "wan", "size": "tiny", "overrides": {"num_layers": 1}}
    pipe, videos = resumes_exactly_and_keeps_the_first_frame(tmp_path, model, "diffusion.paradigm=edm")
    plain = pipe.generate(["the digit 3 moves up"], steps=3, seeds=[1], progress=False).videos  # text-to-video
    assert torch.isfinite(plain).all() and not torch.allclose(plain, videos)
