"""The sampler contract shared by samplers.py, flow_samplers.py and multistep.py: grid checks, precision, lookup.

Kept apart so that the three sampler modules can share it without importing each other.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

Tensor = torch.Tensor


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a sampler keeps its state in: float32 at least (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def grid_floats(grid: Tensor, name: str = "sigmas") -> list[float]:
    """A 1-D descending time grid as float64 Python numbers, checked (one host sync per run)."""
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"{name} must be a 1-D tensor of at least 2 values, got shape {tuple(grid.shape)}")
    values = grid.detach().to("cpu", torch.float64).tolist()
    if any(a <= b for a, b in zip(values, values[1:])) or values[-1] < 0:
        raise ValueError(f"{name} must be strictly descending and end at >= 0, got {values}")
    return values


def resolve(table: dict[str, Callable], method: str, options: dict, kind: str = "sampler") -> Callable:
    """table[method], or a one-line ValueError naming the valid methods / options."""
    if method not in table:
        raise ValueError(f"unknown {kind} {method!r}; use one of: {', '.join(sorted(table))}")
    fn = table[method]
    params = inspect.signature(fn).parameters
    valid = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in ("generator", "callback")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        takes = f"its options are: {', '.join(valid)}" if valid else "it takes no options"
        raise ValueError(f"{kind} {method!r} has no option {', '.join(map(repr, unknown))}; {takes}")
    return fn
