"""Model folders in and out: dfm model folders, diffusers Wan 2.1 folders and trainer checkpoints -> `Pipeline`
(`load_pipeline`), checkpoint -> folder (`export_checkpoint`), and what a folder holds (`describe`). The folder
formats are described in dfm/pipeline/__init__.py."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from dfm.checkpoint import find_checkpoint
from dfm.diffusion.sampling import SPACES, resolve_sampler
from dfm.errors import UserError
from dfm.pipeline.generation import (
    DEFAULT_KEYS,
    DEFAULT_MODEL,
    WAN_DEFAULTS,
    WAN_TEXT_LENGTH,
    Pipeline,
    PipelineError,
)

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
        ckpt = find_checkpoint(path)
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
    path = find_checkpoint(given) if given.exists() else None
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
        ckpt = find_checkpoint(path)
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


