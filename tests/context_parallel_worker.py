"""Run under torchrun by tests/test_context_parallel.py: every rank computes each case twice, once as one process
(context parallelism off) and once with its 1/N of the tokens (on), and rank 0 writes the largest differences of
the outputs and of the gradients (the mean over ranks, as DDP takes it) to the JSON file given as argv[1], with
the one-line messages of the errors the cases below should raise. argv[2], if given: the case names to run."""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
import torch.distributed as dist

from dfm.models.context_parallel import (ContextParallel, ContextParallelError, context_parallel_group,
                                         enable_context_parallel)
from dfm.models import DIT_CONFIGS, WAN_CONFIGS, DiT, WanModel
from dfm.models.dit import config as dit_config


def wan(**kw):
    return WanModel(dataclasses.replace(WAN_CONFIGS["tiny"], **kw))


class PerTokenTimesteps(torch.nn.Module):
    """A WanModel fed per-token timesteps [B, L] (Wan 2.2 TI2V's expand_timesteps): the first latent frame at t=0,
    the rest falling along the sequence, so the sharded forward must shard the modulation with the tokens."""

    def __init__(self):
        super().__init__()
        self.inner = wan()

    def forward(self, x, t, ctx, mask):
        pt, ph, pw = self.inner.config.patch_size
        L = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
        first = (x.shape[3] // ph) * (x.shape[4] // pw)  # tokens of the first latent frame
        ramp = torch.linspace(1.0, 0.5, L)  # [L]
        t_tok = t[:, None] * ramp  # [B, L]
        t_tok[:, :first] = 0.0
        return self.inner(x, t_tok, ctx, mask)


def dit(name="tiny", **kw):
    return DiT(dit_config(name, in_channels=4, context_dim=24, **kw))


def randomize(model, seed):
    """Random weights everywhere (DiT starts as the identity: zero adaLN gates and a zero final layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1) + float("norm" in name))
    return model


def run(model, size, seed, checkpointing=False):
    """Forward + backward of a fixed random loss: (output, {name: grad}) with the input's gradient as 'x'."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, 4, *size, generator=g).requires_grad_()
    t = torch.tensor([300.0, 800.0])
    ctx = torch.randn(2, 5, 24, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    model.gradient_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    out = model(x, t, ctx, mask)
    w = torch.randn(out.shape, generator=g)
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    return out.detach(), grads


CASES = {  # name: (model builder, (F, H, W), mode, activation checkpointing)
    "wan_ulysses_even": (lambda: wan(), (2, 4, 6), "ulysses", False),  # 12 tokens
    "wan_ring_even": (lambda: wan(), (2, 4, 6), "ring", False),
    "wan_ulysses_odd": (lambda: wan(), (3, 2, 6), "ulysses", False),  # 9 tokens: padded
    "wan_ring_odd": (lambda: wan(), (3, 2, 6), "ring", False),
    "wan_auto_odd_checkpointing": (lambda: wan(), (3, 2, 6), "auto", True),
    "wan_ring_one_token_per_rank": (lambda: wan(), (1, 2, 2), "ring", False),  # 1 token: rank 1 holds padding only
    "wan_per_token_t_ulysses_odd": (PerTokenTimesteps, (3, 2, 6), "ulysses", False),
    "wan_per_token_t_ring_odd": (PerTokenTimesteps, (3, 2, 6), "ring", False),
    "dit_ulysses_odd": (lambda: dit(), (3, 2, 6), "ulysses", False),
    "dit_ring_even": (lambda: dit(), (2, 4, 6), "ring", False),
    "dit_ring_odd_sincos": (lambda: dit(position="sincos"), (3, 2, 6), "ring", False),
    "dit_ulysses_factorized_odd": (lambda: dit(attention="factorized"), (3, 2, 6), "ulysses", False),
    "dit_ulysses_causal_odd": (lambda: dit(attention="causal"), (3, 2, 6), "ulysses", False),
    "hourglass_ulysses": (lambda: dit("hourglass-tiny", window=(1, 2, 2)), (2, 8, 8), "auto", False),
    "hourglass_ulysses_odd": (lambda: dit("hourglass-tiny", window=(1, 2, 2)), (3, 4, 4), "auto", False),
}


def compare(name, build, size, mode, checkpointing, cp_group):
    model = randomize(build(), seed=len(name))
    ref_out, ref_grads = run(model, size, seed=7, checkpointing=checkpointing)
    enable_context_parallel(model, ContextParallel(cp_group, mode))
    out, grads = run(model, size, seed=7, checkpointing=checkpointing)
    enable_context_parallel(model, None)
    n = dist.get_world_size(cp_group)
    for gr in grads.values():  # the mean over ranks (DDP's), here over the CP group
        dist.all_reduce(gr, group=cp_group)
        gr /= n
    assert grads.keys() == ref_grads.keys(), sorted(set(grads) ^ set(ref_grads))
    return {"out": (out - ref_out).abs().max().item(), "out_scale": ref_out.abs().max().item(),
            "grad": max((grads[k] - ref_grads[k]).abs().max().item() for k in grads),
            "grad_scale": max(g.abs().max().item() for g in ref_grads.values()), "params": len(grads) - 1}


def error(fn) -> str:
    try:
        fn()
    except ContextParallelError as e:
        return str(e)
    return "no error"


def main(path, names=None):
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    names = names.split(",") if names else list(CASES)
    results = {name: compare(name, *CASES[name], dist.group.WORLD) for name in names}
    world = dist.get_world_size()
    results["errors"] = {
        "degree": error(lambda: context_parallel_group(world + 1)),
        "ulysses_heads": error(lambda: enable_context_parallel(dit(dim=48, heads=3), ContextParallel(None, "ulysses"))),
        "ring_pattern": error(lambda: enable_context_parallel(dit(attention="factorized", dim=48, heads=3),
                                                               ContextParallel(None, "auto"))),
    }
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
