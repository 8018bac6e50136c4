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

Hourglass DiT (Crowson et al. 2024, "Scalable High-Resolution Pixel-Space Image Synthesis with Hourglass
Diffusion Transformers"; Tian et al. 2024, U-DiT): setting `depths` turns the same DiT into a U-shaped stack of
levels, finest first, with the same blocks, conditioning and cross-attention:

    level 0   depths[0] blocks ──────────── skip ─────────── lerp/linear -> depths[0] blocks -> final layer
                 │ TokenMerge (merge (t, h, w) tokens -> 1)                  ↑ TokenSplit
    level 1   depths[1] blocks ─────── skip ──── lerp/linear -> depths[1] blocks
                 │                                 ↑
    level n-1 (coarsest): depths[-1] blocks ───────┘

    net = DiT("hourglass-S")                                 # `DiT(cfg)` returns an HourglassDiT when depths is set
    net = DiT(config("S", depths=(2, 2, 3), widths=(256, 384, 512), merge=((1, 2, 2), (2, 2, 2))))

Fine levels attend locally ("window": Swin-style 3D windows, plain and shifted in turn; or "spatial") and the
coarsest one globally ("full", "factorized" or "causal"), so the cost of attention at high token counts is paid
only where there are few tokens. RoPE runs at every level on that level's integer grid.
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
    TokenMerge,
    TokenSplit,
    VideoShapeError,
    cast_keeping_fp32,
    check_patchable,
    gated_add,
    modulate,
    run_blocks,
    sincos_pos_embed_3d,
    unpatchify,
    window_size,
)
from .cache import run_stack
from .rope import rope_3d

ATTENTION = ("full", "factorized", "causal")
POSITION = ("rope", "sincos")
LEVEL_ATTENTION = ("full", "factorized", "causal", "spatial", "window")  # per hourglass level
SKIP = ("lerp", "linear")
# the block attention patterns (dfm.models.layers.attention) a level cycles through
LEVEL_PATTERNS = {"full": ("full",), "causal": ("causal",), "spatial": ("spatial",),
                  "factorized": ("spatial", "temporal"), "window": ("window", "shifted_window")}


def _int_tuple(v) -> tuple:
    """Lists from YAML/JSON as tuples, nested lists too (so configs stay hashable and compare equal)."""
    return tuple(_int_tuple(x) if isinstance(x, (list, tuple)) else x for x in v)


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 4
    out_channels: int | None = None  # None: same as in_channels
    patch_size: tuple[int, int, int] = (1, 2, 2)
    dim: int = 384
    depth: int = 12  # blocks of the flat DiT (an hourglass counts its blocks in `depths`)
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
    # hourglass DiT (HDiT, U-DiT): a non-empty `depths` replaces the flat stack of `depth` blocks
    depths: tuple[int, ...] = ()  # blocks per level, finest first; levels < n-1 run them down and again up
    widths: tuple[int, ...] = ()  # token width per level; () = dim everywhere; heads = width / (dim / heads)
    merge: tuple = (1, 2, 2)  # tokens (t, h, w) merged into one between levels: one triple, or one per step
    level_attention: tuple[str, ...] = ()  # per level, from LEVEL_ATTENTION; () = window, ..., `attention`
    window: tuple[int, int, int] = (2, 8, 8)  # "window" attention block in tokens (t, h, w), clipped to the grid
    skip: str = "lerp"  # up-path skip: "lerp" (HDiT: learned scalar lerp) | "linear" (U-ViT: Linear of concat)

    def __post_init__(self):
        for name in ("patch_size", "depths", "widths", "merge", "level_attention", "window"):
            if isinstance(getattr(self, name), (list, tuple)):  # YAML/JSON lists, nested ones too
                object.__setattr__(self, name, _int_tuple(getattr(self, name)))
        if self.attention not in ATTENTION:
            raise ValueError(f"attention={self.attention!r}; choose one of {ATTENTION}")
        if self.position not in POSITION:
            raise ValueError(f"position={self.position!r}; choose one of {POSITION}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.pooled_text and self.context_dim is None:
            raise ValueError("pooled_text needs context_dim")
        if self.depths:
            self._check_hourglass()
        elif self.widths or self.level_attention:
            raise ValueError("widths and level_attention configure an hourglass DiT; set depths too")

    def _check_hourglass(self):
        n, head_dim = len(self.depths), self.dim // self.heads
        if any(not isinstance(d, int) or d < 1 for d in self.depths):
            raise ValueError(f"depths={self.depths}: every level needs at least one block")
        if self.widths and len(self.widths) != n:
            raise ValueError(f"widths={self.widths} needs one width per level ({n}, as depths={self.depths})")
        if any(w % head_dim for w in self.level_widths):
            raise ValueError(f"widths={self.level_widths}: every width must be a multiple of the head dim "
                             f"{head_dim} (dim / heads)")
        if self.level_attention and len(self.level_attention) != n:
            raise ValueError(f"level_attention={self.level_attention} needs one entry per level ({n})")
        bad = [a for a in self.level_attentions if a not in LEVEL_ATTENTION]
        if bad:
            raise ValueError(f"level_attention {bad[0]!r}; choose from {LEVEL_ATTENTION}")
        merges = self.level_merges  # validates the shape
        if any(k < 1 for m in merges for k in m) or len(self.window) != 3 or min(self.window) < 1:
            raise ValueError(f"merge={self.merge} and window={self.window} need positive (t, h, w) triples")
        if self.skip not in SKIP:
            raise ValueError(f"skip={self.skip!r}; choose one of {SKIP}")
        if "causal" in self.level_attentions:  # nothing may carry information from later frames
            leaky = [a for a in self.level_attentions if a not in ("causal", "spatial", "window")]
            if leaky or any(m[0] != 1 for m in merges) or ("window" in self.level_attentions and self.window[0] != 1):
                raise ValueError("a causal hourglass needs every level causal, spatial or window with window t = 1, "
                                 f"and merges with t = 1; got level_attention={self.level_attentions}, "
                                 f"merge={merges}, window={self.window}")

    @property
    def hourglass(self) -> bool:
        return bool(self.depths)

    @property
    def level_widths(self) -> tuple[int, ...]:
        return tuple(self.widths) or (self.dim,) * max(len(self.depths), 1)

    @property
    def level_heads(self) -> tuple[int, ...]:
        """Heads per level: the head dim (dim / heads) is the same at every level."""
        return tuple(w // (self.dim // self.heads) for w in self.level_widths)

    @property
    def level_merges(self) -> tuple[tuple[int, int, int], ...]:
        """One (t, h, w) merge per step from level i to i+1."""
        steps = max(len(self.depths) - 1, 0)
        m = self.merge
        if len(m) == 3 and all(isinstance(k, int) for k in m):
            return (tuple(m),) * steps
        if len(m) != steps or any(len(k) != 3 for k in m):
            raise ValueError(f"merge={m}: give one (t, h, w) triple, or one per step between levels ({steps})")
        return tuple(tuple(k) for k in m)

    @property
    def level_attentions(self) -> tuple[str, ...]:
        n = len(self.depths)
        return tuple(self.level_attention) or ("window",) * (n - 1) + (self.attention,)


# depth / width / heads as in DiT Table 1 (S, B, L, XL); "tiny" for tests
DIT_CONFIGS: dict[str, DiTConfig] = {
    "tiny": DiTConfig(dim=64, depth=2, heads=4, freq_dim=64),
    "S": DiTConfig(dim=384, depth=12, heads=6),
    "B": DiTConfig(dim=768, depth=12, heads=12),
    "L": DiTConfig(dim=1024, depth=24, heads=16),
    "XL": DiTConfig(dim=1152, depth=28, heads=16),
    # hourglass sizes, within a few % of the parameters of the flat size they are named after
    "hourglass-tiny": DiTConfig(dim=64, heads=4, freq_dim=64, depths=(1, 1), widths=(32, 64), window=(2, 4, 4)),
    "hourglass-S": DiTConfig(dim=384, heads=6, depths=(2, 2, 3), widths=(256, 384, 512)),
    "hourglass-B": DiTConfig(dim=768, heads=12, depths=(2, 2, 3), widths=(512, 768, 1024)),
}

KEEP_FP32 = ("t_embedder", "fps_embedder", "adaln", "norm", "fac")


class DiTBlock(nn.Module):
    """One DiT block; `dim`/`heads` override the config's for the levels of an hourglass (its conditioning
    vector keeps the width cfg.dim)."""

    def __init__(self, cfg: DiTConfig, pattern: str, dim: int | None = None, heads: int | None = None):
        super().__init__()
        dim, heads = dim or cfg.dim, heads or cfg.heads
        self.pattern = pattern
        self.window = cfg.window if "window" in pattern else None
        self.norm1 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.attn = SelfAttention(dim, heads, qk_norm=cfg.qk_norm, eps=cfg.eps)
        self.cross_attn = self.norm_cross = None
        if cfg.context_dim is not None:
            self.norm_cross = LayerNorm(dim, cfg.eps, elementwise_affine=True)
            self.cross_attn = CrossAttention(dim, heads, cfg.context_dim, qk_norm=cfg.qk_norm, eps=cfg.eps)
        self.norm2 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.mlp = MLP(dim, int(dim * cfg.mlp_ratio), act="gelu_tanh")
        self.adaln = AdaLN(cfg.dim, dim, 6, cfg.adaln_lora_rank)

    def forward(self, x, c, grid, rope=None, context=None, context_mask=None, adaln_shared=None):
        """x [B, L, D] fp32 residual stream, c [B, D] (or per token [B, L, D]) fp32 conditioning -> [B, L, D]."""
        dtype = self.mlp.fc1.weight.dtype
        shift1, scale1, gate1, shift2, scale2, gate2 = _chunks(self.adaln(c, adaln_shared))  # 6 x [B, 1 or L, D] fp32
        h = modulate(self.norm1(x), shift1, scale1).to(dtype)
        x = gated_add(x, self.attn(h, rope, self.pattern, grid, window=self.window), gate1)
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.norm_cross(x).to(dtype), context, context_mask)
        h = modulate(self.norm2(x), shift2, scale2).to(dtype)
        return gated_add(x, self.mlp(h), gate2)


def _chunks(m: torch.Tensor):
    """AdaLN's [B, n, D] -> n x [B, 1, D]; per token [B, L, n, D] -> n x [B, L, D] (frame conditioning)."""
    return m.chunk(m.shape[1], dim=1) if m.ndim == 3 else m.unbind(2)


class FinalLayer(nn.Module):
    """LN, adaLN modulation (shift, scale), zero-initialised Linear to patch pixels (DiT)."""

    def __init__(self, cfg: DiTConfig, out_features: int, dim: int | None = None):
        super().__init__()
        dim = dim or cfg.dim
        self.norm = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.adaln = AdaLN(cfg.dim, dim, 2)
        self.linear = nn.Linear(dim, out_features)

    def forward(self, x, c):
        shift, scale = _chunks(self.adaln(c))  # 2 x [B, 1 or L, D] fp32
        return self.linear(modulate(self.norm(x), shift, scale).to(self.linear.weight.dtype))


class DiT(nn.Module):
    """The flat DiT; `DiT(cfg)` with `cfg.depths` set builds an `HourglassDiT` (same forward, same conditioning).

    The two differ only in the trunk between the patch embedding and the final layer (`_build_trunk`, `_trunk`)."""

    def __new__(cls, config: DiTConfig | str = "tiny", *args, **kwargs):
        cfg = DIT_CONFIGS[config] if isinstance(config, str) else config
        if cls is DiT and cfg.hourglass:
            cls = HourglassDiT
        return super().__new__(cls)

    def __init__(self, config: DiTConfig | str = "tiny"):
        super().__init__()
        cfg = DIT_CONFIGS[config] if isinstance(config, str) else config
        self.config = cfg
        out_channels = cfg.out_channels or cfg.in_channels
        width = cfg.level_widths[0]  # the finest level's (= dim for the flat DiT)
        self.patch_embed = PatchEmbed3d(cfg.in_channels, width, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(cfg.freq_dim, cfg.dim)
        self.fps_embedder = TimestepEmbedder(cfg.freq_dim, cfg.dim) if cfg.fps_embedding else None
        self.pooled_proj = MLP(cfg.context_dim, cfg.dim, cfg.dim, act="silu") if cfg.pooled_text else None
        self._build_trunk(cfg)
        self.final = FinalLayer(cfg, out_channels * math.prod(cfg.patch_size), width)
        self.gradient_checkpointing = False
        self.context_parallel = None  # dfm.models.context_parallel.enable_context_parallel: tokens split across ranks
        self.reset_parameters()

    def _build_trunk(self, cfg: DiTConfig):
        # adaLN-LoRA: the full-rank part of the modulation, shared by all blocks
        self.adaln_shared = AdaLN(cfg.dim, cfg.dim, 6) if cfg.adaln_lora_rank else None
        patterns = {"full": ["full"], "causal": ["causal"], "factorized": ["spatial", "temporal"]}[cfg.attention]
        self.blocks = nn.ModuleList(DiTBlock(cfg, patterns[i % len(patterns)]) for i in range(cfg.depth))

    def reset_parameters(self):
        """DiT's initialisation: Xavier-uniform linears with zero bias, N(0, 0.02) time MLP, zero adaLN
        (done in AdaLN), zero final projection and zero cross-attention output (blocks start as identities)."""
        zero = self._zero_init_linears()
        for m in self.modules():
            if isinstance(m, nn.Linear) and not any(m is a for a in zero):
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
        for m in zero:
            nn.init.zeros_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _zero_init_linears(self):
        zero = [self.final.linear]
        for block in self.blocks:
            if block.cross_attn is not None:
                zero.append(block.cross_attn.out)
        # adaLN-Zero: every modulation table (final layer, blocks, adaLN-LoRA's shared part) starts at zero
        zero += [m.proj if hasattr(m, "proj") else m.up for m in self.modules() if isinstance(m, AdaLN)]
        return zero

    def check_input(self, shape) -> tuple[int, int, int]:
        """The token grid (F', H', W') of a [B, C, F, H, W] input, or a VideoShapeError saying which sizes fit."""
        return check_patchable(shape, self.config.patch_size)

    def forward(self, x, c_noise, context=None, context_mask=None, fps=None):
        """x [B, C, F, H, W], c_noise [B] (or scalar; or per token [B, L]: image conditioning by frame, each token
        modulated by its own noise level), context [B, Lc, context_dim], context_mask [B, Lc] bool, fps [B]
        -> [B, C_out, F, H, W] in x's dtype."""
        cfg = self.config
        B = x.shape[0]
        grid = self.check_input(x.shape)  # (F', H', W')
        dtype = self.final.linear.weight.dtype
        h = self.patch_embed(x).float()  # [B, L, D] fp32 residual stream
        if cfg.position == "sincos":
            h = h + sincos_pos_embed_3d(grid, h.shape[-1], device=x.device)  # [B, L, D]
        # fp32 conditioning vector
        c_noise = torch.as_tensor(c_noise, device=x.device).float()
        c_noise = c_noise.reshape(-1).expand(B) if c_noise.ndim < 2 else c_noise  # [B], or [B, L] per token
        c = self.t_embedder(c_noise.flatten() * cfg.c_noise_scale).unflatten(0, c_noise.shape)  # [B, (L,) D]
        per_token = (lambda v: v[:, None]) if c.ndim == 3 else (lambda v: v)  # noqa: E731  [B, D] -> [B, 1, D]
        if self.fps_embedder is not None and fps is not None:
            fps = torch.as_tensor(fps, device=x.device).float().reshape(-1).expand(B)  # [B]
            c = c + per_token(self.fps_embedder(fps))
        if context is not None:
            context = context.to(dtype)
            if self.pooled_proj is not None:
                c = c + per_token(self.pooled_proj(masked_mean(context, context_mask)).float())
        if c.ndim == 3 and cfg.hourglass:
            raise ValueError("per-token noise levels need the flat DiT: an hourglass merges tokens")
        cp = self.context_parallel
        h = h if cp is None else cp.shard(h)  # [B, L/N, D] this rank's tokens
        c = c if cp is None or c.ndim == 2 else cp.shard(c)  # per token: [B, L/N, D], as h
        h = self._trunk(h, c, grid, context, context_mask)  # [B, L, D]
        out = self.final(h, c)  # [B, L, pt*ph*pw*C_out]
        out = out if cp is None else cp.gather(out, math.prod(grid))  # [B, L, pt*ph*pw*C_out] every rank's tokens
        return unpatchify(out, cfg.patch_size, grid).to(x.dtype)  # [B, C_out, F, H, W]

    def _rope(self, grid, device):
        """RoPE table of a token grid ([L, head_dim/2] complex, fp32), or None with sin-cos positions."""
        cfg = self.config
        if cfg.position != "rope":
            return None
        return rope_3d(grid, cfg.dim // cfg.heads, cfg.rope_theta, device=device)

    def _trunk(self, h, c, grid, context, context_mask):
        """The blocks: h [B, L, D] fp32, c [B, D] fp32 -> [B, L, D] fp32."""
        rope = self._rope(grid, h.device)
        shared = self.adaln_shared(c).flatten(-2) if self.adaln_shared is not None else None  # [B, (L,) 6D]
        run = lambda h, blocks=self.blocks: run_blocks(blocks, h, c, grid, rope, context, context_mask,  # noqa: E731
                                                     shared, checkpointing=self.gradient_checkpointing)
        return run_stack(self, h, run, (c, shared))  # through a step cache if one is attached

    def cast(self, dtype: torch.dtype) -> "DiT":
        """Cast to `dtype`, keeping the time/fps embedders, adaLN and norms in fp32."""
        return cast_keeping_fp32(self, dtype, KEEP_FP32)

    def compile_blocks(self, **kwargs) -> "DiT":
        for block in self.blocks:
            block.compile(**kwargs)
        return self


class SkipLerp(nn.Module):
    """HDiT's skip merge: lerp(skip, x, fac) = skip + fac * (x - skip), one learned scalar, 0.5 at init."""

    def __init__(self, dim: int):
        super().__init__()
        self.fac = nn.Parameter(torch.full((1,), 0.5))  # fp32 (KEEP_FP32)

    def forward(self, x, skip):
        return torch.lerp(skip, x, self.fac.float())


class SkipLinear(nn.Module):
    """U-ViT's long skip (Bao et al. 2023): Linear(concat[x, skip]) back to the width, [B, L, 2D] -> [B, L, D]."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, x, skip):
        h = torch.cat([x, skip], dim=-1).to(self.proj.weight.dtype)  # [B, L, 2D]
        return self.proj(h).float()  # fp32 residual stream


class HourglassDiT(DiT):
    """The hourglass DiT (see the module docstring); built by `DiT(cfg)` when `cfg.depths` is set.

    Levels i = 0..n-1, finest first, on token grids grid_i = grid_{i-1} / merge_{i-1}, width widths[i] and
    heads widths[i] / head_dim. Down: level i < n-1 runs its `down[i]` blocks, keeps the result as a skip and
    merges tokens (`merges[i]`); the coarsest level runs `mid`; up: `splits[i]` splits the tokens back to grid_i,
    `skips[i]` merges in the skip, `up[i]` runs depths[i] more blocks (continuing the level's alternation of
    plain/shifted windows or spatial/temporal attention, so a level of depth 1 still gets both). Every block is a
    DiTBlock with its own adaLN from the one conditioning vector c [B, dim]; adaLN-LoRA shares one full-rank table
    per level.
    """

    def _build_trunk(self, cfg: DiTConfig):
        n, widths, heads = len(cfg.depths), cfg.level_widths, cfg.level_heads

        def stack(i, first=0):  # the blocks of level i; patterns alternate from pattern number `first`
            patterns = LEVEL_PATTERNS[cfg.level_attentions[i]]
            return nn.ModuleList(DiTBlock(cfg, patterns[(first + j) % len(patterns)], widths[i], heads[i])
                                 for j in range(cfg.depths[i]))

        self.adaln_shared = (nn.ModuleList(AdaLN(cfg.dim, w, 6) for w in widths) if cfg.adaln_lora_rank else None)
        self.down = nn.ModuleList(stack(i) for i in range(n - 1))
        self.merges = nn.ModuleList(TokenMerge(widths[i], widths[i + 1], m) for i, m in enumerate(cfg.level_merges))
        self.mid = stack(n - 1)
        self.splits = nn.ModuleList(TokenSplit(widths[i + 1], widths[i], m) for i, m in enumerate(cfg.level_merges))
        skip = {"lerp": SkipLerp, "linear": SkipLinear}[cfg.skip]
        self.skips = nn.ModuleList(skip(widths[i]) for i in range(n - 1))
        self.up = nn.ModuleList(stack(i, first=cfg.depths[i]) for i in range(n - 1))  # continue the alternation

    @property
    def blocks(self) -> list[DiTBlock]:
        """Every block in the order they run (for FSDP wrapping, compilation and checkpointing)."""
        return [*(b for level in self.down for b in level), *self.mid, *(b for level in self.up[::-1] for b in level)]

    def reset_parameters(self):
        super().reset_parameters()
        for skip in self.skips:
            if isinstance(skip, SkipLerp):
                nn.init.constant_(skip.fac, 0.5)

    def level_grids(self, grid: tuple[int, int, int]) -> list[tuple[int, int, int]]:
        """Token grids of every level from the finest one's."""
        grids = [tuple(grid)]
        for m in self.config.level_merges:
            grids.append(tuple(n // k for n, k in zip(grids[-1], m)))
        return grids

    def check_input(self, shape) -> tuple[int, int, int]:
        """The finest token grid of a [B, C, F, H, W] input; a VideoShapeError unless the patches, every merge and
        every attention window fit."""
        cfg = self.config
        size = tuple(shape[-3:])
        multiple = tuple(p * math.prod(m[a] for m in cfg.level_merges) for a, p in enumerate(cfg.patch_size))
        if any(n % k for n, k in zip(size, multiple)):
            raise VideoShapeError(f"video size (F, H, W) = {size} does not fit this hourglass DiT: F, H, W must be "
                                  f"multiples of {multiple} (patch {tuple(cfg.patch_size)} times the merges "
                                  f"{cfg.level_merges})")
        grids = self.level_grids(check_patchable(shape, cfg.patch_size))
        for i, (g, a) in enumerate(zip(grids, cfg.level_attentions)):
            if a == "window":
                try:
                    window_size(g, cfg.window)
                except VideoShapeError as e:
                    raise VideoShapeError(f"video size (F, H, W) = {size}, level {i}: {e}") from None
        return grids[0]

    def _trunk(self, h, c, grid, context, context_mask):
        """h [B, L_0, widths[0]] fp32 on grid_0 -> the same, through every level."""
        grids = self.level_grids(grid)
        n = len(grids)
        ropes = [self._rope(g, h.device) for g in grids]  # [L_i, head_dim/2] complex per level, or None
        shared = [a(c).flatten(1) for a in self.adaln_shared] if self.adaln_shared is not None else [None] * n
        run = lambda blocks, h, i: run_blocks(blocks, h, c, grids[i], ropes[i], context, context_mask, shared[i],
                                              checkpointing=self.gradient_checkpointing)
        cp = self.context_parallel  # merges and splits need whole grids: gather the tokens, shard the result
        full = (lambda h, g: h) if cp is None else (lambda h, g: cp.gather(h, math.prod(g)))  # noqa: E731
        part = (lambda h: h) if cp is None else cp.shard  # noqa: E731
        skips = []
        for i in range(n - 1):
            h = run(self.down[i], h, i)  # [B, L_i, W_i]
            skips.append(h)
            h = part(self.merges[i](full(h, grids[i]), grids[i]))  # [B, L_{i+1}, W_{i+1}]
        h = run(self.mid, h, n - 1)  # [B, L_{n-1}, W_{n-1}]
        for i in reversed(range(n - 1)):
            h = part(self.splits[i](full(h, grids[i + 1]), grids[i + 1]))  # [B, L_i, W_i]
            h = self.skips[i](h, skips.pop())
            h = run(self.up[i], h, i)
        return h


def masked_mean(context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens: context [B, Lc, D], mask [B, Lc] bool or None -> [B, D] (zeros if none)."""
    if mask is None:
        return context.mean(1)
    w = mask.to(context.dtype)[..., None]  # [B, Lc, 1]
    return (context * w).sum(1) / w.sum(1).clamp_min(1)


def config(name: str, **overrides) -> DiTConfig:
    """A registry size with fields replaced, e.g. config("B", in_channels=16, attention="causal")."""
    return dataclasses.replace(DIT_CONFIGS[name], **overrides)
