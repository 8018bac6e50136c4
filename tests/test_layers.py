import math

import pytest
import torch
import torch.nn.functional as F

from dfm.models import layers
from dfm.models.layers import (
    AdaLN,
    CrossAttention,
    LayerNorm,
    PatchEmbed3d,
    RMSNorm,
    SelfAttention,
    attention,
    frame_causal_mask,
    patchify,
    sdpa,
    sincos_pos_embed_3d,
    timestep_embedding,
    unpatchify,
)
from dfm.models.rope import apply_rope, rope_3d, rope_axis_dims

GRID = (3, 2, 4)  # (F, H, W) tokens
L = math.prod(GRID)


def qkv(seed=0, B=2, heads=2, hd=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, heads, hd, generator=g) for _ in range(3)]


def test_causal_attention_blocks_future_frames():
    torch.manual_seed(0)
    attn = SelfAttention(16, 2)
    x = torch.randn(1, L, 16, requires_grad=True)
    rope = rope_3d(GRID, 8)
    out = attn(x, rope, "causal", GRID)  # [1, L, 16]
    per_frame = GRID[1] * GRID[2]
    (grad,) = torch.autograd.grad(out[:, :per_frame].sum(), x, retain_graph=True)  # outputs of frame 0
    assert grad[:, per_frame:].abs().max() == 0  # frames 1, 2 do not reach frame 0
    assert grad[:, :per_frame].abs().max() > 0
    (grad,) = torch.autograd.grad(out[:, -per_frame:].sum(), x)  # outputs of frame 2 see every frame
    assert (grad.reshape(GRID[0], -1).abs().amax(-1) > 0).all()
    mask = frame_causal_mask(GRID)
    assert mask.shape == (L, L) and mask[0, per_frame] == 0 and mask[per_frame, 0] == 1


def test_causal_attention_equals_masked_attention():
    q, k, v = qkv(2)
    torch.testing.assert_close(attention(q, k, v, "causal", GRID), sdpa(q, k, v, frame_causal_mask(GRID)))


def test_spatial_attention_is_per_frame_attention():
    q, k, v = qkv()
    out = attention(q, k, v, "spatial", GRID)
    n = GRID[1] * GRID[2]
    for f in range(GRID[0]):
        s = slice(f * n, (f + 1) * n)
        torch.testing.assert_close(out[:, s], sdpa(q[:, s], k[:, s], v[:, s]))


def test_temporal_attention_is_per_position_attention():
    q, k, v = qkv(1)
    out = attention(q, k, v, "temporal", GRID)
    n = GRID[1] * GRID[2]
    for p in range(n):
        idx = torch.arange(GRID[0]) * n + p  # the same (h, w) in every frame
        torch.testing.assert_close(out[:, idx], sdpa(q[:, idx], k[:, idx], v[:, idx]))


def test_unknown_pattern_is_an_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="pattern"):
        attention(q, k, v, "diagonal", GRID)


def test_rope_fp32_matches_float64_reference():
    grid, hd = (21, 30, 52), 128  # Wan 2.1 1.3B at 480x832, 81 frames
    freqs = rope_3d(grid, hd)
    assert freqs.dtype == torch.complex64 and freqs.shape == (math.prod(grid), hd // 2)
    # float64 reference written independently: Wan's rope_params per axis, concatenated per token
    parts = []
    for axis, (n, d) in enumerate(zip(grid, rope_axis_dims(hd))):
        ang = torch.arange(n, dtype=torch.float64)[:, None] / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        parts.append(ang.reshape(shape).expand(*grid, d // 2))
    ref = torch.cat(parts, -1).reshape(-1, hd // 2)
    torch.testing.assert_close(freqs.real.double(), ref.cos(), atol=2e-6, rtol=0)
    torch.testing.assert_close(freqs.imag.double(), ref.sin(), atol=2e-6, rtol=0)
    assert rope_axis_dims(128) == (44, 42, 42)


def test_apply_rope_is_the_interleaved_pair_rotation():
    x = torch.randn(2, L, 3, 12)
    freqs = rope_3d(GRID, 12)
    out = apply_rope(x, freqs)
    # (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos) on pairs (2i, 2i+1), in float64
    cos, sin = freqs.real.double()[:, None], freqs.imag.double()[:, None]
    x1, x2 = x.double()[..., 0::2], x.double()[..., 1::2]
    ref = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-6)
    # a rotation: relative positions only -> q.k is invariant to a common shift of the frame index
    assert out.dtype == x.dtype


def test_patchify_round_trip_and_patch_embed_is_conv3d():
    x = torch.randn(2, 3, 4, 6, 8)
    p = (2, 2, 2)
    tokens = patchify(x, p)
    assert tokens.shape == (2, 2 * 3 * 4, 8 * 3)
    torch.testing.assert_close(unpatchify(tokens, p, (2, 3, 4)), x, rtol=0, atol=0)
    embed = PatchEmbed3d(3, 5, p)
    ref = F.conv3d(x, embed.weight, embed.bias, stride=p).flatten(2).transpose(1, 2)  # [B, L, D]
    torch.testing.assert_close(embed(x), ref)
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.randn(1, 3, 3, 6, 8), p)


def test_adaln_zero_starts_at_zero_and_lora_variant():
    c = torch.randn(3, 10)
    for rank in (None, 4):
        ada = AdaLN(10, 6, 4, lora_rank=rank)
        assert ada(c).shape == (3, 4, 6) and ada(c).abs().max() == 0
    ada = AdaLN(10, 6, 4, lora_rank=4)
    shared = torch.randn(3, 24)
    torch.testing.assert_close(ada(c, shared), shared.unflatten(1, (4, 6)))


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.5, 999.0, 417.25])
    ref = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 256), ref, rtol=0, atol=0)
    assert timestep_embedding(t.bfloat16(), 8).dtype == torch.float32


def test_sincos_3d_splits_axes():
    emb = sincos_pos_embed_3d(GRID, 24).reshape(*GRID, 24)
    d_hw = 2 * (24 // 6)
    d_t = 24 - 2 * d_hw
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb[0, 0, 0], torch.cat([torch.zeros(d_t // 2), torch.ones(d_t // 2)] * 1
                                                     + [torch.zeros(d_hw // 2), torch.ones(d_hw // 2)] * 2))
    # the time part depends on the frame only, the h part on the row only
    torch.testing.assert_close(emb[1, 0, 0, :d_t], emb[1, 1, 3, :d_t])
    assert not torch.allclose(emb[0, 0, 0, :d_t], emb[1, 0, 0, :d_t])
    torch.testing.assert_close(emb[0, 1, 0, d_t:d_t + d_hw], emb[2, 1, 3, d_t:d_t + d_hw])


def test_cross_attention_padding_mask():
    torch.manual_seed(0)
    attn = CrossAttention(16, 2, context_dim=6)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = attn(x, ctx, mask)
    torch.testing.assert_close(out[:1], attn(x[:1], ctx[:1, :2]))  # padding is invisible
    torch.testing.assert_close(out[1:], attn(x[1:], ctx[1:]))
    empty = attn(x, ctx, torch.zeros(2, 4, dtype=torch.bool))
    assert torch.isfinite(empty).all() and empty.abs().max() == 0  # no text: no contribution


def test_norms_compute_in_fp32():
    x = torch.randn(2, 5, 16).bfloat16()
    ln, rms = LayerNorm(16, 1e-6), RMSNorm(16, 1e-6)
    for norm in (ln, rms):
        assert norm(x).dtype == torch.float32
        torch.testing.assert_close(norm(x), norm(x.float()))
    torch.testing.assert_close(rms(x.float()), x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6))


def test_cast_keeping_fp32():
    m = torch.nn.ModuleDict({"norm": LayerNorm(4, elementwise_affine=True), "lin": torch.nn.Linear(4, 4)})
    layers.cast_keeping_fp32(m, torch.bfloat16, ("norm",))
    assert m["norm"].weight.dtype == torch.float32 and m["lin"].weight.dtype == torch.bfloat16


def test_run_blocks_checkpointing_same_gradients():
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(SelfAttention(16, 2) for _ in range(2))
    x = torch.randn(2, L, 16)
    grads = []
    for ckpt in (False, True):
        blocks.zero_grad()
        layers.run_blocks(blocks, x, checkpointing=ckpt).square().sum().backward()
        grads.append([p.grad.clone() for p in blocks.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
