import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from dfm.models import WAN_CONFIGS, CheckpointError, WanConfig, WanModel
from dfm.models.wan import diffusers_to_original_layout, to_diffusers_layout

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random diffusers WanTransformer3DModel saved with save_pretrained."""
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**TINY).eval()
    path = tmp_path_factory.mktemp("wan_diffusers")
    ref.save_pretrained(path)
    return ref, path


def inputs(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 3, 4, 6, generator=g)  # F=3, H=4, W=6: non-square
    t = torch.tensor([999.0, 3.5, 500.0][:B])
    context = torch.randn(B, 7, 24, generator=g)
    context[1:, 4:] = 0  # zero padding, as the Wan pipeline pads prompts to 512 tokens
    return x, t, context


def run_ref(ref, x, t, context):
    return ref(x, t, context, return_dict=False)[0]


def test_parity_outputs_and_gradients_with_diffusers(reference):
    ref, path = reference
    model = WanModel.from_pretrained(path)
    x, t, context = inputs()
    x_ref, x_dfm = x.clone().requires_grad_(), x.clone().requires_grad_()
    c_ref, c_dfm = context.clone().requires_grad_(), context.clone().requires_grad_()
    out_ref, out = run_ref(ref, x_ref, t, c_ref), model(x_dfm, t, c_dfm)
    assert out.shape == x.shape
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    ref.zero_grad()
    (out_ref * w).mean().backward()
    (out * w).mean().backward()
    torch.testing.assert_close(x_dfm.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_dfm.grad, c_ref.grad, atol=1e-5, rtol=1e-5)
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    dfm_grads = to_diffusers_layout({k: p.grad for k, p in model.named_parameters()})
    assert ref_grads.keys() == dfm_grads.keys()
    for k in ref_grads:
        torch.testing.assert_close(dfm_grads[k], ref_grads[k], atol=1e-5, rtol=1e-5, msg=k)


def test_batch_of_one_equals_row_of_batch(reference):
    model = WanModel.from_pretrained(reference[1])
    x, t, context = inputs(3)
    with torch.no_grad():
        full = model(x, t, context)
        torch.testing.assert_close(model(x[2:], t[2:], context[2:]), full[2:], atol=1e-5, rtol=1e-5)


def test_state_dict_is_diffusers_layout_and_round_trips(reference, tmp_path):
    ref, _ = reference
    model = WanModel(WanConfig(**TINY))
    model.load_state_dict(ref.state_dict())  # plain load_state_dict takes diffusers keys
    sd = model.state_dict()
    assert sorted(sd) == sorted(ref.state_dict())
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0)
    again = WanModel(WanConfig(**TINY))
    again.load_state_dict({k: v.clone() for k, v in sd.items()})
    assert again.blocks[0].self_attn.qkv.weight.shape == (96, 32)  # fused on load
    # the fused layout (named_parameters) also loads
    again.load_state_dict(dict(model.named_parameters()))
    # save_pretrained writes a folder diffusers itself loads
    model.save_pretrained(tmp_path)
    back = WanTransformer3DModel.from_pretrained(tmp_path).eval()
    x, t, context = inputs()
    with torch.no_grad():
        torch.testing.assert_close(run_ref(back, x, t, context), model(x, t, context), atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint(reference, tmp_path):
    ref, _ = reference
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = WanModel.from_pretrained(tmp_path)
    x, t, context = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, context), run_ref(ref, x, t, context), atol=1e-5, rtol=1e-5)
    # and dfm writes shards that load back
    model.save_pretrained(tmp_path / "dfm", max_shard_bytes=20_000)
    assert (tmp_path / "dfm" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    again = WanModel.from_pretrained(tmp_path / "dfm")
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, context), model(x, t, context), rtol=0, atol=0)


def test_original_wan_checkpoint_is_renamed_on_load(reference, tmp_path):
    from safetensors.torch import save_file

    ref, _ = reference
    original = diffusers_to_original_layout(ref.state_dict())
    assert "head.head.weight" in original and "blocks.1.self_attn.q.weight" in original
    assert "blocks.0.norm3.weight" in original and "blocks.0.ffn.0.weight" in original
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "dim": 32, "eps": 1e-6, "ffn_dim": 64, "freq_dim": 32, "in_dim": 4,
        "model_type": "t2v", "num_heads": 2, "num_layers": 2, "out_dim": 4, "text_len": 512, "text_dim": 24}))
    model = WanModel.from_pretrained(tmp_path)
    x, t, context = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, context), run_ref(ref, x, t, context), atol=1e-5, rtol=1e-5)
    # a single file with ComfyUI's prefix and no config (inferred; tiny head dim given explicitly)
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in original.items()}, str(tmp_path / "one.safetensors"))
    model = WanModel.from_pretrained(tmp_path / "one.safetensors", config=WanConfig(**TINY))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, context), run_ref(ref, x, t, context), atol=1e-5, rtol=1e-5)


def test_config_mismatch_and_broken_checkpoints_give_one_clear_error(reference, tmp_path):
    ref, path = reference
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "ffn_dim": 128, "num_layers": 3}))
    with pytest.raises(CheckpointError, match=r"do not match the config.*shape mismatch.*missing keys.*config"):
        WanModel.from_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights"):
        WanModel.from_pretrained(tmp_path / "empty")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        WanModel.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        WanModel.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="image_dim and added_kv_proj_dim go together"):
        WanConfig.from_dict({**cfg, "image_dim": 1280})
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "image_dim": 1280, "added_kv_proj_dim": 32}))
    weights.write_bytes((path / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="do not match the config"):  # an I2V config, T2V weights
        WanModel.from_pretrained(tmp_path)


# Wan2.1-T2V-1.3B-Diffusers and Wan2.1-T2V-14B-Diffusers, transformer/config.json
PUBLISHED = {
    "1.3B": {"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
             "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "image_dim": None,
             "in_channels": 16, "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
             "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096},
    "14B": {"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
            "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256, "image_dim": None,
            "in_channels": 16, "num_attention_heads": 40, "num_layers": 40, "out_channels": 16,
            "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096},
}


def check_published(name: str, published: dict) -> tuple:
    """WAN_CONFIGS[name] reads from and writes diffusers' config, and on the meta device has its parameter names
    and shapes (also used by tests/test_wan_family_model.py for the I2V / FLF2V / A14B / 5B configs)."""
    cfg = WAN_CONFIGS[name]
    assert WanConfig.from_dict(published) == cfg
    written = cfg.to_diffusers()
    assert {k: written[k] for k in published} == published
    with torch.device("meta"):
        ours = WanModel(cfg)
        theirs = WanTransformer3DModel(**{k: v for k, v in published.items() if not k.startswith("_")})
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    return ours, theirs  # on the meta device


@pytest.mark.parametrize("name", ["1.3B", "14B"])
def test_registry_matches_published_configs(name):
    ours, theirs = check_published(name, PUBLISHED[name])
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters())
    assert abs(n / 1e9 - {"1.3B": 1.42, "14B": 14.29}[name]) < 0.01


def test_context_mask_equals_truncated_context(reference):
    model = WanModel.from_pretrained(reference[1])
    x, t, context = inputs(1)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, context, mask), model(x, t, context[:, :4]), atol=1e-5, rtol=1e-5)


def test_bf16_keeps_time_path_and_norms_fp32(reference):
    model = WanModel.from_pretrained(reference[1], dtype=torch.bfloat16)
    assert model.blocks[0].ffn.fc1.weight.dtype == torch.bfloat16
    for name, p in model.named_parameters():
        if any(s in name for s in ("time_embedder", "time_proj", "modulation", "norm")):
            assert p.dtype == torch.float32, name
    x, t, context = inputs()
    with torch.no_grad():
        out = model(x, t, context)
        ref = WanModel.from_pretrained(reference[1])(x, t, context)
    assert out.dtype == x.dtype
    err = out - ref
    # measured (this tiny model, these inputs, CPU): max |err| 0.0102, RMS 0.0023 (max |ref| 2.2); bounds 2x that.
    # A timestep rounded to the weights' dtype (NeMo DFM's bug) makes them 0.059 and 0.0153.
    assert err.abs().max() < 0.02 and err.pow(2).mean().sqrt() < 0.005, (err.abs().max(), err.pow(2).mean().sqrt())
    assert err.abs().max() > 0  # the bf16 weights were really used


def time_path(model, x, t, context, autocast=False):
    """(output, {time embedding [B, D], each block's modulation input t_mod [B, 6, D]}) of one forward."""
    rec = {}
    hooks = [model.time_embedder.register_forward_hook(lambda m, a, out: rec.__setitem__("temb", out))]
    for i, block in enumerate(model.blocks):  # block(x, context, t_mod, rope, context_mask)
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: rec.__setitem__(f"t_mod{i}", a[2])))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x, t, context)
    finally:
        for h in hooks:
            h.remove()
    return out, rec


def test_bf16_weights_time_path_is_the_fp32_one(reference):
    """The time path on its own: with bf16 weights the time embedding and every block's modulation are fp32 and
    bit-identical to the fp32 model's (they only ever see fp32 weights and an fp32 t), and timesteps closer than
    bf16's spacing near 1000 (4.0) still give different videos. A timestep rounded to bf16 (NeMo DFM) breaks both:
    999 and 999.5 both become 1000, and the time embedding moves by 0.059 (measured on a planted copy)."""
    fp32, bf16 = WanModel.from_pretrained(reference[1]), WanModel.from_pretrained(reference[1], dtype=torch.bfloat16)
    x, t, context = inputs()  # t = [999, 3.5]: 999 is not a bf16 number
    _, want = time_path(fp32, x, t, context)
    _, got = time_path(bf16, x, t, context)
    assert want.keys() == got.keys() and len(got) == 1 + len(bf16.blocks)
    for k in want:
        assert got[k].dtype == torch.float32, k
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    # 999 vs 999.5: measured max |change| of the output 0.0271 in fp32, 0.0273 with bf16 weights; the planted
    # bug gives exactly 0. Row 1 (t = 3.5 both times) must not move.
    changes = []
    for model in (fp32, bf16):
        a, _ = time_path(model, x, torch.tensor([999.0, 3.5]), context)
        b, _ = time_path(model, x, torch.tensor([999.5, 3.5]), context)
        assert torch.equal(a[1], b[1])
        changes.append((a[0] - b[0]).abs().max())
    assert changes[0] > 0.01 and changes[1] > 0.5 * changes[0], changes


def test_autocast_time_path_is_fp32(reference):
    model = WanModel.from_pretrained(reference[1])
    x, t, context = inputs()
    _, want = time_path(model, x, t, context)
    _, got = time_path(model, x, t, context, autocast=True)
    for k in want:
        assert got[k].dtype == torch.float32, (k, got[k].dtype)
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)


def test_gradient_checkpointing_same_gradients(reference):
    model = WanModel.from_pretrained(reference[1])
    x, t, context = inputs()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(x, t, context).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert not list(model.buffers())  # no RoPE (float64 or other) buffers
