"""LoRA against diffusers + PEFT as the oracle: files PEFT made and diffusers saved load into dfm and give
diffusers' videos; dfm's LoRAs export to files diffusers loads with the same output; the conversion of fused
q/k/v is exact both ways; fuse / unfuse / unload restore the model; bad files get one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
pytest.importorskip("sentencepiece")

from test_wan import TINY, inputs, run_ref  # noqa: E402
from test_wan_pipeline import FRAMES, PROMPTS, SIZE, noise, wan_folders  # noqa: E402,F401  (wan_folders: the fixture)

from dfm.errors import UserError  # noqa: E402
from dfm.models import WanModel  # noqa: E402
from dfm.models.lora import LoRA, add_lora, fuse_lora, remove_lora, unfuse_lora  # noqa: E402
from dfm.models.lora_files import describe_lora, load_lora_file, read_lora, save_lora  # noqa: E402
from dfm.pipeline import WAN_NEGATIVE_PROMPT, load_pipeline  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def peft_lora(transformer, rank=4, alpha=8, rank_pattern=None, seed=0):
    """A random PEFT LoRA on a diffusers transformer (B not zero: init_lora_weights=False)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False,
                             rank_pattern=rank_pattern or {})
    transformer.add_adapter(config, adapter_name="default")
    layers = peft.get_peft_model_state_dict(transformer, adapter_name="default")
    transformer.delete_adapters("default")
    return layers, config


def save_diffusers_lora(folder, layers, config=None):
    """WanPipeline.save_lora_weights: the file the ecosystem writes (metadata when config is given)."""
    meta = config.to_dict() if config is not None else None
    diffusers.WanPipeline.save_lora_weights(folder, transformer_lora_layers=layers,
                                            transformer_lora_adapter_metadata=meta)
    return folder / "pytorch_lora_weights.safetensors"


def to_comfyui(path, out, alpha, lora_ab=False, kohya=False):
    """The same weights under original-Wan / ComfyUI (or kohya) names, written here by hand."""
    sd = load_file(path)
    names = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
             "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
             "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
             "ffn.net.2": "ffn.2"}
    new = {}
    for key, value in sd.items():
        module, part = key.removeprefix("transformer.").rsplit(".lora_", 1)
        block, rest = module.split(".", 2)[:2], module.split(".", 2)[2]
        name = f"blocks.{block[1]}.{names[rest]}"
        down = {"A.weight": "lora_A.weight" if lora_ab else "lora_down.weight",
                "B.weight": "lora_B.weight" if lora_ab else "lora_up.weight"}[part]
        prefix = "lora_unet_" + name.replace(".", "_") if kohya else "diffusion_model." + name
        new[f"{prefix}.{down}"] = value
        new[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    save_file(new, out)
    return out


@pytest.fixture(scope="module")
def lora_files(wan_folders, tmp_path_factory):
    """test_wan_pipeline's tiny diffusers Wan folder and PEFT LoRA files for its transformer: with the adapter
    metadata (rank 4, alpha 8; attn2.to_k rank 2 by rank_pattern) and without (alpha lost: alpha = rank)."""
    root = tmp_path_factory.mktemp("lora")
    folder = wan_folders["unipc"]
    transformer = diffusers.WanTransformer3DModel.from_pretrained(folder / "transformer")
    layers, config = peft_lora(transformer, rank=4, alpha=8, rank_pattern={"attn2.to_k": 2})
    return {"folder": folder, "meta": save_diffusers_lora(root / "meta", layers, config),
            "plain": save_diffusers_lora(root / "plain", layers), "config": config, "layers": layers}


def diffusers_lora_videos(folder, lora, scale, seeds, steps=4, guidance=5.0):
    pipe = diffusers.WanPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="x")
    pipe.set_adapters(["x"], [scale])
    frames = pipe(prompt=PROMPTS, negative_prompt=WAN_NEGATIVE_PROMPT, height=SIZE, width=SIZE, num_frames=FRAMES,
                  num_inference_steps=steps, guidance_scale=guidance, latents=noise(seeds), output_type="pt").frames
    return frames.permute(0, 2, 1, 3, 4) * 2 - 1


@pytest.mark.parametrize("which,scale", [("meta", 1.0), ("meta", 0.5), ("plain", 1.0)])
def test_peft_lora_gives_diffusers_video(lora_files, which, scale):
    """A PEFT LoRA saved by WanPipeline.save_lora_weights: dfm's video == diffusers' load_lora_weights video."""
    pipe = load_pipeline(lora_files["folder"])
    seeds, steps = [3, 4], 4
    plain = pipe.generate(PROMPTS, num_frames=FRAMES, height=SIZE, width=SIZE, steps=steps, seeds=seeds,
                          progress=False).videos
    name = pipe.load_lora(lora_files[which], scale=scale)
    out = pipe.generate(PROMPTS, num_frames=FRAMES, height=SIZE, width=SIZE, steps=steps, seeds=seeds,
                        progress=False).videos
    expected = diffusers_lora_videos(lora_files["folder"], lora_files[which], scale, seeds, steps)
    assert (out - plain).abs().max() > 1e-2  # the LoRA changes the video
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert pipe.source["lora"] == [{"name": name, "scale": scale, "fused": False}]
    pipe.unload_lora()
    again = pipe.generate(PROMPTS, num_frames=FRAMES, height=SIZE, width=SIZE, steps=steps, seeds=seeds,
                          progress=False).videos
    assert torch.equal(again, plain)  # unload restores the model exactly


def transformer_pair(folder):
    ref = diffusers.WanTransformer3DModel.from_pretrained(folder / "transformer").eval()
    return ref, WanModel.from_pretrained(folder / "transformer").eval()


def wan_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 16, 2, 4, 4, generator=g), torch.tensor([900.0, 250.0]), torch.randn(2, 7, 32, generator=g)


@pytest.mark.parametrize("style", ["comfyui", "comfyui_ab", "kohya"])
def test_comfyui_and_kohya_keys_give_the_same(lora_files, style, tmp_path):
    """The same weights under original-Wan names (lora_down/up + alpha, lora_A/B under diffusion_model., kohya):
    the same transformer output as the diffusers file, and as diffusers itself gives (comfyui)."""
    alpha = lora_files["config"].lora_alpha
    path = to_comfyui(lora_files["meta"], tmp_path / f"{style}.safetensors", alpha, lora_ab=style == "comfyui_ab",
                      kohya=style == "kohya")
    ref, net = transformer_pair(lora_files["folder"])
    x, t, ctx = wan_inputs()
    add_lora(net, load_lora_file(net, lora_files["meta"]), "a")
    with torch.no_grad():
        want = net(x, t, ctx)
    remove_lora(net)
    lora = load_lora_file(net, path)
    assert read_lora(path).format == ("kohya" if style == "kohya" else "comfyui")
    add_lora(net, lora, "b")
    with torch.no_grad():
        got = net(x, t, ctx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if style == "comfyui":  # diffusers reads the ComfyUI layout too: the same output
        pipe = diffusers.WanPipeline.from_pretrained(str(lora_files["folder"]), local_files_only=True)
        pipe.load_lora_weights(str(path), adapter_name="c")
        with torch.no_grad():
            theirs = run_ref(pipe.transformer, x, t, ctx)
        torch.testing.assert_close(got, theirs, atol=1e-5, rtol=0)


def trained_lora(net, rank=3, alpha=5.0, seed=1):
    """A dfm LoRA with every matrix random (as after training: B no longer zero)."""
    torch.manual_seed(seed)
    lora = LoRA.create(net, rank=rank, alpha=alpha)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.3)
    return lora


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_dfm_lora_exports_to_diffusers_exactly(lora_files, fmt, tmp_path):
    """A LoRA trained on dfm's fused layers, exported: diffusers loads it (load_lora_weights) and its transformer
    gives dfm's output; reading the file back gives the same adapter bit for bit."""
    ref, net = transformer_pair(lora_files["folder"])
    lora = trained_lora(net)
    add_lora(net, lora, "t")
    x, t, ctx = wan_inputs()
    with torch.no_grad():
        ours = net(x, t, ctx)
    path = save_lora(net, lora, tmp_path / "lora.safetensors", fmt)
    pipe = diffusers.WanPipeline.from_pretrained(str(lora_files["folder"]), local_files_only=True)
    pipe.load_lora_weights(str(path), adapter_name="t")
    with torch.no_grad():
        theirs = run_ref(pipe.transformer, x, t, ctx)
        base = run_ref(ref, x, t, ctx)
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    back = load_lora_file(net, path)
    assert back.state_dict().keys() == lora.state_dict().keys()
    for k, v in lora.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_diffusers_file_is_what_save_lora_weights_writes(lora_files, tmp_path):
    """dfm's diffusers export == WanPipeline.save_lora_weights of the same layers and adapter config: the same
    keys, tensors and metadata; and diffusers' load_lora_adapter reads it into a bare transformer too."""
    ref, net = transformer_pair(lora_files["folder"])
    lora = trained_lora(net, rank=2, alpha=3.0)
    ours = save_lora(net, lora, tmp_path / "ours.safetensors", "diffusers")
    layers = {k.removeprefix("transformer."): v for k, v in load_file(ours).items()}
    with safe_open(str(ours), "pt") as f:
        meta = f.metadata()
    config = {k.removeprefix("transformer."): v for k, v in json.loads(meta["lora_adapter_metadata"]).items()}
    diffusers.WanPipeline.save_lora_weights(tmp_path / "theirs", transformer_lora_layers=layers,
                                            transformer_lora_adapter_metadata=config)
    theirs = tmp_path / "theirs" / "pytorch_lora_weights.safetensors"
    with safe_open(str(theirs), "pt") as f:
        assert f.metadata() == meta
    a, b = load_file(ours), load_file(theirs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == 3.0
    # (diffusers reads the metadata only on its safetensors path: with weight_name or use_safetensors=True; a bare
    # file path goes through its pickle fallback and loads at alpha = rank)
    ref.load_lora_adapter(str(ours.parent), weight_name=ours.name, adapter_name="x", prefix="transformer")
    add_lora(net, lora)
    x, t, ctx = wan_inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, ctx), run_ref(ref, x, t, ctx), atol=1e-5, rtol=0)


def test_fuse_unfuse_unload_round_trip(lora_files):
    """Two stacked adapters with scales: fused == hooked output; unfuse gives the weights back bit for bit, unload
    the original model exactly; fusing one of two and unfusing in any order works."""
    _, net = transformer_pair(lora_files["folder"])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, t, ctx = wan_inputs()
    with torch.no_grad():
        base = net(x, t, ctx)
        a, b = trained_lora(net, seed=1), trained_lora(net, rank=2, seed=2)
        add_lora(net, a, "a", 0.7)
        only_a = net(x, t, ctx)
        add_lora(net, b, "b", -0.4)
        hooked = net(x, t, ctx)
        fuse_lora(net)
        torch.testing.assert_close(net(x, t, ctx), hooked, atol=1e-5, rtol=0)
        unfuse_lora(net, "a")  # a was fused first: b is unfused, a restored, b fused again
        torch.testing.assert_close(net(x, t, ctx), hooked, atol=1e-5, rtol=0)
        remove_lora(net, "b")
        torch.testing.assert_close(net(x, t, ctx), only_a, atol=1e-6, rtol=0)
        fuse_lora(net, "a")
        unfuse_lora(net)
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
        remove_lora(net)
        assert torch.equal(net(x, t, ctx), base)
    assert net.state_dict().keys() == before.keys()  # adapters never enter the network's own state_dict


def bad_file(tmp_path, name, tensors):
    path = tmp_path / name
    save_file(tensors, path)
    return path


def test_bad_lora_files_get_one_line(lora_files, tmp_path):
    _, net = transformer_pair(lora_files["folder"])
    good = load_file(lora_files["meta"])
    cases = {
        "unmatched": ({**good, "transformer.blocks.7.attn1.to_q.lora_A.weight": torch.zeros(4, 24),
                       "transformer.blocks.7.attn1.to_q.lora_B.weight": torch.zeros(24, 4)},
                      "blocks.7.attn1.to_q.lora_A.weight' matches no layer"),
        "width": ({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64),
                   "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4)}, "another width"),
        "flux": ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 24),
                  "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(24, 4)},
                 "another architecture"),
        "dit": ({"transformer.blocks.0.attn.qkv.lora_A.weight": torch.zeros(4, 24),
                 "transformer.blocks.0.attn.qkv.lora_B.weight": torch.zeros(72, 4)}, "LoRA for a DiT"),
        "diff": ({"diffusion_model.blocks.0.self_attn.q.diff": torch.zeros(24, 24)}, "full weight or bias"),
        "alone": ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 24)}, "no matching"),
        "junk": ({"hello": torch.zeros(1)}, "not a LoRA key"),
    }
    for name, (tensors, words) in cases.items():
        with pytest.raises(UserError) as e:
            load_lora_file(net, bad_file(tmp_path, f"{name}.safetensors", tensors))
        msg = str(e.value)
        assert words in msg and "\n" not in msg, (name, msg)


def test_info_describes_a_lora_file(lora_files):
    text = describe_lora(lora_files["meta"])
    assert "diffusers / PEFT" in text and "rank                      2, 4" in text and "alpha                     8" in text
    assert "blocks.N.attn1.to_q" in text and "width 24" in text
    plain = describe_lora(lora_files["plain"])
    assert "none stored: alpha = rank" in plain


def test_dit_lora_round_trips_through_its_file(tmp_path):
    """A DiT (no diffusers counterpart): its fused q/k/v slices are written as one block-diagonal adapter per
    layer (dfm's layer names, PEFT keys), which reads back to the same output; a Wan LoRA is refused by name."""
    from dfm.models import DiT, DiTConfig

    torch.manual_seed(0)
    net = DiT(DiTConfig(dim=32, heads=2, depth=2, in_channels=3, out_channels=3, context_dim=8, freq_dim=32)).eval()
    lora = trained_lora(net)
    names = lora.names()
    assert "blocks.0.attn.qkv" in names and "blocks.1.mlp.fc2" in names and "blocks.0.cross_attn.kv" in names
    assert len(names) == 2 * 7  # per block: attn qkv/out, cross q/kv/out, mlp fc1/fc2 (no adaLN, no embedders)
    hourglass = DiT(DiTConfig(dim=32, heads=2, depths=(1, 1), widths=(32, 64), in_channels=3, context_dim=8,
                              freq_dim=32))
    assert sorted({n.split(".")[0] for n in LoRA.create(hourglass, rank=2).names()}) == ["down", "mid", "up"]
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 3, 2, 8, 8, generator=g), torch.tensor([0.3, 2.0]), torch.randn(2, 5, 8, generator=g)
    with torch.no_grad():
        base = net(x, t, ctx)
        add_lora(net, lora, "a")
        ours = net(x, t, ctx)
        path = save_lora(net, lora, tmp_path / "dit.safetensors")
        assert read_lora(path).format == "dfm" and read_lora(path).arch == "dit"
        remove_lora(net)
        assert torch.equal(net(x, t, ctx), base)
        add_lora(net, load_lora_file(net, path), "b")
        torch.testing.assert_close(net(x, t, ctx), ours, atol=1e-6, rtol=0)
        fuse_lora(net)
        torch.testing.assert_close(net(x, t, ctx), ours, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="LoRA for a DiT"):
        _, wan = transformer_pair_tiny(tmp_path)
        load_lora_file(wan, path)


def transformer_pair_tiny(tmp_path):
    ref = diffusers.WanTransformer3DModel(**TINY).eval()
    ref.save_pretrained(tmp_path / "wan")
    return ref, WanModel.from_pretrained(tmp_path / "wan")
