"""WAN: the Wan 2.1 text-to-video transformer (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video
Generative Models"), the flow-matching backbone.

Same math and the same state-dict layout as diffusers' `WanTransformer3DModel`, so released checkpoints run:

    model = WanModel.from_pretrained("Wan2.1-T2V-1.3B-Diffusers/transformer")   # or an original Wan folder
    v = model(x, t, context)    # x [B, C, F, H, W], t [B] on 0..1000, context [B, L, text_dim] -> velocity

Per block (diffusers `WanTransformerBlock`, Wan `WanAttentionBlock`), with e = table + Linear(SiLU(t_emb)):

    x = x + gate1 * SelfAttn(LN(x) * (1 + scale1) + shift1)        RoPE 3D, RMS qk-norm across heads
    x = x + CrossAttn(LN_affine(x), text)
    x = x + gate2 * FFN(LN(x) * (1 + scale2) + shift2)              GELU-tanh

Differences that change speed, not results: q/k/v (and cross k/v) are fused into one projection at load
time and split again by `state_dict()`; RoPE is one complex multiply with a table built once per forward in
fp32; modulation and gated residuals are single fused ops. The residual stream, time path, modulation and
norms are fp32 (as in the original Wan) even when the weights are bf16.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfm.errors import CheckpointError, first_line
from dfm.io import save_safetensors

from .layers import (
    MLP,
    CrossAttention,
    LayerNorm,
    PatchEmbed3d,
    SelfAttention,
    TimestepEmbedder,
    cast_keeping_fp32,
    check_patchable,
    gated_add,
    linear_fp32,
    modulate,
    run_blocks,
    unpatchify,
)
from .cache import run_stack
from .rope import rope_3d
from .wan_image import FAMILY_CONFIGS, ImageCrossAttention, ImageEmbedder

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


# ------------------------------------------------------------------------------------------------ configs


@dataclass(frozen=True)
class WanConfig:
    """Field names and defaults as in diffusers' `WanTransformer3DModel` config.json."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    image_dim: int | None = None  # I2V / FLF2V: CLIP image features' width (dfm/models/wan_image.py)
    added_kv_proj_dim: int | None = None  # I2V / FLF2V: the image context's width in the cross-attention
    pos_embed_seq_len: int | None = None  # FLF2V: image tokens with a learned position table (2 x 257)

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def to_diffusers(self) -> dict:
        """The config.json diffusers writes for this model."""
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return {"_class_name": "WanTransformer3DModel", **d}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "WanConfig":
        """Read a diffusers config.json or an original Wan config.json (dim, num_heads, in_dim, ...)."""
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        if "num_heads" in d and "num_attention_heads" not in d:  # original Wan layout
            kind = d.get("model_type", "t2v")
            if kind not in ("t2v", "i2v", "flf2v", "ti2v"):
                raise ValueError(f"{source}: model_type {kind!r} is not supported; WanModel runs t2v, i2v, flf2v, ti2v")
            image = {"image_dim": 1280, "added_kv_proj_dim": d["dim"]} if kind in ("i2v", "flf2v") else {}
            if kind == "flf2v":
                image["pos_embed_seq_len"] = 2 * 257
            d = {**image, "num_attention_heads": d["num_heads"], "attention_head_dim": d["dim"] // d["num_heads"],
                 "in_channels": d.get("in_dim", 16), "out_channels": d.get("out_dim", 16),
                 "text_dim": d.get("text_dim", 4096), "freq_dim": d.get("freq_dim", 256), "ffn_dim": d["ffn_dim"],
                 "num_layers": d["num_layers"], "eps": d.get("eps", 1e-6),
                 "patch_size": d.get("patch_size", (1, 2, 2)), "cross_attn_norm": d.get("cross_attn_norm", True)}
        if (d.get("image_dim") is None) != (d.get("added_kv_proj_dim") is None):
            raise ValueError(f"{source}: image_dim and added_kv_proj_dim go together (an image-conditioned Wan "
                             "model has both); set both or neither")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"{source}: unknown WAN config fields {unknown}; expected some of {sorted(fields)}")
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        if d.get("qk_norm", "rms_norm_across_heads") not in ("rms_norm_across_heads", True):
            raise ValueError(f"{source}: qk_norm={d['qk_norm']!r} is not supported (Wan uses 'rms_norm_across_heads')")
        d.pop("qk_norm", None)
        return cls(**d)


WAN_CONFIGS: dict[str, WanConfig] = {
    # tests and benchmarks (not a released model)
    "tiny": WanConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=24,
                      freq_dim=32, ffn_dim=64, num_layers=2),
    # Wan2.1-T2V-1.3B-Diffusers / transformer / config.json
    "1.3B": WanConfig(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    # Wan2.1-T2V-14B-Diffusers / transformer / config.json
    "14B": WanConfig(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
    **{name: WanConfig(**kw) for name, kw in FAMILY_CONFIGS.items()},  # I2V, FLF2V, Wan 2.2 (wan_image.py)
}

# the parameters that stay fp32 when the model is cast to bf16 (time path, modulation tables, norms), by name
# in dfm's layout and in diffusers' (which `from_pretrained` casts while loading)
KEEP_FP32 = ("time_embedder", "time_proj", "modulation", "norm")
KEEP_FP32_DIFFUSERS = ("condition_embedder.time_embedder", "condition_embedder.time_proj", "scale_shift_table", "norm")


# ------------------------------------------------------------------------------------------------ network


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_attention_heads, qk_norm=True, eps=cfg.eps)
        self.norm2 = LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else None
        self.cross_attn = (CrossAttention(dim, cfg.num_attention_heads, qk_norm=True, eps=cfg.eps)
                           if cfg.added_kv_proj_dim is None else
                           ImageCrossAttention(dim, cfg.num_attention_heads, cfg.added_kv_proj_dim, cfg.eps))
        self.norm3 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = MLP(dim, cfg.ffn_dim, act="gelu_tanh")
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)  # per-block table, fp32

    def forward(self, x, context, t_mod, rope, context_mask=None, image_context=None):
        """x [B, L, D] fp32 residual stream, context [B, Lc, D], t_mod [B, 6, D] (or per token [B, L, 6, D]) fp32,
        rope [L, hd/2], image_context [B, N, D] (I2V) or None -> [B, L, D]."""
        dtype = self.ffn.fc1.weight.dtype
        # fp32 modulation: table + shared projection of the timestep
        shift1, scale1, gate1, shift2, scale2, gate2 = _chunk6(self.modulation.float() + t_mod)  # 6 x [B, 1 or L, D]
        h = modulate(self.norm1(x), shift1, scale1).to(dtype)
        x = gated_add(x, self.self_attn(h, rope), gate1)
        h = (x if self.norm2 is None else self.norm2(x)).to(dtype)
        x = x + (self.cross_attn(h, context, context_mask) if image_context is None else
                 self.cross_attn(h, context, context_mask, image_context))
        h = modulate(self.norm3(x), shift2, scale2).to(dtype)
        return gated_add(x, self.ffn(h), gate2)


def _chunk6(m: torch.Tensor):
    """[B, 6, D] -> 6 x [B, 1, D]; per-token [B, L, 6, D] -> 6 x [B, L, D]."""
    return m.chunk(6, dim=1) if m.ndim == 3 else m.unbind(2)


class WanModel(nn.Module):
    """Wan 2.1 text-to-video transformer. `WanModel(config)` with a `WanConfig` or a name in `WAN_CONFIGS`.

    `state_dict()` is in diffusers' layout and `load_state_dict` accepts it (and dfm's fused layout)."""

    def __init__(self, config: WanConfig | str = "1.3B"):
        super().__init__()
        cfg = WAN_CONFIGS[config] if isinstance(config, str) else config
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = PatchEmbed3d(cfg.in_channels, dim, cfg.patch_size)
        self.text_embedder = MLP(cfg.text_dim, dim, dim, act="gelu_tanh")
        self.time_embedder = TimestepEmbedder(cfg.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        if cfg.image_dim is not None:
            self.image_embedder = ImageEmbedder(cfg.image_dim, dim, cfg.pos_embed_seq_len)
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_out = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation_out = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)  # fp32
        self.gradient_checkpointing = False
        self.context_parallel = None  # dfm.models.context_parallel.enable_context_parallel: tokens split across ranks
        self.register_state_dict_post_hook(_state_dict_hook)
        self.register_load_state_dict_pre_hook(_load_state_dict_pre_hook)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, context_mask=None,
                image_context=None) -> torch.Tensor:
        """x [B, C, F, H, W], t [B] (or scalar; or per token [B, L] as Wan 2.2 TI2V) on diffusers' 0..1000 scale
        (1000 = noise), context [B, Lc, text_dim], context_mask [B, Lc] bool or None (Wan attends to all tokens,
        padding included), image_context [B, N, image_dim] CLIP features (I2V / FLF2V models only)
        -> velocity [B, C_out, F, H, W] in x's dtype."""
        cfg = self.config
        B = x.shape[0]
        grid = check_patchable(x.shape, cfg.patch_size)  # (F', H', W')
        dtype = self.proj_out.weight.dtype
        rope = rope_3d(grid, cfg.attention_head_dim, device=x.device)  # [L, hd/2] complex64, fp32
        h = self.patch_embedding(x).float()  # [B, L, D] fp32 residual stream
        # fp32 time path: t is never rounded to bf16
        t = torch.as_tensor(t, device=x.device).float()
        t = t.reshape(-1).expand(B) if t.ndim < 2 else t  # [B], or [B, L] per token
        temb = self.time_embedder(t.flatten()).unflatten(0, t.shape)  # [B, D] or [B, L, D]
        t_mod = linear_fp32(F.silu(temb), self.time_proj.weight, self.time_proj.bias)  # [B, (L,) 6D]
        t_mod = t_mod.unflatten(-1, (6, cfg.dim))  # [B, 6, D] or [B, L, 6, D]
        ctx = self.text_embedder(context.to(dtype))  # [B, Lc, D]
        img = self._image_context(image_context)  # [B, N, D] or None
        extra = {} if img is None else {"image_context": img}
        cp = self.context_parallel
        if cp is not None:  # this rank's tokens (rope stays the full table); per-token modulation follows them
            h = cp.shard(h)  # [B, L/N, D]
            t_mod = t_mod if t_mod.ndim == 3 else cp.shard(t_mod)  # [B, L/N, 6, D]
            temb = temb if temb.ndim == 2 else cp.shard(temb)  # [B, L/N, D]
        run = lambda h, blocks=self.blocks: run_blocks(blocks, h, ctx, t_mod, rope, context_mask,  # noqa: E731
                                                     checkpointing=self.gradient_checkpointing, **extra)
        h = run_stack(self, h, run, t_mod)  # the block stack, through a step cache if one is attached
        out_mod = self.modulation_out.float() + (temb[:, None, :] if temb.ndim == 2 else temb[:, :, None, :])
        shift, scale = out_mod.chunk(2, dim=1) if temb.ndim == 2 else out_mod.unbind(2)  # 2 x [B, 1 or L, D] fp32
        out = self.proj_out(modulate(self.norm_out(h), shift, scale).to(dtype))  # [B, L, pt*ph*pw*C]
        out = out if cp is None else cp.gather(out, rope.shape[0])  # [B, L, pt*ph*pw*C] every rank's tokens
        return unpatchify(out, cfg.patch_size, grid).to(x.dtype)  # [B, C, F, H, W]

    def _image_context(self, image_context):
        """CLIP features [B, N, image_dim] -> embedded [B, N, D]; None for a text-to-video model."""
        if self.config.image_dim is None:
            if image_context is not None:
                raise ValueError("this Wan model has no image cross-attention (image_dim is None); it takes no "
                                 "image_context")
            return None
        if image_context is None:
            raise ValueError("this Wan model is image-conditioned (image_dim set): pass image_context")
        return self.image_embedder(image_context.to(self.proj_out.weight.dtype))

    # -------------------------------------------------------------------------------------------- helpers

    def cast(self, dtype: torch.dtype) -> "WanModel":
        """Cast to `dtype` (e.g. bf16), keeping the time path, modulation tables and norms in fp32."""
        return cast_keeping_fp32(self, dtype, KEEP_FP32)

    def compile_blocks(self, **kwargs) -> "WanModel":
        """torch.compile each transformer block (they are identical, so one compiled graph is reused)."""
        for block in self.blocks:
            block.compile(**kwargs)
        return self

    @classmethod
    def from_pretrained(cls, path, config: WanConfig | dict | str | None = None, dtype=torch.float32,
                        device="cpu") -> "WanModel":
        """Load a diffusers transformer folder (config.json + diffusion_pytorch_model.safetensors, or shards with
        diffusion_pytorch_model.safetensors.index.json), an original Wan 2.1 folder (its keys are renamed on
        load), or one .safetensors file (config inferred from the weights unless given)."""
        return load_pretrained(cls, path, config, dtype, device)

    def save_pretrained(self, path, max_shard_bytes: int | None = None) -> None:
        """Write config.json and safetensors in diffusers' layout (sharded with an index above max_shard_bytes)."""
        save_pretrained(self, path, max_shard_bytes)


# ------------------------------------------------------------------------------------- state-dict layouts
# Each table maps a key prefix of one layout to the other; block keys are matched after "blocks.<i>.".

_DFM_TO_DIFFUSERS_TOP = [
    ("text_embedder.fc1.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedder.fc2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedder.fc1.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedder.fc2.", "condition_embedder.time_embedder.linear_2."),
    ("time_proj.", "condition_embedder.time_proj."),
    ("modulation_out", "scale_shift_table"),
    ("image_embedder.fc1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("image_embedder.fc2.", "condition_embedder.image_embedder.ff.net.2."),
    ("image_embedder.", "condition_embedder.image_embedder."),  # norm1, norm2, pos_embed
]
_DFM_TO_DIFFUSERS_BLOCK = [
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("self_attn.out.", "attn1.to_out.0."),
    ("cross_attn.q.", "attn2.to_q."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
    ("cross_attn.out.", "attn2.to_out.0."),
    ("cross_attn.norm_added_k.", "attn2.norm_added_k."),
    ("ffn.fc1.", "ffn.net.0.proj."),
    ("ffn.fc2.", "ffn.net.2."),
    ("modulation", "scale_shift_table"),
]
# fused dfm projection -> the diffusers projections it concatenates (along the output dimension)
_FUSED = {"self_attn.qkv.": ("attn1.to_q.", "attn1.to_k.", "attn1.to_v."),
          "cross_attn.kv.": ("attn2.to_k.", "attn2.to_v."),
          "cross_attn.add_kv.": ("attn2.add_k_proj.", "attn2.add_v_proj.")}

_ORIGINAL_TO_DIFFUSERS_TOP = [
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
]
_ORIGINAL_TO_DIFFUSERS_BLOCK = [
    *[(f"self_attn.{a}.", f"attn1.to_{a}.") for a in "qkv"],
    ("self_attn.o.", "attn1.to_out.0."),
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    *[(f"cross_attn.{a}.", f"attn2.to_{a}.") for a in "qkv"],
    ("cross_attn.o.", "attn2.to_out.0."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
    ("cross_attn.k_img.", "attn2.add_k_proj."),
    ("cross_attn.v_img.", "attn2.add_v_proj."),
    ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
    ("norm3.", "norm2."),  # the original names the cross-attention norm norm3 (and the FFN norm norm2)
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
    ("modulation", "scale_shift_table"),
]
_BLOCK = re.compile(r"^(blocks\.\d+\.)(.*)$")


def _rename(key: str, top, block) -> str:
    m = _BLOCK.match(key)
    head, rest, table = (m.group(1), m.group(2), block) if m else ("", key, top)
    for src, dst in table:
        if rest.startswith(src):
            return head + dst + rest[len(src):]
    return key


def _swap(table):
    return [(b, a) for a, b in table]


def to_diffusers_layout(sd: dict) -> dict:
    """dfm keys -> diffusers keys; fused projections are split into views (no copy)."""
    out = {}
    for key, value in sd.items():
        m = _BLOCK.match(key)
        fused = next((f for f in _FUSED if m and m.group(2).startswith(f)), None)
        if fused is None:
            out[_rename(key, _DFM_TO_DIFFUSERS_TOP, _DFM_TO_DIFFUSERS_BLOCK)] = value
            continue
        suffix = m.group(2)[len(fused):]  # "weight" / "bias"
        for name, part in zip(_FUSED[fused], value.chunk(len(_FUSED[fused]), dim=0)):
            out[m.group(1) + name + suffix] = part
    return out


def from_diffusers_layout(sd: dict) -> dict:
    """diffusers keys -> dfm keys; projections are concatenated into the fused ones. dfm keys pass through."""
    out, pending = {}, {}
    for key, value in sd.items():
        m = _BLOCK.match(key)
        hit = next(((f, i) for f, names in _FUSED.items() for i, n in enumerate(names)
                    if m and m.group(2).startswith(n)), None)
        if hit is None:
            out[_rename(key, _swap(_DFM_TO_DIFFUSERS_TOP), _swap(_DFM_TO_DIFFUSERS_BLOCK))] = value
            continue
        fused, i = hit
        suffix = m.group(2)[len(_FUSED[fused][i]):]
        pending.setdefault((m.group(1) + fused + suffix, fused), {})[i] = (key, value)
    for (fused_key, fused), parts in pending.items():
        n = len(_FUSED[fused])
        if len(parts) == n:
            out[fused_key] = torch.cat([parts[i][1] for i in range(n)], dim=0)
        else:  # incomplete: keep the diffusers names so that loading reports them
            out.update(dict(parts.values()))
    return out


def original_to_diffusers_layout(sd: dict) -> dict:
    """Original Wan 2.1 keys (wan/modules/model.py) -> diffusers keys."""
    return {_rename(k, _ORIGINAL_TO_DIFFUSERS_TOP, _ORIGINAL_TO_DIFFUSERS_BLOCK): v for k, v in sd.items()}


def diffusers_to_original_layout(sd: dict) -> dict:
    """diffusers keys -> original Wan 2.1 keys (the inverse of `original_to_diffusers_layout`)."""
    top, block = _swap(_ORIGINAL_TO_DIFFUSERS_TOP), _swap(_ORIGINAL_TO_DIFFUSERS_BLOCK)
    return {_rename(k, top, block): v for k, v in sd.items()}


def _replace_prefixed(state_dict, prefix, convert):
    items = list(state_dict.items())
    mine = {k[len(prefix):]: v for k, v in items if k.startswith(prefix)}
    state_dict.clear()
    state_dict.update((k, v) for k, v in items if not k.startswith(prefix))
    state_dict.update((prefix + k, v) for k, v in convert(mine).items())


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    _replace_prefixed(state_dict, prefix, to_diffusers_layout)


def _load_state_dict_pre_hook(module, state_dict, prefix, *args):
    _replace_prefixed(state_dict, prefix, from_diffusers_layout)


# --------------------------------------------------------------------------------------- loading / saving


def _read_safetensors(files: list[Path]) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sd = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"missing weight file {f} (listed in the index); download the complete checkpoint")
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"could not read {f}: {e}. The file is corrupt or truncated; download it again") from e
    return sd


PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save / pickle files: never loaded
CONVERT_HINT = ("convert them where you trust them, e.g. safetensors.torch.save_file(torch.load(FILE, "
                "weights_only=True), 'diffusion_pytorch_model.safetensors')")


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: only .safetensors weights are loaded (nothing executes code from a "
                                  "checkpoint); convert .bin/.pt/.pth files with safetensors first")
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist; pass a diffusers transformer folder, an original Wan folder "
                              "or a .safetensors file")
    if (path / INDEX_NAME).is_file():
        try:
            weight_map = json.loads((path / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX_NAME} is not a valid safetensors index ({e}); download it again") from e
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    if (path / "transformer").is_dir():
        raise CheckpointError(f"{path} looks like a pipeline folder; pass {path / 'transformer'}")
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLED_SUFFIXES)
    if pickled:
        raise CheckpointError(f"{path} holds pickled weights only ({', '.join(pickled[:3])}); dfm loads only "
                              f"safetensors (unpickling can run code): {CONVERT_HINT}")
    found = sorted(p.name for p in path.iterdir())[:10]
    raise CheckpointError(f"no weights in {path}: expected {WEIGHTS_NAME} or {INDEX_NAME} (found {found}); "
                          "download the transformer weights (safetensors) into this folder")


def _strip_prefix(sd: dict) -> dict:
    for prefix in ("model.diffusion_model.", "diffusion_model.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _is_original(sd: dict) -> bool:
    return any(k.startswith(("head.head.", "text_embedding.", "time_embedding.")) or ".self_attn.q." in k for k in sd)


def infer_config(sd: dict) -> WanConfig:
    """A config from diffusers-layout weights alone. The head count is not in the weights: Wan's head dim is
    128 in every released model, so heads = dim / 128."""
    try:
        w = sd["patch_embedding.weight"]  # [D, C, pt, ph, pw]
        dim, patch = w.shape[0], tuple(w.shape[2:])
        img = sd.get("condition_embedder.image_embedder.norm1.weight")
        pos = sd.get("condition_embedder.image_embedder.pos_embed")
        add_k = sd.get("blocks.0.attn2.add_k_proj.weight")
        return WanConfig(
            patch_size=patch, num_attention_heads=dim // 128, attention_head_dim=128, in_channels=w.shape[1],
            out_channels=sd["proj_out.weight"].shape[0] // math.prod(patch),
            text_dim=sd["condition_embedder.text_embedder.linear_1.weight"].shape[1],
            freq_dim=sd["condition_embedder.time_embedder.linear_1.weight"].shape[1],
            ffn_dim=sd["blocks.0.ffn.net.0.proj.weight"].shape[0],
            num_layers=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
            cross_attn_norm="blocks.0.norm2.weight" in sd, image_dim=None if img is None else img.shape[0],
            added_kv_proj_dim=None if add_k is None else add_k.shape[1],
            pos_embed_seq_len=None if pos is None else pos.shape[1])
    except KeyError as e:
        raise CheckpointError(f"cannot infer a WAN config: the weights have no {e}; pass config=...") from e


def _check_against_model(sd: dict, expected: dict, source: str, config_source: str) -> None:
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs config {tuple(expected[k].shape)}"
              for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if not (missing or unexpected or shapes):
        return
    image_keys = [k for k in unexpected if "img" in k or "add_k_proj" in k or "image_embedder" in k]
    if image_keys:
        raise CheckpointError(f"{source} is an image-to-video Wan checkpoint (keys like {image_keys[0]}) but the "
                              f"config from {config_source} has no image_dim / added_kv_proj_dim; use the "
                              "config.json that came with these weights")
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    raise CheckpointError(f"the weights in {source} do not match the config from {config_source}: "
                          f"{'; '.join(parts)}. Use the config.json that came with these weights, or pass the "
                          "matching config= (WAN_CONFIGS has '1.3B' and '14B')")


def load_pretrained(cls, path, config=None, dtype=torch.float32, device="cpu"):
    path = Path(path)
    files = _weight_files(path)
    sd = _strip_prefix(_read_safetensors(files))
    if _is_original(sd):
        sd = original_to_diffusers_layout(sd)
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    if isinstance(config, str):
        cfg, config_source = WAN_CONFIGS[config], f"WAN_CONFIGS[{config!r}]"
    elif isinstance(config, WanConfig):
        cfg, config_source = config, "the config argument"
    elif isinstance(config, dict):
        cfg, config_source = WanConfig.from_dict(config, "config argument"), "the config argument"
    elif path.is_dir() and config_file.is_file():
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config_file} is not valid JSON ({first_line(e)}); download it again") from None
        cfg, config_source = WanConfig.from_dict(raw, str(config_file)), str(config_file)
    else:
        cfg, config_source = infer_config(sd), "the weights (inferred, head dim 128)"
    with torch.device("meta"):
        model = cls(cfg)
    _check_against_model(sd, model.state_dict(), str(path), config_source)
    keep = lambda k: any(s in k for s in KEEP_FP32_DIFFUSERS)  # noqa: E731
    sd = {k: v.to(device=device, dtype=torch.float32 if keep(k) else dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device)


def save_pretrained(model: WanModel, path, max_shard_bytes: int | None = None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config.to_diffusers(), indent=2) + "\n")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    shards, size = [[]], 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    for stale in [*path.glob("diffusion_pytorch_model*.safetensors"), path / INDEX_NAME]:
        if stale.exists():
            os.remove(stale)
    if len(shards) == 1:
        save_safetensors({k: sd[k].contiguous().clone() for k in shards[0]}, str(path / WEIGHTS_NAME))
        return
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors({k: sd[k].contiguous().clone() for k in keys}, str(path / name))
        weight_map.update((k, name) for k in keys)
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
