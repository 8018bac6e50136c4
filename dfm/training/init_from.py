"""`model.init_from=FOLDER` of a diffusers Wan 2.1 text-to-video folder: the recipe takes the folder's model.

    dfm train --config RECIPE model.init_from=Wan2.1-T2V-1.3B-Diffusers lora.rank=16

Its transformer config (model.arch wan, the WanConfig fields as model.overrides over model.size), its VAE
(autoencoder.name = FOLDER/vae), its UMT5 encoder and tokenizer (text.encoder = FOLDER/text_encoder, frozen) and the
flow settings its scheduler samples with (sampling.shift, sampler and grid; guidance 5) fill the config — each only
where the recipe leaves the field at its default, so a recipe can still set any of them. `--dry-run` prints the
result. A Wan 2.2 TI2V folder also sets its conditioning layout (conditioning.mode=frame). A two-expert Wan 2.2
A14B text-to-video folder needs `model.expert=high|low` (with lora.rank): a LoRA trains one expert (Wan 2.2
LoRAs come as one file per expert): `transformer` (high noise, model time t >= boundary_ratio * 1000) or
`transformer_2` (below), and the flow times it trains on are moved into that expert's range (`ExpertTimesteps`).
Other folders (A14B image-to-video) and folders that are neither dfm's nor Wan's get one line before any work
(ConfigError, exit 2)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from dfm.checkpoint import find_checkpoint
from dfm.config import ConfigError
from dfm.models import WAN_CONFIGS
from dfm.models.wan import WanConfig
from dfm.pipeline.folders import wan_scheduler_settings
from dfm.pipeline.pipeline import PipelineError
from dfm.text import WordTokenizer

SUPPORTED = ("model.init_from takes a dfm model folder, a trainer run, or a diffusers Wan 2.1 text-to-video, Wan 2.1 "
             "I2V, Wan 2.1 FLF2V, Wan 2.2 TI2V or Wan 2.2 A14B text- or image-to-video folder (with "
             "model.expert=high|low)")
# the concat layouts: (name, the frames every sample is given, CLIP image context)
CONCAT_LAYOUTS = {"I2V": ("Wan 2.1 I2V", "first frame", True),
                  "FLF2V": ("Wan 2.1 FLF2V", "first and last frames (conditioning.last=true)", True),
                  "A14B-I2V": ("Wan 2.2 A14B image-to-video", "first frame", False)}
DERIVED = ("in_channels", "out_channels", "text_dim")  # from the VAE and the text encoder (dfm.model)


def wan_index(folder: Path) -> dict | None:
    """The model_index.json of a diffusers Wan folder (any Wan pipeline class), else None."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and str(index.get("_class_name", "")).startswith("Wan") else None


def _is_dfm(folder: Path) -> bool:
    """A dfm model folder (model_index.json with "format": "dfm") or a trainer run / checkpoint."""
    try:
        return json.loads((folder / "model_index.json").read_text()).get("format") == "dfm"
    except (OSError, ValueError, AttributeError):
        return find_checkpoint(folder) is not None


def two_experts(index: dict) -> bool:
    return index.get("transformer_2") not in (None, [None, None]) or index.get("boundary_ratio") is not None


def check_wan_folder(folder: Path, index: dict, expert: str = "", lora: bool = True) -> tuple[WanConfig, str]:
    """(the config of the folder's transformer (of `expert` for two experts), its layout: "T2V", "I2V" or
    "TI2V"), or one line saying which Wan folders model.init_from supports."""
    name = index.get("_class_name")
    if two_experts(index):
        if name not in ("WanPipeline", "WanImageToVideoPipeline") or index.get("expand_timesteps"):
            raise ConfigError(f"model.init_from={folder} is a two-expert {name} folder; not supported: {SUPPORTED}")
        if expert not in ("high", "low") or not lora:
            ratio = index.get("boundary_ratio")
            raise ConfigError(f"model.init_from={folder} is a two-expert Wan 2.2 folder: a LoRA trains one expert; "
                              f"set lora.rank and model.expert=high (transformer, t >= {ratio} * 1000) or "
                              f"model.expert=low (transformer_2, below)")
        if not isinstance(index.get("boundary_ratio"), (int, float)):
            raise ConfigError(f"model.init_from={folder}: its model_index.json has two transformers but no "
                              f"boundary_ratio; download the Wan 2.2 folder again")
    elif expert:
        raise ConfigError(f"model.expert={expert}: model.init_from={folder} has one transformer; model.expert "
                          f"picks one of a two-expert Wan 2.2 folder's; leave it unset")
    sub = "transformer_2" if expert == "low" else "transformer"
    if name not in ("WanPipeline", "WanImageToVideoPipeline"):
        raise ConfigError(f"model.init_from={folder} is a {name} folder; not supported: {SUPPORTED}")
    try:
        config = WanConfig.from_dict(json.loads((folder / sub / "config.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"model.init_from={folder}: no readable {sub}/config.json ({e}); download the Wan "
                          f"folder again") from None
    kind = "TI2V" if index.get("expand_timesteps") else "T2V" if name == "WanPipeline" else "I2V"
    if kind == "I2V" and two_experts(index):
        kind = "A14B-I2V"  # Wan 2.2 A14B image-to-video: the 36-channel I2V layout without CLIP, per expert
        if config.image_dim is not None:
            raise ConfigError(f"model.init_from={folder}: a two-expert image-to-video transformer with CLIP image "
                              f"cross-attention is no released layout; not supported: {SUPPORTED}")
    if kind == "I2V" and config.image_dim is None:
        raise ConfigError(f"model.init_from={folder} holds an image-to-video transformer without CLIP; not "
                          f"supported: {SUPPORTED}")
    if kind == "I2V" and config.pos_embed_seq_len:
        kind = "FLF2V"  # Wan 2.1 FLF2V: the I2V layout with the first and last frames (and both CLIP features)
    if kind not in CONCAT_LAYOUTS and config.image_dim is not None:
        raise ConfigError(f"model.init_from={folder} holds an image-to-video transformer; not supported: {SUPPORTED}")
    return config, kind


def layout_conditioning(cfg, folder: Path, kind: str) -> None:
    """The folder's own image conditioning. TI2V (Wan 2.2 5B) gives the first latent frame clean at t = 0:
    conditioning.mode=frame (first frame only, as the folder's pipeline does). I2V (Wan 2.1) concatenates
    [mask, E(frame, zeros...)] to the 16 noisy channels and reads the frame's CLIP features: conditioning.mode=concat,
    image_encoder=FOLDER, probability 1 (its transformer always gets an image). FLF2V (Wan 2.1) is I2V with the last
    frame given too: [mask, E(first, zeros..., last)] and both frames' CLIP features (conditioning.last=true).
    A14B-I2V (Wan 2.2, two experts, one trained per LoRA): the I2V concatenation without CLIP."""
    c, default = cfg.conditioning, type(cfg.conditioning)()
    if kind == "TI2V":
        if c.mode == "none":
            c.mode = "frame"
        if c.mode != "frame" or c.last:
            raise ConfigError(f"model.init_from={folder} is a Wan 2.2 TI2V folder: it is conditioned by its first "
                              f"latent frame (conditioning.mode=frame, conditioning.last=false); leave "
                              f"conditioning.mode unset")
    if kind in CONCAT_LAYOUTS:
        what, frames, clip = CONCAT_LAYOUTS[kind]
        last = kind == "FLF2V"
        if c.mode not in ("none", "concat") or c.probability not in (default.probability, 1) or \
                (c.last and not last) or (c.image_encoder and not clip):
            raise ConfigError(f"model.init_from={folder} is a {what} folder: every sample is conditioned by its "
                              f"{frames} (conditioning.mode=concat, probability 1{'' if clip else ', no CLIP'}); "
                              f"leave conditioning unset")
        c.mode, c.probability, c.last = "concat", 1.0, last
        c.image_encoder = (c.image_encoder or str(folder)) if clip else ""


def resolve_init_from(cfg) -> None:
    """Fill `cfg` (a TrainConfig) from model.init_from when it is a diffusers Wan folder (see the module doc)."""
    folder = Path(cfg.model.init_from)
    index = wan_index(folder)
    if index is None:
        if cfg.model.expert:
            raise ConfigError(f"model.expert={cfg.model.expert}: model.init_from={folder} is not a diffusers Wan "
                              f"folder; model.expert picks one of a two-expert Wan 2.2 folder's; leave it unset")
        if _is_dfm(folder):
            return
        raise ConfigError(f"model.init_from={folder} is neither a dfm model folder or run nor a diffusers Wan "
                          f"folder; {SUPPORTED}")
    wan, kind = check_wan_folder(folder, index, cfg.model.expert, bool(cfg.lora.rank))
    layout_conditioning(cfg, folder, kind)
    m = cfg.model
    if m.arch != "wan" or cfg.diffusion.paradigm != "flow":
        raise ConfigError(f"model.init_from={folder} is a Wan (flow-matching) model; set model.arch=wan and "
                          f"diffusion.paradigm=flow (or leave them at their defaults)")
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(wan).items()}
    if m.size == "tiny" and not m.overrides:  # a registry size that is exactly this transformer
        m.size = next((n for n, c in WAN_CONFIGS.items()
                       if all(getattr(c, k) == getattr(wan, k) for k in fields if k not in DERIVED)), m.size)
    size = dataclasses.asdict(WAN_CONFIGS.get(m.size, WAN_CONFIGS["tiny"]))
    diff = {k: v for k, v in fields.items()
            if k not in DERIVED and (list(size[k]) if isinstance(size[k], tuple) else size[k]) != v}
    m.overrides = {**diff, **m.overrides}  # the recipe's own overrides win
    if cfg.autoencoder.name == "identity":
        cfg.autoencoder.name = str(folder / "vae")
    if cfg.text.encoder == "small":
        cfg.text.encoder = str(folder / "text_encoder")  # UMT5, frozen; its tokenizer is ../tokenizer
        cfg.text.trainable = False
        cfg.text.mask = False  # as diffusers' Wan pipelines: no mask, the transformer attends to the zero padding
    try:
        diffusion, defaults, _ = wan_scheduler_settings(folder)
    except PipelineError as e:
        raise ConfigError(f"model.init_from={folder}: {e}") from None
    s, default = cfg.sampling, type(cfg.sampling)()
    for key, value in (("shift", defaults["shift"]), ("sampler", defaults["sampler"]), ("grid", diffusion["grid"]),
                       ("guidance_scale", defaults["guidance_scale"])):
        if getattr(s, key) == getattr(default, key):
            setattr(s, key, value)
    if cfg.diffusion.flow.timestep_scale == type(cfg.diffusion.flow)().timestep_scale:
        cfg.diffusion.flow.timestep_scale = diffusion["timestep_scale"]


# ============================================================================ one expert of a two-expert folder


class ExpertTimesteps:
    """A TimestepSampler whose flow times s (after its shift) are rescaled into one expert's range: the model sees
    t = s * timestep_scale and runs the high-noise expert where t >= boundary_ratio * num_train_timesteps, so with
    b = boundary_ratio * num_train_timesteps / timestep_scale (0.875 for A14B T2V):
        high:  s' = b + (1 - b) s    in [b, 1]        low:  s' = b s    in [0, b)
    (a rescaling, not a rejection: no draw is wasted, the sampler's shape, e.g. logit-normal, is kept inside)."""

    def __init__(self, sampler, expert: str, b: float):
        self.sampler, self.expert, self.b = sampler, expert, float(b)

    def sample(self, batch: int, generator=None, device=None) -> torch.Tensor:
        s = self.sampler.sample(batch, generator, device)  # [B] in [0, 1]
        if self.expert == "high":
            return self.b + (1 - self.b) * s
        below = torch.nextafter(torch.tensor(self.b, dtype=s.dtype), torch.tensor(0.0, dtype=s.dtype))
        return torch.minimum(self.b * s, below.to(s.device))  # s = 1 (fp32 sigmoid) stays below b


def restrict_to_expert(module, cfg) -> None:
    """model.expert set (a two-expert Wan folder): the DiffusionModule trains on that expert's flow times only."""
    if not cfg.model.expert:
        return
    folder = Path(cfg.model.init_from)
    ratio = float(wan_index(folder)["boundary_ratio"])
    steps = wan_scheduler_settings(folder)[0]["num_train_timesteps"]
    module.timesteps = ExpertTimesteps(module.timesteps, cfg.model.expert,
                                       ratio * steps / cfg.diffusion.flow.timestep_scale)


# ======================================================================= a full fine-tune's start (the trainer)


def run_vocab(cfg, base, captions) -> list:
    """The small text encoder's vocabulary of a run starting from `base` (lora.Base or None): a fresh run's words
    (`captions()`), a LoRA's base vocabulary (its frozen encoder), or for a full fine-tune the base's words in their
    order followed by the run's new ones (a paraphrase's "seven", "upward"), so the vocabulary grows by word."""
    if base is None or base.vocab is None:
        return WordTokenizer.from_captions(captions()).vocab
    if cfg.lora.rank:
        return list(base.vocab)
    known = set(base.vocab)
    return [*base.vocab, *(w for w in WordTokenizer.from_captions(captions()).vocab if w not in known)]


@torch.no_grad()
def init_weights(module, base, init_module) -> list[str]:
    """`init_module(module, base)` (dfm.pipeline.lora.init_module: strict copies of the transformer and the text
    encoder) with the text encoder's word table copied by word: a word the base knows takes the base's row, a new
    word keeps the row it was initialised with. Returns the new words."""
    text = getattr(module, "text", None)
    if base.text is None or base.vocab is None or text is None or list(text.tokenizer.vocab) == list(base.vocab):
        init_module(module, base)
        return []
    old_rows, old = base.text["embed.weight"], {w: j for j, w in enumerate(base.vocab)}
    rows = text.embed.weight.detach().clone()  # [V_new, D], fresh rows
    if rows.shape[1:] != old_rows.shape[1:]:
        init_module(module, base)  # the widths differ: init_module names the misfit in one line
    new = []
    for word, i in text.tokenizer.index.items():
        if word in old:
            rows[i] = old_rows[old[word]]
        else:
            new.append(word)
    init_module(module, dataclasses.replace(base, text={**base.text, "embed.weight": rows}))
    return new
