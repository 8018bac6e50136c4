"""Image conditioning of a trained model: one model for text-to-video and image-to-video.

`conditioning.mode` (a section of the model recipe, so checkpoints and exported folders know it):

    none    text-to-video only (every model before this section)
    frame   the TI2V way (Wan 2.2 5B): the first latent frame (and with `last` the last one) of x is the clean latents
            of the given frame, its tokens get noise level 0 (per-token timesteps: the backbone's t is [B, L]) and
            the loss ignores them. With the causal VAE the first pixel frame has its own latent frame, so this is exact.
            WAN or the flat DiT (per-token adaLN), flow or EDM (`FrameEDM`: per-frame sigma, 0 on the given frames).
    concat  the Wan 2.1 I2V way: [x, mask, y] along channels, mask [B, tf, f, h, w] 1 on the given pixel frames
            (frame 0 counted tf times, as the VAE folds 1 + tf k frames) and y = E(first frame, zero frames...);
            an unconditioned sample gets mask 0 and y 0. The backbone takes C + tf + C channels. With
            `image_encoder` (a Wan 2.1 I2V folder's CLIP) the frame's CLIP features are the backbone's image_context
            too (every sample conditioned: probability 1).

A sample is conditioned with probability `probability` (drawn per sample from (seed, sample index): see
dfm.training.conditioning), so with 0.5 half the batch trains image-to-video and half text-to-video.

Backbone calls, the same in training and sampling (`Conditioned.call`):
    frame:   net(x with x[:, :, given] = first_latent, t [B, L] zero on given tokens, ...)   (first_latent [B, C, 1, h, w])
    concat:  net(cat([x, condition]), t, ...)                                                (condition [B, tf + C, f, h, w])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from dfm.config import ConfigError
from dfm.diffusion.edm import LogNormalSigma
from dfm.diffusion.flow import TimestepSampler, loss_weight
from dfm.diffusion.noise import randn_like
from dfm.diffusion.paths import append_dims

Tensor = torch.Tensor
MODES = ("none", "frame", "concat")


@dataclass
class ConditioningConfig:
    mode: Literal["none", "frame", "concat"] = "none"
    probability: float = 0.5  # of a training sample being conditioned (the rest train text-to-video)
    last: bool = False  # frame: the last latent frame is given too (first-last-frame)
    # concat, Wan 2.1 I2V: a folder with image_encoder/ + image_processor/ (CLIP); the given frame's CLIP features
    # [B, 257, Di] (penultimate hidden state) feed the transformer's image cross-attention (image_context)
    image_encoder: str = ""


def check_conditioning(c: ConditioningConfig, arch: str, paradigm: str, patch_size) -> None:
    """ConfigError for what the conditioning cannot do with this backbone and paradigm."""
    if c.mode not in MODES:
        raise ConfigError(f"unknown conditioning.mode {c.mode!r}; use one of {', '.join(MODES)}")
    if not 0 <= c.probability <= 1:
        raise ConfigError(f"conditioning.probability must be in [0, 1], got {c.probability}")
    if c.mode == "frame":
        if arch not in ("wan", "dit") or paradigm not in ("flow", "edm"):
            raise ConfigError(f"conditioning.mode=frame needs per-token noise levels: model.arch=wan or dit with "
                              f"diffusion.paradigm=flow or edm (got {arch}/{paradigm}); use conditioning.mode=concat")
        if tuple(patch_size)[0] != 1:
            raise ConfigError(f"conditioning.mode=frame gives whole latent frames: model.overrides.patch_size must "
                              f"be [1, ph, pw] (got {list(patch_size)})")
    if c.last and c.mode == "none":
        raise ConfigError("conditioning.last=true gives the last frame too: set conditioning.mode=frame or concat")
    if c.image_encoder and (c.mode != "concat" or arch != "wan" or c.probability != 1):
        raise ConfigError("conditioning.image_encoder (CLIP image context, Wan 2.1 I2V) needs "
                          "conditioning.mode=concat, conditioning.probability=1 and model.arch=wan")


def in_channels(c: ConditioningConfig, channels: int, temporal_factor: int) -> int:
    """The backbone's input channels: C, or C + tf + C for concat."""
    return channels + temporal_factor + channels if c.mode == "concat" else channels


def frame_mask(num_frames: int, latent_shape, temporal_factor: int, last: bool = False) -> Tensor:
    """[1, tf, f, h, w]: 1 on the given pixel frames (frame 0 repeated tf times, as diffusers' mask_lat_size)."""
    _, _, f, h, w = latent_shape
    mask = torch.zeros(1, 1, num_frames, h, w)
    mask[:, :, 0] = 1
    if last:
        mask[:, :, -1] = 1
    mask = torch.cat([mask[:, :, :1].repeat_interleave(temporal_factor, dim=2), mask[:, :, 1:]], dim=2)
    return mask.view(1, f, temporal_factor, h, w).transpose(1, 2)  # [1, tf, f, h, w]


def given_frames(conditioned: Tensor, num_latent_frames: int, last: bool) -> Tensor:
    """[B] bool -> [B, f] bool: the latent frames given clean (frame 0, and the last with `last`)."""
    given = torch.zeros(conditioned.shape[0], num_latent_frames, dtype=torch.bool, device=conditioned.device)
    given[:, 0] = conditioned
    if last:
        given[:, -1] = conditioned
    return given


def token_timesteps(t: Tensor, given: Tensor, tokens_per_frame: int) -> Tensor:
    """t [B], given [B, f] bool -> per-token t [B, f * tokens_per_frame]: 0 on the given frames' tokens."""
    per_frame = t[:, None] * (~given).to(t.dtype)  # [B, f]
    return per_frame.repeat_interleave(tokens_per_frame, dim=1)  # [B, L], tokens in (f, h, w) order


def tokens_per_frame(net, shape) -> int:
    _, ph, pw = net.config.patch_size
    return (shape[3] // ph) * (shape[4] // pw)


class Conditioned:
    """How the backbone `net` is called under a conditioning mode (a plain callable, so the weights' names stay)."""

    def __init__(self, net, c: ConditioningConfig):
        self.net, self.c = net, c

    def call(self, x: Tensor, t: Tensor, given: Tensor | None = None, first_latent: Tensor | None = None,
             last_latent: Tensor | None = None, condition: Tensor | None = None, **cond) -> Tensor:
        """x [B, C, f, h, w], t [B]; frame: `given` [B, f] bool with the clean frames already in x, or
        first_latent / last_latent [B, C, 1, h, w] to put in (sampling); concat: condition [B, tf + C, f, h, w]."""
        if condition is not None:
            x_in = torch.cat([x, condition.to(x.dtype)], dim=1)
            return self.net(x_in, t, **cond)
        if first_latent is None and given is None:
            return self.net(x, t, **cond)  # text-to-video: the plain call, [B] timesteps
        B, f = x.shape[0], x.shape[2]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(B)
        if given is None:  # sampling: put the given frames in
            x = torch.cat([first_latent.to(x.dtype), x[:, :, 1:]], dim=2)
            if last_latent is not None:
                x = torch.cat([x[:, :, :-1], last_latent.to(x.dtype)], dim=2)
            ones = torch.ones(B, dtype=torch.bool, device=x.device)
            given = given_frames(ones, f, last_latent is not None)
        return self.net(x, token_timesteps(t, given, tokens_per_frame(self.net, x.shape)), **cond)


def frame_flow_loss(velocity_model: Callable[..., Tensor], x0: Tensor, conditioned: Tensor, *, last: bool = False,
                    generator=None, sampling: TimestepSampler | None = None, weighting: str = "none",
                    weighting_shift: float = 1.0, timestep_scale: float = 1.0, **cond) -> Tensor:
    """dfm.diffusion.flow.flow_loss with the given frames clean (conditioned [B] bool): the same draws (timesteps,
    then noise, per generator), x_s = x0 on the given frames, whose tokens get t = 0 and weight 0 in the loss; the
    per-sample loss is the mean over the other elements. velocity_model(x, t, given=[B, f], **cond)."""
    sampling = sampling if sampling is not None else TimestepSampler()
    s = sampling.sample(x0.shape[0], generator, x0.device)  # [B] fp32
    eps = randn_like(x0, generator)  # [B, C, f, h, w]
    s_ = append_dims(s, x0.ndim)
    given = given_frames(conditioned.to(x0.device), x0.shape[2], last)  # [B, f]
    g = given[:, None, :, None, None]  # [B, 1, f, 1, 1]
    x_s = torch.where(g, x0, (1 - s_) * x0 + s_ * eps).to(x0.dtype)
    u = eps - x0  # target velocity
    v = velocity_model(x_s, s * timestep_scale, given=given, **cond)
    weight = (~g).float().expand_as(x0)  # [B, C, f, h, w]: 0 on the given frames
    dims = tuple(range(1, x0.ndim))
    err = ((v.float() - u.float()) ** 2 * weight).sum(dims) / weight.sum(dims)  # [B]
    return loss_weight(s, weighting, weighting_shift) * err


# ------------------------------------------------------------------------------------ frame conditioning, EDM

GIVEN_SIGMA = 0.002  # EDM's sigma_min: the noise level the backbone's c_noise reads on given (sigma = 0) tokens


class FrameEDM:
    """EDM's preconditioned denoiser (`precond`, an EDMPrecond) with per-frame noise levels: the given latent frames
    have sigma = 0, where Karras et al.'s coefficients are exact — c_skip = 1, c_out = 0 (D = x, the clean
    latents), c_in = 1 / sigma_data — and only c_noise = ln(sigma) / 4 is undefined: those tokens read
    c_noise(GIVEN_SIGMA), the schedule's lowest level. D(x, sigma [B], given [B, f] | first_latent ...)."""

    def __init__(self, precond, c: ConditioningConfig):
        self.precond, self.c = precond, c

    def __call__(self, x: Tensor, sigma, given: Tensor | None = None, first_latent: Tensor | None = None,
                 last_latent: Tensor | None = None, **cond) -> Tensor:
        net, B, f = self.precond.net, x.shape[0], x.shape[2]
        if given is None and first_latent is None:
            return self.precond(x, sigma, **cond)  # text-to-video
        if given is None:  # sampling: put the given frames in
            x = torch.cat([first_latent.to(x.dtype), x[:, :, 1:]], dim=2)
            if last_latent is not None:
                x = torch.cat([x[:, :, :-1], last_latent.to(x.dtype)], dim=2)
            given = given_frames(torch.ones(B, dtype=torch.bool, device=x.device), f, last_latent is not None)
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(B)  # [B]
        s = sigma[:, None] * (~given).float()  # [B, f] per-frame sigma, 0 on the given frames
        c_skip, c_out, c_in, _ = self.precond.coefficients(s)  # [B, f] each, fp32 (exact at sigma = 0)
        c_noise = self.precond.coefficients(torch.where(given, torch.full_like(s, GIVEN_SIGMA), s))[3]  # [B, f]
        c_skip, c_out, c_in = (c[:, None, :, None, None] for c in (c_skip, c_out, c_in))  # [B, 1, f, 1, 1]
        tokens = c_noise.repeat_interleave(tokens_per_frame(net, x.shape), dim=1)  # [B, L]
        F_x = net((c_in * x).to(self.precond.dtype or torch.float32), tokens, **cond)
        return c_skip * x + c_out * F_x.float()


def frame_edm_loss(denoiser: FrameEDM, x0: Tensor, conditioned: Tensor, *, last: bool = False, generator=None,
                   P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, **cond) -> Tensor:
    """dfm.diffusion.edm.edm_loss with the given frames clean (conditioned [B] bool): the same draws (ln sigma ~
    N(P_mean, P_std^2), then noise, per generator), x = x0 on the given frames (sigma = 0 there), weight
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 and the mean over the other elements."""
    sigma = LogNormalSigma(P_mean, P_std).sample(x0.shape[0], generator).float().to(x0.device)  # [B]
    n = randn_like(x0, generator)  # [B, C, f, h, w]
    given = given_frames(conditioned.to(x0.device), x0.shape[2], last)  # [B, f]
    g = given[:, None, :, None, None]  # [B, 1, f, 1, 1]
    x = torch.where(g, x0, x0 + append_dims(sigma, x0.ndim) * n)
    D_x = denoiser(x, sigma, given=given, **cond)
    weight = (~g).float().expand_as(x0)  # 0 on the given frames
    dims = tuple(range(1, x0.ndim))
    err = ((D_x.float() - x0.float()) ** 2 * weight).sum(dims) / weight.sum(dims)  # [B]
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2 * err
