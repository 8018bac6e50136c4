"""LoRA on a Pipeline and in model folders and runs: `Pipeline.load_lora / unload_lora / fuse_lora`, `dfm
generate --lora PATH[:SCALE]`, `dfm info LORA.safetensors`, `dfm export RUN OUT.safetensors --lora-only`.

The math and the file formats are dfm/models/lora.py and dfm/models/lora_files.py; this module only ties them to
the pipeline: adapters are named after their file (several stack, each with its scale) and recorded in
`pipe.source["lora"]`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dfm.errors import first_line
from dfm.models.lora import (LoRA, LoRAError, add_lora, adapters, backbone, fuse_lora, remove_lora, set_scale,
                             unfuse_lora)
from dfm.models.lora_files import EXPERT_KEY, FORMATS, describe_lora, load_lora_file, save_lora

__all__ = ["FORMATS", "LoRAError", "describe_lora", "export_lora", "fuse", "load", "parse_lora_arg", "unfuse",
           "unload"]


EXPERTS = ("high", "low")  # a two-expert Wan 2.2 folder's transformer and transformer_2


def _nets(pipe) -> dict:
    """{expert: network} adapters go on: {"": the transformer}, or {"high": .., "low": ..} for two experts."""
    net = pipe.transformer
    while not hasattr(net, "experts") and isinstance(getattr(net, "net", None), torch.nn.Module):
        net = net.net
    experts = list(getattr(net, "experts", ()))
    return dict(zip(EXPERTS, experts)) if len(experts) == 2 else {"": pipe.transformer}


def file_expert(path) -> str | None:
    """The expert a LoRA file was trained for (metadata of `dfm export --lora-only`), else None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as st:
            value = (st.metadata() or {}).get(EXPERT_KEY)
    except (OSError, ValueError, RuntimeError):
        return None
    return value if value in EXPERTS else None


def _target(pipe, expert: str | None, path=None):
    """The network a LoRA goes on: the transformer, or for two experts `expert` ("high" or "low"; None: the
    file's own expert, else "high", the transformer, as diffusers' load_lora_weights)."""
    nets = _nets(pipe)
    if expert is None:
        expert = "" if "" in nets else (file_expert(path) if path is not None else None) or "high"
    if expert and expert not in EXPERTS:
        raise LoRAError(f"expert={expert!r}: use 'high' (transformer) or 'low' (transformer_2)")
    if expert not in nets:
        raise LoRAError(f"expert={expert}: this model has one transformer; expert picks one of a two-expert "
                        f"Wan 2.2 model's, leave it unset")
    return nets[expert]


def _holding(pipe, name: str | None) -> list:
    """The networks to act on: all, or the one holding adapter `name` (the first if none: it names the miss)."""
    nets = list(_nets(pipe).values())
    return nets if name is None else [n for n in nets if name in adapters(n)][:1] or nets[:1]


def _record(pipe) -> None:
    pipe.source["lora"] = [{"name": n, "scale": e["scale"], "fused": e["fused"] is not None,
                            **({"expert": expert} if expert else {})}
                           for expert, net in _nets(pipe).items() for n, e in adapters(net).items()]
    if not pipe.source["lora"]:
        del pipe.source["lora"]


def load(pipe, path, scale: float = 1.0, name: str | None = None, expert: str | None = None) -> str:
    """Add the LoRA file at `path` to the pipeline's transformer (two experts: see `_target`) with `scale`;
    returns the adapter's name (the file's stem, made unique)."""
    path = Path(path)
    net = _target(pipe, expert, path)
    lora = load_lora_file(net, path)
    taken = {n for other in _nets(pipe).values() for n in adapters(other)}
    if name is None:
        name, i = path.stem, 1
        while name in taken:
            i += 1
            name = f"{path.stem}_{i}"
    add_lora(net, lora.to(pipe.device), name, float(scale))
    _record(pipe)
    return name


def add(pipe, lora: LoRA, name: str = "default", scale: float = 1.0, expert: str | None = None) -> str:
    add_lora(_target(pipe, expert), lora, name, scale)
    _record(pipe)
    return name


def unload(pipe, name: str | None = None) -> None:
    """Remove one adapter, or all: the transformer is as it was before loading (fused ones are unfused)."""
    for net in _holding(pipe, name):
        remove_lora(net, name)
    _record(pipe)


def fuse(pipe, name: str | None = None) -> None:
    """Merge the adapters (or one) into the transformer's weights; `unfuse` restores them exactly."""
    for net in _holding(pipe, name):
        fuse_lora(net, name)
    _record(pipe)


def unfuse(pipe, name: str | None = None) -> None:
    for net in _holding(pipe, name):
        unfuse_lora(net, name)
    _record(pipe)


def scale(pipe, name: str, value: float) -> None:
    set_scale(_holding(pipe, name)[0], name, value)
    _record(pipe)


class LoraArg(tuple):
    """(path, scale) of --lora, with `.expert` ("high", "low" or None: the file's own, else "high")."""

    def __new__(cls, path: str, scale: float, expert: str | None = None):
        self = super().__new__(cls, (path, scale))
        self.expert = expert
        return self


def parse_lora_arg(text: str) -> LoraArg:
    """--lora PATH[:SCALE][:high|:low] -> (path, scale) with .expert; the scale is the part after the last ':'
    when it is a number; a last ':high' / ':low' picks the expert of a two-expert Wan 2.2 model."""
    expert = None
    head, sep, tail = text.rpartition(":")
    if sep and tail in EXPERTS:
        text, expert = head, tail
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return LoraArg(path, float(tail), expert)
        except ValueError:
            pass
    return LoraArg(text, 1.0, expert)


def check_lora_files(paths) -> None:
    """--lora PATH: each a .safetensors file that exists (before the model is loaded)."""
    for path in paths:
        if Path(path).suffix != ".safetensors" or not Path(path).is_file():
            raise LoRAError(f"--lora {path}: not found or not a .safetensors file; pass a LoRA file (PATH[:SCALE])")


def check_lora_experts(model, args) -> None:
    """--lora PATH:low|:high only on a two-expert Wan 2.2 folder (from its model_index.json, before loading)."""
    import json

    picked = [a for a in args if getattr(a, "expert", None)]
    try:
        index = json.loads((Path(model) / "model_index.json").read_text())
    except (OSError, ValueError):
        return  # a trainer run, or not a folder: the loaded pipeline checks
    if picked and isinstance(index, dict) and index.get("transformer_2") in (None, [None, None]):
        raise LoRAError(f"--lora {picked[0][0]}:{picked[0].expert}: {model} has one transformer; :high / :low "
                        f"pick an expert of a two-expert Wan 2.2 folder, drop the suffix")


def check_lora_target(out, format: str = "diffusers", overwrite: bool = False) -> Path:
    """`dfm export RUN OUT --lora-only`: OUT is a new .safetensors name (or --force), the format known."""
    out = Path(out)
    if format not in FORMATS:
        raise LoRAError(f"--format {format!r}: use one of {', '.join(FORMATS)}")
    if out.suffix != ".safetensors" or out.is_dir():
        raise LoRAError(f"{out}: --lora-only writes a .safetensors file; name OUT like lora.safetensors")
    if out.exists() and not overwrite:
        raise LoRAError(f"{out} exists; choose another name or pass --force to replace it")
    return out


def export_lora(pipe, out, format: str = "diffusers", overwrite: bool = False) -> Path:
    """The pipeline's one (unfused) LoRA as a file in `format`, written atomically."""
    from dfm.io import atomic_path

    out = check_lora_target(out, format, overwrite)
    loaded = [(expert, net, e) for expert, net in _nets(pipe).items() for e in adapters(net).values()]
    if len(loaded) != 1:
        raise LoRAError(f"this model holds {len(loaded)} LoRA adapters; --lora-only exports a run trained with "
                        f"lora.rank set (exactly one adapter)")
    ((expert, net, entry),) = loaded
    with atomic_path(out) as tmp:  # one expert's: its keys as any (diffusers: load_into_transformer_2 for low)
        save_lora(net, entry["lora"], tmp, format, metadata={EXPERT_KEY: expert} if expert else None)
    return out


# ================================================================================ LoRA runs (training, export)


@dataclass
class Base:
    """The weights a LoRA run starts from (model.init_from): the backbone's state_dict (any adapters of the base
    fused in), and a small text encoder's weights and vocabulary (None for a frozen Hugging Face encoder)."""

    net: dict
    text: dict | None
    vocab: list | None
    source: str


def base_of(pipe, source: str) -> Base:
    """The Base in a loaded Pipeline (`load_pipeline(model.init_from)`: a dfm model folder, a trainer run (its EMA
    weights) or a diffusers Wan folder); `source` names it in messages."""
    from dfm.text import SmallTextEncoder

    fuse_lora(pipe.transformer)  # a LoRA run as the base: its adapters become part of the weights
    text = getattr(pipe.text, "encoder", pipe.text)
    small = text if isinstance(text, SmallTextEncoder) else None
    return Base({k: v.detach().clone() for k, v in backbone(pipe.transformer).state_dict().items()},
                small.state_dict() if small is not None else None, small.tokenizer.vocab if small else None,
                str(source))


def diffusers_wan(folder) -> bool:
    """A diffusers Wan folder (model_index.json of a Wan pipeline class), not a dfm folder or run."""
    import json

    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and str(index.get("_class_name", "")).startswith("Wan")


def wan_lora_recipe(checkpoint):
    """The ModelRecipe of a LoRA run (a trainer checkpoint folder) on a diffusers Wan folder, else None."""
    from dfm.model import read_recipe

    config = Path(checkpoint) / "config.yaml"
    recipe = read_recipe(config)[0] if config.is_file() else None
    return recipe if recipe is not None and recipe.lora.rank and diffusers_wan(recipe.model.init_from) else None


def load_base(source, load_pipeline, expert: str = "") -> Base:
    """The Base of model.init_from: a diffusers Wan folder's transformer alone (`transformer_2` for
    expert="low"; its VAE and UMT5 are the run's own, named by the config), else
    `base_of(load_pipeline(source))` (dfm.pipeline.folders.load_pipeline)."""
    from dfm.models import WanModel

    if diffusers_wan(source):
        net = WanModel.from_pretrained(Path(source) / ("transformer_2" if expert == "low" else "transformer"))
        return Base({k: v.detach() for k, v in net.state_dict().items()}, None, None, str(source))
    return base_of(load_pipeline(source), source)


def wan_run(pipe, cfg, ckpt: dict, ema: bool, path, expert: str = "") -> object:
    """A LoRA run on a diffusers Wan folder (load_pipeline(RUN)): `pipe` = load_pipeline(that folder), with its
    sampling settings, plus the run's adapters (`cfg` its lora section; EMA weights unless ema=False) on its
    transformer, or on the expert it trained (model.expert) of a two-expert folder."""
    state = ckpt["ema"] if ema and ckpt["ema"] is not None else ckpt["model"]
    net = _target(pipe, expert or None)
    lora = LoRA.create(backbone(net), cfg.rank, cfg.alpha or None, cfg.targets, cfg.dropout,
                       init=False)
    try:
        lora.load_state_dict({k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}, strict=True)
    except RuntimeError as e:
        raise LoRAError(f"{path}: its adapters do not fit {pipe.source.get('folder')} ({first_line(e)[:200]}); "
                        f"load the run with the Wan folder it was trained on") from None
    add(pipe, lora.eval().to(pipe.device), expert=expert or None)
    pipe.source.update(checkpoint=str(path), step=int(ckpt["step"]), weights="ema" if state is ckpt["ema"] else
                       "model")
    return pipe


def init_module(module, base: Base) -> None:
    """Copy the base's weights into a DiffusionModule built from the run's config (one line if they differ)."""
    for part, state in (("net", base.net), ("text", base.text)):
        target = getattr(module, part, None)
        if target is None or state is None:
            continue
        try:
            target.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise LoRAError(f"model.init_from={base.source}: its {'transformer' if part == 'net' else 'text encoder'} "
                            f"does not fit the model this config builds ({first_line(e)[:200]}); use the recipe the "
                            f"base was trained with") from None


def attach_training_lora(module, cfg, base_dtype=None) -> LoRA:
    """Freeze the whole DiffusionModule and add fresh adapters (`cfg` is the lora section) to its backbone; they
    become `module.lora`, so the optimiser, EMA, DDP / FSDP2 and checkpoints see only them. `base_dtype` (bf16
    under CUDA training) casts the frozen backbone (fp32 time path and norms kept); the adapters stay fp32."""
    module.requires_grad_(False)
    if base_dtype is not None and base_dtype != torch.float32 and hasattr(module.net, "cast"):
        module.net.cast(base_dtype)
    lora = LoRA.create(module.net, cfg.rank, cfg.alpha or None, cfg.targets, cfg.dropout)
    module.add_module("lora", lora)
    add_lora(module.net, lora, "default")
    return lora


def load_run_weights(module, state: dict, load_full) -> None:
    """A checkpoint's weights into `module`: the adapters alone for a LoRA run (`module.lora`), else everything
    (`load_full(module, state)`, dfm.distributed.load_full_state_dict)."""
    lora = getattr(module, "lora", None)
    if not isinstance(lora, LoRA):
        load_full(module, state)
        return
    other = [k for k in state if not k.startswith("lora.")]
    if other:
        raise ValueError(f"a LoRA run's checkpoint holds only adapters, this one also {other[:2]}")
    load_full(lora, {k[len("lora."):]: v for k, v in state.items()})


def run_module(module, recipe, base: Base) -> None:
    """A LoRA run's model for inference (load_pipeline(RUN)): the base of model.init_from, frozen adapters."""
    init_module(module, base)
    attach_training_lora(module, recipe.lora)
    module.lora.eval()
