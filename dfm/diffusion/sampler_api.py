"""The sampler contract shared by samplers.py, flow_samplers.py, multistep.py and schedules.py: grid checks,
precision, and the one error of an unknown sampler, grid or option.

Kept apart so that the sampler modules can share it without importing each other.
"""

from __future__ import annotations

import torch

from dfm.errors import UserError

Tensor = torch.Tensor


class SamplingError(UserError, ValueError):
    """An unknown sampler, grid or sampler option; the message is one line and lists the valid ones."""


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
