"""Image-to-video with dfm's own image-conditioned models (trained with a `conditioning` section: dfm.conditioning).

A dfm model folder records the mode in model_index.json ("conditioning": {"mode": "frame", "last": false}), a
trainer checkpoint in its config.yaml; loading either attaches a `DfmConditioner` (folders.CONDITIONERS hook), so
`Pipeline.generate(prompts, image=...)` and `dfm generate --image PATH` work as for the Wan family:

    frame   the image's latents E(image) [B, C, 1, h, w] are the first latent frame at every step (its tokens at
            t = 0) and of the result, so the decoded first frame is the decode of E(image); no image: text-to-video
    concat  condition [B, tf + C, f, h, w] = [mask, E(image, zero frames...)] in both CFG branches; no image: zeros
"""

from __future__ import annotations

import dataclasses

import torch

from dfm.conditioning import ConditioningConfig, frame_mask
from dfm.pipeline import folders
from dfm.pipeline.pipeline import PipelineError
from dfm.pipeline.wan_family import clip_features, load_image_encoder, pixels, read_image


def listed(image) -> list:
    """An image argument (one image or one per prompt; None: none) as a list."""
    return [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]


class DfmConditioner:
    """The image side of a dfm model trained with conditioning (the interface of wan_family.WanConditioner)."""

    two_experts = False

    def __init__(self, c: ConditioningConfig, vae):
        self.c, self.vae = c, vae
        self._clip = None  # (CLIP, processor) of c.image_encoder, loaded at the first image

    def check(self, image, last_image, guidance_scale_2) -> None:
        if self.c.image_encoder and image is None:
            raise PipelineError("this model is a Wan 2.1 I2V fine-tune: it needs an image (image=..., --image PATH)")
        if self.c.image_encoder and self.c.last and last_image is None:
            raise PipelineError("this model is a Wan 2.1 FLF2V fine-tune: it needs last_image too (last_image=..., "
                                "--last-image PATH)")
        if guidance_scale_2 is not None:
            raise PipelineError("guidance_scale_2 is a two-expert (Wan 2.2 A14B) setting; use guidance_scale")
        if last_image is not None and not self.c.last:
            raise PipelineError("this model was trained on the first frame only: it takes no last_image")
        if last_image is not None and image is None:
            raise PipelineError("last_image needs image (the first frame) too")

    def guidance(self, w: float, w2):
        return w

    def prepare(self, image, last_image, n: int, num_frames: int, height: int, width: int, device) -> tuple:
        """(cond tensors of both CFG branches, latents -> latents) for n videos."""
        shape = (n, *self.vae.latent_shape(num_frames, height, width))  # [n, C, f, h, w]
        if image is None:
            if self.c.mode == "concat":  # text-to-video: the unconditioned samples' mask 0, y 0 of training
                tf = getattr(self.vae, "temporal_factor", 1)
                return {"condition": torch.zeros(n, tf + shape[1], *shape[2:], device=device)}, lambda z: z
            return {}, lambda z: z
        firsts = self._frames(image, n, "image", height, width)  # [n, 3, 1, H, W]
        if self.c.mode == "concat":  # [first, zeros... (, last)]
            lasts = [] if last_image is None else [self._frames(last_image, n, "last_image", height, width)]
            video = torch.cat([firsts, firsts.new_zeros(n, 3, num_frames - 1 - len(lasts), height, width), *lasts],
                              dim=2)
            y = self._encode(video)  # [n, C, f, h, w]
            mask = frame_mask(num_frames, y.shape, getattr(self.vae, "temporal_factor", 1), bool(lasts)).to(y)
            cond = {"condition": torch.cat([mask.expand(n, -1, -1, -1, -1), y], dim=1).to(device)}
            if self.c.image_encoder:  # CLIP features of each video's image(s) [n, N, Di], as WanConditioner
                cond["image_context"] = self._image_context(image, last_image, n).to(device)
            return cond, lambda z: z
        first = self._encode(firsts).to(device)  # [n, C, 1, h, w]
        cond = {"first_latent": first}
        if last_image is not None:
            cond["last_latent"] = self._encode(self._frames(last_image, n, "last_image", height, width)).to(device)

        def finish(z):
            z = torch.cat([first.to(z), z[:, :, 1:]], dim=2)
            return torch.cat([z[:, :, :-1], cond["last_latent"].to(z)], dim=2) if "last_latent" in cond else z

        return cond, finish

    def _image_context(self, image, last_image, n: int) -> torch.Tensor:
        if self._clip is None:
            device = next(iter(self.vae.state_dict().values()), torch.empty(0)).device
            self._clip = load_image_encoder(self.c.image_encoder, device)
        firsts = [read_image(im) for im in listed(image)]
        lasts = [read_image(im, "last_image") for im in listed(last_image)]
        k = max(len(firsts), len(lasts))
        feats = torch.cat([clip_features(*self._clip, [firsts[i % len(firsts)], *([lasts[i % len(lasts)]] if lasts
                                                                                   else [])]) for i in range(k)])
        return feats.expand(n, -1, -1) if k == 1 else feats  # [n, N, Di]

    def _frames(self, image, n: int, what: str, height: int, width: int) -> torch.Tensor:
        images = listed(image)
        if len(images) not in (1, n):
            raise PipelineError(f"got {len(images)} {what}s for {n} prompts; pass one, or one per prompt")
        frames = torch.stack([pixels(read_image(im, what), height, width) for im in images])  # [k, 3, H, W]
        return frames[:, :, None].expand(n, -1, -1, -1, -1) if len(images) == 1 else frames[:, :, None]

    @torch.no_grad()
    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        device = next(iter(self.vae.state_dict().values()), torch.empty(0)).device
        return self.vae.encode(video.to(device)).float()


def attach(pipe, conditioning: dict | ConditioningConfig | None) -> None:
    """Give a loaded dfm pipeline its conditioning (a model_index.json entry or a recipe's section), if any."""
    if conditioning is None:
        return
    c = conditioning if isinstance(conditioning, ConditioningConfig) else ConditioningConfig(
        **{k: v for k, v in conditioning.items() if k in {f.name for f in dataclasses.fields(ConditioningConfig)}})
    if c.mode == "none":
        return
    pipe.module.conditioning = c
    pipe.conditioner = DfmConditioner(c, pipe.vae)


def index_entry(pipe) -> dict:
    """The model_index.json entry of a conditioned pipeline ({} for a text-to-video one: folders stay as they were)."""
    c = getattr(pipe.module, "conditioning", None)
    if c is None or c.mode == "none":
        return {}
    return {"conditioning": {"mode": c.mode, "last": c.last, **({"image_encoder": c.image_encoder} if c.image_encoder
                                                                 else {})}}


folders.CONDITIONERS.append((attach, index_entry))
