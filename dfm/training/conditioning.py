"""The trainer's side of image conditioning (dfm.conditioning): which samples are conditioned, and their inputs.

Sample g is conditioned when a uniform draw seeded by (train.seed, g, 3) is < conditioning.probability: a function
of the global sample index alone, so N ranks and a resumed run condition exactly the samples one uninterrupted
process does (as the caption dropout of dfm.training.data.keep_captions, seeded by (seed, g, 1)). With
probability 0 (or mode none) nothing is drawn and the loss is today's, bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from dfm.conditioning import check_conditioning, frame_mask
from dfm.config import ConfigError
from dfm.model import backbone_config
from dfm.pipeline.pipeline import PipelineError
from dfm.pipeline.wan_family import clip_features, load_image_encoder, read_image


def conditioned_samples(seed: int, samples, probability: float) -> list[bool]:
    """Per global sample index: conditioned on its first frame or not."""
    return [bool(np.random.default_rng([seed, int(g), 3]).random() < probability) for g in samples]


def check_training_conditioning(cfg) -> None:
    """ConfigError for a conditioning section this run cannot train (before anything is written)."""
    c = cfg.conditioning
    net = backbone_config(cfg.model, 3, cfg.text.dim)
    check_conditioning(c, cfg.model.arch, cfg.diffusion.paradigm, getattr(net, "patch_size", (1, 1, 1)))
    if c.mode == "frame" and getattr(net, "hourglass", False):
        raise ConfigError("conditioning.mode=frame gives each token its own noise level, which an hourglass DiT "
                          "(model.overrides.depths) merges away; use the flat DiT or conditioning.mode=concat")
    if c.image_encoder and cfg.train.validate_every:
        raise ConfigError("train.validate_every: the validation videos are text-to-video, and a Wan 2.1 I2V model "
                          "needs an image; set train.validate_every=0 and sample checkpoints with dfm generate --image")
    if c.mode == "concat" and cfg.data.dataset == "latents":
        raise ConfigError("conditioning.mode=concat encodes the first frame alone (E(frame, zeros...)): it needs "
                          "pixel data, not data.dataset=latents; use conditioning.mode=frame or the videos")


def image_encoder(cfg, device):
    """(CLIP, processor) of conditioning.image_encoder (Wan 2.1 I2V), frozen; None without one."""
    if not cfg.conditioning.image_encoder:
        return None
    try:
        clip, processor = load_image_encoder(cfg.conditioning.image_encoder, device)
    except PipelineError as e:
        raise ConfigError(f"conditioning.image_encoder: {e}") from None
    return clip.requires_grad_(False), processor


def image_context(images, video: torch.Tensor) -> torch.Tensor:
    """CLIP features [b, N, Di] of each clip's first frame (video [b, 3, F, H, W] in [-1, 1]), as the Wan I2V
    pipeline computes them for that frame given as an image (the uint8 picture, its processor)."""
    clip, processor = images
    return torch.cat([clip_features(clip, processor, [read_image(v[:, 0])]) for v in video])


@torch.no_grad()
def loss_inputs(cfg, batch: dict, x0: torch.Tensor, autoencoder, images=None) -> dict:
    """The image-conditioning keyword arguments of DiffusionModule.loss for one micro-batch ({} when none);
    `images`: image_encoder(cfg) for the CLIP image context."""
    c = cfg.conditioning
    if c.mode == "none" or c.probability == 0:
        return {}
    flags = torch.tensor(conditioned_samples(cfg.train.seed, batch["sample"].tolist(), c.probability),
                         device=x0.device)  # [b] bool
    if c.mode == "frame":
        return {"conditioned": flags}
    video = batch["video"].to(x0.device)  # [b, 3, F, H, W]: concat, the first frame then zeros
    first = torch.cat([video[:, :, :1], torch.zeros_like(video[:, :, 1:])], dim=2)
    y = autoencoder.encode(first).to(x0.dtype)  # [b, C, f, h, w]
    tf = getattr(autoencoder, "temporal_factor", 1)
    mask = frame_mask(video.shape[2], x0.shape, tf).to(x0)  # [1, tf, f, h, w]
    cond = torch.cat([mask.expand(x0.shape[0], -1, -1, -1, -1), y], dim=1)  # [b, tf + C, f, h, w]
    out = {"condition": cond * flags.view(-1, 1, 1, 1, 1).to(cond.dtype)}  # unconditioned: mask 0, y 0
    if images is not None:  # probability 1 (checked): every sample has its frame's CLIP features
        out["image_context"] = image_context(images, video).to(x0.device)
    return out
