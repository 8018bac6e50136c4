"""The runtime pipeline: text encoding, per-sample noise, guided sampling and VAE decoding (`Pipeline.generate`).
Overview: dfm/pipeline/__init__.py; model folders in and out: dfm/pipeline/folders.py."""

from __future__ import annotations

import math
import operator
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from dfm.diffusion.paths import flow_t_to_sigma
from dfm.diffusion.sampling import guided_sample
from dfm.diffusion.samplers import resolve_sampler
from dfm.diffusion.schedules import GRIDS, Grid, sampling_grid
from dfm.errors import UserError
from dfm.pipeline.caching import build_cache, cached_denoiser
from dfm.text import WordTokenizer, guidance_branches, wan_prompt_clean, words

Tensor = torch.Tensor

# the generation defaults a model folder holds (model_index.json "defaults"); None: off / the model's own
# the grids a name can select (a model folder, --grid); "learned" needs a fitted LearnedSchedule object
GRID_NAMES = tuple(g for g in GRIDS if g != "learned")

DEFAULT_KEYS = ("num_frames", "height", "width", "fps", "steps", "sampler", "guidance_scale", "guidance_rescale",
                "guidance_interval", "shift", "negative_prompt")


class PipelineError(UserError, ValueError):
    """A bad model folder or generation argument; the message is one line that names the problem and the fix."""


# Seeds. Noise is drawn from CPU torch.Generators (the same videos on every device), and a CPU generator (mt19937)
# reads only the low 32 bits of its seed: manual_seed(s) and manual_seed(s + 2**32) give the same noise, and
# manual_seed(-1) is manual_seed(2**64 - 1). So a seed a user gives is an integer in [0, SEED_LIMIT), where no two
# seeds alias (a batch's seed, seed + 1, ... included).
SEED_LIMIT = 2**32
# Guidance scales w in [0, GUIDANCE_MAX]: 0 is the unconditional model, 1 the conditional one (no guidance), w > 1
# extrapolates away from the unconditional branch. Published defaults are 3-7.5 (Wan 5, Stable Diffusion 7.5) and
# few exceed 30; far beyond that the update is the (scaled-up) difference of two predictions, not an image. w < 0
# guides away from the prompt, which a negative prompt does properly. 100 leaves room to experiment.
GUIDANCE_MAX = 100.0
# Below this much work per forward (transformer parameters x latent tokens x batch, about FLOPs / 2), more CPU
# threads buy nothing and cost a lot on a busy machine (measured on the shipped model, 1.2M parameters x 80 tokens:
# 0.5 s with one thread, 5-20 s with two on a loaded 2-core machine); `cpu_threads` gives one thread there.
SMALL_WORK = 1e9


def check_seed(seed, name: str = "seed", count: int = 1) -> int:
    """`seed` as an int in [0, SEED_LIMIT - count] (so seed .. seed + count - 1 are distinct seeds), or a one-line
    PipelineError naming the range."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            seed = operator.index(seed)  # numpy integers; not floats or strings
        except TypeError:
            raise PipelineError(f"{name} must be an integer in [0, {SEED_LIMIT - count}], got {seed!r}") from None
    if not 0 <= seed <= SEED_LIMIT - count:
        more = f" (one per video: {name} to {name} + {count - 1})" if count > 1 else ""
        raise PipelineError(f"{name} {seed} is out of range: seeds are integers in [0, {SEED_LIMIT - count}]{more}, "
                            f"since torch's CPU generator reads only the low 32 bits of a seed")
    return int(seed)


# ============================================================================================ conditioning


def count_tokens(text_encoder, prompt: str) -> int | None:
    """Tokens the encoder would read for `prompt` before truncation (special tokens included), or None if it
    cannot say. Knows dfm's small encoder (raw or frozen) and the Hugging Face encoders of dfm.text."""
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
    stack_evals: int | None = None  # block-stack evaluations (one per forward, fewer with a step cache)


class Pipeline:
    """A text-to-video model ready to sample: transformer + text encoder + VAE + sampling recipe.

    module:  a DiffusionModule (dfm.model): `module("denoise", x, sigma, **cond)` is the EDM denoiser of either
             paradigm
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
        self.conditioner = None  # image inputs and experts of the Wan family (dfm/pipeline/wan_family.py)

    @property
    def transformer(self) -> nn.Module:
        return self.module.net

    # LoRA (dfm/pipeline/lora.py): adapters stack, each with its scale; unload restores the transformer exactly
    def load_lora(self, path, scale: float = 1.0, name: str | None = None, expert: str | None = None) -> str:
        """Add a LoRA file (diffusers/PEFT, original Wan/ComfyUI or kohya keys) with `scale`; returns its name.
        Two experts (Wan 2.2 A14B): expert="high" or "low" (default: the file's dfm metadata, else "high")."""
        from dfm.pipeline import lora

        return lora.load(self, path, scale, name, expert)

    def unload_lora(self, name: str | None = None) -> None:
        from dfm.pipeline import lora

        lora.unload(self, name)

    def fuse_lora(self, name: str | None = None) -> None:
        from dfm.pipeline import lora

        lora.fuse(self, name)

    def unfuse_lora(self, name: str | None = None) -> None:
        from dfm.pipeline import lora

        lora.unfuse(self, name)

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
            seeds = [check_seed(s, f"seeds[{i}]") for i, s in enumerate(seeds)]
            if len(prompts) == 1 and len(seeds) > 1:
                prompts = prompts * len(seeds)  # several videos of one prompt
            if len(seeds) != len(prompts):
                raise PipelineError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per prompt")
        else:
            if seed is None:
                seed = int.from_bytes(os.urandom(4), "little") % (SEED_LIMIT - len(prompts) + 1)
            seed = check_seed(seed, count=len(prompts))
            seeds = [seed + i for i in range(len(prompts))]
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

    def grid(self, steps: int, shift: float | None, grid: str | None = None) -> Grid:
        """The sampling grid: `grid` (a name of GRID_NAMES), default the model's own. Flow models pass `shift` (the
        grids that take one use it); EDM models their sigma range and rho to the EDM grids (karras, exponential,
        ...), while logsnr, the few-step grid, keeps its own range. For a flow model logsnr starts at s = 1."""
        d = self.diffusion
        if not isinstance(steps, int) or steps < 1:
            raise PipelineError(f"steps must be a positive integer, got {steps!r}")
        name = grid or d["grid"]
        if name not in GRID_NAMES:
            raise PipelineError(f"unknown sampling grid {name!r}; use one of {', '.join(GRID_NAMES)}")
        if name == "logsnr" and self.paradigm == "flow":
            name = "flow_logsnr"  # the same levels, from s = 1 (pure noise), as a flow model starts
        if self.paradigm == "edm":
            if shift is not None:
                raise PipelineError(f"shift applies to flow-matching models; this one is EDM ({name} grid, sigma "
                                    f"{d.get('sigma_max')} -> {d.get('sigma_min')}, rho {d.get('rho')})")
            own_range = name not in ("logsnr", "flow_logsnr")
            params = {k: d[k] for k in ("sigma_min", "sigma_max", "rho") if own_range and k in d}
        else:
            shift = 1.0 if shift is None else float(shift)
            if not shift > 0:
                raise PipelineError(f"shift must be positive, got {shift}")
            params = {"shift": shift, "num_train_timesteps": int(d.get("num_train_timesteps", 1000))}
        return sampling_grid(name, steps, **params)

    def guidance_interval(self, interval) -> tuple[float, float] | None:
        """(lo, hi) in the model's noise levels (flow: times s in [0, 1]; EDM: sigmas) -> EDM sigmas, or None."""
        if interval is None:
            return None
        try:
            lo, hi = (float(v) for v in interval)
        except (TypeError, ValueError):
            raise PipelineError(f"guidance_interval must be two numbers LO,HI, got {interval!r}") from None
        top = 1.0 if self.paradigm == "flow" else math.inf
        if not 0 <= lo < hi <= top:
            unit = "flow times s, 0 <= LO < HI <= 1" if self.paradigm == "flow" else "sigmas, 0 <= LO < HI"
            raise PipelineError(f"guidance_interval {lo:g},{hi:g}: give the noise levels where guidance applies "
                                f"({unit})")
        if self.paradigm == "flow":  # s -> sigma = s / (1 - s); s = 1 is sigma = inf
            lo, hi = (float(flow_t_to_sigma(torch.tensor(v, dtype=torch.float64))) for v in (lo, hi))
        return lo, hi

    def denoise(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        """D(x, sigma) in EDM coordinates, fp32 out (autocast when the pipeline runs in a lower precision); through
        the module's forward, so that DDP / FSDP2 hooks see it."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.module("denoise", x, sigma, **cond).float()

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        ctx, mask = self.text.encode(list(prompts))
        return ctx.to(self.device).float(), mask.to(self.device)

    def settings(self, num_frames=None, height=None, width=None, steps=None, sampler=None, guidance_scale=None,
                 guidance_rescale=None, guidance_interval=None, grid=None, shift=None, sampler_options=None) -> dict:
        """The resolved, checked settings of a generation (None arguments take `self.defaults`): a PipelineError
        or SamplingError before any sampling."""
        dflt = self.defaults
        pick = lambda v, k: dflt[k] if v is None else v  # noqa: E731
        num_frames, height, width = pick(num_frames, "num_frames"), pick(height, "height"), pick(width, "width")
        steps, guidance = pick(steps, "steps"), float(pick(guidance_scale, "guidance_scale"))
        rescale = float(pick(guidance_rescale, "guidance_rescale") or 0.0)
        levels = pick(guidance_interval, "guidance_interval")  # in the model's noise levels
        if shift is None and self.paradigm == "flow":
            shift = dflt["shift"]
        for name, v in (("guidance_scale", guidance), ("guidance_rescale", rescale)):
            if not math.isfinite(v):
                raise PipelineError(f"{name} must be a finite number, got {v}")
        if not 0 <= guidance <= GUIDANCE_MAX:
            raise PipelineError(f"guidance_scale must be in [0, {GUIDANCE_MAX:g}] (1 = no guidance, 0 = the "
                                f"unconditional model; to steer away from something use a negative prompt), got "
                                f"{guidance:g}")
        if not 0 <= rescale <= 1:
            raise PipelineError(f"guidance_rescale must be in [0, 1] (phi of Lin et al. 2023), got {rescale:g}")
        solver = resolve_sampler(pick(sampler, "sampler") or "auto", self.paradigm)
        if sampler_options is None:  # the recipe's options for its sampler (Wan: UniPC's order and variant)
            sampler_options = self.sampler_options.get(solver.name, {})
        if sampler_options:
            solver = resolve_sampler(solver.name, self.paradigm, sampler_options)  # checks the options
        return {"num_frames": num_frames, "height": height, "width": width, "steps": steps, "sampler": solver,
                "guidance_scale": guidance, "guidance_rescale": rescale, "guidance_interval": levels,
                "interval_sigmas": self.guidance_interval(levels),
                "shape": self.latent_shape(num_frames, height, width), "grid": self.grid(steps, shift, grid),
                "grid_name": grid or self.diffusion["grid"],
                "shift": shift if self.paradigm == "flow" else None}

    def check_settings(self, prompts, negative_prompt=None, **settings) -> None:
        """Everything `generate` checks before sampling, without sampling (the trainer's validation at start-up)."""
        self._prompts(prompts, self.defaults["negative_prompt"] if negative_prompt is None else negative_prompt, 0,
                      None)
        self.settings(**settings)

    def _check_finite(self, x: Tensor, stage: str) -> None:
        """A one-line PipelineError naming `stage` (and the part whose weights are not finite, if one is) when `x`
        holds NaN or inf: such a video would come out black or grey and look like a result."""
        if bool(torch.isfinite(x).all()):
            return
        bad = (~torch.isfinite(x)).sum().item()
        parts = {"text encoding": ("text encoder", self.text), "sampling": ("transformer", self.transformer),
                 "VAE decoding": ("VAE", self.vae)}
        part, module = parts.get(stage, (None, None))
        broken = [n for n, t in module.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()] \
            if isinstance(module, nn.Module) else []
        cause = (f"the {part}'s weights hold NaN or inf ({len(broken)} tensor{'s' if len(broken) > 1 else ''}, e.g. "
                 f"{broken[0]}): the model folder is damaged or was saved from a diverged run; export a good "
                 f"checkpoint again" if broken else
                 "the weights are finite, so sampling diverged with these settings: try a lower guidance scale, "
                 "more steps or another sampler")
        raise PipelineError(f"{stage} gave {bad} non-finite values (NaN or inf) of {x.numel()}; {cause}")

    def cpu_threads(self, settings: dict, batch: int = 1) -> int | None:
        """1 when a generation of `settings` (this class's `settings(...)`) is too small for CPU threads to help
        (see SMALL_WORK), else None (leave the count as it is)."""
        params = sum(p.numel() for p in self.transformer.parameters())
        patch = math.prod(getattr(self.transformer.config, "patch_size", (1,)))
        tokens = math.prod(settings["shape"][1:]) / patch
        guided = 2 if settings["guidance_scale"] != 1 else 1
        return 1 if params * tokens * batch * guided < SMALL_WORK else None

    def _image_inputs(self, image, last_image, guidance_scale_2, n: int, s: dict):
        """(cond tensors of both branches, latents -> latents or None, guidance scale or per-step function)."""
        c = self.conditioner
        if c is None:
            given = [k for k, v in (("image", image), ("last_image", last_image),
                                    ("guidance_scale_2", guidance_scale_2)) if v is not None]
            if given:
                raise PipelineError(f"this is a text-to-video model with one transformer: it takes no {given[0]}; "
                                    f"use a Wan image-to-video or Wan 2.2 folder")
            return {}, None, s["guidance_scale"]
        c.check(image, last_image, guidance_scale_2)
        scale = c.guidance(s["guidance_scale"], guidance_scale_2)
        extra, finish = c.prepare(image, last_image, n, s["num_frames"], s["height"], s["width"], self.device)
        return extra, finish, scale

    # ---------------------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(self, prompts: str | list[str], negative_prompt=None, num_frames=None, height=None, width=None,
                 steps=None, sampler=None, guidance_scale=None, shift=None, seed=None, seeds=None, progress=True,
                 callback=None, sampler_options: dict | None = None, guidance_rescale=None, guidance_interval=None,
                 grid: str | None = None, image=None, last_image=None, guidance_scale_2=None, cache=None,
                 cache_threshold=None) -> Generation:
        """Videos for `prompts` (None arguments take `self.defaults`); the steps are listed in dfm/pipeline/__init__.py.

        seeds: one per prompt (a single prompt with several seeds gives several videos); default seed, seed + 1, ...
        from `seed` (random if None; the seeds used are in the result). negative_prompt: str, one per prompt, or
        None for the model's default (Wan: its negative prompt; dfm models: the null conditioning of training).
        guidance_rescale: phi of Lin et al. 2023 in [0, 1], measured on the model's own prediction (flow: the
        velocity; EDM: the denoised x0). guidance_interval: (lo, hi) in the model's noise levels (flow: times s;
        EDM: sigmas): guidance only where lo < level <= hi, the conditional model elsewhere (Kynkaanniemi et al.
        2024). grid: a sampling grid name (dfm.diffusion.schedules.GRIDS; "logsnr" is the few-step grid).
        callback(info): once per step with the sampler's dict ('x', 'i', 'denoised', ...) plus 'steps'.
        sampler_options: keyword options of the sampler (default: the recipe's, `self.sampler_options`).
        image / last_image: the first / last frame (Wan I2V, FLF2V, 2.2 folders): a PIL image, a path or a
        [3, H, W] tensor in [-1, 1], one for all prompts or one per prompt. guidance_scale_2: the low-noise
        expert's scale (Wan 2.2 A14B; default the folder's).
        cache: "magcache" | "teacache" | "fbcache" | "none" (None: off, unless dfm.pipeline.caching.default_cache
        set one), cache_threshold: its threshold (None: the method's default); see dfm/pipeline/caching.py.
        """
        start = time.perf_counter()
        negative = self.defaults["negative_prompt"] if negative_prompt is None else negative_prompt
        s = self.settings(num_frames, height, width, steps, sampler, guidance_scale, guidance_rescale,
                          guidance_interval, grid, shift, sampler_options)
        prompts, negative, seeds = self._prompts(prompts, negative, seed, seeds)
        step_cache = build_cache(self, cache, cache_threshold, **{k: s[k] for k in ("num_frames", "height", "width",
                                 "guidance_scale")}, image=image, last_image=last_image,
                                 guidance_scale_2=guidance_scale_2)  # checked (calibrated if new) before sampling
        guidance, grid_ = s["guidance_scale"], s["grid"]
        extra, finish, scale = self._image_inputs(image, last_image, guidance_scale_2, len(prompts), s)

        cond, uncond = guidance_branches(self.encode, prompts, negative, self.null, self.use_mask,
                                         0.0 if callable(scale) else scale)  # a per-expert w needs uncond
        for branch in (cond, uncond) if extra else ():
            if branch is not None:
                branch.update(extra)  # image tensors: the same in both branches
        for branch in (cond, uncond):
            if branch is not None:
                self._check_finite(branch["context"], "text encoding")
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        noise = torch.cat([torch.randn((1, *s["shape"]), generator=g) for g in generators])  # [B, C, f, h, w], CPU
        noise = noise.to(self.device)

        bar = tqdm(total=grid_.steps, desc="generate", file=sys.stderr, dynamic_ncols=True, leave=False) \
            if progress else None

        def on_step(info: dict) -> None:
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback({**info, "steps": grid_.steps})

        try:
            with cached_denoiser(self, step_cache, grid_) as denoise:
                latents, nfe = guided_sample(denoise, noise, grid_, s["sampler"], cond=cond, uncond=uncond,
                                             guidance_scale=scale, generators=generators, callback=on_step,
                                             rescale=s["guidance_rescale"], interval=s["interval_sigmas"],
                                             rescale_space="flow" if self.paradigm == "flow" else "x0")
        finally:
            if bar is not None:
                bar.close()
        self._check_finite(latents, "sampling")
        latents = finish(latents) if finish is not None else latents
        with torch.autocast(self.device.type, enabled=False):
            videos = self.vae.decode(latents.float()).float()  # [B, 3, F, H, W]
        self._check_finite(videos, "VAE decoding")
        videos = videos.clamp(-1, 1).cpu()
        settings = {"num_frames": s["num_frames"], "height": s["height"], "width": s["width"], "steps": s["steps"],
                    "sampler": s["sampler"].name, "guidance_scale": guidance,
                    "guidance_rescale": s["guidance_rescale"], "guidance_interval": s["guidance_interval"],
                    "grid": s["grid_name"], "shift": s["shift"], "negative_prompt": negative,
                    "cache": step_cache.summary() if step_cache is not None else None}
        return Generation(videos, prompts, seeds, nfe, time.perf_counter() - start, float(self.defaults["fps"]),
                          settings, step_cache.computed if step_cache is not None else nfe)
