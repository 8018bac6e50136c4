"""DiT for video: the diffusion transformer of Peebles & Xie 2023 ("Scalable Diffusion Models with
Transformers") on 3D patches, the primary backbone for EDM.

    net = DiT(dataclasses.replace(DIT_CONFIGS["B"], in_channels=16, context_dim=4096, attention="factorized"))
    F_x = net(x, c_noise, context=text, context_mask=mask, fps=fps)      # x [B, C, F, H, W] -> [B, C_out, F, H, W]

It knows nothing of the diffusion paradigm: `dfm.diffusion.edm` preconditioning calls `net(x_in, c_noise, **cond)`.
The noise level c_noise [B] enters through a sinusoidal embedding (c_noise * c_noise_scale; scale 1 gives
EDM's ADM for c_noise = ln(sigma)/4 and DiT for c_noise in 0..999), optionally plus mean-pooled text and an fps
embedding, and conditions every block through adaLN-Zero (or adaLN-LoRA). Per block:

    x = x + gate1 * SelfAttn(LN(x) * (1 + scale1) + shift1)      pattern: full | causal | spatial/temporal
    x = x + CrossAttn(LN_affine(x), text)                        (zero-initialised output: identity at init)
    x = x + gate2 * MLP(LN(x) * (1 + scale2) + shift2)

"factorized" alternates spatial (even blocks) and temporal (odd blocks) attention (Latte, variant 1).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .layers import (
    MLP,
    AdaLN,
    CrossAttention,
    LayerNorm,
    PatchEmbed3d,
    SelfAttention,
    TimestepEmbedder,
    cast_keeping_fp32,
    check_patchable,
    gated_add,
    modulate,
    run_blocks,
    sincos_pos_embed_3d,
    unpatchify,
)
from .rope import rope_3d

ATTENTION = ("full", "factorized", "causal")
POSITION = ("rope", "sincos")


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 4
    out_channels: int | None = None  # None: same as in_channels
    patch_size: tuple[int, int, int] = (1, 2, 2)
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    context_dim: int | None = None  # text token width; None: no cross-attention
    attention: str = "full"  # "full" | "factorized" | "causal"
    position: str = "rope"  # "rope" | "sincos"
    adaln_lora_rank: int | None = None  # None: adaLN-Zero; r: adaLN-LoRA with rank r
    pooled_text: bool = False  # add the mask-aware mean of the text tokens to the conditioning
    fps_embedding: bool = False
    qk_norm: bool = True
    freq_dim: int = 256
    c_noise_scale: float = 1.0
    rope_theta: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self):
        if self.attention not in ATTENTION:
            raise ValueError(f"attention={self.attention!r}; choose one of {ATTENTION}")
        if self.position not in POSITION:
            raise ValueError(f"position={self.position!r}; choose one of {POSITION}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.pooled_text and self.context_dim is None:
            raise ValueError("pooled_text needs context_dim")


# depth / width / heads as in DiT Table 1 (S, B, L, XL); "tiny" for tests
DIT_CONFIGS: dict[str, DiTConfig] = {
    "tiny": DiTConfig(dim=64, depth=2, heads=4, freq_dim=64),
    "S": DiTConfig(dim=384, depth=12, heads=6),
    "B": DiTConfig(dim=768, depth=12, heads=12),
    "L": DiTConfig(dim=1024, depth=24, heads=16),
    "XL": DiTConfig(dim=1152, depth=28, heads=16),
}

KEEP_FP32 = ("t_embedder", "fps_embedder", "adaln", "norm")


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, pattern: str):
        super().__init__()
        self.pattern = pattern
        self.norm1 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.attn = SelfAttention(cfg.dim, cfg.heads, qk_norm=cfg.qk_norm, eps=cfg.eps)
        self.cross_attn = self.norm_cross = None
        if cfg.context_dim is not None:
            self.norm_cross = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)
            self.cross_attn = CrossAttention(cfg.dim, cfg.heads, cfg.context_dim, qk_norm=cfg.qk_norm, eps=cfg.eps)
        self.norm2 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.mlp = MLP(cfg.dim, int(cfg.dim * cfg.mlp_ratio), act="gelu_tanh")
        self.adaln = AdaLN(cfg.dim, cfg.dim, 6, cfg.adaln_lora_rank)

    def forward(self, x, c, grid, rope=None, context=None, context_mask=None, adaln_shared=None):
        """x [B, L, D] fp32 residual stream, c [B, D] fp32 conditioning -> [B, L, D]."""
        dtype = self.mlp.fc1.weight.dtype
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c, adaln_shared).chunk(6, dim=1)  # 6 x [B, 1, D] fp32
        h = modulate(self.norm1(x), shift1, scale1).to(dtype)
        x = gated_add(x, self.attn(h, rope, self.pattern, grid), gate1)
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.norm_cross(x).to(dtype), context, context_mask)
        h = modulate(self.norm2(x), shift2, scale2).to(dtype)
        return gated_add(x, self.mlp(h), gate2)


class FinalLayer(nn.Module):
    """LN, adaLN modulation (shift, scale), zero-initialised Linear to patch pixels (DiT)."""

    def __init__(self, cfg: DiTConfig, out_features: int):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.adaln = AdaLN(cfg.dim, cfg.dim, 2)
        self.linear = nn.Linear(cfg.dim, out_features)

    def forward(self, x, c):
        shift, scale = self.adaln(c).chunk(2, dim=1)  # 2 x [B, 1, D] fp32
        return self.linear(modulate(self.norm(x), shift, scale).to(self.linear.weight.dtype))


class DiT(nn.Module):
    def __init__(self, config: DiTConfig | str = "tiny"):
        super().__init__()
        cfg = DIT_CONFIGS[config] if isinstance(config, str) else config
        self.config = cfg
        out_channels = cfg.out_channels or cfg.in_channels
        self.patch_embed = PatchEmbed3d(cfg.in_channels, cfg.dim, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(cfg.freq_dim, cfg.dim)
        self.fps_embedder = TimestepEmbedder(cfg.freq_dim, cfg.dim) if cfg.fps_embedding else None
        self.pooled_proj = MLP(cfg.context_dim, cfg.dim, cfg.dim, act="silu") if cfg.pooled_text else None
        # adaLN-LoRA: the full-rank part of the modulation, shared by all blocks
        self.adaln_shared = AdaLN(cfg.dim, cfg.dim, 6) if cfg.adaln_lora_rank else None
        patterns = {"full": ["full"], "causal": ["causal"], "factorized": ["spatial", "temporal"]}[cfg.attention]
        self.blocks = nn.ModuleList(DiTBlock(cfg, patterns[i % len(patterns)]) for i in range(cfg.depth))
        self.final = FinalLayer(cfg, out_channels * math.prod(cfg.patch_size))
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self):
        """DiT's initialisation: Xavier-uniform linears with zero bias, N(0, 0.02) time MLP, zero adaLN
        (done in AdaLN), zero final projection and zero cross-attention output (blocks start as identities)."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and not any(m is a for a in self._zero_init_linears()):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for emb in (self.t_embedder, self.fps_embedder):
            if emb is not None:
                nn.init.normal_(emb.fc1.weight, std=0.02)
                nn.init.normal_(emb.fc2.weight, std=0.02)
        if self.fps_embedder is not None:  # fps starts as "no information"
            nn.init.zeros_(self.fps_embedder.fc2.weight)
            nn.init.zeros_(self.fps_embedder.fc2.bias)
        for m in self._zero_init_linears():
            nn.init.zeros_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _zero_init_linears(self):
        zero = [self.final.linear, self.final.adaln.proj]
        for block in self.blocks:
            if block.cross_attn is not None:
                zero.append(block.cross_attn.out)
            zero.append(block.adaln.proj if hasattr(block.adaln, "proj") else block.adaln.up)
        if self.adaln_shared is not None:
            zero.append(self.adaln_shared.proj)
        return zero

    def forward(self, x, c_noise, context=None, context_mask=None, fps=None):
        """x [B, C, F, H, W], c_noise [B] (or scalar), context [B, Lc, context_dim], context_mask [B, Lc] bool,
        fps [B] -> [B, C_out, F, H, W] in x's dtype."""
        cfg = self.config
        B = x.shape[0]
        grid = check_patchable(x.shape, cfg.patch_size)  # (F', H', W')
        dtype = self.final.linear.weight.dtype
        h = self.patch_embed(x).float()  # [B, L, D] fp32 residual stream
        rope = None
        if cfg.position == "rope":
            rope = rope_3d(grid, cfg.dim // cfg.heads, cfg.rope_theta, device=x.device)  # [L, hd/2] complex, fp32
        else:
            h = h + sincos_pos_embed_3d(grid, cfg.dim, device=x.device)  # [B, L, D]
        # fp32 conditioning vector
        c_noise = torch.as_tensor(c_noise, device=x.device).float().reshape(-1).expand(B)  # [B]
        c = self.t_embedder(c_noise * cfg.c_noise_scale)  # [B, D]
        if self.fps_embedder is not None and fps is not None:
            fps = torch.as_tensor(fps, device=x.device).float().reshape(-1).expand(B)  # [B]
            c = c + self.fps_embedder(fps)
        if context is not None:
            context = context.to(dtype)
            if self.pooled_proj is not None:
                c = c + self.pooled_proj(masked_mean(context, context_mask)).float()
        shared = self.adaln_shared(c).flatten(1) if self.adaln_shared is not None else None  # [B, 6D]
        h = run_blocks(self.blocks, h, c, grid, rope, context, context_mask, shared,
                       checkpointing=self.gradient_checkpointing)
        out = self.final(h, c)  # [B, L, pt*ph*pw*C_out]
        return unpatchify(out, cfg.patch_size, grid).to(x.dtype)  # [B, C_out, F, H, W]

    def cast(self, dtype: torch.dtype) -> "DiT":
        """Cast to `dtype`, keeping the time/fps embedders, adaLN and norms in fp32."""
        return cast_keeping_fp32(self, dtype, KEEP_FP32)

    def compile_blocks(self, **kwargs) -> "DiT":
        for block in self.blocks:
            block.compile(**kwargs)
        return self


def masked_mean(context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens: context [B, Lc, D], mask [B, Lc] bool or None -> [B, D] (zeros if none)."""
    if mask is None:
        return context.mean(1)
    w = mask.to(context.dtype)[..., None]  # [B, Lc, 1]
    return (context * w).sum(1) / w.sum(1).clamp_min(1)


def config(name: str, **overrides) -> DiTConfig:
    """A registry size with fields replaced, e.g. config("B", in_channels=16, attention="causal")."""
    return dataclasses.replace(DIT_CONFIGS[name], **overrides)
