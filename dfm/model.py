"""The model: what is trained and what samples, for every backbone x paradigm pair.

A `DiffusionModule` is a backbone (`model.arch`: wan | dit) with the text encoder it is trained with, seen as one
EDM denoiser D(x, sigma) for sampling and as one per-sample loss for training. Its config sections and builders
live here, each builder taking its own section, so that the trainer (dfm.training) and the pipeline
(dfm.pipeline) build the same model from the same settings:

    model:        ModelConfig        -> backbone_config / build_backbone   (the arch's size registry + overrides)
    diffusion:    DiffusionConfig    -> DiffusionModule                    (paradigm; flow.* and edm.* training)
    sampling:     SamplingConfig     -> sampling_recipe                    (grid, sampler, guidance, ...)
    text:         TextConfig         -> build_text_encoder
    autoencoder:  AutoencoderConfig  -> build_autoencoder
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import yaml
from torch import nn

from dfm.config import ConfigError, from_dict, load_yaml, upgrade
from dfm.conditioning import ConditioningConfig, Conditioned, FrameEDM, frame_edm_loss, frame_flow_loss
from dfm.errors import first_line
from dfm.diffusion.edm import EDMPrecond, edm_loss
from dfm.diffusion.flow import TimestepSampler, flow_loss
from dfm.diffusion.paths import append_dims, denoiser_from_velocity
from dfm.models import DIT_CONFIGS, WAN_CONFIGS, DiT, WanModel
from dfm.models.lora import DEFAULT_TARGETS
from dfm.text import SmallTextConfig, SmallTextEncoder, WordTokenizer, load_text_encoder
from dfm.vae import VAEError, load_vae

# ------------------------------------------------------------------------------------------------ sections


@dataclass
class ModelConfig:
    arch: Literal["wan", "dit"] = "wan"  # the backbone
    size: str = "tiny"  # a name in the arch's size registry (WAN_CONFIGS / DIT_CONFIGS)
    overrides: dict = field(default_factory=dict)  # per-field changes to that size, e.g. {num_layers: 4}
    init_from: str = ""  # start from these weights: a dfm model folder, a trainer run or a diffusers Wan folder
    expert: Literal["", "high", "low"] = ""  # a two-expert Wan 2.2 folder: the one a LoRA trains
    # in/out channels and the text width are derived (autoencoder and text encoder): see backbone_config


@dataclass
class FlowConfig:
    """diffusion.flow: flow-matching training (dfm.diffusion.flow). Flow time s = 1 is pure noise."""

    timestep_sampling: Literal["uniform", "logit_normal", "mode", "mixed"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    uniform_ratio: float = 0.1
    shift: float = 1.0  # static shift of the training times, s' = a s / (1 + (a - 1) s); 1: none
    weighting: Literal["none", "sigma_sqrt", "cosmap", "linear"] = "none"
    weighting_slope: float = 1.0  # the "linear" weighting's w(s) = 1 + slope * s
    timestep_scale: float = 1000.0  # the backbone sees s * timestep_scale (Wan: 0..1000)


@dataclass
class EDMConfig:
    """diffusion.edm: EDM training (dfm.diffusion.edm, Karras et al. 2022 Table 1): ln(sigma) ~ N(P_mean, P_std^2).

    The defaults are the paper's for pixels (sigma_data 0.5); for unit-variance latents (sigma_data 1) EDM2's
    (-0.4, 1.0) at sigma_data 0.5 becomes (0.3, 1.0): see configs/dit_edm_latent_digits.yaml."""

    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5


@dataclass
class DiffusionConfig:
    paradigm: Literal["flow", "edm"] = "flow"
    flow: FlowConfig = field(default_factory=FlowConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)


@dataclass
class SamplingConfig:
    """How the model samples: the trainer's validation videos and the defaults of an exported model folder."""

    sampler: str = "auto"  # auto: euler for flow, heun for edm; or SPACE:NAME / NAME (dfm.diffusion.samplers)
    steps: int = 20
    guidance_scale: float = 4.0  # classifier-free guidance w (1: the conditional model alone)
    guidance_rescale: float = 0.0  # phi of Lin et al. 2023 (0: plain CFG)
    guidance_interval: Optional[list[float]] = None  # [lo, hi]: guidance only for lo < level <= hi, in the model's
    # noise levels (flow: time s in [0, 1]; EDM: sigma)
    grid: Optional[str] = None  # None: the paradigm's (flow: flow_shifted, edm: karras); or any GRIDS name
    shift: float = 1.0  # flow grids: s' = a s / (1 + (a - 1) s)
    sigma_min: float = 0.002  # EDM grids (Karras)
    sigma_max: float = 80.0
    rho: float = 7.0
    fps: float = 8.0  # of the videos (data.fps wins when the data has one)


@dataclass
class TextConfig:
    # "small" (trained from scratch with the model), a folder written by SmallTextEncoder.save_pretrained (trained
    # further unless trainable=false), or a Hugging Face T5 / UMT5 / CLIP folder (dfm.text.load_text_encoder: frozen)
    encoder: str = "small"
    dim: int = 128
    layers: int = 2
    heads: int = 4
    max_length: int = 32
    trainable: bool = True  # train the encoder with the diffusion model
    dropout: float = 0.1  # conditioning dropout for classifier-free guidance
    null: Literal["empty", "zeros"] = "empty"  # what replaces a dropped caption: the empty prompt, or zeros
    mask: bool = True  # the cross-attention skips padding; false (Wan folders): it attends to the zero padding too


@dataclass
class AutoencoderConfig:
    name: str = "identity"  # "identity" (pixel space) or a VAE folder (dfm.vae.load_vae: ours or diffusers' Wan)


@dataclass
class LoRAConfig:
    """lora: train low-rank adapters on a frozen base (model.init_from) instead of the whole model
    (dfm/models/lora.py). rank 0: off. alpha 0: = rank (scale 1). targets: fnmatch patterns over the backbone's
    linear layer names; the default is every attention projection and FFN layer of every block."""

    rank: int = 0
    alpha: float = 0.0
    targets: list = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dropout: float = 0.0


@dataclass
class ModelRecipe:
    """The sections of a training config that describe the model and how it samples (dfm.training.TrainConfig
    adds data, optim and train): what a checkpoint's config.yaml must give to rebuild the model for inference."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    text: TextConfig = field(default_factory=TextConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)  # image-to-video (dfm.conditioning)

    # keys of earlier dfm versions: config files (and so old checkpoints) that hold them load with the values
    # moved; a command-line override that uses one is told the new name (dfm.config.upgrade)
    RENAMED = {
        **{f"diffusion.{k}": (f"diffusion.flow.{k}",) for k in
           ("timestep_sampling", "logit_mean", "logit_std", "mode_scale", "uniform_ratio", "weighting",
            "timestep_scale")},
        "diffusion.shift": ("diffusion.flow.shift", "diffusion.flow.weighting_slope"),  # it was both
        **{f"diffusion.{k}": (f"diffusion.edm.{k}",) for k in ("P_mean", "P_std", "sigma_data")},
        **{f"diffusion.{k}": (f"sampling.{k}",) for k in ("sigma_min", "sigma_max", "rho")},
        "train.val_steps": ("sampling.steps",),
        "train.val_sampler": ("sampling.sampler",),
        "train.val_guidance": ("sampling.guidance_scale",),
        "train.val_shift": ("sampling.shift",),
        "train.val_fps": ("sampling.fps",),
    }


def read_recipe(path: Path) -> tuple[ModelRecipe, dict]:
    """(the model sections, the whole upgraded mapping) of a training config.yaml (a checkpoint's)."""
    try:
        raw = load_yaml(Path(path).read_text(encoding="utf-8"), path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} is not a readable config ({first_line(e)}); use a checkpoint written by "
                          f"`dfm train`") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections; use a checkpoint written by `dfm train`")
    raw = upgrade(ModelRecipe, raw)
    names = [f.name for f in dataclasses.fields(ModelRecipe)]
    return from_dict(ModelRecipe, {k: raw[k] for k in names if k in raw}), raw


# ------------------------------------------------------------------------------------------------ builders

BACKBONES = {"wan": (WanModel, WAN_CONFIGS), "dit": (DiT, DIT_CONFIGS)}  # arch -> (class, size registry)

# fields set from the autoencoder and the text encoder
_DERIVED = ("in_channels", "out_channels", "text_dim", "context_dim")


def backbone_class(arch: str) -> type[nn.Module]:
    if arch not in BACKBONES:
        raise ConfigError(f"unknown model.arch {arch!r}; use {' or '.join(BACKBONES)}")
    return BACKBONES[arch][0]


def backbone_config(m: ModelConfig, channels: int, text_dim: int, in_channels: int | None = None):
    """The backbone's config dataclass: the registry entry `model.size`, then `model.overrides`, then the
    channel count and the text width (derived, so they always fit the autoencoder and the text encoder)."""
    backbone_class(m.arch)
    registry = BACKBONES[m.arch][1]
    if m.size not in registry:
        raise ConfigError(f"unknown model.size {m.size!r} for model.arch={m.arch}; valid sizes: {', '.join(registry)}")
    base = registry[m.size]
    fields = {f.name: f for f in dataclasses.fields(base)}
    unknown = [k for k in m.overrides if k not in fields]
    if unknown:
        raise ConfigError(f"unknown config key 'model.overrides.{unknown[0]}' for model.arch={m.arch}; "
                          f"valid keys: {', '.join(k for k in fields if k not in _DERIVED)}")
    derived = {"in_channels": in_channels or channels, "out_channels": channels, "text_dim": text_dim, "context_dim": text_dim}
    derived = {k: v for k, v in derived.items() if k in fields}
    clash = [k for k in derived if k in m.overrides and m.overrides[k] != derived[k]]
    if clash:
        raise ConfigError(f"model.overrides.{clash[0]} is set by the trainer ({derived[clash[0]]}, from the "
                          f"autoencoder / text.dim); remove it")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in {**m.overrides, **derived}.items()}
    try:
        return dataclasses.replace(base, **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.overrides: {e}") from None


def build_backbone(m: ModelConfig, channels: int, text_dim: int, in_channels: int | None = None) -> nn.Module:
    return backbone_class(m.arch)(backbone_config(m, channels, text_dim, in_channels))


def build_autoencoder(a: AutoencoderConfig, clip: tuple[int, int, int] | None = None) -> nn.Module:
    """`autoencoder.name`: "identity" (pixel space) or a VAE folder (dfm.vae.load_vae), frozen in eval mode; the
    clip size (frames, height, width), when given, must be one the autoencoder can represent (ConfigError)."""
    try:
        vae = load_vae(a.name)
        if clip is not None:
            vae.latent_shape(*clip)
    except VAEError as e:
        raise ConfigError(f"autoencoder.name={a.name}: {e}") from None
    return vae.requires_grad_(False).eval()


def build_text_encoder(t: TextConfig, vocab: list[str], max_length: Optional[int] = None):
    """The trained SmallTextEncoder (`text.encoder`: small, or a small-encoder folder), or a frozen
    dfm.text.FrozenTextEncoder (a Hugging Face T5 / UMT5 / CLIP folder), which runs outside the trained module."""
    if t.encoder == "small":
        return SmallTextEncoder(WordTokenizer(vocab), SmallTextConfig(t.dim, t.layers, t.heads, t.max_length))
    folder = Path(t.encoder)
    if not folder.is_dir():
        raise ConfigError(f"text.encoder must be 'small' or a text encoder folder, got {t.encoder!r} (not found)")
    try:
        small = json.loads((folder / "config.json").read_text()).get("type") == "small"
    except (OSError, ValueError):
        small = False
    if small:
        enc = SmallTextEncoder.from_pretrained(folder)
        if enc.dim != t.dim:
            raise ConfigError(f"the text encoder in {t.encoder} has dim {enc.dim}; set text.dim={enc.dim}")
        return enc
    return load_text_encoder(folder, max_length=max_length)  # None: the model's own (512 for UMT5, 77 for CLIP)


def set_activation_checkpointing(net: nn.Module) -> None:
    if hasattr(net, "gradient_checkpointing"):
        net.gradient_checkpointing = True
        return
    blocks = getattr(net, "blocks", None)
    if blocks is None:
        raise ConfigError(f"train.activation_checkpointing: {type(net).__name__} has no blocks to checkpoint")
    for block in blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        block.forward = checkpointed


# --------------------------------------------------------------------------------------------- sampling recipe

DEFAULT_GRID = {"flow": "flow_shifted", "edm": "karras"}  # the grid a paradigm's models are sampled on


def sampling_recipe(r: ModelRecipe) -> dict:
    """What sampling needs of a trained model (a model folder's "diffusion" entry, nothing of training): the grid
    and its parameters, and the denoiser's (flow: timestep_scale; EDM: sigma_data)."""
    d, s = r.diffusion, r.sampling
    grid = s.grid or DEFAULT_GRID[d.paradigm]
    if d.paradigm == "flow":
        return {"grid": grid, "timestep_scale": d.flow.timestep_scale}
    return {"grid": grid, "sigma_data": d.edm.sigma_data, "sigma_min": s.sigma_min, "sigma_max": s.sigma_max,
            "rho": s.rho}  # the sigma range of the EDM grids; logsnr keeps its own (dfm.pipeline.Pipeline.grid)


def sampling_defaults(r: ModelRecipe, num_frames: int, size: int, fps: float | None = None) -> dict:
    """A trained model's generation defaults (a model folder's "defaults"): its clip size and `sampling`."""
    s, flow = r.sampling, r.diffusion.paradigm == "flow"
    return {"num_frames": num_frames, "height": size, "width": size, "fps": float(fps or s.fps), "steps": s.steps,
            "sampler": s.sampler, "guidance_scale": s.guidance_scale, "guidance_rescale": s.guidance_rescale,
            "guidance_interval": list(s.guidance_interval) if s.guidance_interval else None,
            "shift": s.shift if flow else None, "negative_prompt": None}


def diffusion_from_recipe(paradigm: str, recipe: dict) -> DiffusionConfig:
    """The inverse of `sampling_recipe` for what the denoiser needs (a model folder's "diffusion" entry)."""
    flow = FlowConfig(**{k: recipe[k] for k in ("timestep_scale",) if k in recipe})
    edm = EDMConfig(**{k: recipe[k] for k in ("sigma_data",) if k in recipe})
    return DiffusionConfig(paradigm=paradigm, flow=flow, edm=edm)


# ------------------------------------------------------------------------------------------------- module


class DiffusionModule(nn.Module):
    """What is trained and what samples: backbone `net` + text encoder `text`, and the loss of one paradigm.

    Every computation goes through `forward(task, ...)` so that DDP and FSDP2 hooks see it:
      forward("loss", x0, text, mask, keep, generators) -> per-sample loss [B]  (text: token ids [B, L] for the
          trained encoder `text`, or embeddings [B, L, D] from a frozen encoder outside, when `text` is None)
      forward("encode", ids, mask) -> context [B, L, D]
      forward("denoise", x, sigma, context=, context_mask=) -> x0_hat, the EDM-coordinate denoiser D(x, sigma)
    """

    def __init__(self, net: nn.Module, text: SmallTextEncoder | None, diffusion: DiffusionConfig, null: str = "empty",
                 conditioning: ConditioningConfig | None = None):
        super().__init__()
        self.net, self.text = net, text
        self.diffusion, self.null = diffusion, null
        self.conditioning = conditioning or ConditioningConfig()  # image inputs: dfm.conditioning
        f = diffusion.flow
        self.timesteps = TimestepSampler(f.timestep_sampling, f.logit_mean, f.logit_std, f.mode_scale,
                                         f.uniform_ratio, f.shift)

    def forward(self, task: str, *args, **kwargs):
        if task == "loss":
            return self.loss(*args, **kwargs)
        if task == "encode":
            return self.text(*args)
        if task == "denoise":
            return self.denoise(*args, **kwargs)
        raise ValueError(f"unknown task {task!r}")

    def velocity(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        if self.conditioning.mode == "none":
            return self.net(x, t, **cond)
        return Conditioned(self.net, self.conditioning).call(x, t, **cond)  # image inputs in cond

    def edm_denoiser(self) -> EDMPrecond:
        if self.conditioning.mode == "frame":  # per-frame sigma, 0 on the given frames (dfm.conditioning)
            return FrameEDM(EDMPrecond(self.net, sigma_data=self.diffusion.edm.sigma_data), self.conditioning)
        return EDMPrecond(self.net if self.conditioning.mode == "none" else self.velocity,
                          sigma_data=self.diffusion.edm.sigma_data)

    def loss(self, x0, text, mask, keep, generators, conditioned=None, condition=None, image_context=None):
        """x0 [B, C, F, H, W]; text: ids [B, L] or embeddings [B, L, D] (dropped captions already emptied for
        null=empty); mask [B, L]; keep [B] bool; image conditioning (dfm.conditioning): conditioned [B] bool
        (frame: those samples' first latent frame given clean) or condition [B, tf + C, F, H, W] (concat)."""
        context = self.text(text, mask) if self.text is not None else text  # [B, L, D]
        if self.null == "zeros":
            context = context * append_dims(keep.to(context.dtype), context.ndim)  # dropped -> zeros
        cond = {"context": context, "context_mask": mask}
        if condition is not None:
            cond["condition"] = condition
        if image_context is not None:  # [B, N, Di] CLIP features of the given frame (Wan 2.1 I2V)
            cond["image_context"] = image_context
        d = self.diffusion
        if d.paradigm == "flow" and conditioned is not None and self.conditioning.mode == "frame":
            f = d.flow
            return frame_flow_loss(self.velocity, x0, conditioned, last=self.conditioning.last,
                                   generator=generators, sampling=self.timesteps, weighting=f.weighting,
                                   weighting_shift=f.weighting_slope, timestep_scale=f.timestep_scale, **cond)
        if d.paradigm == "flow":
            f = d.flow
            return flow_loss(self.velocity, x0, generator=generators, sampling=self.timesteps,
                             weighting=f.weighting, weighting_shift=f.weighting_slope,
                             timestep_scale=f.timestep_scale, **cond)
        e = d.edm
        if conditioned is not None and self.conditioning.mode == "frame":
            return frame_edm_loss(self.edm_denoiser(), x0, conditioned, last=self.conditioning.last,
                                  generator=generators, P_mean=e.P_mean, P_std=e.P_std, sigma_data=e.sigma_data,
                                  **cond)
        return edm_loss(self.edm_denoiser(), x0, generator=generators, P_mean=e.P_mean, P_std=e.P_std,
                        sigma_data=e.sigma_data, **cond)

    def denoise(self, x, sigma, **cond):
        """D(x, sigma) in EDM coordinates for either paradigm (flow: the exact adapter of dfm.diffusion.paths)."""
        if self.diffusion.paradigm == "edm":
            return self.edm_denoiser()(x, sigma, **cond)
        scale = self.diffusion.flow.timestep_scale
        return denoiser_from_velocity(lambda x_s, s: self.velocity(x_s, s * scale, **cond))(x, sigma)
