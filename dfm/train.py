"""The trainer: one `train(config)` for every backbone x paradigm pair (DiT/EDM, WAN/flow, and the crossings).

    dfm train --config configs/wan_flow_digits.yaml train.max_steps=200 train.output_dir=runs/wan
    torchrun --nproc_per_node 2 -m dfm train --config configs/dit_edm_digits.yaml train.parallel=fsdp
    dfm train --config configs/wan_flow_digits.yaml --resume              # continue from the latest checkpoint

What is trained is a `DiffusionModule`: the backbone (`model.arch`: wan | dit) and the built-in text encoder,
with the loss of one paradigm (`diffusion.paradigm`: flow | edm). Video goes through an autoencoder hook first
(`autoencoder.name: identity`, i.e. pixel space, until the VAE lands).

Reproducibility (see `dfm.distributed`): the global batch of step k holds the global samples
[k*B, (k+1)*B); sample g is item perm_e[g mod N] of the dataset (e = g div N, perm_e a permutation fixed by
(seed, e)); its noise, time and conditioning dropout come from generators seeded by (seed, g). Rank r of W takes a
contiguous B/W slice, split into `grad_accum` micro-batches. So the data and noise of a step depend on neither the
world size nor interruptions: N ranks reproduce one process (up to float summation order), and `--resume`
reproduces the uninterrupted run exactly on the CPU.

Output directory: config.yaml (the resolved config), metrics.jsonl (one JSON object per logged step), tb/
(TensorBoard, if installed), samples/step_XXXXXXXX/ (validation mp4s and contact_sheet.png), checkpoints/step_*/
(model, EMA, optimizer, RNG and data position, config.yaml, text.json; the last `keep_checkpoints` kept).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from dfm import distributed as D
from dfm.checkpoint import CheckpointError, find_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from dfm.config import ConfigError, config_yaml
from dfm.errors import UserError
from dfm.video import write_text_atomic
from dfm.diffusion.edm import EDMPrecond, edm_loss
from dfm.diffusion.flow import TimestepSampler, flow_loss
from dfm.diffusion.paths import append_dims, sigma_to_flow_t
from dfm.text import SmallTextConfig, SmallTextEncoder, WordTokenizer

# ------------------------------------------------------------------------------------------------------ config


@dataclass
class ModelConfig:
    arch: Literal["wan", "dit"] = "wan"  # the backbone
    size: str = "tiny"  # a name in the arch's size registry (WAN_CONFIGS / DIT_CONFIGS)
    overrides: dict = field(default_factory=dict)  # per-field changes to that size, e.g. {num_layers: 4}
    # in/out channels and the text width are set by the trainer (autoencoder and text encoder)


@dataclass
class DiffusionConfig:
    paradigm: Literal["flow", "edm"] = "flow"
    # flow matching (dfm.diffusion.flow): timestep density, static shift, loss weighting
    timestep_sampling: Literal["uniform", "logit_normal", "mode", "mixed"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    uniform_ratio: float = 0.1
    shift: float = 1.0
    weighting: Literal["none", "sigma_sqrt", "cosmap", "linear"] = "none"
    timestep_scale: float = 1000.0  # the backbone sees s * timestep_scale (Wan: 0..1000)
    # EDM (dfm.diffusion.edm, Karras et al. 2022 Table 1): ln(sigma) ~ N(P_mean, P_std^2). The defaults are the
    # paper's for pixels (sigma_data 0.5); for unit-variance latents (sigma_data 1) EDM2's (-0.4, 1.0) at sigma_data
    # 0.5 becomes (0.3, 1.0): see configs/dit_edm_latent_digits.yaml
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    sigma_min: float = 0.002  # sampling grid (validation)
    sigma_max: float = 80.0
    rho: float = 7.0


@dataclass
class DataConfig:
    dataset: Literal["digits", "folder", "latents"] = "digits"  # latents: a folder written by `dfm preprocess` (root)
    num_frames: int = 8
    size: int = 32  # frames are size x size
    # digits (dfm.data.MovingDigits)
    num_digits: int = 1
    colors: Optional[list[str]] = None
    bounce: bool = False
    length: int = 10_000  # items per epoch
    # folder (dfm.data.VideoFolder)
    root: Optional[str] = None
    buckets: Optional[list[list[int]]] = None  # [[H, W], ...] aspect buckets (each video to the nearest); None: size x size
    frame_buckets: Optional[list[int]] = None  # clip lengths (each video gets the longest it supplies); None: num_frames
    stride: Optional[int] = None
    fps: Optional[float] = None
    # loading
    shuffle: bool = True
    num_workers: int = 0


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


@dataclass
class AutoencoderConfig:
    name: str = "identity"  # "identity" (pixel space) or a VAE folder (dfm.vae.load_vae: ours or diffusers' Wan)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01  # on matrices only (not biases, norms, tables)
    warmup_steps: int = 0  # linear warm-up from 0
    schedule: Literal["constant", "cosine"] = "constant"  # after the warm-up
    min_lr: float = 0.0  # the end of the cosine
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates


@dataclass
class RunConfig:
    max_steps: int = 1000
    max_minutes: float = 0.0  # also stop (checkpoint, validation) at the first log step past this wall time; 0: off
    batch_size: int = 8  # the global batch (all ranks, all accumulation micro-batches)
    grad_accum: int = 1
    output_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500  # 0: only at the end (every run ends with a checkpoint)
    keep_checkpoints: int = 3  # 0 keeps all
    validate_every: int = 0  # 0 = never
    val_prompts: list[str] = field(default_factory=list)  # empty: the captions of the first 4 training items
    val_steps: int = 20
    val_sampler: str = "auto"  # auto: euler for flow, heun for edm; any name of the samplers' registries
    val_guidance: float = 4.0
    val_shift: float = 1.0  # flow sampling grid shift
    val_fps: float = 8.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with several processes
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # CPU threads per process; 0: torch's default (on a busy machine 1 is often fastest)
    progress: bool = True  # the progress bar (rank 0)
    tensorboard: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (a non-finite loss, ...); the message is one line that names the fix."""


def check_config(cfg: TrainConfig, world_size: int = 1) -> None:
    """Cross-field checks that the dataclass types cannot express; raises ConfigError."""
    t, o = cfg.train, cfg.optim
    for key, value in [("train.max_steps", t.max_steps), ("train.batch_size", t.batch_size),
                       ("train.grad_accum", t.grad_accum), ("train.log_every", t.log_every),
                       ("data.num_frames", cfg.data.num_frames), ("data.size", cfg.data.size)]:
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in [("train.checkpoint_every", t.checkpoint_every), ("train.validate_every", t.validate_every),
                       ("train.keep_checkpoints", t.keep_checkpoints), ("train.seed", t.seed),
                       ("optim.warmup_steps", o.warmup_steps), ("optim.grad_clip", o.grad_clip),
                       ("data.num_workers", cfg.data.num_workers), ("train.threads", t.threads),
                       ("train.max_minutes", t.max_minutes)]:
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if t.batch_size % (world_size * t.grad_accum):
        raise ConfigError(f"train.batch_size={t.batch_size} (global) must be divisible by world size x grad_accum = "
                          f"{world_size} x {t.grad_accum}; change train.batch_size or train.grad_accum")
    if not 0 <= cfg.text.dropout < 1:
        raise ConfigError(f"text.dropout must be in [0, 1), got {cfg.text.dropout}")
    if not 0 <= o.ema_decay < 1:
        raise ConfigError(f"optim.ema_decay must be in [0, 1), got {o.ema_decay}")
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas must be two numbers, got {o.betas}")
    if cfg.data.dataset == "folder" and not cfg.data.root:
        raise ConfigError("data.dataset=folder needs data.root=PATH (a folder of videos with captions)")
    if t.precision == "bf16" and (t.device == "cpu" or not torch.cuda.is_available()):
        raise ConfigError("train.precision=bf16 needs CUDA (bf16 matmuls are ~500x slower on these CPUs); "
                          "use train.precision=auto or fp32")
    backbone_config(cfg, 3, cfg.text.dim)  # the size name and overrides


# ---------------------------------------------------------------------------------------------------- models


def _arch(arch: str):
    """(model class, size registry) of a backbone."""
    if arch == "wan":
        from dfm.models import WAN_CONFIGS, WanModel

        return WanModel, WAN_CONFIGS
    if arch == "dit":
        try:
            from dfm.models import DIT_CONFIGS, DiT
        except ImportError:
            raise ConfigError("model.arch=dit: the DiT backbone (dfm.models.DiT) is not available yet") from None
        return DiT, DIT_CONFIGS
    raise ConfigError(f"unknown model.arch {arch!r}; use wan or dit")


# fields the trainer sets from the autoencoder and the text encoder
_DERIVED = ("in_channels", "out_channels", "text_dim", "context_dim")


def backbone_config(cfg: TrainConfig, channels: int, text_dim: int):
    """The backbone's config dataclass: the registry entry `model.size`, then `model.overrides`, then the
    channel count and the text width (derived, so they always fit the autoencoder and the text encoder)."""
    cls, registry = _arch(cfg.model.arch)
    if cfg.model.size not in registry:
        raise ConfigError(f"unknown model.size {cfg.model.size!r} for model.arch={cfg.model.arch}; "
                          f"valid sizes: {', '.join(registry)}")
    base = registry[cfg.model.size]
    fields = {f.name: f for f in dataclasses.fields(base)}
    unknown = [k for k in cfg.model.overrides if k not in fields]
    if unknown:
        raise ConfigError(f"unknown config key 'model.overrides.{unknown[0]}' for model.arch={cfg.model.arch}; "
                          f"valid keys: {', '.join(k for k in fields if k not in _DERIVED)}")
    derived = {"in_channels": channels, "out_channels": channels, "text_dim": text_dim, "context_dim": text_dim}
    derived = {k: v for k, v in derived.items() if k in fields}
    clash = [k for k in derived if k in cfg.model.overrides and cfg.model.overrides[k] != derived[k]]
    if clash:
        raise ConfigError(f"model.overrides.{clash[0]} is set by the trainer ({derived[clash[0]]}, from the "
                          f"autoencoder / text.dim); remove it")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in {**cfg.model.overrides, **derived}.items()}
    try:
        return dataclasses.replace(base, **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.overrides: {e}") from None


def build_autoencoder(cfg: TrainConfig) -> nn.Module:
    """`autoencoder.name`: "identity" (pixel space) or a VAE folder (dfm.vae.load_vae), frozen in eval mode; the
    clip size must be one the autoencoder can represent (ConfigError otherwise)."""
    from dfm.vae import VAEError, load_vae

    try:
        vae = load_vae(cfg.autoencoder.name)
        vae.latent_shape(cfg.data.num_frames, cfg.data.size, cfg.data.size)
    except VAEError as e:
        raise ConfigError(f"autoencoder.name={cfg.autoencoder.name}: {e}") from None
    return vae.requires_grad_(False).eval()


def build_text_encoder(cfg: TrainConfig, vocab: list[str], max_length: Optional[int] = None):
    """The trained SmallTextEncoder (`text.encoder`: small, or a small-encoder folder), or a frozen
    dfm.text.FrozenTextEncoder (a Hugging Face T5 / UMT5 / CLIP folder), which runs outside the trained module."""
    t = cfg.text
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
    from dfm.text import load_text_encoder

    return load_text_encoder(folder, max_length=max_length)  # None: the model's own (512 for UMT5, 77 for CLIP)


class DiffusionModule(nn.Module):
    """What is trained: backbone `net` + text encoder `text`, and the loss of one paradigm.

    Every computation goes through `forward(task, ...)` so that DDP and FSDP2 hooks see it:
      forward("loss", x0, text, mask, keep, generators) -> per-sample loss [B]  (text: token ids [B, L] for the
          trained encoder `text`, or embeddings [B, L, D] from a frozen encoder outside, when `text` is None)
      forward("encode", ids, mask) -> context [B, L, D]
      forward("denoise", x, sigma, context=, context_mask=) -> x0_hat, the EDM-coordinate denoiser D(x, sigma)
    """

    def __init__(self, net: nn.Module, text: SmallTextEncoder | None, diffusion: DiffusionConfig, null: str = "empty"):
        super().__init__()
        self.net, self.text = net, text
        self.diffusion, self.null = diffusion, null
        d = diffusion
        self.timesteps = TimestepSampler(d.timestep_sampling, d.logit_mean, d.logit_std, d.mode_scale,
                                         d.uniform_ratio, d.shift)

    def forward(self, task: str, *args, **kwargs):
        if task == "loss":
            return self.loss(*args, **kwargs)
        if task == "encode":
            return self.text(*args)
        if task == "denoise":
            return self.denoise(*args, **kwargs)
        raise ValueError(f"unknown task {task!r}")

    def velocity(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.net(x, t, **cond)

    def edm_denoiser(self) -> EDMPrecond:
        return EDMPrecond(self.net, sigma_data=self.diffusion.sigma_data)

    def loss(self, x0, text, mask, keep, generators):
        """x0 [B, C, F, H, W]; text: ids [B, L] or embeddings [B, L, D] (dropped captions already emptied for
        null=empty); mask [B, L]; keep [B] bool."""
        context = self.text(text, mask) if self.text is not None else text  # [B, L, D]
        if self.null == "zeros":
            context = context * append_dims(keep.to(context.dtype), context.ndim)  # dropped -> zeros
        cond = {"context": context, "context_mask": mask}
        d = self.diffusion
        if d.paradigm == "flow":
            return flow_loss(self.velocity, x0, generator=generators, sampling=self.timesteps,
                             weighting=d.weighting, weighting_shift=d.shift, timestep_scale=d.timestep_scale, **cond)
        return edm_loss(self.edm_denoiser(), x0, generator=generators, P_mean=d.P_mean, P_std=d.P_std,
                        sigma_data=d.sigma_data, **cond)

    def denoise(self, x, sigma, **cond):
        """D(x, sigma) in EDM coordinates for either paradigm (flow: s = sigma/(1+sigma), x0 = x_s - s*v)."""
        if self.diffusion.paradigm == "edm":
            return self.edm_denoiser()(x, sigma, **cond)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        s = sigma_to_flow_t(sigma)  # [B] fp32
        x_s = x / append_dims(1 + sigma, x.ndim)  # x_edm * (1 - s)
        v = self.net(x_s, s * self.diffusion.timestep_scale, **cond)
        return x_s - append_dims(s, x.ndim) * v.float()


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


# ------------------------------------------------------------------------------------------------------ data


def build_dataset(cfg: TrainConfig) -> Dataset:
    d = cfg.data
    if d.dataset == "digits":
        from dfm.data import MovingDigits

        return MovingDigits(split="train", num_frames=d.num_frames, size=d.size, num_digits=d.num_digits,
                            colors=d.colors, bounce=d.bounce, length=d.length, seed=cfg.train.seed)
    if d.dataset == "latents":
        from dfm.data import LatentDataset

        if not d.root:
            raise ConfigError("data.dataset=latents needs data.root, a folder written by `dfm preprocess`")
        return LatentDataset(d.root)
    from dfm.data import VideoFolder

    ds = VideoFolder(d.root, num_frames=d.frame_buckets or d.num_frames, size=d.buckets or (d.size, d.size),
                     stride=d.stride, fps=d.fps, seed=cfg.train.seed)
    if len(ds) == 0:
        raise ConfigError(f"data.root={d.root}: no usable videos (skipped: {len(ds.skipped)}); check the folder")
    return ds


def check_latent_dataset(cfg: TrainConfig, dataset, autoencoder) -> None:
    """A `dfm preprocess` folder must hold latents of this config's autoencoder (the one that decodes them: the same
    folder, or one with the same config.json) and of this config's clip size (data.num_frames, data.size)."""
    made_by = dataset.vae or {}
    made_by_spec = made_by.get("spec")
    same_folder = made_by_spec is not None and \
        Path(str(made_by_spec)).resolve() == Path(cfg.autoencoder.name).resolve()
    same_kind = made_by.get("class") == "IdentityVAE" and cfg.autoencoder.name == "identity"
    config_file = Path(cfg.autoencoder.name) / "config.json"
    same_config = "config" in made_by and config_file.is_file() and \
        json.loads(config_file.read_text()) == made_by["config"]
    unnamed = made_by_spec is None and all(  # made in Python without a spec: only the shape can be compared
        made_by.get(k, v) == v for k, v in (("channels", autoencoder.channels),
                                            ("spatial_factor", getattr(autoencoder, "spatial_factor", 1)),
                                            ("temporal_factor", getattr(autoencoder, "temporal_factor", 1))))
    if not (same_folder or same_kind or same_config or unnamed):
        raise ConfigError(f"data.root={cfg.data.root} holds latents of the VAE {made_by_spec!r}; set "
                          f"autoencoder.name={made_by_spec} (now {cfg.autoencoder.name!r})")
    d = cfg.data
    want = tuple(autoencoder.latent_shape(d.num_frames, d.size, d.size))
    stored = sorted(set(map(tuple, dataset.bucket_keys)))
    if want not in stored:
        raise ConfigError(f"data.root={cfg.data.root} holds latents of shape {stored[0]} (C, f, h, w), not {want} "
                          f"= data.num_frames={d.num_frames}, data.size={d.size}; set those to the clips it encoded")


def check_stored_text(cfg: TrainConfig, dataset, frozen_text) -> None:
    """Stored text embeddings must come from the text encoder the run samples with (same folder, same length)."""
    stored = dataset.text_encoder
    if stored is None or stored.get("type") == "small":  # no embeddings, or a small encoder's: captions are used
        return
    ours = frozen_text.describe() if frozen_text is not None else {}
    if not ours.get("path") or Path(str(stored.get("path"))).resolve() != Path(ours["path"]).resolve():
        raise ConfigError(f"data.root={cfg.data.root} stores embeddings of the text encoder {stored.get('path')!r}; "
                          f"set text.encoder to that folder (now {cfg.text.encoder!r})")


def vocabulary_captions(cfg: TrainConfig, dataset: Dataset) -> list[str]:
    """Captions that define the word vocabulary of the small text encoder."""
    if cfg.data.dataset == "digits":
        from dfm.data import DIRECTIONS, caption_for

        colors = [None] if not cfg.data.colors else list(cfg.data.colors)
        return [caption_for(digit, direction, color, bounce) for digit in range(10) for direction in DIRECTIONS
                for color in colors for bounce in (False, True)]
    if cfg.data.dataset == "latents":
        return list(dataset.captions)
    return [clip.caption for clip in dataset.clips]


def keep_captions(seed: int, samples, dropout: float) -> list[bool]:
    """Conditioning dropout: sample g keeps its caption unless a uniform draw seeded by (seed, g) is < dropout."""
    return [bool(np.random.default_rng([seed, int(g), 1]).random() >= dropout) for g in samples]


class GlobalOrder(Dataset):
    """Global sample index g -> {"video", "caption", "sample": g}.

    One shape (every item alike): item perm_e[g mod N], e = g div N, where perm_e is a permutation of the N items
    fixed by (seed, e) (the identity without shuffle).
    Buckets (a dataset whose `bucket_keys` hold several shapes, e.g. VideoFolder with aspect or length buckets):
    global batch k = g div B is batch k mod n_e of epoch e = k div n_e, the epoch's full single-shape batches in the
    order `BucketBatchSampler(seed, epoch e)` gives; so every global batch (and each rank's slice of it) shares one
    shape, and the order is still a function of (seed, g) alone."""

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True, batch_size: int = 1):
        self.dataset, self.seed, self.shuffle, self.B = dataset, seed, shuffle, batch_size
        self.n = len(dataset)
        keys = getattr(dataset, "bucket_keys", None)
        self.bucketed = keys is not None and len(set(keys)) > 1
        self._epoch, self._perm, self._batches = -1, None, None
        if self.bucketed:
            from dfm.data.buckets import BucketBatchSampler

            self._sampler = BucketBatchSampler(keys, batch_size, shuffle=shuffle, drop_last=True, seed=seed)
            if len(self._sampler) == 0:
                raise ConfigError(f"no shape bucket holds train.batch_size={batch_size} videos (bucket sizes: "
                                  f"{sorted(len(g) for g in self._sampler.groups.values())}); lower the batch size "
                                  f"or use fewer buckets")

    def _set_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        self._epoch = epoch
        if hasattr(self.dataset, "set_epoch"):  # new random temporal crops each epoch
            self.dataset.set_epoch(epoch)
        if self.bucketed:
            self._sampler.set_epoch(epoch)
            self._batches = self._sampler.batches()
        elif self.shuffle:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def index(self, g: int) -> int:
        if self.bucketed:
            k, j = divmod(int(g), self.B)
            epoch, b = divmod(k, len(self._sampler))
            self._set_epoch(epoch)
            return self._batches[b][j]
        epoch, i = divmod(int(g), self.n)
        self._set_epoch(epoch)
        return int(self._perm[i]) if self.shuffle else i

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, g: int) -> dict:
        item = self.dataset[self.index(g)]
        out = {k: item[k] for k in ("video", "latents", "context", "context_mask") if k in item}
        return {**out, "caption": item["caption"], "sample": int(g)}


class StepBatches(Sampler):
    """The global sample indices of each micro-batch of this rank, steps start_step .. max_steps - 1."""

    def __init__(self, start_step: int, max_steps: int, batch_size: int, grad_accum: int, rank: int, world: int):
        self.start, self.stop, self.B, self.A, self.rank, self.W = start_step, max_steps, batch_size, grad_accum, rank, world
        self.m = batch_size // (world * grad_accum)

    def __iter__(self):
        for step in range(self.start, self.stop):
            first = step * self.B + self.rank * (self.B // self.W)  # this rank's contiguous slice
            for a in range(self.A):
                yield list(range(first + a * self.m, first + (a + 1) * self.m))

    def __len__(self) -> int:
        return (self.stop - self.start) * self.A


def collate_batch(items: list[dict]) -> dict:
    """Stack the tensors (video or latents, and stored text embeddings if any); captions as a list."""
    batch = {k: torch.stack([it[k] for it in items]) for k in ("video", "latents", "context", "context_mask")
             if k in items[0]}
    return {**batch, "caption": [it["caption"] for it in items], "sample": torch.tensor([it["sample"] for it in items])}


# ------------------------------------------------------------------------------------------ optimisation


def lr_at(step: int, o: OptimConfig, max_steps: int) -> float:
    """The learning rate of update `step` (0-based): linear warm-up, then constant or cosine down to min_lr."""
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    span = max(1, max_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (ndim >= 2) only, not on biases, norms and 1-d tables."""
    decay, no_decay = [], []
    for _, p in D.unwrap(module).named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


class EMA:
    """Exponential moving average of the trainable parameters, laid out like them (sharded under FSDP2)."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        named = [(n, p) for n, p in D.unwrap(module).named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.warmup = decay, warmup

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, updates: int) -> None:
        w = 1 - self.decay_at(updates)
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), w)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: D.to_full(s) for n, s in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise CheckpointError(f"the checkpoint's EMA lacks {missing[:3]}; resume from a matching checkpoint")
        for n, s in zip(self.names, self.shadow):
            src = D._like(state[n], s)
            s.copy_(src)

    @contextlib.contextmanager
    def swapped(self):
        """The EMA weights in the live parameters for the duration (validation), then the trained ones back."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)


# ------------------------------------------------------------------------------------------------ logging


class Logger:
    """metrics.jsonl, TensorBoard and one-line notices, on rank 0 only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled, self.bar, self.tb = enabled, None, None
        self.path = out / "metrics.jsonl"
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():  # drop records past the checkpoint: they are redone
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and _record_step(ln) <= resume_step]
            write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(out / "tb"))
            except ImportError:
                self.notice("TensorBoard logging skipped: the tensorboard package is not installed "
                            "(pip install tensorboard); metrics.jsonl has the same numbers")

    def notice(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"dfm: {msg}", file=sys.stderr)
        else:
            print(f"dfm: {msg}", file=sys.stderr, flush=True)

    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # unreadable (e.g. cut by a kill): dropped


# ----------------------------------------------------------------------------------------------- training


@dataclass
class Resume:
    step: int
    path: Path
    ckpt: dict
    vocab: list[str]
    state: dict  # the trainer's state.json entries (data position, batch size, seed, ...)


def find_resume(cfg: TrainConfig, resume: str | None, log) -> Resume | None:
    """The checkpoint to continue from: None (fresh start), "latest" (under output_dir; none -> fresh), or a path."""
    if resume is None:
        return None
    if resume == "latest":
        path = latest_checkpoint(Path(cfg.train.output_dir) / "checkpoints")
        if path is None:
            log(f"--resume: no checkpoint under {cfg.train.output_dir}/checkpoints; starting from step 0")
            return None
    else:
        path = find_checkpoint(resume) or Path(resume)  # none there: load_checkpoint says what is missing
    ckpt = load_checkpoint(path)
    try:
        meta = json.loads((path / "text.json").read_text())
        vocab = meta["vocab"] if meta.get("type", "small") == "small" else []  # a frozen encoder has none to keep
    except (OSError, ValueError, KeyError):
        raise CheckpointError(f"checkpoint {path} has no readable text.json (the text vocabulary); resume from an "
                              f"earlier step_* folder or start afresh") from None
    changed = config_changes(path / "config.yaml", cfg)
    if changed:  # often meant (max_steps, lr), sometimes not (a recipe file passed with --config): say which
        log(f"resuming from {path} with settings that differ from its config.yaml: {', '.join(changed)} (the new "
            f"values are used; `dfm train --resume RUN` without --config keeps the run's)")
    return Resume(int(ckpt["step"]), path, ckpt, vocab, dict(ckpt.get("state") or {}))


def config_changes(saved: Path, cfg: TrainConfig) -> list[str]:
    """'key old -> new' for each setting of `cfg` that differs from the config.yaml a checkpoint was written with
    ([] if that file is missing, unreadable or not a mapping). A key on one side only shows as (absent)."""
    import yaml

    try:
        old = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(old, dict) or not old:
        return []

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
        return out

    # through YAML, so tuples and lists (and other spellings of one value) compare equal
    before, after = flat(old), flat(yaml.safe_load(config_yaml(cfg)))

    def show(d, k):
        return repr(d[k]) if k in d else "(absent)"

    return [f"{k} {show(before, k)} -> {show(after, k)}" for k in sorted(set(before) | set(after))
            if k not in before or k not in after or before[k] != after[k]]


def autocast(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


class Trainer:
    """State of one run; `train(config)` is `Trainer(config).run()`."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None, info: D.DistInfo | None = None):
        self.cfg = cfg
        self.info = info if info is not None else D.init_distributed(cfg.train.device)
        check_config(cfg, self.info.world_size)
        t = cfg.train
        self.out = Path(t.output_dir)
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        D.barrier()
        self.resume = find_resume(cfg, resume, self._notice_early)
        self.start_step = self.resume.step if self.resume else 0
        self.log = Logger(self.out, self.info.is_main, t.tensorboard, self.start_step if self.resume else None)
        if self.info.is_main:
            write_text_atomic(self.out / "config.yaml", config_yaml(cfg))

        self.dataset = build_dataset(cfg)
        self.latents = cfg.data.dataset == "latents"  # items hold VAE latents (and maybe text embeddings)
        self.autoencoder = build_autoencoder(cfg).to(self.info.device)
        if self.latents:
            check_latent_dataset(cfg, self.dataset, self.autoencoder)
        vocab = self.resume.vocab if self.resume else WordTokenizer.from_captions(
            vocabulary_captions(cfg, self.dataset)).vocab
        torch.manual_seed(D.derive_seed(t.seed, 0xC0DE))  # identical initial weights on every rank
        stored = self.dataset.text_encoder if self.latents else None  # embeddings of a given length on disk
        text = build_text_encoder(cfg, vocab, stored.get("max_length") if stored else None)
        # a frozen encoder (Hugging Face) runs outside the trained module: not in its weights, not under DDP/FSDP
        self.frozen_text = None if isinstance(text, SmallTextEncoder) else text.to(self.info.device)
        if self.latents:
            check_stored_text(cfg, self.dataset, self.frozen_text)
        if self.frozen_text is None:
            text.requires_grad_(cfg.text.trainable)
        net = _arch(cfg.model.arch)[0](backbone_config(cfg, self.autoencoder.channels, text.dim))
        module = DiffusionModule(net, text if self.frozen_text is None else None, cfg.diffusion, cfg.text.null)
        if self.resume:
            try:
                D.load_full_state_dict(module, self.resume.ckpt["model"])
            except ValueError as e:
                raise CheckpointError(f"{self.resume.path}: {e}; resume with the config it was trained with "
                                      f"({self.resume.path / 'config.yaml'})") from None
        if t.activation_checkpointing:
            set_activation_checkpointing(net)
        module.to(self.info.device)
        blocks = [*getattr(net, "blocks", []), *([text] if self.frozen_text is None else [])] \
            if t.parallel == "fsdp" else []
        self.model = D.wrap_model(module, self.info, t.parallel, blocks)
        self.module = module  # the unwrapped DiffusionModule (FSDP2 shards it in place)
        if t.compile:
            net.compile_blocks() if hasattr(net, "compile_blocks") else net.compile()
        self.optimizer = build_optimizer(module, cfg.optim)
        self.ema = EMA(module, cfg.optim.ema_decay, cfg.optim.ema_warmup)
        if self.resume:
            ck = self.resume.ckpt
            if ck["optimizer"] is None or ck["ema"] is None:
                raise CheckpointError(f"checkpoint {self.resume.path} lacks the optimizer or EMA state needed to "
                                      f"resume; start afresh from its weights instead")
            D.load_optimizer_state(self.optimizer, ck["optimizer"])
            self.ema.load(ck["ema"])
            self.resume.ckpt = None  # free the CPU copies
        # RNG: per rank, and a function of the step, so a resumed run draws what the uninterrupted one would
        D.seed_process(D.derive_seed(t.seed, self.start_step), self.info.rank)
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.last_checkpoint = self.resume.path if self.resume else None

    def _notice_early(self, msg):
        if self.info.is_main:
            print(f"dfm: {msg}", file=sys.stderr, flush=True)

    # -------------------------------------------------------------------------------------------- the loop

    def loader(self) -> DataLoader:
        t = self.cfg.train
        sampler = StepBatches(self.start_step, t.max_steps, t.batch_size, t.grad_accum, self.info.rank,
                              self.info.world_size)
        return DataLoader(GlobalOrder(self.dataset, t.seed, self.cfg.data.shuffle, t.batch_size), batch_sampler=sampler,
                          collate_fn=collate_batch, num_workers=self.cfg.data.num_workers,
                          pin_memory=self.info.device.type == "cuda")

    def conditioning(self, batch: dict):
        """(text [b, L] token ids or [b, L, D] embeddings, mask [b, L], keep [b]) of a micro-batch; keep = False
        where the caption is dropped for classifier-free guidance (replaced by the empty prompt or zeros)."""
        keep = keep_captions(self.cfg.train.seed, batch["sample"], self.cfg.text.dropout)
        captions, dev, empty = batch["caption"], self.info.device, self.cfg.text.null == "empty"
        if empty:
            captions = [c if k else "" for c, k in zip(captions, keep)]
        if self.frozen_text is None:  # the trained small encoder runs inside the module
            text = self.module.text
            ids, mask = text.tokenizer(captions, text.max_length)
            return ids.to(dev), mask.to(dev), torch.tensor(keep, device=dev)
        if "context" in batch:  # embeddings stored by `dfm preprocess`; dropped rows become the empty prompt's
            context, mask = batch["context"], batch["context_mask"]
            if empty and not all(keep):
                from dfm.diffusion.sampling import pad_context

                null, null_mask = pad_context(*self.frozen_text.encode([""]), context.shape[1])
                drop = ~torch.tensor(keep)
                context, mask = context.clone(), mask.clone()
                context[drop], mask[drop] = null[0].to(context.dtype), null_mask[0]
        else:
            context, mask = self.frozen_text.encode(captions)  # [b, L, D], [b, L] (cached per prompt)
        return context.to(dev), mask.to(dev), torch.tensor(keep, device=dev)

    def train_step(self, step: int, micro_batches: list[dict]) -> tuple[float, float, float]:
        """One optimizer update from this rank's micro-batches: (global mean loss, grad norm, lr)."""
        cfg, dev = self.cfg, self.info.device
        lr = lr_at(step, cfg.optim, cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.info.world_size / cfg.train.batch_size  # DDP / FSDP average over ranks: sum/B overall
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for a, batch in enumerate(micro_batches):
            if "latents" in batch:  # encoded once by `dfm preprocess`
                x0 = batch["latents"].to(dev, non_blocking=True)
            else:
                with torch.no_grad():
                    x0 = self.autoencoder.encode(batch["video"].to(dev, non_blocking=True))
            ids, mask, keep = self.conditioning(batch)
            gens = D.sample_generators(cfg.train.seed, batch["sample"].tolist(), 0)
            with D.gradient_sync(self.model, a == len(micro_batches) - 1):
                with autocast(dev, cfg.train.precision):
                    per_sample = self.model("loss", x0, ids, mask, keep, gens)  # [b]
                (per_sample.float().sum() * scale).backward()
            loss_sum += per_sample.detach().double().sum()
        loss = float(D.all_reduce_sum(loss_sum)) / cfg.train.batch_size
        if not math.isfinite(loss):
            self.stop(f"loss is {loss} at step {step + 1}")
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        grad_norm = float(grad_norm.full_tensor() if D._is_dtensor(grad_norm) else grad_norm)
        if not math.isfinite(grad_norm):
            self.stop(f"the gradient norm is {grad_norm} at step {step + 1} (loss {loss:.4g})")
        self.optimizer.step()
        self.ema.update(step)
        return loss, grad_norm, lr

    def stop(self, what: str) -> None:
        o = self.cfg.optim
        last = f"the last good checkpoint {self.last_checkpoint} is intact" if self.last_checkpoint else \
            "no checkpoint was written yet"
        raise TrainingError(f"{what}: training stopped; {last}. Try a lower optim.lr (now {o.lr:g}) or "
                            f"optim.grad_clip (now {o.grad_clip:g}), or check the data")

    def run(self) -> dict:
        t = self.cfg.train
        if self.start_step >= t.max_steps:
            self.log.notice(f"already at step {self.start_step} >= train.max_steps={t.max_steps}; nothing to do")
            return {"step": self.start_step}
        if self.resume:
            self.log.notice(f"resuming from {self.resume.path} (step {self.start_step})")
            saved = self.resume.state
            if saved.get("batch_size", t.batch_size) != t.batch_size or saved.get("seed", t.seed) != t.seed:
                self.log.notice(f"the checkpoint was trained with train.batch_size={saved.get('batch_size')} and "
                                f"train.seed={saved.get('seed')}; with other values the data order from here on "
                                f"differs from that run's")
        if self.info.is_main and t.progress:
            from tqdm import tqdm

            self.log.bar = tqdm(total=t.max_steps, initial=self.start_step, desc="train", dynamic_ncols=True,
                                file=sys.stderr)
        step, window, window_start = self.start_step, [], time.perf_counter()
        began = window_start
        micro: list[dict] = []
        last_loss = float("nan")
        for batch in self.loader():
            micro.append(batch)
            if len(micro) < t.grad_accum:
                continue
            loss, grad_norm, lr = self.train_step(step, micro)
            micro, step, last_loss = [], step + 1, loss
            window.append(loss)
            if self.log.bar is not None:
                self.log.bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                rate = len(window) / elapsed
                record = {"step": step, "loss": sum(window) / len(window), "lr": lr, "grad_norm": grad_norm,
                          "steps_per_s": rate, "samples_per_s": rate * t.batch_size,
                          "samples_seen": step * t.batch_size, "time": time.time()}
                self.log.metrics(record)
                if self.log.bar is not None:
                    self.log.bar.set_postfix(loss=f"{record['loss']:.4f}", steps_s=f"{rate:.2f}",
                                             samples_s=f"{rate * t.batch_size:.1f}")
                window, window_start = [], time.perf_counter()
            out_of_time = t.max_minutes > 0 and step % t.log_every == 0 and \
                bool(D.broadcast_object(time.perf_counter() - began > 60 * t.max_minutes))  # every rank stops alike
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.max_steps or out_of_time:
                self.checkpoint(step, lr)
            if t.validate_every and (step % t.validate_every == 0 or step == t.max_steps or out_of_time):
                self.validate(step)
            if out_of_time:
                self.log.notice(f"train.max_minutes={t.max_minutes:g} reached at step {step}; stopped with a "
                                f"checkpoint (--resume continues)")
                break
        self.log.close()
        return {"step": step, "loss": last_loss, "checkpoint": str(self.last_checkpoint)}

    # ------------------------------------------------------------------------------------ checkpoints

    def checkpoint(self, step: int, lr: float) -> None:
        """Gather the full state (collective), write it atomically on rank 0, wait for it on every rank."""
        t = self.cfg.train
        model_sd = D.full_state_dict(self.model)
        ema_sd = {**model_sd, **self.ema.full_state_dict()}  # a complete EMA model (frozen parts as they are)
        opt_sd = D.full_optimizer_state(self.optimizer)
        path = None
        if self.info.is_main:
            text = self.module.text
            text_meta = {"type": "frozen", "encoder": self.frozen_text.describe()} if self.frozen_text is not None else \
                {"type": "small", **dataclasses.asdict(text.config), "vocab": text.tokenizer.vocab}
            extra = {"config.yaml": config_yaml(self.cfg), "text.json": json.dumps(text_meta)}
            state = {"step": step, "data_position": step * t.batch_size, "batch_size": t.batch_size,
                     "world_size": self.info.world_size, "seed": t.seed, "lr": lr,
                     "lr_schedule": self.cfg.optim.schedule, "ema_updates": step}
            path = save_checkpoint(self.out / "checkpoints", step, model_sd, ema=ema_sd, optimizer=opt_sd,
                                   state=state, extra_files=extra, keep=t.keep_checkpoints)
        self.last_checkpoint = Path(D.broadcast_object(str(path) if path else None))
        D.barrier()

    # ------------------------------------------------------------------------------------- validation

    def val_prompts(self) -> list[str]:
        prompts = list(self.cfg.train.val_prompts)
        if prompts:
            return prompts
        if self.cfg.data.dataset == "folder":
            return [c.caption for c in self.dataset.clips[:4]]
        return [self.dataset[i]["caption"] for i in range(min(4, len(self.dataset)))]

    @torch.no_grad()
    def generate(self, prompts: list[str], steps: int, guidance: float, method: str = "auto") -> torch.Tensor:
        """Videos [P, 3, F, H, W] in [-1, 1] for `prompts`, with fixed noise per prompt index (collective under
        FSDP2: every rank runs it)."""
        from dfm.diffusion.sampling import guidance_branches, guided_sample, resolve_sampler, sampling_grid

        cfg, dev, d = self.cfg, self.info.device, self.cfg.diffusion
        model = self.model if self.cfg.train.parallel == "fsdp" else self.module  # FSDP2 hooks need the wrapper
        text = self.module.text

        def encode(texts: list[str]):
            if self.frozen_text is not None:
                context, mask = self.frozen_text.encode(texts)
                return context.to(dev), mask.to(dev)
            ids, mask = text.tokenizer(texts, text.max_length)
            ids, mask = ids.to(dev), mask.to(dev)
            with autocast(dev, cfg.train.precision):
                return model("encode", ids, mask).float(), mask  # [P, L, D], [P, L]

        def denoiser(x, sigma, **cond):
            with autocast(dev, cfg.train.precision):
                return model("denoise", x, sigma, **cond).float()

        # the pipeline's guided sampling (dfm.pipeline): the same CFG branches, grids and samplers as `dfm generate`
        cond, uncond = guidance_branches(encode, prompts, None, cfg.text.null, True, guidance)
        shape = self.sample_shape()
        gens = D.sample_generators(cfg.train.seed, range(len(prompts)), 2)
        noise = torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(dev)  # [P, C, F, H, W]
        if d.paradigm == "flow":
            grid = sampling_grid("flow_shifted", steps, shift=cfg.train.val_shift)
        else:
            grid = sampling_grid("karras", steps, sigma_min=d.sigma_min, sigma_max=d.sigma_max, rho=d.rho)
        x, _ = guided_sample(denoiser, noise, grid, resolve_sampler(method, d.paradigm), cond=cond, uncond=uncond,
                             guidance=guidance, generators=gens)
        return self.autoencoder.decode(x).clamp(-1, 1).cpu()

    def sample_shape(self) -> tuple[int, ...]:
        """The latent shape (C, f, h, w) of validation samples: the data's clip size (a latent dataset's first item)."""
        if self.latents:
            return tuple(self.dataset.bucket_keys[0])
        d = self.cfg.data
        return self.autoencoder.latent_shape(d.num_frames, d.size, d.size)

    def validate(self, step: int) -> None:
        from dfm.video import write_contact_sheet, write_video

        t = self.cfg.train
        prompts = self.val_prompts()
        # FSDP2 needs every rank in each forward; with replicated weights rank 0 samples alone
        if t.parallel == "fsdp" or self.info.is_main:
            self.model.eval()
            with self.ema.swapped():
                videos = self.generate(prompts, t.val_steps, t.val_guidance, t.val_sampler)
            self.model.train()
        if self.info.is_main:
            folder = self.out / "samples" / f"step_{step:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, v in enumerate(videos):
                write_video(folder / f"{i:02d}.mp4", v, fps=t.val_fps, pad_odd=True)
            write_contact_sheet(folder / "contact_sheet.png", videos, labels=prompts)
            (folder / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
            self.log.notice(f"step {step}: validation samples in {folder}")
        D.barrier()


def train(config: TrainConfig, resume: str | None = None) -> dict:
    """Train as configured; `resume` is None, "latest" or a checkpoint path. Returns {'step', 'loss', 'checkpoint'}.

    Under torchrun every process calls this. A process group that is not yet set up is created here and destroyed
    at the end; one the caller created is used and left alone."""
    info = D.init_distributed(config.train.device)
    if config.train.threads > 0:
        torch.set_num_threads(config.train.threads)
    try:
        return Trainer(config, resume, info).run()
    finally:
        D.teardown(info)
