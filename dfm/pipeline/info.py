"""`dfm info`: what a dfm model folder, a diffusers Wan folder or a trainer checkpoint holds, read from configs and
safetensors headers (dfm/pipeline/folders.py reads the same folders to load them)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

from safetensors import safe_open

from dfm.checkpoint import find_checkpoint
from dfm.model import backbone_config
from dfm.pipeline.folders import (FAMILY_LOADERS, WAN_TEXT_LENGTH, _checkpoint_config, _checkpoint_recipe, _load_vae,
                                  _read_json, wan_scheduler_settings)
from dfm.pipeline.pipeline import DEFAULT_KEYS, PipelineError


def _safetensors_params(files: Sequence[Path], by_prefix: bool = False) -> dict[str, int]:
    """Element counts read from safetensors headers (no weights loaded): {"total": n}, or per first key
    component ({"net": n1, "text": n2} for a trainer checkpoint) with by_prefix."""
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


def conditioning_line(c: dict | None) -> str:
    """A dfm model's image conditioning (dfm.conditioning) for `dfm info`."""
    mode = (c or {}).get("mode", "none")
    if mode == "none":
        return "none (text-to-video only)"
    if mode == "frame":
        given = "first and last latent frames" if c.get("last") else "first latent frame"
        return f"frame (image-to-video: the image's latents are the {given} at t = 0; --image optional)"
    clip = f" + CLIP image context ({c['image_encoder']})" if c.get("image_encoder") else ""
    return f"concat (image-to-video: [mask, E(image, zeros...)] along channels{clip}; --image " \
           f"{'required' if clip else 'optional'})"


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
            add("conditioning", conditioning_line(index.get("conditioning")))
        elif index.get("_class_name") in ("WanPipeline", "WanImageToVideoPipeline"):
            arch, paradigm = "wan", "flow"
            diffusion, defaults, options = wan_scheduler_settings(path)
            text = _read_json(path / "text_encoder" / "config.json", again)
            text_line = (f"{text.get('model_type')} ({(text.get('architectures') or ['?'])[0]}), dim "
                         f"{text.get('d_model')}, max_length {WAN_TEXT_LENGTH}, zero-padded, no mask in the "
                         f"transformer")
            info = next((info for claims, _, info in FAMILY_LOADERS if claims(path, index)), None)
            family, extra = info(index, path) if info else ([("layout", "T2V (Wan 2.1 text-to-video)")], {})
            add("path", f"{path} (diffusers Wan {'' if info else '2.1 '}folder, {index['_class_name']})")
            for k, v in family:
                add(k, v)
            defaults.update(extra)
            if options:
                add("sampler options", json.dumps(options))
        else:
            raise PipelineError(f"{path}/model_index.json describes {index.get('_class_name')!r}; not a dfm or "
                                f"Wan 2.1 folder")
        tcfg = _read_json(path / "transformer" / "config.json", again)
        parts = {name: _count(path / name) for name in ("transformer", "transformer_2", "text_encoder", "vae",
                                                         "image_encoder") if (path / name).is_dir()}
        vae = _load_vae(path / "vae", again)
    else:
        ckpt = find_checkpoint(path)
        if ckpt is None:
            raise PipelineError(f"{path} is neither a model folder (model_index.json) nor a trainer checkpoint")
        trained = _checkpoint_config(ckpt)
        r, text, vae = trained.recipe, trained.text, trained.vae
        arch, paradigm = r.model.arch, r.diffusion.paradigm
        diffusion, defaults = _checkpoint_recipe(trained)
        tcfg = dataclasses.asdict(backbone_config(r.model, vae.channels, text.dim))
        text_line = (f"small encoder, dim {text.dim}, max_length {text.max_length}, null {r.text.null}, "
                     f"mask on")
        state = _read_json(ckpt / "state.json", "the checkpoint is damaged")
        add("path", f"{ckpt} (trainer checkpoint, step {state.get('step')})")
        add("weights", "model.safetensors + ema.safetensors" if (ckpt / "ema.safetensors").is_file()
            else "model.safetensors (no EMA)")
        add("conditioning", conditioning_line(dataclasses.asdict(r.conditioning)))
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


