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
unpickled on load: safetensors and JSON only, and a state.json of the wrong shape (edited by hand) is a
CheckpointError like a corrupt file.

Keep-last-K pruning counts the checkpoints of one run only (`state["run"]`, an id the trainers give each run) and
always keeps that run's newest good one (`checkpoint_health`: finite, sane weights and loss, recorded in
`state["health"]`). `--resume` of a run directory takes its newest checkpoint that reads back whole
(`resume_candidates`, `load_newest_intact`) and says which ones it skipped and why.
"""

from __future__ import annotations

import json
import math
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

from dfm.errors import CheckpointError, first_line
from dfm.io import save_safetensors

STEP_DIR = re.compile(r"^step_(\d+)$")
# A good checkpoint (one to go back to): finite weights with |w| <= WEIGHT_LIMIT and a finite loss <= LOSS_LIMIT.
# The losses here have unit-variance targets (O(1)) and trained weights stay O(1): far beyond either is divergence.
WEIGHT_LIMIT = 1e6
LOSS_LIMIT = 1e4


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
    if final.exists():  # re-saving the same step: the old one goes aside first (a kill leaves it as a .tmp-*)
        os.replace(final, root / f"{final.name}.tmp-old-{os.getpid()}")
    os.replace(tmp, final)
    for stale in root.glob(f"{final.name}.tmp-old-{os.getpid()}"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        _prune(root, (state or {}).get("run"), keep)
    return final


def _saved_state(path: Path) -> dict | None:
    try:
        state = json.loads((path / "state.json").read_text()).get("state")
    except (OSError, ValueError, AttributeError):
        return None
    return state if isinstance(state, dict) else None


def _prune(root: Path, run, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints of run `run` (others' and unreadable ones are never touched),
    keeping that run's newest good checkpoint as well when none of the newest `keep` is good."""
    states = {p: _saved_state(p) for p in list_checkpoints(root)}
    ours = [p for p, st in states.items() if st is not None and st.get("run") == run]  # oldest first
    drop, kept = ours[:-keep], ours[-keep:]

    def good(p):
        return (states[p].get("health") or {}).get("good", True) is not False

    if drop and not any(good(p) for p in kept):
        newest_good = next((p for p in reversed(drop) if good(p)), None)
        if newest_good is not None:
            drop.remove(newest_good)
    for old in drop:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_health(weights: dict[str, torch.Tensor], loss: float | None = None) -> dict:
    """Is this a checkpoint to go back to? {"good", "max_abs_weight" (None if not finite), "loss", "why" ("" if
    good)}: good means finite weights with |w| <= WEIGHT_LIMIT and (if given) a finite loss <= LOSS_LIMIT."""
    biggest, finite = 0.0, True
    for v in weights.values():
        if v.is_floating_point() and v.numel():
            a = v.detach().abs().amax().float()
            if not torch.isfinite(a):
                finite = False
                break
            biggest = max(biggest, float(a))
    why = []
    if not finite:
        why.append("weights not finite (NaN or inf)")
    elif biggest > WEIGHT_LIMIT:
        why.append(f"weights up to {biggest:.3g}, over {WEIGHT_LIMIT:g}")
    loss_ok = loss is None or (math.isfinite(loss) and loss <= LOSS_LIMIT)
    if not loss_ok:
        why.append(f"loss {loss:.3g}" + (f", over {LOSS_LIMIT:g}" if math.isfinite(loss) else ""))
    return {"good": not why, "max_abs_weight": biggest if finite else None,
            "loss": loss if loss is not None and math.isfinite(loss) else None, "why": "; ".join(why)}


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


def _corrupt(path: Path, why: str) -> CheckpointError:
    e = CheckpointError(f"checkpoint {path} is corrupt: {why}; resume from an earlier step_* folder or start afresh")
    e.why = why  # the short reason, for "skipped step_N (why)"
    return e


def _state_problem(meta, path: Path) -> str | None:
    """What is wrong with a state.json's shape (None if nothing): the fields this module and the trainers read."""
    if not isinstance(meta, dict):
        return "is not a JSON object"
    step = meta.get("step")
    if type(step) is not int or step < 0:
        return f"has step {step!r}, not a step number"
    named = STEP_DIR.match(path.name)
    if named and int(named.group(1)) != step:
        return f"says step {step}, but the folder is {path.name}"
    if not isinstance(meta.get("state", {}), dict):
        return "has a 'state' that is not an object"
    opt = meta.get("optimizer")
    if opt is not None and not (
            isinstance(opt, dict) and isinstance(opt.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"])
            and isinstance(opt.get("scalars", {}), dict)
            and all(k.isdigit() and isinstance(v, dict) for k, v in opt.get("scalars", {}).items())):
        return "has an 'optimizer' entry of the wrong shape"
    if not isinstance(meta.get("rng", {}), dict):
        return "has an 'rng' entry of the wrong shape"
    return None


def load_checkpoint(path: str | Path, restore_rng_state: bool = False) -> dict:
    """Read a checkpoint folder: {'step', 'model', 'ema', 'optimizer', 'state', 'path'}; optionally restore the RNGs.
    Anything unreadable or of the wrong shape (state.json edited by hand, too) is a CheckpointError naming it."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no state.json); pass a step_* folder under "
                              f"OUTPUT/checkpoints, or start without --resume")
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _corrupt(path, f"state.json is unreadable ({type(e).__name__}: {first_line(e)})") from None
    problem = _state_problem(meta, path)
    if problem:
        raise _corrupt(path, f"state.json {problem} (edited by hand?)")

    def tensors(name):
        try:
            return load_file(path / name)
        except (OSError, ValueError, SafetensorError) as e:
            raise _corrupt(path, f"{name} is unreadable ({type(e).__name__}: {first_line(e)})") from None

    out = {"step": meta["step"], "state": meta.get("state", {}), "path": path, "model": tensors("model.safetensors")}
    out["ema"] = tensors("ema.safetensors") if (path / "ema.safetensors").is_file() else None
    try:
        out["optimizer"] = (_unflatten_optimizer(tensors("optimizer.safetensors"), meta["optimizer"])
                            if "optimizer" in meta else None)
        if restore_rng_state:
            restore_rng(tensors("rng.safetensors"), meta["rng"])
    except (KeyError, ValueError, TypeError, IndexError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise _corrupt(path, f"state.json does not match its tensors ({type(e).__name__}: {first_line(e)})") from None
    return out


def resume_candidates(path: str | Path) -> tuple[list[Path], bool]:
    """The checkpoints `--resume PATH` can mean, newest first, and whether PATH named one step_* folder itself (then
    that one alone; else the run directory's or checkpoints folder's, for `load_newest_intact`). A missing PATH, or
    one without a checkpoint, is a CheckpointError saying so."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--resume {path}: not found; pass a run directory, its checkpoints/ folder or a "
                              f"step_* folder")
    if (path / "state.json").is_file() or STEP_DIR.match(path.name):
        return [path], True
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[::-1], False
    raise CheckpointError(f"--resume {path}: no checkpoint there (no step_*/state.json in it or in its checkpoints/ "
                          f"folder); pass a run directory, its checkpoints/ folder or a step_* folder")


def load_newest_intact(candidates: list[Path], explicit: bool, notice, check=None) -> dict:
    """`load_checkpoint` of the first of `candidates` (newest first) that reads back whole and passes `check(path)`
    (which raises CheckpointError); `notice(msg)` names the ones skipped and why. A step_* folder named explicitly
    (`explicit`) is not swapped for another: its error stands, naming the newest other step to try."""
    skipped = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
            if check is not None:
                check(path)
        except CheckpointError as e:
            if explicit:
                others = [p for p in list_checkpoints(path.parent) if p != path]
                hint = f" ({others[-1]} is the newest other one)" if others else ""
                raise CheckpointError(f"{first_line(e)}{hint}") from None
            skipped.append(f"{path.name} is corrupt: {getattr(e, 'why', first_line(e))}")
            continue
        if skipped:
            notice(f"{'; '.join(skipped)}; resuming from {path}, the newest intact checkpoint")
        return ckpt
    raise CheckpointError(f"no intact checkpoint under {candidates[0].parent}: {'; '.join(skipped)}; start afresh "
                          f"in a new train.output_dir")
