"""The rest of the Wan family as diffusers lays it out (model_index.json), on dfm's one Pipeline:

    layout     diffusers class             transformer(s)                          conditioning
    I2V        WanImageToVideoPipeline     one, 36 channels, CLIP cross-attn       first frame (VAE) + mask, CLIP
    FLF2V      WanImageToVideoPipeline     one, 36 ch, CLIP with position table    first + last frame, both CLIPs
    A14B-T2V   WanPipeline                 two experts, boundary_ratio             text
    A14B-I2V   WanImageToVideoPipeline     two experts, 36 ch, no CLIP             first frame (VAE) + mask
    TI2V       WanPipeline, expand_ts      one, 48 ch (Wan 2.2 VAE), per-token t   optional first frame latents

One generation is Pipeline.generate with three additions (`WanConditioner`): the image inputs become cond tensors
of both CFG branches (so guidance stays one batched forward), `WanFamilyNet` applies them inside the backbone
call (channel concat, or the first latent frame replaced at t = 0), and with two experts the backbone and the
guidance scale switch per step by the noise level the sampler asks for: the high-noise expert and w where
t >= boundary_ratio * 1000 (t the model's timestep, as diffusers compares), the low-noise one and w2 below.

    I2V condition  [B, 4 + C, f, h, w] = [mask, E(first frame, zeros...)]: mask 1 on the pixel frames given
                   (frame 0 counts 4 times, as the VAE folds 1 + 4k frames), 0 elsewhere (diffusers prepare_latents)
    TI2V           x[:, :, 0] = E(image), t = 0 on those tokens; the result's first frame is E(image)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from dfm.diffusion.paths import sigma_to_flow_t
from dfm.errors import first_line
from dfm.pipeline.folders import (FAMILY_LOADERS, WAN_TEXT_LENGTH, IntegerTimesteps, _diffusion_module,
                                  _load_text, _load_transformer, _load_vae, _need_dir, wan_scheduler_settings)
from dfm.pipeline.pipeline import Pipeline, PipelineError

IMAGE_LAYOUTS = ("I2V", "FLF2V", "A14B-I2V", "TI2V")
# Wan's defaults per layout as recalled from Wan2.2's wan/configs (not checked against the files here); shift comes
# from the scheduler config
LAYOUT_DEFAULTS = {
    "I2V": {},
    "FLF2V": {"height": 720, "width": 1280},
    "A14B-T2V": {"height": 720, "width": 1280, "steps": 40, "guidance_scale": 4.0, "guidance_scale_2": 3.0},
    "A14B-I2V": {"height": 720, "width": 1280, "steps": 40, "guidance_scale": 3.5, "guidance_scale_2": 3.5},
    "TI2V": {"num_frames": 121, "height": 704, "width": 1280, "fps": 24.0},
}


def layout(index: dict, transformer_config: dict) -> str | None:
    """The family layout of a diffusers model_index.json (None: plain Wan 2.1 T2V, loaded by folders.py)."""
    name = index.get("_class_name")
    two = index.get("transformer_2") not in (None, [None, None])
    if name == "WanImageToVideoPipeline":
        if index.get("expand_timesteps"):
            return "TI2V"
        if two:
            return "A14B-I2V"
        return "FLF2V" if transformer_config.get("pos_embed_seq_len") else "I2V"
    if name == "WanPipeline":
        if index.get("expand_timesteps"):
            return "TI2V"
        if two or index.get("boundary_ratio") is not None:
            return "A14B-T2V"
    return None


def _claims(path: Path, index: dict) -> bool:
    if index.get("_class_name") == "WanImageToVideoPipeline":
        return True
    return index.get("_class_name") == "WanPipeline" and layout(index, {}) is not None


# ============================================================================================== backbone


class WanFamilyNet(nn.Module):
    """One or two WanModels (high-noise first) behind the backbone signature `net(x, t, context, **cond)`.

    cond: `condition` [B, 4 + C, f, h, w] (I2V: concatenated to x along channels), `image_context` [B, N, Di]
    (CLIP features), `first_latent` [B, C, 1, h, w] (TI2V: replaces x's first frame, whose tokens get t = 0)."""

    def __init__(self, experts: list[nn.Module], boundary: float | None = None, expand_timesteps: bool = False):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.boundary, self.expand_timesteps = boundary, expand_timesteps

    @property
    def config(self):
        return self.experts[0].config

    def high_noise(self, t: torch.Tensor) -> torch.Tensor:
        """[B] bool: the high-noise expert's steps (diffusers: t >= boundary_ratio * num_train_timesteps)."""
        return torch.ones_like(t, dtype=torch.bool) if self.boundary is None else t >= self.boundary

    def forward(self, x, t, context, context_mask=None, condition=None, image_context=None, first_latent=None):
        B = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(B)  # [B]
        if self.expand_timesteps:
            x, t = self._expand(x, t, first_latent)
        if condition is not None:
            x = torch.cat([x, condition.to(x.dtype)], dim=1)  # [B, C + 4 + C, f, h, w]
        kw = {"context_mask": context_mask, **({} if image_context is None else {"image_context": image_context})}
        high = self.high_noise(t if t.ndim == 1 else t.amax(1))  # [B]
        if bool(high.all()) or len(self.experts) == 1:
            return self.experts[0](x, t, context, **kw)
        if not bool(high.any()):
            return self.experts[1](x, t, context, **kw)
        pick = high.view(B, *[1] * (x.ndim - 1))  # samples at different noise levels: each its expert
        return torch.where(pick, self.experts[0](x, t, context, **kw), self.experts[1](x, t, context, **kw))

    def _expand(self, x, t, first_latent):
        """Per-token timesteps [B, L]; with an image, the first latent frame is its latents at t = 0."""
        pt, ph, pw = self.config.patch_size
        f, h, w = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        keep = torch.ones(f, h * w, device=x.device)  # [f', h'w'] 1 = denoised, 0 = given
        if first_latent is not None:
            x = torch.cat([first_latent.to(x.dtype), x[:, :, 1:]], dim=2)
            keep[0] = 0
        return x, keep.flatten()[None, :] * t[:, None]  # [B, L]


def expert_guidance(net: WanFamilyNet, diffusion: dict, w: float, w2: float):
    """sigma [B] -> the guidance scale of the expert that step runs ([B]), the backbone's own switch: t as
    DiffusionModule.denoise and IntegerTimesteps compute it from sigma."""

    def scale(sigma: torch.Tensor) -> torch.Tensor:
        t = sigma_to_flow_t(sigma.float()) * float(diffusion["timestep_scale"])
        if diffusion.get("integer_timesteps"):
            t = torch.floor(t + 1e-3)
        return torch.where(net.high_noise(t), torch.tensor(w), torch.tensor(w2))

    return scale


# ============================================================================================ conditioning


def read_image(image, what: str = "image"):
    """A PIL image, a path, or a [3, H, W] tensor in [-1, 1] -> an RGB PIL image (or a one-line PipelineError)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise PipelineError(f"cannot read {what} {image}: {first_line(e)}; pass a PNG or JPEG file") from None
    if torch.is_tensor(image):
        if image.ndim != 3 or image.shape[0] != 3:
            raise PipelineError(f"{what} tensor must be [3, H, W] in [-1, 1], got shape {tuple(image.shape)}")
        pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return Image.fromarray(pixels.permute(1, 2, 0).numpy())
    raise PipelineError(f"{what} must be a PIL image, a file path or a [3, H, W] tensor, got {type(image).__name__}")


def pixels(image, height: int, width: int) -> torch.Tensor:
    """diffusers' VideoProcessor.preprocess of a PIL image: Lanczos resize to (width, height), [-1, 1], [3, H, W]."""
    import numpy as np
    from PIL import Image

    resized = image.resize((width, height), resample=Image.LANCZOS)
    arr = torch.from_numpy(np.array(resized).astype(np.float32) / 255.0)  # [H, W, 3] in [0, 1]
    return arr.permute(2, 0, 1) * 2 - 1


def check_inputs(kind: str | None, two_experts: bool, image, last_image, guidance_scale_2) -> None:
    """One-line errors for image inputs a layout does not take (kind None: a text-to-video model)."""
    name = {"A14B-T2V": "Wan 2.2 A14B text-to-video", None: "text-to-video"}.get(kind, f"Wan {kind}")
    if image is None and kind in ("I2V", "FLF2V", "A14B-I2V"):
        raise PipelineError(f"this is a {name} folder: it needs an image (image=..., --image PATH)")
    if image is not None and kind not in IMAGE_LAYOUTS:
        raise PipelineError(f"this is a {name} model: it takes no image; use a Wan image-to-video folder")
    if last_image is None and kind == "FLF2V":
        raise PipelineError("this is a Wan FLF2V (first-last-frame) folder: it needs last_image too "
                            "(last_image=..., --last-image PATH)")
    if last_image is not None and kind != "FLF2V":
        raise PipelineError(f"last_image needs a first-last-frame (FLF2V) model; this one is {name}")
    if guidance_scale_2 is not None and not two_experts:
        raise PipelineError(f"guidance_scale_2 is the low-noise expert's scale; this {name} model has one "
                            f"transformer: use guidance_scale")


def check_folder_inputs(path, image, last_image, guidance_scale_2) -> None:
    """`check_inputs` from a folder's model_index.json and transformer config alone (before loading weights)."""
    import json

    path = Path(path)
    if not path.exists():
        return  # load_pipeline names the problem
    if not (path / "model_index.json").is_file():
        return  # a trainer checkpoint (quick to load): the loaded pipeline checks
    try:
        index = json.loads((path / "model_index.json").read_text())
        if index.get("format") == "dfm" and index.get("conditioning"):
            return  # a dfm model trained with image conditioning: its conditioner checks (pipeline/conditioned.py)
        kind = layout(index, _read_config(path / "transformer")) if _claims(path, index) else None
    except (OSError, ValueError, AttributeError, PipelineError):
        return  # not a readable folder: load_pipeline names the problem
    check_inputs(kind, index.get("transformer_2") not in (None, [None, None]), image, last_image, guidance_scale_2)


class WanConditioner:
    """The image side of a family pipeline: checks the inputs, encodes them once, and gives the cond tensors both
    CFG branches share plus what happens to the sampled latents (TI2V: the given first frame put back)."""

    def __init__(self, layout: str, net: WanFamilyNet, vae, diffusion: dict, clip=None, processor=None,
                 guidance_scale_2: float | None = None):
        self.layout, self.net, self.vae, self.diffusion = layout, net, vae, diffusion
        self.clip, self.processor = clip, processor
        self.guidance_scale_2 = guidance_scale_2  # the low-noise expert's default w (None: one expert)

    @property
    def two_experts(self) -> bool:
        return len(self.net.experts) == 2

    def check(self, image, last_image, guidance_scale_2) -> None:
        check_inputs(self.layout, self.two_experts, image, last_image, guidance_scale_2)

    def guidance(self, w: float, w2: float | None):

        """The guidance scale for guided_sample: w, or per step w / w2 by expert."""
        if not self.two_experts:
            return w
        if w2 is None:  # the folder's (Wan's) default, else diffusers' rule: the same w for both experts
            w2 = w if self.guidance_scale_2 is None else self.guidance_scale_2
        if not (math.isfinite(float(w2)) and 0 <= float(w2) <= 100):
            raise PipelineError(f"guidance_scale_2 must be a number in [0, 100], got {w2}")
        return w if w2 == w else expert_guidance(self.net, self.diffusion, w, float(w2))

    def prepare(self, image, last_image, n: int, num_frames: int, height: int, width: int, device) -> tuple:
        """(cond tensors for both branches, latents -> latents) for n videos."""
        if image is None:
            return {}, lambda z: z
        firsts = self._images(image, n, "image")
        lasts = self._images(last_image, n, "last_image") if last_image is not None else None
        cache, rows = {}, []
        for i in range(n):  # one image for all is encoded once
            key = (id(firsts[i]), None if lasts is None else id(lasts[i]))
            if key not in cache:
                cache[key] = self._encode(firsts[i], None if lasts is None else lasts[i], num_frames, height, width)
            rows.append(cache[key])
        cond = {k: torch.cat([r[k] for r in rows]).to(device) for k in rows[0]}
        if "first_latent" not in cond:
            return cond, lambda z: z
        first = cond["first_latent"]
        return cond, lambda z: torch.cat([first.to(z), z[:, :, 1:]], dim=2)

    def _images(self, image, n: int, what: str) -> list:
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if len(images) not in (1, n):
            raise PipelineError(f"got {len(images)} {what}s for {n} prompts; pass one, or one per prompt")
        images = [read_image(im, what) for im in images]
        return images * n if len(images) == 1 else images

    @torch.no_grad()
    def _encode(self, first, last, num_frames: int, height: int, width: int) -> dict:
        vae, out = self.vae, {}
        frame = pixels(first, height, width)[None, :, None]  # [1, 3, 1, H, W]
        if self.layout == "TI2V":
            return {"first_latent": vae.encode(frame.to(vae.latents_mean.device))}  # [1, C, 1, h, w]
        frames = [frame, frame.new_zeros(1, 3, num_frames - 1 - (last is not None), height, width)]
        if last is not None:
            frames.append(pixels(last, height, width)[None, :, None])
        latents = vae.encode(torch.cat(frames, dim=2).to(vae.latents_mean.device))  # [1, C, f, h, w]
        out["condition"] = torch.cat([self._mask(num_frames, latents.shape, last is not None).to(latents),
                                      latents], dim=1)  # [1, 4 + C, f, h, w]
        if self.clip is not None:
            out["image_context"] = clip_features(self.clip, self.processor, [first] if last is None else [first, last])
        return out

    def _mask(self, num_frames: int, shape, has_last: bool) -> torch.Tensor:
        """diffusers' mask_lat_size: 1 on the given pixel frames, frame 0 repeated x temporal factor, folded
        to [1, tf, f, h, w] (tf = 4 channels)."""
        tf = self.vae.temporal_factor
        _, _, f, h, w = shape
        mask = torch.zeros(1, 1, num_frames, h, w)
        mask[:, :, 0] = 1
        if has_last:
            mask[:, :, -1] = 1
        mask = torch.cat([mask[:, :, :1].repeat_interleave(tf, dim=2), mask[:, :, 1:]], dim=2)  # [1, 1, tf*f, h, w]
        return mask.view(1, f, tf, h, w).transpose(1, 2)  # [1, tf, f, h, w]


# ================================================================================================ loading


def _load_clip(path: Path, device, dtype):
    from transformers import CLIPImageProcessor, CLIPVisionModel

    again = "download the folder again (an I2V folder has image_encoder/ and image_processor/)"
    _need_dir(path / "image_encoder", again)
    _need_dir(path / "image_processor", again)
    try:
        clip = CLIPVisionModel.from_pretrained(str(path / "image_encoder"), torch_dtype=dtype, use_safetensors=True)
        processor = CLIPImageProcessor.from_pretrained(str(path / "image_processor"))
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}/image_encoder: {first_line(e)}; {again}") from None
    return clip.eval().to(device), processor


@torch.no_grad()
def clip_features(clip, processor, images: list) -> torch.Tensor:
    """PIL images of one video (first, then last) -> [1, N, Di] fp32: CLIP's penultimate hidden state, the image
    context of Wan 2.1 I2V / FLF2V (diffusers' encode_image)."""
    inputs = processor(images=images, return_tensors="pt")
    device = next(clip.parameters()).device
    feats = clip(pixel_values=inputs["pixel_values"].to(device, clip.dtype),
                 output_hidden_states=True).hidden_states[-2]  # [1 or 2, 257, Di], penultimate
    return feats.float().reshape(1, -1, feats.shape[-1])  # [1, N, Di]


def load_image_encoder(folder, device=None, dtype=torch.float32):
    """(CLIP vision model, its processor) of a Wan I2V folder (FOLDER/image_encoder, FOLDER/image_processor)."""
    return _load_clip(Path(folder), device or torch.device("cpu"), dtype)


def load_family_folder(path: Path, index: dict, device, dtype) -> Pipeline:
    """A diffusers folder of one of the layouts above as a Pipeline with its WanConditioner."""
    again = "download the Wan folder again"
    _need_dir(path / "transformer", again)
    tcfg = _read_config(path / "transformer")
    kind = layout(index, tcfg)
    diffusion, defaults, options = wan_scheduler_settings(path)
    extra = LAYOUT_DEFAULTS[kind]
    defaults = {**defaults, **{k: v for k, v in extra.items() if k != "guidance_scale_2"}}
    names = ["transformer", "transformer_2"] if kind.startswith("A14B") else ["transformer"]
    for name in names:
        _need_dir(path / name, again)
    experts = [_load_transformer("wan", path / name, device, dtype) for name in names]
    text = _load_text(path / "text_encoder", again, tokenizer=path / "tokenizer", max_length=WAN_TEXT_LENGTH,
                      device=device, dtype=dtype)
    vae = _load_vae(path / "vae", again)
    clip = processor = None
    if experts[0].config.image_dim is not None:
        clip, processor = _load_clip(path, device, dtype)
    _check_parts(path, kind, experts, text, vae, clip)
    ratio = index.get("boundary_ratio")
    boundary = None if ratio is None else float(ratio) * diffusion["num_train_timesteps"]
    net = WanFamilyNet(experts, boundary, expand_timesteps=kind == "TI2V")
    backbone = IntegerTimesteps(net) if diffusion["integer_timesteps"] else net
    module = _diffusion_module(backbone, text, "flow", diffusion, "empty")
    pipe = Pipeline(module.to(device), text, vae.to(device), arch="wan", paradigm="flow", diffusion=diffusion,
                    defaults=defaults, null="empty", use_mask=False, kind="wan", device=device, dtype=dtype,
                    source={"folder": str(path), "format": f"diffusers {index.get('_class_name')}", "layout": kind},
                    sampler_options={defaults["sampler"]: options} if options else None)
    w2 = extra.get("guidance_scale_2") if len(experts) == 2 else None
    pipe.conditioner = WanConditioner(kind, net, pipe.vae, diffusion, clip, processor, w2)
    return pipe


def _read_config(folder: Path) -> dict:
    import json

    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"{folder}/config.json is unreadable ({first_line(e)}); download the folder again") from None


def _check_parts(path: Path, kind: str, experts, text, vae, clip) -> None:
    c = vae.channels
    want = c + vae.temporal_factor + c if kind in ("I2V", "FLF2V", "A14B-I2V") else c
    for i, net in enumerate(experts):
        cfg = net.config
        if cfg.text_dim != text.dim:
            raise PipelineError(f"{path}: transformer {i + 1} reads text of width {cfg.text_dim} but the text "
                                f"encoder gives {text.dim}; the folder mixes models")
        if cfg.in_channels != want:
            raise PipelineError(f"{path}: a {kind} transformer takes {want} channels with this {c}-channel VAE, "
                                f"but transformer {i + 1} takes {cfg.in_channels}; the folder mixes models")
    if clip is not None and clip.config.hidden_size != experts[0].config.image_dim:
        raise PipelineError(f"{path}: the image encoder gives width {clip.config.hidden_size}, the transformer "
                            f"reads {experts[0].config.image_dim}; the folder mixes models")


def describe_layout(pipe_index: dict, path: Path) -> tuple[list[tuple[str, str]], dict]:
    """`dfm info` for a family folder: (key, value) lines naming the layout, and its defaults over Wan 2.1's."""
    kind = layout(pipe_index, _read_config(path / "transformer"))
    lines = [("layout", f"{kind} (diffusers {pipe_index.get('_class_name')})")]
    if pipe_index.get("boundary_ratio") is not None:
        lines.append(("experts", f"transformer (t >= {pipe_index['boundary_ratio'] * 1000:g}), transformer_2 below"))
    extra = LAYOUT_DEFAULTS[kind]
    if "guidance_scale_2" in extra:
        lines.append(("default guidance_scale_2", str(extra["guidance_scale_2"])))
    lines.append(("image", {"I2V": "required (CLIP + first frame)", "FLF2V": "image and last_image required",
                            "A14B-I2V": "required (first frame, no CLIP)", "TI2V": "optional (first latent frame)",
                            "A14B-T2V": "none (text-to-video)"}[kind]))
    return lines, {k: v for k, v in extra.items() if k != "guidance_scale_2"}


FAMILY_LOADERS.append((_claims, load_family_folder, describe_layout))
