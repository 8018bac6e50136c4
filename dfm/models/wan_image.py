"""The image conditioning of Wan's image-to-video and first-last-frame models (Wan 2.1 I2V / FLF2V), as
diffusers' `WanImageEmbedding` and the added k/v of `WanAttention` (original Wan: `img_emb`, `k_img`, `v_img`).

    image tokens  c_img = LN2(W2 GELU(W1 LN1(clip + pos)))        clip: CLIP's penultimate hidden state [B, N, Di]
    cross-attn    out = O(Attn(q, k_text, v_text) + Attn(q, RMS(K_img c_img), V_img c_img))

q is the text branch's query (normed once); the image keys have their own RMS norm, the values none. For FLF2V
the first and last frames' tokens are concatenated (N = 2 x 257) and `pos` is a learned [1, N, Di] table.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import CrossAttention, LayerNorm, RMSNorm, sdpa

_14B = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)
FAMILY_CONFIGS = {  # WanConfig fields of the released models beyond text-to-video (wan.WAN_CONFIGS holds them)
    # Wan2.1-I2V-14B-480P/720P-Diffusers: CLIP image cross-attention, 16 noise + 20 condition channels
    "14B-I2V": dict(_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
    # Wan2.1-FLF2V-14B-720P-Diffusers: first and last frame, 2 x 257 image tokens with a position table
    "14B-FLF2V": dict(_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120, pos_embed_seq_len=514),
    # Wan2.2-I2V-A14B-Diffusers, each of transformer/ and transformer_2/ (no CLIP; T2V-A14B's experts are "14B")
    "A14B-I2V": dict(_14B, in_channels=36),
    # Wan2.2-TI2V-5B-Diffusers: 48-channel VAE latents, per-token timesteps in the pipeline
    "5B": dict(num_attention_heads=24, attention_head_dim=128, ffn_dim=14336, num_layers=30, in_channels=48,
               out_channels=48),
}


class ImageEmbedder(nn.Module):
    """CLIP image features [B, N, image_dim] -> image context tokens [B, N, dim] (fp32 norms, eps 1e-5 as
    diffusers' FP32LayerNorm)."""

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None = None):
        super().__init__()
        self.norm1 = LayerNorm(image_dim, 1e-5, elementwise_affine=True)
        self.fc1 = nn.Linear(image_dim, image_dim)
        self.fc2 = nn.Linear(image_dim, dim)
        self.norm2 = LayerNorm(dim, 1e-5, elementwise_affine=True)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, image_dim)) if pos_embed_seq_len else None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        dtype = self.fc1.weight.dtype
        if self.pos_embed is not None:
            if image.shape[1] != self.pos_embed.shape[1]:
                raise ValueError(f"image context has {image.shape[1]} tokens; this first-last-frame model takes "
                                 f"{self.pos_embed.shape[1]} (the first and the last frame's CLIP tokens)")
            image = image.float() + self.pos_embed.float()  # [B, N, Di]
        h = self.norm1(image).to(dtype)
        h = self.fc2(F.gelu(self.fc1(h)))  # exact GELU (diffusers FeedForward "gelu")
        return self.norm2(h).to(dtype)  # [B, N, D]


class ImageCrossAttention(CrossAttention):
    """Text cross-attention plus the image branch: `add_kv` (fused add_k_proj / add_v_proj) and `norm_added_k`."""

    def __init__(self, dim: int, heads: int, image_context_dim: int, eps: float = 1e-6):
        super().__init__(dim, heads, qk_norm=True, eps=eps)
        self.add_kv = nn.Linear(image_context_dim, 2 * dim)
        self.norm_added_k = RMSNorm(dim, eps)

    def forward(self, x, context, context_mask=None, image_context=None):
        """x [B, L, D], context [B, Lc, D], image_context [B, N, D] (embedded) -> [B, L, D]."""
        if image_context is None:
            raise ValueError("this Wan model is image-conditioned: pass image_context (CLIP image features)")
        k, v = self.kv(context).chunk(2, dim=-1)  # 2 x [B, Lc, D]
        q = self.norm_q(self.q(x)).type_as(v)  # [B, L, D]
        k = self.norm_k(k).type_as(v)
        k_img, v_img = self.add_kv(image_context).chunk(2, dim=-1)  # 2 x [B, N, D]
        k_img = self.norm_added_k(k_img).type_as(v_img)
        q, k, v, k_img, v_img = (t.unflatten(-1, (self.heads, -1)) for t in (q, k, v, k_img, v_img))
        mask = keep = None
        if context_mask is not None:
            keep = context_mask.bool().any(-1)  # [B]
            mask = (context_mask.bool() | ~keep[:, None])[:, None, None, :]  # [B, 1, 1, Lc]
        text = sdpa(q, k, v, mask).flatten(2)  # [B, L, D]
        if keep is not None:
            text = text * keep[:, None, None].to(text.dtype)
        return self.out(text + sdpa(q, k_img, v_img).flatten(2))  # [B, L, D]
