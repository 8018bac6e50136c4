"""WanModel's image-to-video, first-last-frame and per-token-timestep (TI2V) configurations against diffusers'
WanTransformer3DModel: the same outputs and gradients from the same weights, batch 2, and the released configs'
parameter names and shapes on the meta device."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from dfm.models import WAN_CONFIGS, WanConfig, WanModel
from test_wan import check_published  # the tests folder is on sys.path
from dfm.models.wan import diffusers_to_original_layout, to_diffusers_layout

BASE = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, text_dim=24, freq_dim=32, ffn_dim=64,
            num_layers=2)
CONFIGS = {
    "i2v": dict(BASE, in_channels=12, out_channels=4, image_dim=20, added_kv_proj_dim=32),
    "flf2v": dict(BASE, in_channels=12, out_channels=4, image_dim=20, added_kv_proj_dim=32, pos_embed_seq_len=6),
    "ti2v": dict(BASE, in_channels=6, out_channels=6),
}
TEXT = 512  # diffusers' I2V attention takes the last 512 context tokens as text, the rest as image


def reference(kind):
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**CONFIGS[kind]).eval()
    if kind == "flf2v":
        with torch.no_grad():  # the position table starts at zero: make it matter
            ref.condition_embedder.image_embedder.pos_embed.normal_(0, 0.5)
    return ref


def inputs(kind, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = CONFIGS[kind]
    x = torch.randn(B, cfg["in_channels"], 3, 4, 6, generator=g)  # 3 x 2 x 3 = 18 tokens
    context = torch.randn(B, TEXT, 24, generator=g)
    context[:, 7:] = 0
    if kind == "ti2v":  # per token: the first latent frame's tokens at t = 0 (the image), the rest at t
        t = torch.tensor([999.0, 300.5])[:B, None].repeat(1, 18)
        t[:, :6] = 0
        return x, t, context, None
    n = cfg.get("pos_embed_seq_len") or 5
    image = torch.randn(B, n, cfg["image_dim"], generator=g)
    return x, torch.tensor([999.0, 3.5])[:B], context, image


def run_ref(ref, x, t, context, image):
    """diffusers' call; FLF2V takes the frames' CLIP tokens as [2B, N/2, D] (first, last, first, ...), dfm as
    [B, N, D] (first then last)."""
    if image is not None and ref.config.pos_embed_seq_len:
        image = image.reshape(-1, image.shape[1] // 2, image.shape[2])
    return ref(x, t, context, encoder_hidden_states_image=image, return_dict=False)[0]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_outputs_and_gradients_equal_diffusers(kind, tmp_path):
    ref = reference(kind)
    ref.save_pretrained(tmp_path)
    model = WanModel.from_pretrained(tmp_path)
    assert model.config == WanConfig(**CONFIGS[kind])
    x, t, context, image = inputs(kind)
    leaves, mine = ([v.clone().requires_grad_() if v is not None else None for v in (x, context, image)]
                    for _ in range(2))
    out_ref = run_ref(ref, leaves[0], t, leaves[1], leaves[2])
    out = model(mine[0], t, mine[1], image_context=mine[2])
    assert out.shape == (2, CONFIGS[kind]["out_channels"], 3, 4, 6)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    (out_ref * w).mean().backward()
    (out * w).mean().backward()
    for a, b in zip(mine, leaves):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    dfm_grads = to_diffusers_layout({k: p.grad for k, p in model.named_parameters()})
    assert ref_grads.keys() == dfm_grads.keys()
    for k in ref_grads:
        torch.testing.assert_close(dfm_grads[k], ref_grads[k], atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("kind", ["i2v", "flf2v"])
def test_image_context_matters_and_round_trips(kind, tmp_path):
    ref = reference(kind)
    model = WanModel(WanConfig(**CONFIGS[kind]))
    model.load_state_dict(ref.state_dict())
    assert sorted(model.state_dict()) == sorted(ref.state_dict())
    x, t, context, image = inputs(kind)
    with torch.no_grad():
        a = model(x, t, context, image_context=image)
        b = model(x, t, context, image_context=torch.randn_like(image))  # (a shift or a permutation would not show)
        assert (a - b).abs().max() > 1e-3
        torch.testing.assert_close(model(x[1:], t[1:], context[1:], image_context=image[1:]), a[1:], atol=1e-5,
                                   rtol=1e-5)
    model.save_pretrained(tmp_path / "dfm")
    back = WanTransformer3DModel.from_pretrained(tmp_path / "dfm").eval()
    with torch.no_grad():
        torch.testing.assert_close(run_ref(back, x, t, context, image), a, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pass image_context"):
        model(x, t, context)


def test_original_wan_image_keys(tmp_path):
    from safetensors.torch import save_file

    ref = reference("flf2v")
    original = diffusers_to_original_layout(ref.state_dict())
    for key in ("img_emb.proj.0.weight", "img_emb.proj.1.weight", "img_emb.proj.3.weight", "img_emb.proj.4.bias",
                "img_emb.emb_pos", "blocks.0.cross_attn.k_img.weight", "blocks.1.cross_attn.v_img.bias",
                "blocks.0.cross_attn.norm_k_img.weight"):
        assert key in original, key
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "w.safetensors"))
    model = WanModel.from_pretrained(tmp_path / "w.safetensors", config=WanConfig(**CONFIGS["flf2v"]))
    x, t, context, image = inputs("flf2v")
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, context, image_context=image), run_ref(ref, x, t, context, image),
                                   atol=1e-5, rtol=1e-5)


def test_per_token_timesteps_uniform_equal_scalar():
    """TI2V without an image: every token at t is the scalar-t model, to rounding."""
    model = WanModel(WanConfig(**CONFIGS["ti2v"])).eval()
    x, _, context, _ = inputs("ti2v")
    t = torch.tensor([999.0, 300.5])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t[:, None].expand(2, 18), context), model(x, t, context), atol=1e-6,
                                   rtol=1e-6)


# released diffusers configs (transformer/config.json of each Wan-AI/*-Diffusers folder)
COMMON = dict(patch_size=[1, 2, 2], attention_head_dim=128, cross_attn_norm=True, eps=1e-6, freq_dim=256,
              qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, text_dim=4096)
PUBLISHED = {
    "14B-I2V": dict(COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36, out_channels=16,
                    image_dim=1280, added_kv_proj_dim=5120, pos_embed_seq_len=None),
    "14B-FLF2V": dict(COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36,
                      out_channels=16, image_dim=1280, added_kv_proj_dim=5120, pos_embed_seq_len=514),
    "A14B-I2V": dict(COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=36, out_channels=16,
                     image_dim=None, added_kv_proj_dim=None, pos_embed_seq_len=None),
    "5B": dict(COMMON, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48,
               image_dim=None, added_kv_proj_dim=None, pos_embed_seq_len=None),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_released_configs_match_diffusers_on_meta(name):
    check_published(name, PUBLISHED[name])


def test_cfg_scale_per_noise_level():
    """CFGDenoiser with a scale function (two experts): each step is plain CFG with that step's w, in one forward."""
    from dfm.diffusion.guidance import CFGDenoiser

    calls = []

    def model(x, sigma, context):
        calls.append(x.shape[0])
        return x * context[:, :1, None, None] + sigma[:, None, None, None]

    x = torch.randn(2, 3, 4, 4)
    cond, uncond = {"context": torch.full((2, 1), 2.0)}, {"context": torch.full((2, 1), 0.5)}
    per_level = CFGDenoiser(model, cond, uncond, guidance_scale=lambda s: torch.where(s > 1, 5.0, 2.0))
    for sigma, w in ((3.0, 5.0), (0.5, 2.0)):
        want = CFGDenoiser(model, cond, uncond, guidance_scale=w)(x, torch.tensor(sigma))
        torch.testing.assert_close(per_level(x, torch.tensor(sigma)), want, rtol=0, atol=0)
    assert calls == [4] * 4  # both branches batched, every call


def test_infer_config_reads_the_image_widths():
    """A lone .safetensors of an FLF2V model (no config.json): the image widths come from the weights."""
    from dfm.models.wan import infer_config

    kw = dict(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=36, out_channels=16,
              text_dim=24, freq_dim=32, ffn_dim=64, num_layers=1, image_dim=20, added_kv_proj_dim=128,
              pos_embed_seq_len=6)
    with torch.device("meta"):
        ref = WanTransformer3DModel(**kw)
    assert infer_config(ref.state_dict()) == WanConfig(**kw)
