"""The layer library shared by DiT and WAN.

Video tokens are kept as a sequence [B, L, D] in (f, h, w) order, L = F*H*W after patchify. Attention goes
through `torch.nn.functional.scaled_dot_product_attention` with one of these patterns:

    full            every token sees every token
    causal          frame-causal: a token sees the tokens of its own and of earlier frames
    spatial         a token sees the tokens of its own frame        } "factorized" attention alternates them
    temporal        a token sees the tokens at its own (h, w) position } (Latte, Ma et al. 2024, variant 1)
    window          a token sees the tokens of its (t, h, w) block of the grid    } local attention; alternating
    shifted_window  the same with the blocks moved by half a window (Swin)        } them links neighbouring blocks

Token merging and splitting (`merge_tokens`, `TokenMerge`, `TokenSplit`) move a sequence between grids of
different resolution, for the hourglass DiT (Crowson et al. 2024).

Precision: timestep embeddings, modulation (shift/scale/gate), norms and RoPE are computed in fp32 even when
the weights are bf16; lines that do so say "fp32". `cast_keeping_fp32` casts a model to bf16 except for
the small parameters those paths use.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfm.errors import UserError

from .rope import apply_rope

PATTERNS = ("full", "causal", "spatial", "temporal", "window", "shifted_window")


class VideoShapeError(UserError, ValueError):
    """A video (or latent) size the model cannot cut into its patches, merges or attention windows."""


# ----------------------------------------------------------------------------------------------- attention


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention on [B, L, heads, head_dim] tensors -> [B, Lq, heads, head_dim]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2)  # [B, Lq, heads, head_dim]


def frame_causal_mask(grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """Boolean [L, L] mask, True where query token i may see key token j: frame(j) <= frame(i). ("causal"
    attention computes the same thing frame by frame without materialising it.)"""
    f, h, w = grid
    frame = torch.arange(f, device=device).repeat_interleave(h * w)  # [L] frame index of each token
    return frame[:, None] >= frame[None, :]  # [L, L]


def attention(q, k, v, pattern: str = "full", grid: tuple[int, int, int] | None = None, attn_mask=None,
              window: tuple[int, int, int] | None = None):
    """Self-attention of video tokens with a pattern. q, k, v: [B, L, heads, head_dim], L = F*H*W in (f, h, w)
    order; returns [B, L, heads, head_dim]. `attn_mask` is only used by "full", `window` (t, h, w) only by the
    window patterns."""
    if pattern == "full":
        return sdpa(q, k, v, attn_mask)
    if pattern not in PATTERNS:
        raise ValueError(f"unknown attention pattern {pattern!r}; choose one of {PATTERNS}")
    if grid is None:
        raise ValueError(f"attention pattern {pattern!r} needs the token grid (F, H, W)")
    if pattern in ("window", "shifted_window"):
        if window is None:
            raise ValueError(f"attention pattern {pattern!r} needs a window size (t, h, w)")
        return window_attention(q, k, v, grid, window, shifted=pattern == "shifted_window")
    B, L = q.shape[:2]
    f, h, w = grid
    if pattern == "causal":  # query frame i against key frames 0..i: no [L, L] mask, half the FLOPs of full
        n = h * w
        return torch.cat([sdpa(q[:, i * n:(i + 1) * n], k[:, :(i + 1) * n], v[:, :(i + 1) * n]) for i in range(f)],
                         dim=1)  # [B, L, heads, head_dim]
    if pattern == "spatial":
        fold = lambda t: t.reshape(B * f, h * w, *t.shape[2:])  # [B*F, H*W, heads, head_dim]
        return sdpa(fold(q), fold(k), fold(v)).reshape(q.shape)  # [B, L, heads, head_dim]
    # temporal
    fold = lambda t: t.unflatten(1, (f, h * w)).transpose(1, 2).reshape(B * h * w, f, *t.shape[2:])  # [B*HW, F, heads, hd]
    out = sdpa(fold(q), fold(k), fold(v))  # [B*H*W, F, heads, head_dim]
    return out.reshape(B, h * w, f, *out.shape[2:]).transpose(1, 2).reshape(q.shape)  # [B, L, heads, head_dim]


def window_size(grid: tuple[int, int, int], window: tuple[int, int, int]) -> tuple[int, int, int]:
    """The attention window on a token grid: each side of `window` clipped to the grid; the grid must then be a
    whole number of windows (else VideoShapeError)."""
    win = tuple(min(a, n) for a, n in zip(window, grid))
    if any(n % a for a, n in zip(win, grid)):
        raise VideoShapeError(f"the token grid (F, H, W) = {tuple(grid)} is not a whole number of attention windows "
                              f"{win}; use a video size whose token grid is divisible by the window, or change it")
    return win


def shifted_window_mask(grid, win, shift, device=None) -> torch.Tensor:
    """Boolean [nW, 1, N, N] mask of shifted-window attention (Swin, Liu et al. 2021, §3.2 "efficient batch
    computation"), N = tokens per window: True where two tokens of a window were also neighbours before the cyclic
    shift. Along an axis of n tokens, window a and shift s, the shifted positions fall into the runs [0, n-a),
    [n-a, n-s) and [n-s, n) (the last holds the tokens that wrapped around); tokens attend when their runs agree on
    every axis."""
    runs = []
    for n, a, s in zip(grid, win, shift):
        run = torch.zeros(n, dtype=torch.long, device=device)  # [n]
        if s:
            run[n - a:n - s], run[n - s:] = 1, 2
        runs.append(run)
    region = runs[0][:, None, None] * 9 + runs[1][None, :, None] * 3 + runs[2][None, None, :]  # [F, H, W]
    (f, h, w), (wt, wh, ww) = grid, win
    region = region.reshape(f // wt, wt, h // wh, wh, w // ww, ww).permute(0, 2, 4, 1, 3, 5)  # [nt, nh, nw, wt, wh, ww]
    region = region.reshape(-1, wt * wh * ww)  # [nW, N]
    return (region[:, :, None] == region[:, None, :])[:, None]  # [nW, 1, N, N]


def window_attention(q, k, v, grid, window, shifted: bool = False):
    """Attention inside non-overlapping 3D blocks of the token grid (Swin, Liu et al. 2021; Video Swin, Liu et al.
    2022): q, k, v [B, L, heads, head_dim] on grid (F, H, W) -> [B, L, heads, head_dim].

    The grid is cut into windows of (t, h, w) tokens (`window_size`: clipped to the grid) that become batch
    entries of one SDPA call, so the cost is O(L * t*h*w) instead of O(L^2). `shifted` first rolls the grid back by
    half a window along every axis with more than one window and masks the pairs the roll wrapped around
    (`shifted_window_mask`); alternating plain and shifted blocks lets information cross window borders. RoPE is
    applied before (by the caller), so relative positions stay those of the unshifted grid.
    """
    B, L, heads, hd = q.shape
    f, h, w = grid
    wt, wh, ww = win = window_size(grid, window)
    nt, nh, nw = f // wt, h // wh, w // ww
    shift = tuple(a // 2 if shifted and a < n else 0 for a, n in zip(win, grid))

    def fold(t):  # [B, L, heads, hd] -> [B*nW, heads, N, hd] (4D: the fused CPU kernel takes only 4D)
        t = t.reshape(B, f, h, w, heads, hd)
        if any(shift):
            t = t.roll([-s for s in shift], dims=(1, 2, 3))
        t = t.reshape(B, nt, wt, nh, wh, nw, ww, heads, hd)
        t = t.permute(0, 1, 3, 5, 7, 2, 4, 6, 8)  # [B, nt, nh, nw, heads, wt, wh, ww, hd]
        return t.reshape(B * nt * nh * nw, heads, wt * wh * ww, hd)  # [B*nW, heads, N, hd]

    mask = None
    if any(shift):
        mask = shifted_window_mask(grid, win, shift, q.device).repeat(B, 1, 1, 1)  # [B*nW, 1, N, N]
    out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), attn_mask=mask)  # [B*nW, heads, N, hd]
    out = out.reshape(B, nt, nh, nw, heads, wt, wh, ww, hd)
    out = out.permute(0, 1, 5, 2, 6, 3, 7, 4, 8)  # [B, nt, wt, nh, wh, nw, ww, heads, hd]
    out = out.reshape(B, f, h, w, heads, hd)
    if any(shift):
        out = out.roll(shift, dims=(1, 2, 3))
    return out.reshape(B, L, heads, hd)  # [B, L, heads, head_dim]


class SelfAttention(nn.Module):
    """Multi-head self-attention: one fused q/k/v projection, RMS qk-norm across all heads (Wan; Dehghani et
    al. 2023 "Scaling ViT to 22B" for qk-norm), optional RoPE, an attention pattern, an output projection."""

    context_parallel = None  # a dfm.models.context_parallel.ContextParallel: x holds this rank's tokens only

    def __init__(self, dim: int, heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.out = nn.Linear(dim, dim)

    def forward(self, x, rope=None, pattern: str = "full", grid=None, attn_mask=None, window=None):
        """x [B, L, D] (compute dtype), rope [L, head_dim/2] complex or None -> [B, L, D]."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x [B, L, D]
        q, k = self.norm_q(q).type_as(v), self.norm_k(k).type_as(v)  # fp32 norm, back to compute dtype
        q, k, v = (t.unflatten(-1, (self.heads, -1)) for t in (q, k, v))  # [B, L, heads, head_dim]
        if self.context_parallel is not None:  # this rank's tokens against the whole sequence
            return self.out(self.context_parallel.attention(q, k, v, rope, pattern, grid, attn_mask, window).flatten(2))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = attention(q, k, v, pattern, grid, attn_mask, window)  # [B, L, heads, head_dim]
        return self.out(out.flatten(2))  # [B, L, D]


class CrossAttention(nn.Module):
    """Attention from video tokens to text tokens, with a fused k/v projection and an optional padding mask."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context, context_mask=None):
        """x [B, L, D], context [B, Lc, Dc], context_mask [B, Lc] bool (True = a real token) or None -> [B, L, D].

        A sample whose mask has no True entry gets a zero output (no text, no text contribution)."""
        k, v = self.kv(context).chunk(2, dim=-1)  # 2 x [B, Lc, D]
        q = self.norm_q(self.q(x)).type_as(v)  # [B, L, D]
        k = self.norm_k(k).type_as(v)
        q, k, v = (t.unflatten(-1, (self.heads, -1)) for t in (q, k, v))  # [B, *, heads, head_dim]
        mask = keep = None
        if context_mask is not None:
            keep = context_mask.bool().any(-1)  # [B]
            mask = (context_mask.bool() | ~keep[:, None])[:, None, None, :]  # [B, 1, 1, Lc]
        out = self.out(sdpa(q, k, v, mask).flatten(2))  # [B, L, D]
        return out if keep is None else out * keep[:, None, None].to(out.dtype)


# --------------------------------------------------------------------------------------------------- norms


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32; returns fp32 (callers cast after modulating)."""

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)  # fp32


class RMSNorm(nn.RMSNorm):
    """RMSNorm (Zhang & Sennrich 2019) computed in fp32; returns fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps=eps, elementwise_affine=True)

    def forward(self, x):
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps)  # fp32


# -------------------------------------------------------------------------------------- AdaLN modulation


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, the adaptive norm of DiT (Peebles & Xie 2023, §3.2), in one fused op."""
    return torch.addcmul(shift, x, 1 + scale)


def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y, the gated residual of adaLN-Zero, in one fused op."""
    return torch.addcmul(x, y, gate)


def linear_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear in fp32 whatever the weights' dtype and the autocast state: the time path and the modulation stay
    fp32 under bf16 weights and under torch.autocast (Wan's reference runs them with autocast off)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


class AdaLN(nn.Module):
    """Maps a conditioning vector c [B, Dc] to n modulation vectors [B, n, D] (shift/scale/gate ...).

    adaLN-Zero (DiT): Linear(SiLU(c)) with zero-initialised weights, so every gate starts at 0 and each block
    starts as the identity. adaLN-LoRA (NVIDIA Cosmos, 2025): the full-rank projection is shared by all blocks
    (computed once by the model and passed in as `shared`) and each block adds a rank-r correction
    Up(Down(SiLU(c))), which saves most of adaLN's parameters.
    """

    def __init__(self, cond_dim: int, dim: int, n: int, lora_rank: int | None = None):
        super().__init__()
        self.n, self.dim = n, dim
        if lora_rank is None:
            self.proj = nn.Linear(cond_dim, n * dim)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            self.down = nn.Linear(cond_dim, lora_rank, bias=False)
            self.up = nn.Linear(lora_rank, n * dim, bias=False)
            nn.init.zeros_(self.up.weight)

    def forward(self, c: torch.Tensor, shared: torch.Tensor | None = None) -> torch.Tensor:
        # fp32: modulation is computed in fp32 from an fp32 c
        h = F.silu(c.float())
        if hasattr(self, "proj"):
            out = linear_fp32(h, self.proj.weight, self.proj.bias)  # [B, n*D]
        else:
            out = linear_fp32(linear_fp32(h, self.down.weight), self.up.weight)  # [B, n*D]
            if shared is not None:
                out = out + shared
        return out.unflatten(-1, (self.n, self.dim))  # [B, n, D]


# ---------------------------------------------------------------------------------------------- embeddings


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = True):
    """Sinusoidal embedding of a real-valued time (Vaswani et al. 2017 §3.5; DDPM): [B] -> [B, dim], fp32.

    Channel i < dim/2 uses frequency exp(-ln(max_period) * i / (dim/2)); the output is [cos, sin] when
    flip_sin_to_cos (Wan, diffusers' `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`)."""
    half = dim // 2
    # fp32 timesteps: never round a time to bf16 (it loses resolution near s = 1)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # [half]
    args = t.float()[:, None] * freqs[None, :]  # [B, half]
    emb = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    return torch.cat(emb, dim=-1)  # [B, dim]


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear (DiT, Wan), computed in fp32."""

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # fp32: the whole time path, with the weights upcast if the model was cast to bf16
        h = linear_fp32(timestep_embedding(t, self.freq_dim), self.fc1.weight, self.fc1.bias)
        return linear_fp32(F.silu(h), self.fc2.weight, self.fc2.bias)  # [B, dim]


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin(pos w_i), cos(pos w_i)] with w_i = 10000^(-2i/dim) (Vaswani et al. 2017): [N] -> [N, dim], fp32."""
    omega = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float32, device=pos.device) / (dim // 2))  # [dim/2]
    args = pos.float()[:, None] * omega[None, :]  # [N, dim/2]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # [N, dim]


def sincos_pos_embed_3d(grid: tuple[int, int, int], dim: int, device=None) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding (MAE/DiT's 2D version plus time): [F*H*W, dim] in (f, h, w) order.

    The channels are split as RoPE splits them: d_h = d_w = 2*(dim//6) ... rounded to even, d_t the rest."""
    f, h, w = grid
    d_hw = 2 * (dim // 6)
    d_t = dim - 2 * d_hw
    if d_t % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    e_t = sincos_1d(torch.arange(f, device=device), d_t)[:, None, None].expand(f, h, w, d_t)  # [F, H, W, d_t]
    e_h = sincos_1d(torch.arange(h, device=device), d_hw)[None, :, None].expand(f, h, w, d_hw)  # [F, H, W, d_hw]
    e_w = sincos_1d(torch.arange(w, device=device), d_hw)[None, None, :].expand(f, h, w, d_hw)  # [F, H, W, d_hw]
    return torch.cat([e_t, e_h, e_w], dim=-1).reshape(f * h * w, dim)  # [L, dim]


# ----------------------------------------------------------------------------------- patchify / unpatchify


def check_patchable(shape, patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """The token grid (F/pt, H/ph, W/pw) of a [B, C, F, H, W] shape, or a clear error."""
    f, h, w = shape[-3:]
    if f % patch[0] or h % patch[1] or w % patch[2]:
        raise VideoShapeError(f"video size (F, H, W) = {(f, h, w)} is not divisible by the patch size {tuple(patch)}")
    return f // patch[0], h // patch[1], w // patch[2]


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, L, pt*ph*pw*C], tokens in (f, h, w) order, features in (pt, ph, pw, C) order."""
    B, C = x.shape[:2]
    (f, h, w), (pt, ph, pw) = check_patchable(x.shape, patch), patch
    x = x.reshape(B, C, f, pt, h, ph, w, pw)  # [B, C, F', pt, H', ph, W', pw]
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, F', H', W', pt, ph, pw, C]
    return x.reshape(B, f * h * w, pt * ph * pw * C)  # [B, L, pt*ph*pw*C]


def unpatchify(x: torch.Tensor, patch: tuple[int, int, int], grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of `patchify`: [B, L, pt*ph*pw*C] -> [B, C, F, H, W]."""
    B = x.shape[0]
    (f, h, w), (pt, ph, pw) = grid, patch
    x = x.reshape(B, f, h, w, pt, ph, pw, -1)  # [B, F', H', W', pt, ph, pw, C]
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F', pt, H', ph, W', pw]
    return x.reshape(B, x.shape[1], f * pt, h * ph, w * pw)  # [B, C, F, H, W]


class PatchEmbed3d(nn.Conv3d):
    """3D patch embedding: a Conv3d with stride = kernel (its parameters keep the Conv3d layout, so checkpoints
    load unchanged), evaluated as patchify + one matmul. [B, C, F, H, W] -> [B, L, D]."""

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int]):
        super().__init__(in_channels, dim, kernel_size=patch, stride=patch)
        self.patch = tuple(patch)

    def forward(self, x):
        w = self.weight.permute(0, 2, 3, 4, 1).flatten(1)  # [D, pt*ph*pw*C] in patchify's feature order
        return F.linear(patchify(x.to(w.dtype), self.patch), w, self.bias)  # [B, L, D]


# ------------------------------------------------------------------------------------ token merge / split


def merge_tokens(x: torch.Tensor, grid: tuple[int, int, int], factor: tuple[int, int, int]) -> torch.Tensor:
    """Merge each (mt, mh, mw) group of neighbouring tokens into one: [B, L, D] on grid (F, H, W) ->
    [B, L/m, m*D] on grid (F/mt, H/mh, W/mw), m = mt*mh*mw, features in (mt, mh, mw, D) order (`patchify` applied
    to the token grid)."""
    B, L, D = x.shape
    (f, h, w), (mt, mh, mw) = grid, factor
    if f % mt or h % mh or w % mw:
        raise VideoShapeError(f"token grid (F, H, W) = {tuple(grid)} is not divisible by the merge {tuple(factor)}")
    x = x.reshape(B, f // mt, mt, h // mh, mh, w // mw, mw, D)  # [B, F', mt, H', mh, W', mw, D]
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)  # [B, F', H', W', mt, mh, mw, D]
    return x.reshape(B, L // (mt * mh * mw), mt * mh * mw * D)  # [B, L', m*D]


def split_tokens(x: torch.Tensor, grid: tuple[int, int, int], factor: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of `merge_tokens`: [B, L', m*D] on the coarse grid (F', H', W') -> [B, L'*m, D] on the grid
    (F'*mt, H'*mh, W'*mw)."""
    B = x.shape[0]
    (f, h, w), (mt, mh, mw) = grid, factor
    x = x.reshape(B, f, h, w, mt, mh, mw, -1)  # [B, F', H', W', mt, mh, mw, D]
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7)  # [B, F', mt, H', mh, W', mw, D]
    return x.reshape(B, f * mt * h * mh * w * mw, -1)  # [B, L, D]


class TokenMerge(nn.Module):
    """Down one level of an hourglass (HDiT, Crowson et al. 2024, §3 "token merging"): `merge_tokens`, then a
    bias-free Linear(m*D_in -> D_out). [B, L, D_in] fp32 on `grid` -> [B, L/m, D_out] fp32."""

    def __init__(self, in_dim: int, out_dim: int, factor: tuple[int, int, int]):
        super().__init__()
        self.factor = tuple(factor)
        self.proj = nn.Linear(math.prod(self.factor) * in_dim, out_dim, bias=False)

    def forward(self, x, grid):
        x = merge_tokens(x, grid, self.factor).to(self.proj.weight.dtype)  # [B, L', m*D_in]
        return self.proj(x).float()  # [B, L', D_out], fp32 residual stream


class TokenSplit(nn.Module):
    """Up one level (HDiT's token splitting): a bias-free Linear(D_in -> m*D_out), then `split_tokens`.
    [B, L', D_in] fp32 on the coarse `grid` -> [B, L'*m, D_out] fp32 on the fine grid."""

    def __init__(self, in_dim: int, out_dim: int, factor: tuple[int, int, int]):
        super().__init__()
        self.factor = tuple(factor)
        self.proj = nn.Linear(in_dim, math.prod(self.factor) * out_dim, bias=False)

    def forward(self, x, grid):
        x = self.proj(x.to(self.proj.weight.dtype))  # [B, L', m*D_out]
        return split_tokens(x, grid, self.factor).float()  # [B, L, D_out], fp32 residual stream


# --------------------------------------------------------------------------------------------------- MLPs


class MLP(nn.Module):
    """Linear -> activation -> Linear; GELU with the tanh approximation by default (DiT, Wan, PixArt)."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, act: str = "gelu_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim or dim)
        if act not in ("gelu_tanh", "silu"):
            raise ValueError(f"unknown activation {act!r}")
        self.act = act

    def forward(self, x):
        h = self.fc1(x)
        h = F.gelu(h, approximate="tanh") if self.act == "gelu_tanh" else F.silu(h)
        return self.fc2(h)


# ------------------------------------------------------------------------------------------------- helpers


def cast_keeping_fp32(module: nn.Module, dtype: torch.dtype, keep_fp32: Iterable[str]) -> nn.Module:
    """Cast floating parameters to `dtype`, except those whose name contains one of `keep_fp32` (time
    embedders, modulation tables, norms): they stay fp32. In place; returns the module."""
    keep = tuple(keep_fp32)
    for name, p in module.named_parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.float32 if any(k in name for k in keep) else dtype)
    return module


def run_blocks(blocks: nn.ModuleList, x, *args, checkpointing: bool = False, **kwargs):
    """Apply blocks in order; with `checkpointing`, keep only each block's input and recompute the rest in the
    backward pass (activation checkpointing, Chen et al. 2016), one block at a time."""
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False, **kwargs)
        else:
            x = block(x, *args, **kwargs)
    return x
