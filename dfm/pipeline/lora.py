"""LoRA on a Pipeline and in model folders and runs: `Pipeline.load_lora / unload_lora / fuse_lora`, `dfm
generate --lora PATH[:SCALE]`, `dfm info LORA.safetensors`, `dfm export RUN OUT.safetensors --lora-only`.

The math and the file formats are dfm/models/lora.py and dfm/models/lora_files.py; this module only ties them to
the pipeline: adapters are named after their file (several stack, each with its scale) and recorded in
`pipe.source["lora"]`."""

from __future__ import annotations

from pathlib import Path

from dfm.models.lora import LoRA, LoRAError, add_lora, adapters, fuse_lora, remove_lora, set_scale, unfuse_lora
from dfm.models.lora_files import FORMATS, describe_lora, load_lora_file, save_lora

__all__ = ["FORMATS", "LoRAError", "describe_lora", "export_lora", "fuse", "load", "parse_lora_arg", "unfuse",
           "unload"]


def _record(pipe) -> None:
    pipe.source["lora"] = [{"name": n, "scale": e["scale"], "fused": e["fused"] is not None}
                           for n, e in adapters(pipe.transformer).items()]
    if not pipe.source["lora"]:
        del pipe.source["lora"]


def load(pipe, path, scale: float = 1.0, name: str | None = None) -> str:
    """Add the LoRA file at `path` to the pipeline's transformer with `scale`; returns the adapter's name (the
    file's stem, made unique)."""
    path = Path(path)
    lora = load_lora_file(pipe.transformer, path)
    taken = adapters(pipe.transformer)
    if name is None:
        name, i = path.stem, 1
        while name in taken:
            i += 1
            name = f"{path.stem}_{i}"
    add_lora(pipe.transformer, lora.to(pipe.device), name, float(scale))
    _record(pipe)
    return name


def add(pipe, lora: LoRA, name: str = "default", scale: float = 1.0) -> str:
    add_lora(pipe.transformer, lora, name, scale)
    _record(pipe)
    return name


def unload(pipe, name: str | None = None) -> None:
    """Remove one adapter, or all: the transformer is as it was before loading (fused ones are unfused)."""
    remove_lora(pipe.transformer, name)
    _record(pipe)


def fuse(pipe, name: str | None = None) -> None:
    """Merge the adapters (or one) into the transformer's weights; `unfuse` restores them exactly."""
    fuse_lora(pipe.transformer, name)
    _record(pipe)


def unfuse(pipe, name: str | None = None) -> None:
    unfuse_lora(pipe.transformer, name)
    _record(pipe)


def scale(pipe, name: str, value: float) -> None:
    set_scale(pipe.transformer, name, value)
    _record(pipe)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """--lora PATH[:SCALE] -> (path, scale); the scale is the part after the last ':' when it is a number."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def export_lora(pipe, out, format: str = "diffusers", overwrite: bool = False) -> Path:
    """The pipeline's one (unfused) LoRA as a file in `format`; OUT is checked before any work."""
    out = Path(out)
    if format not in FORMATS:
        raise LoRAError(f"--format {format!r}: use one of {', '.join(FORMATS)}")
    if out.suffix != ".safetensors":
        raise LoRAError(f"{out}: a LoRA is written as a .safetensors file; name OUT like lora.safetensors")
    if out.exists() and not overwrite:
        raise LoRAError(f"{out} exists; choose another name or pass --force")
    loaded = adapters(pipe.transformer)
    if len(loaded) != 1:
        raise LoRAError(f"this model holds {len(loaded)} LoRA adapters; --lora-only exports a run trained with "
                        f"lora.rank set (exactly one adapter)")
    (entry,) = loaded.values()
    from dfm.io import atomic_path

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_lora(pipe.transformer, entry["lora"], tmp, format)
    return out
