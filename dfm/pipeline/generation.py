"""The pipeline: text encoding, per-sample noise, guided sampling and VAE decoding (`Pipeline.generate`), and the
constants of model folders. Overview and the folder format: dfm/pipeline/__init__.py."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dfm.diffusion.sampling import (
    Grid,
    check_sampler_options,
    guidance_branches,
    guided_sample,
    resolve_sampler,
    sampling_grid,
)
from dfm.errors import UserError

Tensor = torch.Tensor

DEFAULT_MODEL = "models/wan_flow_digits"
FORMAT_VERSION = 1


# Wan 2.1's recommended negative prompt (the English form given in diffusers' WanPipeline example)
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)
WAN_DEFAULTS = {"num_frames": 81, "height": 480, "width": 832, "fps": 16.0, "steps": 50, "sampler": "flow:unipc",
                "guidance_scale": 5.0, "shift": 5.0, "negative_prompt": WAN_NEGATIVE_PROMPT}
WAN_TEXT_LENGTH = 512  # UMT5 tokens (diffusers' max_sequence_length)

DEFAULT_KEYS = ("num_frames", "height", "width", "fps", "steps", "sampler", "guidance_scale", "shift",
                "negative_prompt")


class PipelineError(UserError, ValueError):
    """A bad model folder or generation argument; the message is one line that names the problem and the fix."""


# ============================================================================================ conditioning


def count_tokens(text_encoder, prompt: str) -> int | None:
    """Tokens the encoder would read for `prompt` before truncation (special tokens included), or None if it
    cannot say. Knows dfm's small encoder (raw or frozen) and the Hugging Face encoders of dfm.text."""
    from dfm.text import WordTokenizer, wan_prompt_clean, words

    if hasattr(text_encoder, "count_tokens"):
        return int(text_encoder.count_tokens(prompt))
    tok = getattr(text_encoder, "tokenizer", None) or getattr(getattr(text_encoder, "encoder", None), "tokenizer", None)
    if isinstance(tok, WordTokenizer):
        return 1 + len(words(prompt))  # <bos> + words
    if tok is not None and callable(tok):
        if getattr(text_encoder, "kind", None) == "umt5":
            prompt = wan_prompt_clean(prompt)  # what HFTextEncoder tokenizes
        try:
            return len(tok(prompt, add_special_tokens=True)["input_ids"])
        except (TypeError, KeyError):
            return None
    return None


# ================================================================================================ pipeline


@dataclass
class Generation:
    """The result of `Pipeline.generate`."""

    videos: Tensor  # [B, 3, F, H, W] float32 CPU in [-1, 1]
    prompts: list[str]
    seeds: list[int]
    nfe: int  # guided denoiser evaluations per video (a batched cond + uncond pass is one)
    seconds: float  # wall time of the call
    fps: float
    settings: dict = field(default_factory=dict)  # the resolved arguments


class Pipeline:
    """A text-to-video model ready to sample: transformer + text encoder + VAE + sampling recipe.

    module:  a DiffusionModule (dfm.train): `.denoise(x, sigma, **cond)` is the EDM denoiser of either paradigm
    text:    .encode(prompts) -> (context [B, L, D], mask [B, L]), .dim, .max_length
    vae:     .decode(latents) -> video in [-1, 1], .latent_shape(F, H, W), .channels
    diffusion: {"grid", "num_train_timesteps", "sigma_min", "sigma_max", "rho", ...} (sampling settings)
    sampler_options: per sampler name, the options the model's recipe uses (Wan: UniPC's order and variant)
    """

    def __init__(self, module: nn.Module, text, vae: nn.Module, *, arch: str, paradigm: str, diffusion: dict,
                 defaults: dict, null: str = "empty", use_mask: bool = True, kind: str = "dfm",
                 device="cpu", dtype: torch.dtype = torch.float32, source: dict | None = None,
                 config_yaml: str | None = None, sampler_options: dict | None = None):
        self.module, self.text, self.vae = module, text, vae
        self.arch, self.paradigm, self.kind = arch, paradigm, kind
        self.diffusion, self.null, self.use_mask = dict(diffusion), null, use_mask
        self.defaults = {k: defaults.get(k) for k in DEFAULT_KEYS}
        self.device, self.dtype = torch.device(device), dtype
        self.source, self.config_yaml = dict(source or {}), config_yaml
        self.sampler_options = dict(sampler_options or {})  # {"flow:unipc": {"order": 2, ...}}: a recipe's options

    @property
    def transformer(self) -> nn.Module:
        return self.module.net

    # ---------------------------------------------------------------------------------------- arguments

    def _prompts(self, prompts, negative_prompt, seed, seeds) -> tuple[list[str], list[str] | None, list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise PipelineError("no prompt given; pass at least one text prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise PipelineError(f"prompt {i} is empty; write what the video should show "
                                    f"(for an unconditional sample use guidance_scale=1 with a neutral prompt)")
        if seeds is not None:
            seeds = [int(s) for s in seeds]
            if len(prompts) == 1 and len(seeds) > 1:
                prompts = prompts * len(seeds)  # several videos of one prompt
            if len(seeds) != len(prompts):
                raise PipelineError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per prompt")
        else:
            if seed is None:
                seed = int.from_bytes(os.urandom(4), "little")
            seeds = [int(seed) + i for i in range(len(prompts))]
        if negative_prompt is not None:
            negative_prompt = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negative_prompt) == 1:
                negative_prompt = negative_prompt * len(prompts)
            if len(negative_prompt) != len(prompts):
                raise PipelineError(f"got {len(negative_prompt)} negative prompts for {len(prompts)} prompts; pass "
                                    f"one, or one per prompt")
        for label, texts in (("prompt", prompts), ("negative prompt", negative_prompt or [])):
            for i, p in enumerate(texts):
                n = count_tokens(self.text, p)
                if n is not None and n > self.text.max_length:
                    raise PipelineError(f"{label} {i} is {n} tokens long; this model's text encoder reads at most "
                                        f"{self.text.max_length}: shorten it")
        return prompts, negative_prompt, seeds

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """(C, f, h, w) of the latents of a video, or a PipelineError naming the valid sizes."""
        for name, v in (("num_frames", num_frames), ("height", height), ("width", width)):
            if not isinstance(v, int) or v < 1:
                raise PipelineError(f"{name} must be a positive integer, got {v!r}")
        shape = tuple(self.vae.latent_shape(num_frames, height, width))  # raises a UserError for bad frames/sizes
        patch = tuple(self.transformer.config.patch_size)
        sf = getattr(self.vae, "spatial_factor", 1)
        tf = getattr(self.vae, "temporal_factor", 1)
        _, f, h, w = shape
        if h % patch[1] or w % patch[2]:
            raise PipelineError(f"height x width {height}x{width} must be multiples of {sf * patch[1]}x"
                                f"{sf * patch[2]} (VAE factor {sf} x patch {patch[1]}x{patch[2]}); e.g. "
                                f"{max(1, round(height / (sf * patch[1]))) * sf * patch[1]}x"
                                f"{max(1, round(width / (sf * patch[2]))) * sf * patch[2]}")
        if f % patch[0]:
            raise PipelineError(f"num_frames {num_frames} gives {f} latent frames, not a multiple of the temporal "
                                f"patch {patch[0]} (VAE factor {tf})")
        return shape

    def grid(self, steps: int, shift: float | None) -> Grid:
        d = self.diffusion
        if not isinstance(steps, int) or steps < 1:
            raise PipelineError(f"steps must be a positive integer, got {steps!r}")
        if self.paradigm == "edm":
            if shift is not None:
                raise PipelineError("shift applies to flow-matching models; this one is EDM (Karras grid, "
                                    f"sigma {d.get('sigma_max')} -> {d.get('sigma_min')}, rho {d.get('rho')})")
            return sampling_grid("karras", steps, sigma_min=d["sigma_min"], sigma_max=d["sigma_max"], rho=d["rho"])
        shift = 1.0 if shift is None else float(shift)
        if not shift > 0:
            raise PipelineError(f"shift must be positive, got {shift}")
        return sampling_grid(d.get("grid", "flow_shifted"), steps, shift=shift,
                             num_train_timesteps=int(d.get("num_train_timesteps", 1000)))

    def denoise(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        """D(x, sigma) in EDM coordinates, fp32 out (autocast when the pipeline runs in a lower precision)."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.module.denoise(x, sigma, **cond).float()

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        ctx, mask = self.text.encode(list(prompts))
        return ctx.to(self.device).float(), mask.to(self.device)

    # ---------------------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(self, prompts: str | list[str], negative_prompt=None, num_frames=None, height=None, width=None,
                 steps=None, sampler=None, guidance_scale=None, shift=None, seed=None, seeds=None, progress=True,
                 callback=None, sampler_options: dict | None = None) -> Generation:
        """Videos for `prompts` (None arguments take `self.defaults`); the steps are listed in dfm/pipeline/__init__.py.

        seeds: one per prompt (a single prompt with several seeds gives several videos); default seed, seed + 1, ...
        from `seed` (random if None; the seeds used are in the result). negative_prompt: str, one per prompt, or
        None for the model's default (Wan: its negative prompt; dfm models: the null conditioning of training).
        callback(info): once per step with the sampler's dict ('x', 'i', 'denoised', ...) plus 'steps'.
        sampler_options: keyword options of the sampler (default: the recipe's, `self.sampler_options`).
        """
        start = time.perf_counter()
        dflt = self.defaults
        pick = lambda v, k: dflt[k] if v is None else v  # noqa: E731
        num_frames, height, width = pick(num_frames, "num_frames"), pick(height, "height"), pick(width, "width")
        steps, guidance = pick(steps, "steps"), float(pick(guidance_scale, "guidance_scale"))
        sampler_name = pick(sampler, "sampler") or "auto"
        if shift is None and self.paradigm == "flow":
            shift = dflt["shift"]
        negative = pick(negative_prompt, "negative_prompt")
        if not math.isfinite(guidance):
            raise PipelineError(f"guidance_scale must be a finite number, got {guidance}")
        space_method = resolve_sampler(sampler_name, self.paradigm)
        if sampler_options is None:
            sampler_options = self.sampler_options.get(f"{space_method[0]}:{space_method[1]}", {})
        check_sampler_options(space_method, sampler_options)
        prompts, negative, seeds = self._prompts(prompts, negative, seed, seeds)
        shape = self.latent_shape(num_frames, height, width)
        grid = self.grid(steps, shift)

        cond, uncond = guidance_branches(self.encode, prompts, negative, self.null, self.use_mask, guidance)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.cat([torch.randn((1, *shape), generator=g) for g in generators])  # [B, C, f, h, w], CPU draws
        noise = noise.to(self.device)

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=grid.steps, desc="generate", file=sys.stderr, dynamic_ncols=True, leave=False)

        def on_step(info: dict) -> None:
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback({**info, "steps": grid.steps})

        try:
            latents, nfe = guided_sample(self.denoise, noise, grid, space_method, cond=cond, uncond=uncond,
                                         guidance=guidance, generators=generators, callback=on_step,
                                         options=sampler_options)
        finally:
            if bar is not None:
                bar.close()
        with torch.autocast(self.device.type, enabled=False):
            videos = self.vae.decode(latents.float()).float().clamp(-1, 1).cpu()  # [B, 3, F, H, W]
        settings = {"num_frames": num_frames, "height": height, "width": width, "steps": steps,
                    "sampler": f"{space_method[0]}:{space_method[1]}", "guidance_scale": guidance,
                    "shift": shift if self.paradigm == "flow" else None, "negative_prompt": negative}
        return Generation(videos, prompts, seeds, nfe, time.perf_counter() - start, float(dflt["fps"]), settings)

    # ------------------------------------------------------------------------------------------ saving

    def save_pretrained(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write a dfm model folder (its layout: dfm/pipeline/__init__.py) atomically: built beside `folder`, then
        renamed."""
        from dfm.pipeline.folders import _save_transformer, _text_module

        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise PipelineError(f"{folder} exists and is not empty; choose another folder or pass --force")
        if not hasattr(_text_module(self.text), "save_pretrained") or not hasattr(self.vae, "save_pretrained"):
            raise PipelineError("this pipeline's text encoder or VAE cannot be saved as a dfm model folder")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _save_transformer(self.transformer, self.arch, tmp / "transformer")
            _text_module(self.text).save_pretrained(tmp / "text_encoder")
            self.vae.save_pretrained(tmp / "vae")
            if self.config_yaml:
                (tmp / "config.yaml").write_text(self.config_yaml)
            index = {"format": "dfm", "version": FORMAT_VERSION, "arch": self.arch, "paradigm": self.paradigm,
                     "diffusion": self.diffusion, "text": {"null": self.null, "mask": self.use_mask,
                                                           "max_length": int(self.text.max_length)},
                     "defaults": self.defaults, "source": self.source}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

