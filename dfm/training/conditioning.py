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
from dfm.pipeline.wan_family import clip_features, load_image_encoder, pixels, read_image


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
    if cfg.train.val_images and c.mode == "none":
        raise ConfigError("train.val_images are the first frames of image-to-video validation videos: this run has "
                          "no conditioning section (conditioning.mode=frame or concat); remove train.val_images")
    if cfg.train.val_images and c.last:
        raise ConfigError("train.val_images: a first-last-frame run (conditioning.last=true) validates with the "
                          "training clips' first and last frames; remove train.val_images")
    for path in cfg.train.val_images:
        try:
            read_image(path, "train.val_images")
        except PipelineError as e:
            raise ConfigError(str(e)) from None
    if c.mode == "concat" and cfg.data.dataset == "latents":
        raise ConfigError("conditioning.mode=concat encodes the first frame alone (E(frame, zeros...)): it needs "
                          "pixel data, not data.dataset=latents; use conditioning.mode=frame or the videos")


def validation_frames(cfg, dataset, autoencoder, count: int) -> tuple[list, list | None, list | None] | None:
    """The given frames of a conditioned run's image-to-video validation videos: (first frames, last frames or None,
    their captions or None), each frame [3, H, W] in [-1, 1] at the data's size. train.val_images: image paths, one
    per validation prompt or one for all, captions None (the videos take the validation prompts); default: the first
    (and, conditioning.last, the last) frames of the first `count` training items with their own captions, so an
    image never meets a prompt it contradicts (a latent dataset's clips are decoded). None for a text-to-video run."""
    c, paths = cfg.conditioning, list(cfg.train.val_images)
    if c.mode == "none":
        return None
    if paths:
        if len(paths) not in (1, count):
            raise ConfigError(f"train.val_images: {len(paths)} images for {count} validation prompts; give one, or "
                              f"one per prompt")
        size = cfg.data.size
        return [pixels(read_image(p, "train.val_images"), size, size) for p in (paths * count)[:count]], None, None
    firsts, lasts, captions = [], [], []
    for i in range(count):
        item = dataset[i % len(dataset)]
        if "video" in item:
            video = item["video"]  # [3, F, H, W] in [-1, 1]
        else:  # a latent dataset: decode the clip (the causal VAE gives frame 0 its own latent frame)
            device = next(iter(autoencoder.state_dict().values()), torch.empty(0)).device
            with torch.no_grad():
                video = autoencoder.decode(item["latents"][None].float().to(device))[0].clamp(-1, 1).cpu()
        firsts.append(video[:, 0].float())
        lasts.append(video[:, -1].float())
        captions.append(str(item.get("caption", "")))
    return firsts, (lasts if c.last else None), captions


def text_to_video_validation(cfg) -> bool:
    """Whether a run's validation makes text-to-video videos: not for models that never trained without an image
    (probability 1) or cannot sample without one (a Wan 2.1 I2V fine-tune's CLIP image context)."""
    c = cfg.conditioning
    return c.mode == "none" or (c.probability < 1 and not c.image_encoder)


def image_encoder(cfg, device):
    """(CLIP, processor) of conditioning.image_encoder (Wan 2.1 I2V), frozen; None without one."""
    if not cfg.conditioning.image_encoder:
        return None
    try:
        clip, processor = load_image_encoder(cfg.conditioning.image_encoder, device)
    except PipelineError as e:
        raise ConfigError(f"conditioning.image_encoder: {e}") from None
    return clip.requires_grad_(False), processor


def image_context(images, video: torch.Tensor, last: bool = False) -> torch.Tensor:
    """CLIP features [b, N, Di] of each clip's first frame (and, `last`, its last: FLF2V, N = 2 x 257), video
    [b, 3, F, H, W] in [-1, 1], as the Wan I2V / FLF2V pipeline computes them for those frames given as images (the
    uint8 pictures, its processor)."""
    clip, processor = images
    return torch.cat([clip_features(clip, processor, [read_image(v[:, 0])] + ([read_image(v[:, -1])] if last else []))
                      for v in video])


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
    video = batch["video"].to(x0.device)  # [b, 3, F, H, W]: concat, the first frame, zeros (, the last frame)
    given = torch.zeros_like(video)
    given[:, :, 0] = video[:, :, 0]
    if c.last:
        given[:, :, -1] = video[:, :, -1]
    y = autoencoder.encode(given).to(x0.dtype)  # [b, C, f, h, w]
    tf = getattr(autoencoder, "temporal_factor", 1)
    mask = frame_mask(video.shape[2], x0.shape, tf, c.last).to(x0)  # [1, tf, f, h, w]
    cond = torch.cat([mask.expand(x0.shape[0], -1, -1, -1, -1), y], dim=1)  # [b, tf + C, f, h, w]
    out = {"condition": cond * flags.view(-1, 1, 1, 1, 1).to(cond.dtype)}  # unconditioned: mask 0, y 0
    if images is not None:  # probability 1 (checked): every sample has its frame's CLIP features
        out["image_context"] = image_context(images, video, c.last).to(x0.device)
    return out
