"""The model folder format, in and out: dfm model folders, diffusers Wan 2.1 folders and trainer checkpoints ->
`Pipeline` (`load_pipeline`), a Pipeline -> a dfm model folder (`save_pipeline`), checkpoint -> folder
(`export_checkpoint`); what a folder holds is dfm/pipeline/info.py (`describe`). The layouts are described in dfm/pipeline/__init__.py."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from dfm import distributed as D
from dfm.checkpoint import CheckpointError, find_checkpoint, load_checkpoint
from dfm.diffusion.samplers import SPACES, resolve_sampler
from dfm.conditioning import ConditioningConfig, in_channels
from dfm.errors import UserError, first_line
from dfm.io import save_safetensors
from dfm.model import (DiffusionModule, ModelRecipe, backbone_config, build_autoencoder, build_backbone,
                       diffusion_from_recipe, read_recipe, sampling_defaults, sampling_recipe)
from dfm.models import DiT, DiTConfig, WanModel
from dfm.pipeline import lora
from dfm.pipeline.pipeline import DEFAULT_KEYS, Pipeline, PipelineError
from dfm.text import FrozenSmallTextEncoder, SmallTextConfig, SmallTextEncoder, WordTokenizer, load_text_encoder
from dfm.vae import load_vae

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
CONDITIONERS: list = []  # (attach(pipe, conditioning), model_index entry(pipe)): pipeline/conditioned.py
FAMILY_LOADERS: list = []  # (claims(path, index), load(path, index, device, dtype), info lines): pipeline/wan_family.py


# ======================================================================================== transformer I/O


def _text_module(text):
    """The savable encoder inside a frozen wrapper (dfm.text.FrozenSmallTextEncoder keeps it as .encoder)."""
    return text if hasattr(text, "save_pretrained") else getattr(text, "encoder", text)


def _save_transformer(net: nn.Module, arch: str, folder: Path) -> None:
    net = net.net if isinstance(net, IntegerTimesteps) else net  # (sample_as_wan_folder's wrapper)
    if arch == "wan":
        net.save_pretrained(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.asdict(net.config)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    (folder / "config.json").write_text(json.dumps({"_class_name": "DiT", **cfg}, indent=2) + "\n")
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, folder / "model.safetensors")


def _load_transformer(arch: str, folder: Path, device, dtype) -> nn.Module:
    if not (folder / "config.json").is_file():
        raise PipelineError(f"{folder} has no config.json; the model folder is incomplete, export it again")
    if arch == "wan":
        try:
            return WanModel.from_pretrained(folder, dtype=dtype, device=device).eval()
        except (OSError, ValueError, SafetensorError) as e:
            raise PipelineError(f"{folder}: {first_line(e)}") from None
    if arch == "dit":
        try:
            raw = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
            raw["patch_size"] = tuple(raw.get("patch_size", (1, 2, 2)))
            net = DiT(DiTConfig(**raw))
            net.load_state_dict(load_file(folder / "model.safetensors"))
        except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as e:
            raise PipelineError(f"{folder} holds no readable DiT ({type(e).__name__}: "
                                f"{first_line(e, '')}); export the model again") from None
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


def _diffusion_module(net, text, paradigm: str, diffusion: dict, null: str) -> DiffusionModule:
    return DiffusionModule(net, text, diffusion_from_recipe(paradigm, diffusion), null).eval()


# ================================================================================================ loading


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing; {what}") from None
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path} is not valid JSON ({first_line(e)}); {what}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path} must hold a JSON object; {what}")
    return data


def _need_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise PipelineError(f"{path} is missing; {what}")


def load_pipeline(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32, context_parallel: int = 1,
                  context_parallel_mode: str = "auto") -> Pipeline:
    """A dfm model folder, a diffusers Wan 2.1 text-to-video folder, or a trainer checkpoint (step_* folder, its
    checkpoints/ folder or the run directory: EMA weights, defaults from the training config). context_parallel=N
    (under torchrun): the transformer's tokens split over N ranks (dfm.pipeline.context_parallel)."""
    if context_parallel != 1:
        from dfm.pipeline.context_parallel import join_launch, shard_pipeline

        device, group = join_launch(context_parallel, device)
        return shard_pipeline(load_pipeline(path, device, dtype), group, context_parallel_mode)
    path = Path(path)
    if not path.exists():
        hint = (" (the shipped model: train configs/wan_flow_digits.yaml, then `dfm export`)"
                if path.as_posix().rstrip("/").endswith(DEFAULT_MODEL) else "")
        raise PipelineError(f"model folder {path} not found{hint}; pass --model PATH to a dfm model folder, a "
                            f"diffusers Wan 2.1 folder or a trainer checkpoint")
    if not (path / "model_index.json").is_file():
        ckpt = find_checkpoint(path)
        if ckpt is not None:
            return pipeline_from_checkpoint(ckpt, device=device, dtype=dtype)
        raise PipelineError(f"{path} has no model_index.json; pass a dfm model folder (dfm export), a diffusers Wan "
                            f"2.1 folder or a trainer checkpoint")
    index = _read_json(path / "model_index.json", "export the model again or download the folder again")
    if index.get("format") == "dfm":
        return _load_dfm_folder(path, index, device, dtype)
    for claims, load, _ in FAMILY_LOADERS:  # Wan I2V / FLF2V / 2.2 layouts
        if claims(path, index):
            return load(path, index, device, dtype)
    if index.get("_class_name") == "WanPipeline":
        return _load_wan_folder(path, index, device, dtype)
    name = index.get("_class_name", index.get("format"))
    raise PipelineError(f"{path}/model_index.json describes {name!r}; dfm loads dfm model folders and diffusers "
                        f"Wan folders (WanPipeline, WanImageToVideoPipeline)")


def _load_vae(folder: Path, what: str):
    _need_dir(folder, what)
    try:
        return load_vae(folder).eval()
    except UserError as e:
        raise PipelineError(f"{folder}: {first_line(e)}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise PipelineError(f"{folder} holds no readable VAE ({first_line(e)}); {what}") from None


def _load_text(folder: Path, what: str, tokenizer: Path | None = None, max_length: int | None = None,
               device="cpu", dtype: torch.dtype = torch.float32):
    _need_dir(folder, what)
    if tokenizer is not None:
        _need_dir(tokenizer, what)
    try:
        return load_text_encoder(folder, tokenizer=tokenizer, max_length=max_length, device=device, dtype=dtype)
    except UserError as e:
        raise PipelineError(f"{folder}: {first_line(e)}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise PipelineError(f"{folder} holds no readable text encoder ({first_line(e)}); {what}") from None


def _check_fit(path: Path, net: nn.Module, text, vae, channels: int | None = None) -> None:
    cfg = net.config
    width = getattr(cfg, "text_dim", None) or getattr(cfg, "context_dim", None)
    if width is not None and width != text.dim:
        raise PipelineError(f"{path}: the transformer reads text of width {width} but the text encoder gives "
                            f"{text.dim}; the folder mixes models")
    if cfg.in_channels != (channels or vae.channels):
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
    cond = index.get("conditioning") or {}
    _check_fit(path, net, text, vae, in_channels(ConditioningConfig(cond.get("mode", "none")), vae.channels,
                                                 getattr(vae, "temporal_factor", 1)))
    backbone = IntegerTimesteps(net) if diffusion.get("integer_timesteps") else net  # a Wan folder's fine-tune
    module = _diffusion_module(backbone, text, paradigm, diffusion, t.get("null", "empty"))
    config_yaml = (path / "config.yaml").read_text() if (path / "config.yaml").is_file() else None
    return _conditioned(cond or None, Pipeline(module.to(device), text, vae.to(device), arch=arch, paradigm=paradigm, diffusion=diffusion,
                    defaults=defaults, null=t.get("null", "empty"), use_mask=bool(t.get("mask", True)), kind="dfm",
                    device=device, dtype=dtype, source={**index.get("source", {}), "folder": str(path)},
                    config_yaml=config_yaml))


def _conditioned(conditioning, pipe: Pipeline) -> Pipeline:
    for attach, _ in CONDITIONERS:  # an image-conditioned model (dfm.conditioning): pipe.conditioner
        attach(pipe, conditioning)
    return pipe


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


@dataclasses.dataclass
class _Trained:
    """What a trainer checkpoint's config.yaml and text.json say of its model."""

    recipe: ModelRecipe  # the model sections of the training config
    clip: tuple[int, int, float | None]  # data.num_frames, data.size, data.fps
    config_yaml: str  # the training config, for the record (keys of older dfm versions moved)
    text: nn.Module  # a small encoder with untrained weights, or the frozen encoder text.json names
    vae: nn.Module


def _checkpoint_config(path: Path) -> _Trained:
    for name in ("config.yaml", "text.json"):
        if not (path / name).is_file():
            raise PipelineError(f"checkpoint {path} has no {name}; use a checkpoint written by `dfm train`")
    recipe, raw = read_recipe(path / "config.yaml")
    data = raw.get("data") or {}
    try:
        clip = (int(data["num_frames"]), int(data["size"]), data.get("fps"))
    except (KeyError, TypeError, ValueError):
        raise PipelineError(f"{path}/config.yaml lacks data.num_frames / data.size; use a checkpoint written by "
                            f"`dfm train`") from None
    meta = _read_json(path / "text.json", "use another checkpoint")
    vae = build_autoencoder(recipe.autoencoder, (clip[0], clip[1], clip[1]))  # "identity" or the config's folder
    record = yaml.safe_dump(raw, sort_keys=False)
    if meta.get("type") == "frozen":  # a Hugging Face encoder trained against, not with, the model
        enc = meta.get("encoder") or {}
        if not enc.get("path"):
            raise PipelineError(f"{path}/text.json names no text encoder folder; use another checkpoint")
        tokenizer = Path(enc["tokenizer"]) if enc.get("tokenizer") else None
        text = _load_text(Path(enc["path"]), "restore the folder text.json names", tokenizer,
                          max_length=enc.get("max_length"))
        return _Trained(recipe, clip, record, text, vae)
    try:
        meta.pop("type", None)
        text = SmallTextEncoder(WordTokenizer(meta.pop("vocab")), SmallTextConfig(**meta))
    except (KeyError, TypeError, ValueError) as e:
        raise PipelineError(f"{path}/text.json is not a small text encoder ({first_line(e)}); use another "
                            f"checkpoint") from None
    return _Trained(recipe, clip, record, text, vae)


def _checkpoint_recipe(trained: _Trained, **overrides) -> tuple[dict, dict]:
    """(sampling settings, defaults) of a trained model: dfm.model's sampling_recipe and sampling_defaults (the
    `sampling` section and the data's clip size: what its validation videos used), then `overrides`."""
    r = trained.recipe
    diffusion, defaults = sampling_recipe(r), sampling_defaults(r, *trained.clip)
    for k, v in overrides.items():
        if k not in DEFAULT_KEYS:
            raise PipelineError(f"unknown default {k!r}; valid: {', '.join(DEFAULT_KEYS)}")
        if v is not None:
            defaults[k] = v
    if defaults["shift"] is not None and r.diffusion.paradigm == "edm":
        raise PipelineError("shift applies to flow-matching models; this checkpoint is EDM")
    defaults["sampler"] = resolve_sampler(defaults["sampler"], r.diffusion.paradigm).name
    return diffusion, defaults


def pipeline_from_checkpoint(path: str | Path, ema: bool = True, device="cpu", dtype=torch.float32,
                             **overrides) -> Pipeline:
    """A Pipeline from a trainer checkpoint: EMA weights (or the trained ones with ema=False), the small text
    encoder of text.json, the autoencoder of the config; defaults from the training config (`_checkpoint_recipe`)
    unless overridden (keys of DEFAULT_KEYS)."""
    given = Path(path)
    path = find_checkpoint(given) if given.exists() else None
    if path is None:
        raise PipelineError(f"{given} is not a trainer checkpoint (a step_* folder with state.json, its "
                            f"checkpoints/ folder or a run directory); check the path")
    r = lora.wan_lora_recipe(path)
    if r is not None:  # a LoRA run on a diffusers Wan folder: that folder + the adapters
        pipe = lora.wan_run(load_pipeline(r.model.init_from, device, dtype), r.lora, load_checkpoint(path), ema, path,
                            r.model.expert)
        bad = [k for k in overrides if k not in DEFAULT_KEYS]
        if bad:
            raise PipelineError(f"unknown default {bad[0]!r}; valid: {', '.join(DEFAULT_KEYS)}")
        pipe.defaults.update({k: v for k, v in overrides.items() if v is not None})
        return pipe
    trained = _checkpoint_config(path)
    r, text, vae = trained.recipe, trained.text, trained.vae
    diffusion, defaults = _checkpoint_recipe(trained, **overrides)
    small = isinstance(text, SmallTextEncoder)  # else a frozen encoder, outside the trained module
    net = build_backbone(r.model, vae.channels, text.dim,
                         in_channels(r.conditioning, vae.channels, getattr(vae, "temporal_factor", 1)))
    module = DiffusionModule(net, text if small else None, r.diffusion, r.text.null, r.conditioning)
    if r.lora.rank:  # a LoRA run: the base of model.init_from with its adapters (dfm/pipeline/lora.py)
        lora.run_module(module, r, lora.load_base(r.model.init_from, load_pipeline))
    ckpt = load_checkpoint(path)
    use_ema = ema and ckpt["ema"] is not None
    try:
        lora.load_run_weights(module, ckpt["ema"] if use_ema else ckpt["model"], D.load_full_state_dict)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}; its config.yaml does not describe these weights") from None
    if dtype != torch.float32 and hasattr(net, "cast"):
        net.cast(dtype)
    source = {"checkpoint": str(path), "step": int(ckpt["step"]), "weights": "ema" if use_ema else "model"}
    frozen = FrozenSmallTextEncoder(text, f"{path}/text.json") if small else text
    pipe = _conditioned(r.conditioning, Pipeline(module.eval().to(device), frozen, vae.eval().to(device), arch=r.model.arch,
                    paradigm=r.diffusion.paradigm, diffusion=diffusion, defaults=defaults, null=r.text.null,
                    use_mask=r.text.mask, kind="dfm", device=device, dtype=dtype, source=source,
                    config_yaml=trained.config_yaml))
    wan = r.model.init_from and lora.diffusers_wan(r.model.init_from)  # a full fine-tune of a Wan folder
    return sample_as_wan_folder(pipe, r.model.init_from) if wan else pipe


def sample_as_wan_folder(pipe: Pipeline, folder) -> Pipeline:
    """A full fine-tune of a diffusers Wan folder samples as the folder does with its scheduler's sampler: integer
    timesteps (UniPC / DPM-Solver) and the scheduler's options (UniPC's variant, order)."""
    diffusion, defaults, options = wan_scheduler_settings(Path(folder))
    if pipe.defaults.get("sampler") != defaults["sampler"]:
        return pipe
    if diffusion["integer_timesteps"]:
        pipe.module.net = IntegerTimesteps(pipe.module.net)
        pipe.diffusion["integer_timesteps"] = True
    if options:
        pipe.sampler_options.setdefault(defaults["sampler"], options)
    return pipe


EXPORTED = {"dfm": {"model_index.json", "config.yaml", "transformer", "text_encoder", "vae"},  # what export writes
            "vae": {"config.json", "model.safetensors", "eval.json"}}


def _exported_kind(folder: Path) -> str | None:
    """"dfm" (model_index.json with "format": "dfm"), "vae" (a causal VAE's config.json) or None."""
    for name, key, value, kind in (("model_index.json", "format", "dfm", "dfm"), ("config.json", "type", "causal_vae", "vae")):
        try:
            if json.loads((folder / name).read_text()).get(key) == value:
                return kind
        except (OSError, ValueError, AttributeError):
            pass
    return None


def check_export_target(folder: Path, overwrite: bool, kind: str = "dfm") -> None:
    """Before any work: OUT is new, an empty folder or, with --force (`overwrite`), a `kind` model folder holding
    only what an export writes. --force never deletes anything else."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)  # OUT or its nearest ancestor
    if existing is not None and not existing.is_dir():
        raise PipelineError(f"{existing} is a file; dfm export writes a folder: name a new or empty folder as OUT")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not overwrite:
        raise PipelineError(f"{folder} exists and is not empty; choose another folder or pass --force (it replaces a "
                            f"model folder that dfm export wrote, nothing else)")
    if _exported_kind(folder) != kind:
        what = ('a dfm model folder (no model_index.json with "format": "dfm")' if kind == "dfm" else
                "a dfm VAE folder (no config.json of a causal VAE)")
        raise PipelineError(f"{folder} is not {what}; --force replaces only a folder that dfm export wrote: choose "
                            f"another folder")
    extra = sorted(p.name for p in folder.iterdir() if p.name not in EXPORTED[kind])
    if extra:
        raise PipelineError(f"{folder} holds files that dfm export does not write ({', '.join(extra[:5])}); --force "
                            f"would delete them: move them out or choose another folder")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(-100, os.fsencode(str(a)), -100, os.fsencode(str(b)), 2) == 0  # AT_FDCWD, RENAME_EXCHANGE


def _write_folder(folder: Path, fill) -> Path:
    """`fill(tmp)` builds the folder beside `folder`, which it then replaces in one atomic exchange (else in two
    renames, the old folder kept until the new one is in place). A failure leaves `folder` as it was."""
    tmp, old = (folder.parent / f".{folder.name}.{tag}-{os.getpid()}" for tag in ("tmp", "old"))
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        fill(tmp)
        if not folder.exists() or not any(folder.iterdir()):
            os.replace(tmp, folder)
        elif not _exchange(tmp, folder):  # after an exchange tmp holds the old folder: removed below
            os.replace(folder, old)
            try:
                os.replace(tmp, folder)
            except OSError:
                os.replace(old, folder)
                raise
    except OSError as e:
        raise PipelineError(f"cannot write {folder}: {e.strerror or e}; it is left as it was") from None
    finally:
        for p in (tmp, old):
            shutil.rmtree(p, ignore_errors=True)
    return folder


def save_pipeline(pipe: Pipeline, folder: str | Path, overwrite: bool = False) -> Path:
    """Write `pipe` as a dfm model folder (its layout: dfm/pipeline/__init__.py) atomically: built beside
    `folder`, then swapped in. `overwrite` replaces a dfm model folder only (`check_export_target`)."""
    folder = Path(folder)
    check_export_target(folder, overwrite, "dfm")
    if not hasattr(_text_module(pipe.text), "save_pretrained") or not hasattr(pipe.vae, "save_pretrained"):
        raise PipelineError("this pipeline's text encoder or VAE cannot be saved as a dfm model folder")

    def fill(tmp: Path) -> None:
        lora.fuse(pipe)  # loaded LoRAs (a LoRA run's adapters) are merged into the saved weights
        _save_transformer(pipe.transformer, pipe.arch, tmp / "transformer")
        _text_module(pipe.text).save_pretrained(tmp / "text_encoder")
        pipe.vae.save_pretrained(tmp / "vae")
        if pipe.config_yaml:
            (tmp / "config.yaml").write_text(pipe.config_yaml)
        index = {"format": "dfm", "version": FORMAT_VERSION, "arch": pipe.arch, "paradigm": pipe.paradigm,
                 "diffusion": pipe.diffusion, "text": {"null": pipe.null, "mask": pipe.use_mask,
                                                       "max_length": int(pipe.text.max_length)},
                 "defaults": pipe.defaults, "source": pipe.source, **{k: v for _, entry in CONDITIONERS
                                                                       for k, v in entry(pipe).items()}}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    return _write_folder(folder, fill)


def export_checkpoint(checkpoint: str | Path, out: str | Path, ema: bool = True, overwrite: bool = False,
                      **overrides) -> Path:
    """`dfm export`: a trainer checkpoint as a dfm model folder (see `pipeline_from_checkpoint`), or a `dfm
    train-vae` run's finished VAE (RUN/model, with RUN/eval.json) as a VAE folder. OUT is checked first."""
    out, run = Path(out), Path(checkpoint)
    vae = next((p for p in (run / "model", run) if _exported_kind(p) == "vae"), None)
    if vae is None:
        wan = lora.wan_lora_recipe(find_checkpoint(run) or run) if run.exists() else None
        if wan is not None:
            raise PipelineError(f"{checkpoint} is a LoRA run on the diffusers Wan folder {wan.model.init_from}; "
                                f"export its adapters with `dfm export {checkpoint} OUT.safetensors --lora-only`")
        check_export_target(out, overwrite, "dfm")
        return save_pipeline(pipeline_from_checkpoint(checkpoint, ema=ema, **overrides), out, overwrite=overwrite)
    given = [k for k, v in overrides.items() if v is not None] + ([] if ema else ["no_ema"])
    if given:
        raise PipelineError(f"{checkpoint} is a VAE run: {', '.join(given)} apply to diffusion models only")
    check_export_target(out, overwrite, "vae")
    load_vae(vae)  # reads whole, or a one-line error
    report = vae / "eval.json" if vae == run else run / "eval.json"  # a VAE folder's own, or its run's
    files = [vae / "config.json", vae / "model.safetensors", *([report] if report.is_file() else [])]
    return _write_folder(out, lambda tmp: [shutil.copy2(f, tmp / f.name) for f in files])
