"""Text-to-video generation: model folders, the pipeline, and `dfm generate / info / export`.

    pipe = load_pipeline("models/wan_flow_digits")            # a dfm model folder, or a diffusers Wan 2.1 folder
    out = pipe.generate(["the digit 3 moves up"], seed=0)     # out.videos [B, 3, F, H, W] in [-1, 1], out.nfe, ...

    dfm generate "the digit 3 moves up" --model models/wan_flow_digits --out digit3.mp4
    dfm export runs/wan/checkpoints/step_00010000 models/wan_flow_digits      # trainer checkpoint -> model folder
    dfm info models/wan_flow_digits

One generation (`Pipeline.generate`):

    1. text:    (context, mask) of the prompts, and of the negative prompts or the model's null conditioning
                (the empty prompt zero-padded, or zeros), padded to one length: the two CFG branches
    2. noise:   eps [B, C, f, h, w], sample b drawn from its own torch.Generator seeded by seeds[b], so a batch
                of 4 gives the same videos as 4 runs of 1; the same generators drive stochastic samplers
    3. sample:  `guided_sample`: CFGDenoiser (both branches in one batched forward) around the model's EDM denoiser
                D(x, sigma) (DiffusionModule.denoise: flow models through the exact x0 = x_s - s v), then any sampler
                of either space through the exact adapters of dfm.diffusion.paths: `edm:NAME` (samplers.SAMPLERS)
                integrates in sigma, `flow:NAME` (samplers.FLOW_SAMPLERS) in flow time s, a bare NAME in the
                model's own space first. The grid is the model's (flow: shifted s from 1; EDM: Karras), seen by
                the other space through sigma = s / (1 - s); an EDM-space sampler takes the first step from s ~ 1
                in closed form (see guided_sample)
    4. decode:  the VAE (or the identity, in pixel space) -> videos in [-1, 1]

The trainer's validation samples through the same `guided_sample` (dfm/diffusion/sampling.py; Trainer.generate), so a model folder reproduces
its validation videos.

A dfm model folder:

    model_index.json   {"format": "dfm", "arch": "wan" | "dit", "paradigm": "flow" | "edm", "diffusion": {grid,
                        timestep_scale, sigma_data, sigma_min, sigma_max, rho, ...}, "text": {"null", "mask", "max_length"},
                        "defaults": {num_frames, height, width, fps, steps, sampler, guidance_scale, shift,
                        negative_prompt}, "source": {...}}
    transformer/       WAN: diffusers' layout (WanModel.save_pretrained); DiT: config.json (DiTConfig) and
                       model.safetensors
    text_encoder/      SmallTextEncoder.save_pretrained, or a frozen Hugging Face encoder with its tokenizer
    vae/               the VAE's save_pretrained ("identity": config.json only)
    config.yaml        the training config, for the record

A diffusers Wan 2.1 text-to-video folder (model_index.json with "_class_name": "WanPipeline") loads with Wan's
defaults: UniPC (order and variant from scheduler/scheduler_config.json) on diffusers' flow-sigma grid, shift
from the scheduler config's flow_shift (Wan's t2v default 5.0 where it has none; diffusers' Wan example uses 5.0
at 720p and 3.0 at 480p: --shift), guidance 5.0, Wan's negative prompt, 81 frames at 480x832, 16 fps, 50 steps.
Wan and diffusers feed the transformer integer timesteps (int(1000 s)) under UniPC / DPM-Solver schedulers while
the solver uses the exact s; such folders do the same. The text encoder attends to the real tokens and the
transformer to all 512 (zero-padded) tokens.

Prompts longer than the text encoder's max_length are an error (the message gives the token count and the limit),
not a silent truncation: a cut-off prompt changes what is asked for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from dfm.diffusion.sampling import (
    SPACES,
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
        """Videos for `prompts` (None arguments take `self.defaults`); see the module docstring.

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
        """Write a dfm model folder (see the module docstring), atomically: built beside `folder`, then renamed."""
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


# ======================================================================================== transformer I/O


def _text_module(text):
    """The savable encoder inside a frozen wrapper (dfm.text.FrozenSmallTextEncoder keeps it as .encoder)."""
    return text if hasattr(text, "save_pretrained") else getattr(text, "encoder", text)


def _save_transformer(net: nn.Module, arch: str, folder: Path) -> None:
    from dfm.checkpoint import save_safetensors

    if arch == "wan":
        net.save_pretrained(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.asdict(net.config)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    (folder / "config.json").write_text(json.dumps({"_class_name": "DiT", **cfg}, indent=2) + "\n")
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, folder / "model.safetensors")


def _load_transformer(arch: str, folder: Path, device, dtype) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (folder / "config.json").is_file():
        raise PipelineError(f"{folder} has no config.json; the model folder is incomplete, export it again")
    if arch == "wan":
        from dfm.models import WanModel

        try:
            return WanModel.from_pretrained(folder, dtype=dtype, device=device).eval()
        except (OSError, ValueError, SafetensorError) as e:
            raise PipelineError(f"{folder}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if arch == "dit":
        from dfm.models import DiT, DiTConfig

        try:
            raw = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
            raw["patch_size"] = tuple(raw.get("patch_size", (1, 2, 2)))
            net = DiT(DiTConfig(**raw))
            net.load_state_dict(load_file(folder / "model.safetensors"))
        except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as e:
            raise PipelineError(f"{folder} holds no readable DiT ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); export the model again") from None
        if dtype != torch.float32:
            net.cast(dtype)
        return net.to(device).eval()
    raise PipelineError(f"unknown arch {arch!r} in model_index.json; expected wan or dit")


class IntegerTimesteps(nn.Module):
    """The backbone fed int(t) instead of t, as Wan 2.1 and diffusers' UniPC / DPM-Solver schedulers do (they
    cast the timesteps T * s to int64 while the solver uses the exact s). t arrives in fp32 after the round trip
    s -> sigma -> s, so 1e-3 is added before flooring (float64 T * s itself is what they truncate)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def config(self):
        return self.net.config

    def forward(self, x, t, *args, **kwargs):
        t = torch.floor(torch.as_tensor(t, dtype=torch.float32, device=x.device) + 1e-3)
        return self.net(x, t, *args, **kwargs)


def _diffusion_module(net, text, paradigm: str, diffusion: dict, null: str):
    from dfm.train import DiffusionConfig, DiffusionModule

    fields = {f.name for f in dataclasses.fields(DiffusionConfig)}
    cfg = DiffusionConfig(paradigm=paradigm, **{k: v for k, v in diffusion.items() if k in fields and k != "paradigm"})
    return DiffusionModule(net, text, cfg, null).eval()


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# ================================================================================================ loading


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing; {what}") from None
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path} is not valid JSON ({_first_line(e)}); {what}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path} must hold a JSON object; {what}")
    return data


def _need_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise PipelineError(f"{path} is missing; {what}")


def load_pipeline(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> Pipeline:
    """A dfm model folder, a diffusers Wan 2.1 text-to-video folder, or a trainer checkpoint (step_* folder, its
    checkpoints/ folder or the run directory: EMA weights, defaults from the training config)."""
    path = Path(path)
    if not path.exists():
        hint = (" (the shipped model: train configs/wan_flow_digits.yaml, then `dfm export`)"
                if path.as_posix().rstrip("/").endswith(DEFAULT_MODEL) else "")
        raise PipelineError(f"model folder {path} not found{hint}; pass --model PATH to a dfm model folder, a "
                            f"diffusers Wan 2.1 folder or a trainer checkpoint")
    if not (path / "model_index.json").is_file():
        ckpt = _find_checkpoint(path)
        if ckpt is not None:
            return pipeline_from_checkpoint(ckpt, device=device, dtype=dtype)
        raise PipelineError(f"{path} has no model_index.json; pass a dfm model folder (dfm export), a diffusers Wan "
                            f"2.1 folder or a trainer checkpoint")
    index = _read_json(path / "model_index.json", "export the model again or download the folder again")
    if index.get("format") == "dfm":
        return _load_dfm_folder(path, index, device, dtype)
    if index.get("_class_name") == "WanPipeline":
        return _load_wan_folder(path, index, device, dtype)
    name = index.get("_class_name", index.get("format"))
    raise PipelineError(f"{path}/model_index.json describes {name!r}; dfm loads dfm model folders and diffusers "
                        f"WanPipeline (Wan 2.1 text-to-video) folders")


def _load_vae(folder: Path, what: str):
    from dfm.vae import load_vae

    _need_dir(folder, what)
    try:
        return load_vae(folder).eval()
    except UserError as e:
        raise PipelineError(f"{folder}: {_first_line(e)}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise PipelineError(f"{folder} holds no readable VAE ({_first_line(e)}); {what}") from None


def _load_text(folder: Path, what: str, tokenizer: Path | None = None, max_length: int | None = None,
               device="cpu", dtype: torch.dtype = torch.float32):
    from dfm.text import load_text_encoder

    _need_dir(folder, what)
    if tokenizer is not None:
        _need_dir(tokenizer, what)
    try:
        return load_text_encoder(folder, tokenizer=tokenizer, max_length=max_length, device=device, dtype=dtype)
    except UserError as e:
        raise PipelineError(f"{folder}: {_first_line(e)}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise PipelineError(f"{folder} holds no readable text encoder ({_first_line(e)}); {what}") from None


def _check_fit(path: Path, net: nn.Module, text, vae) -> None:
    cfg = net.config
    width = getattr(cfg, "text_dim", None) or getattr(cfg, "context_dim", None)
    if width is not None and width != text.dim:
        raise PipelineError(f"{path}: the transformer reads text of width {width} but the text encoder gives "
                            f"{text.dim}; the folder mixes models")
    if cfg.in_channels != vae.channels:
        raise PipelineError(f"{path}: the transformer takes {cfg.in_channels} latent channels but the VAE has "
                            f"{vae.channels}; the folder mixes models")


def _load_dfm_folder(path: Path, index: dict, device, dtype) -> Pipeline:
    again = "export the model again (dfm export CHECKPOINT OUT)"
    try:
        arch, paradigm = index["arch"], index["paradigm"]
        diffusion, defaults = dict(index["diffusion"]), dict(index["defaults"])
    except KeyError as e:
        raise PipelineError(f"{path}/model_index.json lacks {e}; {again}") from None
    if paradigm not in SPACES:
        raise PipelineError(f"{path}/model_index.json: unknown paradigm {paradigm!r}; expected flow or edm")
    _need_dir(path / "transformer", again)
    net = _load_transformer(arch, path / "transformer", device, dtype)
    t = index.get("text", {})
    text = _load_text(path / "text_encoder", again, max_length=t.get("max_length"), device=device)
    vae = _load_vae(path / "vae", again)
    _check_fit(path, net, text, vae)
    module = _diffusion_module(net, text, paradigm, diffusion, t.get("null", "empty"))
    config_yaml = (path / "config.yaml").read_text() if (path / "config.yaml").is_file() else None
    return Pipeline(module.to(device), text, vae.to(device), arch=arch, paradigm=paradigm, diffusion=diffusion,
                    defaults=defaults, null=t.get("null", "empty"), use_mask=bool(t.get("mask", True)), kind="dfm",
                    device=device, dtype=dtype, source={**index.get("source", {}), "folder": str(path)},
                    config_yaml=config_yaml)


WAN_SCHEDULERS = {  # diffusers class -> (grid, default sampler, integer timesteps)
    "UniPCMultistepScheduler": ("flow_unipc", "flow:unipc", True),
    "DPMSolverMultistepScheduler": ("flow_unipc", "flow:dpmpp_2m", True),
    "FlowMatchEulerDiscreteScheduler": ("flow_match_euler", "flow:euler", False),
}


def wan_scheduler_settings(folder: Path) -> tuple[dict, dict, dict]:
    """(diffusion settings, defaults, sampler options) from a Wan folder's scheduler/scheduler_config.json."""
    sched = _read_json(folder / "scheduler" / "scheduler_config.json", "download the Wan folder again")
    name = sched.get("_class_name")
    if name not in WAN_SCHEDULERS:
        raise PipelineError(f"{folder}/scheduler: scheduler {name!r} is not supported; expected one of "
                            f"{', '.join(WAN_SCHEDULERS)}")
    grid, sampler, integer = WAN_SCHEDULERS[name]
    if grid == "flow_unipc" and not sched.get("use_flow_sigmas", False):
        raise PipelineError(f"{folder}/scheduler: {name} without use_flow_sigmas is not a flow-matching schedule")
    shift = sched.get("flow_shift" if grid == "flow_unipc" else "shift") or WAN_DEFAULTS["shift"]
    diffusion = {"grid": grid, "num_train_timesteps": int(sched.get("num_train_timesteps", 1000)),
                 "timestep_scale": float(sched.get("num_train_timesteps", 1000)), "integer_timesteps": integer}
    options = {}
    if sampler == "flow:unipc":
        options = {"order": int(sched.get("solver_order", 2)), "variant": sched.get("solver_type", "bh2"),
                   "lower_order_final": bool(sched.get("lower_order_final", True))}
    return diffusion, {**WAN_DEFAULTS, "sampler": sampler, "shift": float(shift)}, options


def _load_wan_folder(path: Path, index: dict, device, dtype) -> Pipeline:
    again = "download the Wan 2.1 folder again (it needs transformer/, vae/, text_encoder/, tokenizer/, scheduler/)"
    if index.get("transformer_2") not in (None, [None, None]) or index.get("boundary_ratio") is not None:
        raise PipelineError(f"{path} is a two-stage Wan 2.2 pipeline; dfm runs Wan 2.1 text-to-video folders")
    diffusion, defaults, options = wan_scheduler_settings(path)
    _need_dir(path / "transformer", again)
    net = _load_transformer("wan", path / "transformer", device, dtype)
    text = _load_text(path / "text_encoder", again, tokenizer=path / "tokenizer", max_length=WAN_TEXT_LENGTH,
                      device=device, dtype=dtype)  # UMT5-XXL: 5.7B parameters, on the GPU in the pipeline's dtype
    vae = _load_vae(path / "vae", again)
    _check_fit(path, net, text, vae)
    backbone = IntegerTimesteps(net) if diffusion["integer_timesteps"] else net
    module = _diffusion_module(backbone, text, "flow", diffusion, "empty")
    return Pipeline(module.to(device), text, vae.to(device), arch="wan", paradigm="flow", diffusion=diffusion,
                    defaults=defaults, null="empty", use_mask=False, kind="wan", device=device, dtype=dtype,
                    source={"folder": str(path), "format": "diffusers WanPipeline"},
                    sampler_options={defaults["sampler"]: options} if options else None)


# ============================================================================================ checkpoints


def _find_checkpoint(path: Path) -> Path | None:
    """A step_* folder from itself, a checkpoints/ folder or a run directory (the latest), else None."""
    from dfm.checkpoint import latest_checkpoint

    if (path / "state.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    return None


def _checkpoint_config(path: Path):
    """(TrainConfig, the text encoder of text.json: a small one with untrained weights, or the frozen encoder it
    names, the autoencoder) of a checkpoint."""
    from dfm.config import load_config
    from dfm.text import SmallTextConfig, SmallTextEncoder, WordTokenizer
    from dfm.train import TrainConfig, build_autoencoder

    for name in ("config.yaml", "text.json"):
        if not (path / name).is_file():
            raise PipelineError(f"checkpoint {path} has no {name}; use a checkpoint written by `dfm train`")
    cfg = load_config(TrainConfig, path / "config.yaml")
    meta = _read_json(path / "text.json", "use another checkpoint")
    vae = build_autoencoder(cfg)  # "identity" or the VAE folder of the config
    if meta.get("type") == "frozen":  # a Hugging Face encoder trained against, not with, the model
        enc = meta.get("encoder") or {}
        if not enc.get("path"):
            raise PipelineError(f"{path}/text.json names no text encoder folder; use another checkpoint")
        tokenizer = Path(enc["tokenizer"]) if enc.get("tokenizer") else None
        return cfg, _load_text(Path(enc["path"]), "restore the folder text.json names", tokenizer,
                               max_length=enc.get("max_length")), vae
    try:
        meta.pop("type", None)
        text = SmallTextEncoder(WordTokenizer(meta.pop("vocab")), SmallTextConfig(**meta))
    except (KeyError, TypeError, ValueError) as e:
        raise PipelineError(f"{path}/text.json is not a small text encoder ({_first_line(e)}); use another "
                            f"checkpoint") from None
    return cfg, text, vae


def _checkpoint_recipe(cfg, **overrides) -> tuple[dict, dict]:
    """(sampling settings, defaults) of a trained model: what sampling needs of cfg.diffusion, and the validation
    settings (val_steps, val_guidance, val_shift, val_sampler, data.num_frames, data.size, data.fps or val_fps)."""
    d, t = cfg.diffusion, cfg.train
    if d.paradigm == "flow":  # what DiffusionModule.denoise and the grid need, nothing of training
        diffusion = {"grid": "flow_shifted", "timestep_scale": d.timestep_scale}
    else:
        diffusion = {"grid": "karras", "sigma_data": d.sigma_data, "sigma_min": d.sigma_min,
                     "sigma_max": d.sigma_max, "rho": d.rho}
    defaults = {"num_frames": cfg.data.num_frames, "height": cfg.data.size, "width": cfg.data.size,
                "fps": float(cfg.data.fps or t.val_fps), "steps": t.val_steps, "sampler": t.val_sampler,
                "guidance_scale": t.val_guidance, "shift": t.val_shift if d.paradigm == "flow" else None,
                "negative_prompt": None}
    for k, v in overrides.items():
        if k not in DEFAULT_KEYS:
            raise PipelineError(f"unknown default {k!r}; valid: {', '.join(DEFAULT_KEYS)}")
        if v is not None:
            defaults[k] = v
    if defaults["shift"] is not None and d.paradigm == "edm":
        raise PipelineError("shift applies to flow-matching models; this checkpoint is EDM")
    space, method = resolve_sampler(defaults["sampler"], d.paradigm)
    defaults["sampler"] = f"{space}:{method}"
    return diffusion, defaults


def pipeline_from_checkpoint(path: str | Path, ema: bool = True, device="cpu", dtype=torch.float32,
                             **overrides) -> Pipeline:
    """A Pipeline from a trainer checkpoint: EMA weights (or the trained ones with ema=False), the small text
    encoder of text.json, the autoencoder of the config; defaults from the training config (`_checkpoint_recipe`)
    unless overridden (keys of DEFAULT_KEYS)."""
    from dfm import distributed as D
    from dfm.checkpoint import CheckpointError, load_checkpoint
    from dfm.text import FrozenSmallTextEncoder, SmallTextEncoder
    from dfm.train import _arch, backbone_config, config_yaml

    given = Path(path)
    path = _find_checkpoint(given) if given.exists() else None
    if path is None:
        raise PipelineError(f"{given} is not a trainer checkpoint (a step_* folder with state.json, its "
                            f"checkpoints/ folder or a run directory); check the path")
    cfg, text, vae = _checkpoint_config(path)
    diffusion, defaults = _checkpoint_recipe(cfg, **overrides)
    small = isinstance(text, SmallTextEncoder)  # else a frozen encoder, outside the trained module
    net = _arch(cfg.model.arch)[0](backbone_config(cfg, vae.channels, text.dim))
    module = _diffusion_module(net, text if small else None, cfg.diffusion.paradigm,
                               dataclasses.asdict(cfg.diffusion), cfg.text.null)
    ckpt = load_checkpoint(path)
    use_ema = ema and ckpt["ema"] is not None
    try:
        D.load_full_state_dict(module, ckpt["ema"] if use_ema else ckpt["model"])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}; its config.yaml does not describe these weights") from None
    if dtype != torch.float32 and hasattr(net, "cast"):
        net.cast(dtype)
    source = {"checkpoint": str(path), "step": int(ckpt["step"]), "weights": "ema" if use_ema else "model"}
    frozen = FrozenSmallTextEncoder(text, f"{path}/text.json") if small else text
    return Pipeline(module.eval().to(device), frozen, vae.eval().to(device), arch=cfg.model.arch,
                    paradigm=cfg.diffusion.paradigm, diffusion=diffusion, defaults=defaults, null=cfg.text.null,
                    use_mask=True, kind="dfm", device=device, dtype=dtype, source=source,
                    config_yaml=config_yaml(cfg))


def export_checkpoint(checkpoint: str | Path, out: str | Path, ema: bool = True, overwrite: bool = False,
                      **overrides) -> Path:
    """`dfm export`: a trainer checkpoint as a dfm model folder (see `pipeline_from_checkpoint`)."""
    return pipeline_from_checkpoint(checkpoint, ema=ema, **overrides).save_pretrained(out, overwrite=overwrite)


# =================================================================================================== info


def _safetensors_params(files: Sequence[Path], by_prefix: bool = False) -> dict[str, int]:
    """Element counts read from safetensors headers (no weights loaded): {"total": n}, or per first key
    component ({"net": n1, "text": n2} for a trainer checkpoint) with by_prefix."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                group = k.split(".")[0] if by_prefix else "total"
                counts[group] = counts.get(group, 0) + math.prod(st.get_slice(k).get_shape())
    return counts


def _count(folder: Path) -> int:
    return _safetensors_params(sorted(folder.glob("*.safetensors"))).get("total", 0)


def _fmt(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _transformer_summary(arch: str, cfg: dict) -> str:
    patch = tuple(cfg.get("patch_size", ()))
    if cfg.get("depths"):  # an hourglass DiT: blocks and widths per level, finest first (down and up at each)
        blocks = [2 * d for d in cfg["depths"][:-1]] + [cfg["depths"][-1]]
        return (f"{arch} (HourglassDiT, {len(blocks)} levels, blocks {tuple(blocks)}, widths "
                f"{tuple(cfg['widths'])}, patch {patch})")
    layers = cfg.get("num_layers", cfg.get("depth"))
    width = cfg.get("dim") or cfg.get("num_attention_heads", 0) * cfg.get("attention_head_dim", 0)
    name = "WanModel" if arch == "wan" else "DiT"
    return f"{arch} ({name}, {layers} blocks, width {width}, patch {patch})"


def describe(path: str | Path) -> str:
    """`dfm info`: what a dfm model folder, a diffusers Wan folder or a trainer checkpoint holds. Reads configs and
    safetensors headers only (the VAE is loaded for its factors), so it is quick even for a 14B folder."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} not found; pass a model folder or a trainer checkpoint")
    lines: list[str] = []
    add = lambda k, v: lines.append(f"{k:<26}{v}")  # noqa: E731
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json", "the folder is damaged")
        again = "the folder is incomplete"
        if index.get("format") == "dfm":
            arch, paradigm = index.get("arch"), index.get("paradigm")
            diffusion, defaults, t = index.get("diffusion", {}), index.get("defaults", {}), index.get("text", {})
            text = _read_json(path / "text_encoder" / "config.json", again)
            text_line = (f"{text.get('type', text.get('model_type'))} encoder, dim {text.get('dim')}, max_length "
                         f"{text.get('max_length')}, null {t.get('null')}, mask {'on' if t.get('mask') else 'off'}")
            add("path", f"{path} (dfm model folder)")
            add("source", json.dumps(index.get("source", {})))
        elif index.get("_class_name") == "WanPipeline":
            arch, paradigm = "wan", "flow"
            diffusion, defaults, options = wan_scheduler_settings(path)
            text = _read_json(path / "text_encoder" / "config.json", again)
            text_line = (f"{text.get('model_type')} ({(text.get('architectures') or ['?'])[0]}), dim "
                         f"{text.get('d_model')}, max_length {WAN_TEXT_LENGTH}, zero-padded, no mask in the "
                         f"transformer")
            add("path", f"{path} (diffusers Wan 2.1 folder, WanPipeline)")
            if options:
                add("sampler options", json.dumps(options))
        else:
            raise PipelineError(f"{path}/model_index.json describes {index.get('_class_name')!r}; not a dfm or "
                                f"Wan 2.1 folder")
        tcfg = _read_json(path / "transformer" / "config.json", again)
        parts = {"transformer": _count(path / "transformer"), "text_encoder": _count(path / "text_encoder"),
                 "vae": _count(path / "vae")}
        vae = _load_vae(path / "vae", again)
    else:
        ckpt = _find_checkpoint(path)
        if ckpt is None:
            raise PipelineError(f"{path} is neither a model folder (model_index.json) nor a trainer checkpoint")
        cfg, text, vae = _checkpoint_config(ckpt)
        from dfm.train import backbone_config

        arch, paradigm = cfg.model.arch, cfg.diffusion.paradigm
        diffusion, defaults = _checkpoint_recipe(cfg)
        tcfg = dataclasses.asdict(backbone_config(cfg, vae.channels, text.dim))
        text_line = (f"small encoder, dim {text.dim}, max_length {text.max_length}, null {cfg.text.null}, "
                     f"mask on")
        state = _read_json(ckpt / "state.json", "the checkpoint is damaged")
        add("path", f"{ckpt} (trainer checkpoint, step {state.get('step')})")
        add("weights", "model.safetensors + ema.safetensors" if (ckpt / "ema.safetensors").is_file()
            else "model.safetensors (no EMA)")
        groups = _safetensors_params([ckpt / "model.safetensors"], by_prefix=True)
        parts = {"transformer": groups.get("net", 0), "text_encoder": groups.get("text", 0),
                 "vae": sum(p.numel() for p in vae.parameters())}
    add("arch", _transformer_summary(arch, tcfg))
    add("paradigm", paradigm + (" (flow matching, velocity prediction)" if paradigm == "flow"
                                else " (EDM preconditioned denoiser)"))
    for name, n in parts.items():
        add(f"params {name}", f"{_fmt(n)} ({n:,})")
    add("params total", _fmt(sum(parts.values())))
    add("latent", f"{vae.channels} channels, temporal x{getattr(vae, 'temporal_factor', 1)}, spatial "
                  f"x{getattr(vae, 'spatial_factor', 1)} ({type(vae).__name__})")
    add("text", text_line)
    add("text width (transformer)", tcfg.get("text_dim", tcfg.get("context_dim")))
    add("sampling", json.dumps(diffusion))
    for k in DEFAULT_KEYS:
        v = defaults.get(k)
        if k == "negative_prompt" and isinstance(v, str) and len(v) > 60:
            v = v[:57] + "..."
        add(f"default {k}", v)
    return "\n".join(lines)


# ==================================================================================================== CLI


def _slug(text: str, limit: int = 40) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "video"


def cmd_generate(args) -> int:
    from dfm.video import write_contact_sheet, write_video

    if args.threads < 0:
        raise PipelineError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.out and Path(args.out).suffix.lower() not in (".mp4", ".gif"):  # before minutes of sampling
        raise PipelineError(f"--out {args.out}: use a .mp4 or .gif file name")
    model = Path(args.model)
    if args.model == DEFAULT_MODEL and not model.exists():  # the shipped model, from outside the repository
        model = Path(__file__).resolve().parents[1] / DEFAULT_MODEL
    pipe = load_pipeline(model, device=device, dtype=dtype)
    out = pipe.generate(args.prompt, negative_prompt=args.negative, num_frames=args.frames, height=args.height,
                        width=args.width, steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance,
                        shift=args.shift, seed=args.seed, progress=not args.no_progress)
    path = Path(args.out) if args.out else Path("outputs") / f"{_slug(out.prompts[0])}_s{out.seeds[0]}.mp4"
    if path.suffix.lower() not in (".mp4", ".gif"):
        raise PipelineError(f"--out {path}: use a .mp4 or .gif file name")
    videos = out.videos  # [B, 3, F, H, W]
    scale = args.scale if args.scale > 0 else max(1, 128 // min(videos.shape[-2:]))  # auto: tiny videos to >= 128 px
    if scale > 1:  # for viewing only: whole pixels, no smoothing
        videos = videos.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    written = []
    for i, video in enumerate(videos):
        target = path if len(out.videos) == 1 else path.with_name(f"{path.stem}_{i:02d}{path.suffix}")
        written.append(write_video(target, video, fps=out.fps, pad_odd=True))
    sheet = write_contact_sheet(path.with_suffix(".png"), videos, labels=out.prompts)
    for p in written:
        print(p)
    print(sheet)
    s = out.settings
    print(f"dfm generate: {len(written)} video(s) of {s['num_frames']} frames at {s['height']}x{s['width']}, "
          f"{s['sampler']} {s['steps']} steps, guidance {s['guidance_scale']:g}, seeds {out.seeds}; "
          f"NFE {out.nfe}, {out.seconds:.2f} s", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    print(describe(args.path))
    return 0


def cmd_export(args) -> int:
    out = export_checkpoint(args.checkpoint, args.out, ema=not args.no_ema, overwrite=args.force,
                            num_frames=args.frames, height=args.height, width=args.width, fps=args.fps,
                            steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance, shift=args.shift)
    print(out)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="generate videos from text prompts",
                       description="Generate a video from a text prompt with a dfm model folder, a diffusers Wan 2.1 "
                                   "folder or a trainer checkpoint. Writes the video (.mp4 or .gif) and a PNG "
                                   "contact sheet beside it; prints their paths, the NFE and the seconds taken. "
                                   "Unset options take the model's defaults (dfm info MODEL).")
    p.add_argument("prompt", nargs="+", help="the text prompt (several: one video each)")
    p.add_argument("--negative", default=None, help="negative prompt (default: the model's; Wan: its recommended "
                   "one, dfm models: the null conditioning)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder or checkpoint (default {DEFAULT_MODEL})")
    p.add_argument("--sampler", default=None, help="SPACE:METHOD such as flow:unipc, flow:euler, edm:heun, "
                   "edm:dpmpp_2m (a bare method looks in the model's own space first)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--shift", type=float, default=None,
                   help="flow grid shift (flow models; a Wan folder defaults to its scheduler's flow_shift, else "
                        "5.0; diffusers' Wan example: 5.0 at 720p, 3.0 at 480p)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first video (random if unset; printed)")
    p.add_argument("--frames", type=int, default=None, help="number of frames")
    p.add_argument("--height", type=int, default=None, help="frame height in pixels")
    p.add_argument("--width", type=int, default=None, help="frame width in pixels")
    p.add_argument("--out", default=None, help="output .mp4 or .gif (default outputs/<prompt>_s<seed>.mp4)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's; 1 is steadiest on a "
                   "busy machine)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="transformer precision (bf16 on GPUs; the CPU is fastest in fp32)")
    p.add_argument("--scale", type=int, default=0, help="write the video and contact sheet N times larger "
                   "(nearest neighbour, for viewing; default 0 = auto: small videos up to at least 128 px)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="describe a model folder or a trainer checkpoint",
                       description="Print what a dfm model folder, a diffusers Wan 2.1 folder or a trainer "
                                   "checkpoint holds: arch, paradigm, parameters per part, latent and text sizes, "
                                   "sampling defaults.")
    p.add_argument("path", help="model folder, checkpoint (step_* folder) or run directory")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("export", help="turn a trainer checkpoint into a model folder",
                       description="Write a dfm model folder (model_index.json, transformer/, text_encoder/, vae/, "
                                   "config.yaml) from a trainer checkpoint, with the EMA weights unless --no-ema. "
                                   "Sampling defaults come from the training config unless set here.")
    p.add_argument("checkpoint", help="a step_* folder, its checkpoints/ folder or the run directory (latest)")
    p.add_argument("out", help="the model folder to write")
    p.add_argument("--no-ema", action="store_true", help="export the trained weights instead of the EMA")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--sampler", default=None, help="default sampler (SPACE:METHOD)")
    p.add_argument("--steps", type=int, default=None, help="default steps (training: train.val_steps)")
    p.add_argument("--guidance", type=float, default=None, help="default guidance (training: train.val_guidance)")
    p.add_argument("--shift", type=float, default=None, help="default flow shift (training: train.val_shift)")
    p.add_argument("--frames", type=int, default=None, help="default frames (training: data.num_frames)")
    p.add_argument("--height", type=int, default=None, help="default height (training: data.size)")
    p.add_argument("--width", type=int, default=None, help="default width (training: data.size)")
    p.add_argument("--fps", type=float, default=None, help="default fps (training: data.fps or train.val_fps)")
    p.set_defaults(func=cmd_export)
