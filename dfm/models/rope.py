"""3D rotary position embedding (RoPE) for video tokens, as Wan 2.1 uses it.

RoPE (Su et al. 2021, "RoFormer", eq. 34) rotates each consecutive channel pair (x[2i], x[2i+1]) of a
query/key by the angle ``pos * theta**(-2i/d)``; the dot product q.k then depends only on the relative
position. For video the head dimension is split in three and each part encodes one axis (Wan
`wan/modules/model.py` rope_params/rope_apply, diffusers `WanRotaryPosEmbed`):

    head_dim = d_t + d_h + d_w,   d_h = d_w = 2 * (head_dim // 6),   d_t = head_dim - d_h - d_w

Every table here is computed in fp32 on the device it is used on, when it is needed; there are no
buffers (float64 buffers, which Wan and diffusers keep, fail on devices without float64).
"""

from __future__ import annotations

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """The (t, h, w) split of the head dimension, each part even."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def rope_angles_1d(dim: int, length: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Angles ``pos * theta**(-2i/dim)`` for pos < length, i < dim/2: [length, dim/2], fp32."""
    # fp32 on purpose: positions are small integers, so the error is ~1 ulp of the angle
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)  # [dim/2]
    pos = torch.arange(length, dtype=torch.float32, device=device)  # [length]
    return torch.outer(pos, inv_freq)  # [length, dim/2]


def rope_3d(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Unit complex rotations for a (F, H, W) token grid in (f, h, w) order: [F*H*W, head_dim/2] complex64."""
    f, h, w = grid
    d_t, d_h, d_w = rope_axis_dims(head_dim)
    a_t = rope_angles_1d(d_t, f, theta, device)[:, None, None, :].expand(f, h, w, -1)  # [F, H, W, d_t/2]
    a_h = rope_angles_1d(d_h, h, theta, device)[None, :, None, :].expand(f, h, w, -1)  # [F, H, W, d_h/2]
    a_w = rope_angles_1d(d_w, w, theta, device)[None, None, :, :].expand(f, h, w, -1)  # [F, H, W, d_w/2]
    angles = torch.cat([a_t, a_h, a_w], dim=-1).reshape(f * h * w, head_dim // 2)  # [L, head_dim/2]
    return torch.polar(torch.ones_like(angles), angles)  # [L, head_dim/2] complex64


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x [B, L, heads, head_dim] by freqs [L, head_dim/2] (complex); same shape out.

    (x[2i] + i x[2i+1]) * e^{i angle} is the RoFormer rotation; one complex multiply forward and one backward.
    """
    # fp32: the rotation runs in complex64 even when x is bf16, then casts back
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, L, heads, head_dim/2] complex
    return torch.view_as_real(xc * freqs[:, None, :]).flatten(-2).type_as(x)  # [B, L, heads, head_dim]
