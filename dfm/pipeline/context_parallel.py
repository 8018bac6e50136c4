"""Generation with context parallelism: the denoiser's tokens across the ranks of a torchrun launch.

    torchrun --nproc_per_node 2 -m dfm generate "a cat surfing" --model FOLDER --context-parallel 2

    pipe = load_pipeline(FOLDER, context_parallel=2)      # under torchrun; joins (or uses) the process group
    out = pipe.generate("a cat surfing", seed=0)          # every rank returns the same videos

Each denoiser forward shards the patch tokens over the CP group (dfm.models.context_parallel) and gathers the
output, so every rank holds the same full prediction; the sampler (a few element-wise operations per step), the
text encoder and the VAE then run on every rank on identical inputs, which keeps the ranks in lock-step with no
further communication, and rank 0 writes. A world of k*N ranks is k CP groups of N that each make the same video
(data parallelism over prompts is not done here). A seed left to chance is drawn on rank 0 and broadcast: ranks
with different noise would each sample a different video and mix them.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dfm import distributed as D
from dfm.models.context_parallel import ContextParallel, context_parallel_group, enable_context_parallel

from .pipeline import SEED_LIMIT, Pipeline


_JOINED: list[D.DistInfo] = []  # the process group join_launch created (leave_launch destroys it)


def join_launch(degree: int, device="cpu"):
    """Before loading anything: join torchrun's process group (if not joined yet) and build the DP x CP mesh.
    Returns (device of this rank, CP process group); a one-line error if the degree cannot work."""
    if not (dist.is_available() and dist.is_initialized()) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _JOINED.append(D.init_distributed("cuda" if str(device).startswith("cuda") else "cpu"))
    _, group = context_parallel_group(degree)  # the errors: no process group, a degree not dividing the world
    if str(device) == "cuda":  # one GPU per local rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device, group


def leave_launch() -> None:
    """Destroy the process group that join_launch created (a caller's own group is left alone)."""
    while _JOINED:
        D.barrier()
        D.teardown(_JOINED.pop())


def is_writer() -> bool:
    """Whether this rank writes the results: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class ContextParallelPipeline(Pipeline):
    """A Pipeline whose transformer runs context-parallel (`shard_pipeline`); `generate` agrees on the seeds."""

    def generate(self, prompts, *args, seed=None, seeds=None, progress=True, **kwargs):
        if seed is None and seeds is None:  # one seed for every rank, drawn on rank 0
            count = 1 if isinstance(prompts, str) else len(prompts)
            seed = D.broadcast_object(int.from_bytes(os.urandom(4), "little") % (SEED_LIMIT - count + 1))
        return super().generate(prompts, *args, seed=seed, seeds=seeds, progress=progress and dist.get_rank() == 0,
                                **kwargs)


def shard_pipeline(pipe: Pipeline, group, mode: str = "auto") -> ContextParallelPipeline:
    """`pipe` with its transformer's forward sharded over `group` (in place; the same object, now a
    ContextParallelPipeline)."""
    enable_context_parallel(pipe.module, ContextParallel(group, mode))
    pipe.__class__ = ContextParallelPipeline
    return pipe
