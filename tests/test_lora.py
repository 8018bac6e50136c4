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
    frames = pipe(prompt=PROMPTS, negative_prompt=WAN_NEGATIVE_PROMPT, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=steps,
                  guidance_scale=guidance, latents=noise(seeds), output_type="pt").frames
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
