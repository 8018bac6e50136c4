"""The training config: the model's sections (dfm.model) plus data, optimiser and run settings, and the checks
that the dataclass types cannot express."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import yaml

from dfm.config import ConfigError, config_yaml, from_dict, upgrade
from dfm.diffusion.samplers import SamplingError, resolve_sampler
from dfm.errors import UserError
from dfm.model import ModelRecipe, backbone_config
from dfm.pipeline.pipeline import GRID_NAMES
from dfm.training.init_from import resolve_init_from


@dataclass
class DataConfig:
    dataset: Literal["digits", "folder", "latents"] = "digits"  # latents: a folder written by `dfm preprocess` (root)
    num_frames: int = 8
    size: int = 32  # frames are size x size
    # digits (dfm.data.MovingDigits)
    num_digits: int = 1
    colors: Optional[list[str]] = None
    bounce: bool = False
    ink: float = 1.0  # the digits' brightness in (0, 1]; captions do not name it (a style for a LoRA to learn)
    speed: Optional[float] = None  # pixels per frame (None: MovingDigits' default); captions do not name it either
    length: int = 10_000  # items per epoch
    captions: Literal["template", "paraphrase"] = "template"  # paraphrase: dfm.data.captions' training templates
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
    output_dir: str = "runs/default"  # a folder that already holds a run is refused (dfm/training/runs.py)
    overwrite: bool = False  # a fresh run into output_dir moves the run there aside to <output_dir>.old-<time>
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500  # 0: only at the end (every run ends with a checkpoint)
    keep_checkpoints: int = 3  # 0 keeps all
    validate_every: int = 0  # 0 = never; the videos are sampled as the `sampling` section says
    val_prompts: list[str] = field(default_factory=list)  # empty: the captions of the first 4 training items
    # conditioned runs also validate image-to-video; the given first frames: image paths (one per prompt or one for
    # all), empty: the first frames of the training items the default prompts come from
    val_images: list[str] = field(default_factory=list)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with several processes
    context_parallel: int = 1  # ranks that share each sample's tokens (data parallel over world / this many)
    context_parallel_mode: Literal["auto", "ulysses", "ring"] = "auto"  # auto: Ulysses when it divides the heads
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # CPU threads per process; 0: torch's default (on a busy machine 1 is often fastest)
    progress: bool = True  # the progress bar (rank 0)
    tensorboard: bool = True


@dataclass
class TrainConfig(ModelRecipe):
    """The model's sections (dfm.model.ModelRecipe: model, diffusion, sampling, text, autoencoder), then the data,
    the optimiser and the run."""

    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (a non-finite loss, ...); the message is one line that names the fix."""


def check_config(cfg: TrainConfig, world_size: int = 1) -> None:
    """Cross-field checks that the dataclass types cannot express; raises ConfigError."""
    t, o = cfg.train, cfg.optim
    for key, value in [("train.max_steps", t.max_steps), ("train.batch_size", t.batch_size),
                       ("train.grad_accum", t.grad_accum), ("train.log_every", t.log_every),
                       ("data.num_frames", cfg.data.num_frames), ("data.size", cfg.data.size),
                       ("sampling.steps", cfg.sampling.steps)]:
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in [("train.checkpoint_every", t.checkpoint_every), ("train.validate_every", t.validate_every),
                       ("train.keep_checkpoints", t.keep_checkpoints), ("train.seed", t.seed),
                       ("optim.warmup_steps", o.warmup_steps), ("optim.grad_clip", o.grad_clip),
                       ("data.num_workers", cfg.data.num_workers), ("train.threads", t.threads),
                       ("train.max_minutes", t.max_minutes)]:
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    cp = t.context_parallel
    if cp < 1 or world_size % cp:
        raise ConfigError(f"train.context_parallel={cp} does not divide the world size {world_size}: launch a "
                          f"multiple of {max(cp, 1)} processes (torchrun --nproc_per_node {max(cp, 1)}) or change it")
    if t.batch_size % (world_size // cp * t.grad_accum):
        size = "world size" if cp == 1 else "data-parallel size (world / train.context_parallel)"
        raise ConfigError(f"train.batch_size={t.batch_size} (global) must be divisible by {size} x grad_accum = "
                          f"{world_size // cp} x {t.grad_accum}; change train.batch_size or train.grad_accum")
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
    s = cfg.sampling
    if s.grid is not None and s.grid not in GRID_NAMES:
        raise ConfigError(f"unknown sampling.grid {s.grid!r}; use one of {', '.join(GRID_NAMES)} (or null: the "
                          f"paradigm's)")
    try:
        resolve_sampler(s.sampler, cfg.diffusion.paradigm)
    except SamplingError as e:
        raise ConfigError(f"sampling.sampler: {e}") from None
    interval, flow = cfg.sampling.guidance_interval, cfg.diffusion.paradigm == "flow"
    if interval is not None and (len(interval) != 2 or not 0 <= interval[0] < interval[1] <= (1 if flow else 1e30)):
        unit = "flow times s: 0 <= lo < hi <= 1" if flow else "sigmas: 0 <= lo < hi"
        raise ConfigError(f"sampling.guidance_interval must be [lo, hi] in the model's noise levels ({unit}), got "
                          f"{interval}")
    backbone_config(cfg.model, 3, cfg.text.dim)  # the size name and overrides
    lo = cfg.lora
    if lo.rank < 0 or lo.alpha < 0 or not 0 <= lo.dropout < 1:
        raise ConfigError(f"lora: rank >= 0 (0: off), alpha >= 0 (0: = rank), dropout in [0, 1); got rank {lo.rank}, "
                          f"alpha {lo.alpha}, dropout {lo.dropout}")
    if lo.rank and not cfg.model.init_from:
        raise ConfigError("lora.rank is set but model.init_from is not: a LoRA adapts a trained model; pass "
                          "model.init_from=FOLDER (a dfm model folder, a trainer run or a diffusers Wan folder)")
    if cfg.model.init_from:
        if not Path(cfg.model.init_from).exists():
            raise ConfigError(f"model.init_from={cfg.model.init_from} does not exist; pass a dfm model folder, a "
                              f"trainer run or a diffusers Wan folder")
        cfg.model.init_from = str(Path(cfg.model.init_from).resolve())  # the run's config.yaml works from anywhere
        resolve_init_from(cfg)  # a diffusers Wan folder: its transformer config, VAE, UMT5 and flow settings
    if not cfg.text.mask and cfg.text.encoder == "small":
        raise ConfigError("text.mask=false (attend to the zero padding, as Wan folders) needs a frozen Hugging Face "
                          "text encoder (text.encoder=FOLDER); the small encoder trains with its mask")


def config_changes(saved: Path, cfg: TrainConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """'key old -> new' for each setting of `cfg` that differs from the config.yaml a checkpoint was written with
    ([] if that file is missing, unreadable or not a mapping), except the keys in `ignore`. A key on one side only
    shows as (absent)."""
    try:
        old = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: not UTF-8
        return []
    if not isinstance(old, dict) or not old:
        return []

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
        return out

    # through YAML, so tuples and lists (and other spellings of one value) compare equal; the saved one resolved
    # as this version reads it (old keys moved, new keys at their defaults), raw if it no longer resolves
    before = upgrade(TrainConfig, old)
    try:
        before = yaml.safe_load(config_yaml(from_dict(TrainConfig, before)))
    except ConfigError:
        pass
    before, after = flat(before), flat(yaml.safe_load(config_yaml(cfg)))

    def show(d, k):
        return repr(d[k]) if k in d else "(absent)"

    return [f"{k} {show(before, k)} -> {show(after, k)}" for k in sorted(set(before) | set(after))
            if k not in ignore and (k not in before or k not in after or before[k] != after[k])]
