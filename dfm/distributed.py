"""One process or many: process-group set-up, DDP / FSDP2 wrapping, full state dicts, per-sample seeding.

    info = init_distributed()             # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, nccl on GPU
    model = wrap_model(model, info, "fsdp", blocks=model.net.blocks)
    ...
    teardown()

Checkpoints are always written in one layout, whatever the parallelism: `full_state_dict` gathers every parameter
(FSDP2 shards are DTensors) into a plain CPU dict keyed by parameter name, and `full_optimizer_state` does the
same for the optimizer (torch's index-keyed layout), so a checkpoint written by N FSDP ranks loads into one
process with `load_state_dict`. Loading goes the other way: every rank reads the full tensors and keeps its shard
(`distribute_tensor(..., src_data_rank=None)`: no communication).

Seeding: randomness that must not depend on the world size (the noise and dropout of each training sample) comes
from generators seeded by `derive_seed(seed, sample_index, purpose)`; `seed_process` seeds the global RNGs of
each rank differently for anything else.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # init_distributed created the process group (so teardown destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto": this rank's GPU when CUDA is available, else the CPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=cpu (or auto)")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in the environment (a no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = world > 1 and not dist.is_initialized()  # a caller's group is used as it is, and left alone
    if owns:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    if world > 1 and dev.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # share the cores between local ranks
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistInfo(rank, world, local_rank, dev, owns)


def teardown(info: DistInfo | None = None) -> None:
    """Destroy the process group if `info` says init_distributed created it (or, without `info`, any group)."""
    if info is not None and not info.owns_group:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in place; the tensor itself for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (picklable Python data only: strings, numbers, lists, dicts)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --- seeding ------------------------------------------------------------------------------------------------------


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a fixed function of the integer `keys` (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0]) >> 1


def sample_generators(seed: int, sample_indices, purpose: int) -> list[torch.Generator]:
    """One CPU generator per training sample, seeded by (seed, global sample index, purpose).

    A sample's noise therefore depends on neither the rank that draws it nor the world size nor the step it falls
    in, so N ranks see exactly the noise of one process with the same global batch, and a resumed run the noise of
    the uninterrupted one. (CPU generators also drive CUDA runs: `noise.randn_like` moves the draws.)
    """
    return [torch.Generator().manual_seed(derive_seed(seed, int(i), purpose)) for i in sample_indices]


def seed_process(seed: int, rank: int) -> None:
    """Seed the global torch / numpy / Python RNGs of this rank (different per rank, fixed per (seed, rank))."""
    s = derive_seed(seed, rank, 0x5EED)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


# --- wrapping -----------------------------------------------------------------------------------------------------


def wrap_model(module: nn.Module, info: DistInfo, parallel: str = "ddp", blocks=()) -> nn.Module:
    """DDP (parameters replicated) or FSDP2 (`fully_shard` on each of `blocks`, then on the root).

    One process: the module itself (for both). The module must already be on `info.device`.
    """
    if not info.distributed:
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(module)
        return module
    raise ValueError(f"unknown parallel mode {parallel!r}; use ddp or fsdp")


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place, so it is the module itself)."""
    return module.module if hasattr(module, "module") and isinstance(module, nn.parallel.DistributedDataParallel) else module


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of an accumulated step."""
    if enabled:
        yield
    elif isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


# --- full (unsharded) state ---------------------------------------------------------------------------------------


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def to_full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (gathers an FSDP2 shard: a collective, so every rank must call it)."""
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.detach().cpu()


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `ref`: this rank's shard when `ref` is a DTensor (no communication), else a copy."""
    if _is_dtensor(ref):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)
    return full.to(ref.device, ref.dtype)


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name (the module's own names: no state-dict hooks run)."""
    out = dict(module.named_parameters())
    for mod_name, mod in module.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{name}" if mod_name else name] = buf
    return out


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full CPU tensor} for `unwrap(module)`; collective under FSDP2 (call it on every rank)."""
    return {k: to_full(v) for k, v in named_tensors(unwrap(module)).items()}


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into `unwrap(module)` (each rank keeps its shard); names and shapes must match exactly."""
    own = named_tensors(unwrap(module))
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        problems = ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {unexpected[:3]}"] if unexpected else []) + shapes[:3]
        raise ValueError("the checkpoint does not fit this model (" + "; ".join(problems) + ")")
    with torch.no_grad():
        for k, t in own.items():
            src = _like(state[k], t)
            (t.to_local() if _is_dtensor(t) else t).copy_(src.to_local() if _is_dtensor(src) else src)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded state tensor gathered (collective under FSDP2)."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: to_full(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                   for i, s in sd["state"].items()}
    return sd


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a full (index-keyed) optimizer state, sharding each tensor like its parameter."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        state[int(i)] = {k: (_like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v)
                         for k, v in s.items()}
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
