"""Training checkpoints: atomic, pickle-free, complete enough to resume exactly.

A checkpoint is a folder `OUTPUT/checkpoints/step_00001000/` holding

    model.safetensors       weights
    ema.safetensors         EMA weights (optional)
    optimizer.safetensors   optimizer tensors, flattened as "state.<param index>.<name>"
    rng.safetensors         torch CPU (and CUDA) generator states
    state.json              step, optimizer param groups and scalar state, numpy/python RNG, data position, ...
    config.yaml             the resolved config (written by the trainer through `extra_files`)

It is written to `step_XXXX.tmp-<pid>/` and renamed into place in one `os.replace`, so a process killed mid-save
leaves the previous checkpoints intact and, at worst, a `.tmp-*` folder that the next save removes. Nothing is
unpickled on load: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dfm.errors import CheckpointError
from dfm.io import save_safetensors

STEP_DIR = re.compile(r"^step_(\d+)$")


# --- optimizer state <-> (tensors, json) ------------------------------------------------------------------------


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, v in per_param.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    for idx, kv in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(kv)
    return {"state": state, "param_groups": meta["param_groups"]}


# --- RNG ----------------------------------------------------------------------------------------------------------


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# --- save / load ------------------------------------------------------------------------------------------------


def save_checkpoint(
    root: str | Path,
    step: int,
    model: dict[str, torch.Tensor],
    *,
    ema: dict[str, torch.Tensor] | None = None,
    optimizer: dict | None = None,
    state: dict | None = None,
    extra_files: dict[str, str] | None = None,
    keep: int = 3,
) -> Path:
    """Write checkpoint `step` under `root` atomically and keep the newest `keep` (0 keeps all). Returns its path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("step_*.tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:08d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in model.items()}, tmp / "model.safetensors")
    if ema is not None:
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in ema.items()}, tmp / "ema.safetensors")
    meta: dict[str, Any] = {"step": step, "state": state or {}}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer)
        save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
    rng_tensors, meta["rng"] = capture_rng()
    save_safetensors(rng_tensors, tmp / "rng.safetensors")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    with open(tmp / "state.json", "w") as f:  # written last: its presence marks a complete folder
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint a path names: a step_* folder itself, else the latest under PATH/checkpoints (a run
    directory) or under PATH (a checkpoints folder); None if there is none."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    return None


def run_config(path: str | Path) -> Path | None:
    """The config.yaml of a checkpoint or run directory (PATH/config.yaml, else the one beside PATH), if any."""
    path = Path(path)
    return next((c for c in (path / "config.yaml", path.parent / "config.yaml") if c.is_file()), None)


def load_checkpoint(path: str | Path, restore_rng_state: bool = False) -> dict:
    """Read a checkpoint folder: {'step', 'model', 'ema', 'optimizer', 'state', 'path'}; optionally restore the RNGs."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no state.json); pass a step_* folder under "
                              f"OUTPUT/checkpoints, or start without --resume")
    try:
        meta = json.loads((path / "state.json").read_text())
        out = {"step": meta["step"], "state": meta.get("state", {}), "path": path,
               "model": load_file(path / "model.safetensors")}
        out["ema"] = load_file(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None
        out["optimizer"] = (_unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta["optimizer"])
                            if "optimizer" in meta else None)
        if restore_rng_state:
            restore_rng(load_file(path / "rng.safetensors"), meta["rng"])
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt ({type(e).__name__}: {e}); resume from an earlier "
                              f"step_* folder or start afresh") from None
    return out
