"""Reproducible Gaussian noise: one generator per sample, so a batch of 4 gives the same 4 results as 4 runs of 1."""

from __future__ import annotations

from typing import Sequence, Union

import torch

Generator = Union[torch.Generator, Sequence[torch.Generator], None]


def randn_like(x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """Standard normal noise shaped like x [B, ...].

    `generator` is None (global RNG), one torch.Generator (drawn as one tensor, as diffusers' randn_tensor does),
    or a list of B generators (sample b drawn from generator[b], so it does not depend on the batch it sits in).
    Noise is drawn on the generator's device and moved to x's device, so CPU generators drive CUDA runs.
    """
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; pass one per sample")
    return torch.cat(
        [torch.randn((1,) + x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in generator]
    ).to(x.device)


def rand(batch: int, generator: Generator = None, device=None) -> torch.Tensor:
    """U[0, 1) samples [batch] in fp32 (e.g. training timesteps), with the generator semantics of `randn_like`."""
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else device
        return torch.rand(batch, generator=generator, device=dev).to(device)
    if len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch}; pass one per sample")
    return torch.cat([torch.rand(1, generator=g, device=g.device) for g in generator]).to(device)


def randn(batch: int, generator: Generator = None, device=None) -> torch.Tensor:
    """N(0, 1) samples [batch] in fp32 (e.g. log-normal noise levels), with the semantics of `randn_like`."""
    return randn_like(torch.empty(batch, device=device), generator)
