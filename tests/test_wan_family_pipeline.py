"""The Wan family's diffusers folders through dfm's pipeline, against diffusers' pipelines as the oracle.

Tiny random folders (WanTransformer3DModel, AutoencoderKLWan, UMT5 with a tokenizer trained here, CLIPVisionModel +
CLIPImageProcessor for the 2.1 I2V / FLF2V ones) are saved with save_pretrained; `load_pipeline` reads them and
both pipelines run on the same prompts, negative prompt, image and initial latents. The decoded videos agree to
1e-5 (fp32) for: Wan 2.1 I2V and FLF2V (WanImageToVideoPipeline), Wan 2.2 A14B two experts text-to-video
(WanPipeline) and image-to-video without CLIP, with guidance_scale_2, and TI2V (expand_timesteps) with and without
an image, under UniPC and FlowMatch Euler."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
pytest.importorskip("ftfy")  # diffusers' WanImageToVideoPipeline does not run without it

from PIL import Image  # noqa: E402

from dfm.pipeline import PipelineError, load_pipeline  # noqa: E402
from test_wan_pipeline import PROMPTS, scheduler, tokenizer  # noqa: E402

FRAMES, SIZE = 5, 32  # 2 latent frames of 4x4 (Wan 2.1 VAE); TI2V's VAE (16x): 2 x 2x2
NEGATIVE = "blurry, static"


def image(seed: int, size=(40, 48)):
    """A random RGB picture of another size than the video (the resize matters)."""
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (*size, 3), generator=g, dtype=torch.uint8).numpy())


def transformer(seed: int, **kw):
    torch.manual_seed(seed)
    net = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                          out_channels=kw.pop("out_channels", 16), text_dim=32, freq_dim=32,
                                          ffn_dim=48, num_layers=2, rope_max_seq_len=32, **kw).eval()
    with torch.no_grad():  # make the output layer and the image position table lively
        net.proj_out.weight.normal_(0, 0.2)
        embedder = net.condition_embedder.image_embedder
        if embedder is not None and embedder.pos_embed is not None:
            embedder.pos_embed.normal_(0, 0.5)
    return net


def vae(version: str):
    torch.manual_seed(1)
    if version == "2.1":
        return diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                          temperal_downsample=[False, True, True]).eval()
    # Wan 2.2's VAE layout: residual, patchified (x2), 48 channels, 16x spatial
    return diffusers.AutoencoderKLWan(base_dim=4, decoder_base_dim=4, z_dim=48, dim_mult=[1, 1, 1, 1],
                                      num_res_blocks=1, temperal_downsample=[False, True, True], is_residual=True,
                                      patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16,
                                      scale_factor_temporal=4, latents_mean=[(i % 7 - 3) / 10 for i in range(48)],
                                      latents_std=[1 + (i % 5) / 5 for i in range(48)]).eval()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_parts(tmp_path_factory.mktemp("wan_family"))


def make_parts(root):
    """The shared pieces of the folders (tokenizer, UMT5, CLIP and its processor), with `root` for build()."""
    torch.manual_seed(0)
    tok = tokenizer(root)
    text = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval()
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=20, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16)).eval()
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return root, tok, text, clip, processor


def build(parts, name: str, kind: str) -> str:
    """Save one layout with one scheduler ("unipc" or "euler"); returns the folder."""
    root, tok, text, clip, processor = parts
    folder = root / f"{name}_{kind}"
    if folder.is_dir():
        return folder
    sched = scheduler(kind, 3.0)
    common = dict(tokenizer=tok, text_encoder=text, scheduler=sched)
    if name == "i2v":
        pipe = diffusers.WanImageToVideoPipeline(vae=vae("2.1"), image_encoder=clip, image_processor=processor,
                                                 transformer=transformer(2, in_channels=36, image_dim=20,
                                                                         added_kv_proj_dim=24), **common)
    elif name == "flf2v":
        pipe = diffusers.WanImageToVideoPipeline(vae=vae("2.1"), image_encoder=clip, image_processor=processor,
                                                 transformer=transformer(3, in_channels=36, image_dim=20,
                                                                         added_kv_proj_dim=24, pos_embed_seq_len=34),
                                                 **common)
    elif name == "a14b_t2v":
        pipe = diffusers.WanPipeline(vae=vae("2.1"), transformer=transformer(4, in_channels=16),
                                     transformer_2=transformer(5, in_channels=16), boundary_ratio=0.875, **common)
    elif name == "a14b_i2v":
        pipe = diffusers.WanImageToVideoPipeline(vae=vae("2.1"), transformer=transformer(6, in_channels=36),
                                                 transformer_2=transformer(7, in_channels=36), boundary_ratio=0.9,
                                                 **common)
    elif name == "ti2v":
        pipe = diffusers.WanPipeline(vae=vae("2.2"), transformer=transformer(8, in_channels=48, out_channels=48),
                                     expand_timesteps=True, **common)
    pipe.save_pretrained(folder)
    return folder


def noise(seeds, channels=16, shape=(2, 4, 4)):
    return torch.cat([torch.randn((1, channels, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


def oracle(folder, cls, latents, steps, guidance, **kw):
    pipe = cls.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_frames=FRAMES,
                  num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(), output_type="pt",
                  **kw).frames  # [B, F, 3, H, W] in [0, 1]
    return frames.permute(0, 2, 1, 3, 4) * 2 - 1


CASES = {  # layout: (diffusers class, dfm kwargs = diffusers kwargs, latent channels, latent shape)
    "i2v": ("WanImageToVideoPipeline", {"image": image(0)}, 16, (2, 4, 4)),
    "flf2v": ("WanImageToVideoPipeline", {"image": image(0), "last_image": image(1)}, 16, (2, 4, 4)),
    "a14b_t2v": ("WanPipeline", {"guidance_scale_2": 2.0}, 16, (2, 4, 4)),
    "a14b_i2v": ("WanImageToVideoPipeline", {"image": image(2), "guidance_scale_2": 2.0}, 16, (2, 4, 4)),
    "ti2v": ("WanPipeline", {}, 48, (2, 2, 2)),
    "ti2v_image": ("WanImageToVideoPipeline", {"image": image(3)}, 48, (2, 2, 2)),
}


@pytest.mark.parametrize("kind", ["unipc", "euler"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(parts, case, kind):
    cls, kw, channels, shape = CASES[case]
    folder = build(parts, case.removesuffix("_image"), kind)
    pipe = load_pipeline(folder)
    seeds, steps, guidance = [3, 4], 6, 5.0
    out = pipe.generate(PROMPTS, negative_prompt=NEGATIVE, num_frames=FRAMES, height=SIZE, width=SIZE, steps=steps,
                        guidance_scale=guidance, seeds=seeds, progress=False, **kw)
    expected = oracle(folder, getattr(diffusers, cls), noise(seeds, channels, shape), steps, guidance, **kw)
    assert out.videos.shape == expected.shape == (2, 3, FRAMES, SIZE, SIZE)
    assert out.nfe == steps  # cond + uncond batched per expert: one evaluation per step
    assert expected.std() > 1e-3
    # measured max |diff|: 1.5e-6 .. 7.6e-6 for every case but TI2V text-to-video, 2.8e-5 under Euler (1.4e-5 under
    # UniPC on an AMD EPYC): its latents are larger (|z| up to 5.5), one forward agrees to 1.5e-6 and guidance 5
    # over 6 steps amplifies it
    torch.testing.assert_close(out.videos, expected, atol=3e-5 if case == "ti2v" else 1e-5, rtol=0)


def test_experts_switch_by_noise_level_whichever_sampler_runs(parts):
    """The high-noise expert sees only t >= boundary_ratio * 1000, the low-noise one only t below, under an EDM-space
    sampler and a flow one alike; guidance_scale_2 changes the video."""
    pipe = load_pipeline(build(parts, "a14b_t2v", "unipc"))
    experts = pipe.transformer.net.experts  # IntegerTimesteps -> WanFamilyNet
    seen = {0: [], 1: []}
    hooks = [e.register_forward_pre_hook(lambda m, a, i=i: seen[i].extend(a[1].reshape(-1).tolist()))
             for i, e in enumerate(experts)]
    kw = dict(num_frames=FRAMES, height=SIZE, width=SIZE, steps=6, seed=0, progress=False)
    try:
        for sampler in ("edm:heun", "flow:dpmpp_2m"):
            seen[0].clear(), seen[1].clear()
            pipe.generate(PROMPTS[0], sampler=sampler, **kw)
            assert seen[0] and seen[1], sampler
            assert min(seen[0]) >= 875 > max(seen[1]), (sampler, seen)
    finally:
        for h in hooks:
            h.remove()
    a = pipe.generate(PROMPTS[0], guidance_scale_2=1.0, **kw).videos
    b = pipe.generate(PROMPTS[0], guidance_scale_2=4.0, **kw).videos
    assert (a - b).abs().max() > 1e-4


def test_images_per_prompt_and_as_tensors(parts):
    """One image per prompt: each video is the one a batch of one gives; a [3, H, W] tensor in [-1, 1] is the
    same image as the PIL picture it came from."""
    import numpy as np

    pipe = load_pipeline(build(parts, "i2v", "unipc"))
    kw = dict(num_frames=FRAMES, height=SIZE, width=SIZE, steps=3, progress=False)
    pics = [image(0), image(1)]
    both = pipe.generate(PROMPTS, image=pics, seeds=[3, 4], **kw).videos
    for i in range(2):
        one = pipe.generate(PROMPTS[i], image=pics[i], seeds=[3 + i], **kw).videos
        torch.testing.assert_close(one[0], both[i], atol=1e-5, rtol=0)
    tensor = torch.from_numpy(np.array(pics[1])).permute(2, 0, 1).float() / 127.5 - 1  # [3, H, W]
    torch.testing.assert_close(pipe.generate(PROMPTS[1], image=tensor, seeds=[4], **kw).videos, one, rtol=0, atol=0)
    other = pipe.generate(PROMPTS[1], image=pics[0], seeds=[4], **kw).videos[0]
    assert (other - both[1]).abs().max() > 1e-3  # the image matters


def test_wrong_inputs_are_one_line_errors(parts, tmp_path):
    kw = dict(num_frames=FRAMES, height=SIZE, width=SIZE, steps=1, progress=False)
    i2v, t2v = load_pipeline(build(parts, "i2v", "unipc")), load_pipeline(build(parts, "a14b_t2v", "unipc"))
    with pytest.raises(PipelineError, match="Wan I2V folder: it needs an image"):
        i2v.generate(PROMPTS[0], **kw)
    with pytest.raises(PipelineError, match="last_image needs a first-last-frame"):
        i2v.generate(PROMPTS[0], image=image(0), last_image=image(1), **kw)
    with pytest.raises(PipelineError, match="guidance_scale_2 is the low-noise expert's scale; this Wan I2V"):
        i2v.generate(PROMPTS[0], image=image(0), guidance_scale_2=3.0, **kw)
    with pytest.raises(PipelineError, match="A14B text-to-video model: it takes no image"):
        t2v.generate(PROMPTS[0], image=image(0), **kw)
    with pytest.raises(PipelineError, match="FLF2V .* it needs last_image"):
        load_pipeline(build(parts, "flf2v", "unipc")).generate(PROMPTS[0], image=image(0), **kw)
    with pytest.raises(PipelineError, match="got 3 images for 2 prompts"):
        i2v.generate(PROMPTS, image=[image(0)] * 3, **kw)
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    with pytest.raises(PipelineError, match="cannot read image .*bad.png"):
        i2v.generate(PROMPTS[0], image=bad, **kw)


def test_cli_image_flags_and_info(parts, tmp_path, capsys):
    from dfm import cli

    folder = build(parts, "a14b_i2v", "unipc")
    assert cli.main(["info", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "layout                    A14B-I2V (diffusers WanImageToVideoPipeline)" in text
    assert "transformer (t >= 900), transformer_2 below" in text and "params transformer_2" in text
    assert "default guidance_scale_2  3.5" in text and "default steps             40" in text
    assert "default height            720" in text and "image                     required (first frame, no CLIP)" in text
    pic = tmp_path / "first.png"
    image(5).save(pic)
    out = tmp_path / "v.gif"
    base = ["generate", PROMPTS[0], "--model", str(folder), "--frames", str(FRAMES), "--height", str(SIZE),
            "--width", str(SIZE), "--steps", "2", "--seed", "1", "--no-progress"]
    assert cli.main(base + ["--image", str(pic), "--guidance-2", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    capsys.readouterr()
    for flags, message in ((["--image", str(tmp_path / "missing.png")], "cannot read --image"),
                           ([], "it needs an image"),
                           (["--image", str(pic), "--last-image", str(pic)], "last_image needs a first-last-frame")):
        assert cli.main(base + flags + ["--out", str(tmp_path / "x.gif")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dfm generate: error: ") and message in err[0], err


def test_image_to_a_text_to_video_model(tmp_path, capsys):
    """A dfm text-to-video model (the shipped DiT): an image or guidance_scale_2 is one line, from the CLI before any
    weights load."""
    from dfm import cli

    shipped = __import__("pathlib").Path(__file__).resolve().parents[1] / "models" / "dit_edm_digits"
    pic = tmp_path / "p.png"
    image(0).save(pic)
    for flags, what in ((["--image", str(pic)], "text-to-video model: it takes no image"),
                        (["--guidance-2", "3"], "low-noise expert's scale; this text-to-video model has one")):
        assert cli.main(["generate", "the digit 3 moves up", "--model", str(shipped), "--steps", "1", "--out",
                         str(tmp_path / "v.gif"), "--no-progress"] + flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0] and "Loading" not in err[0], err
    pipe = load_pipeline(shipped)
    with pytest.raises(PipelineError, match="text-to-video model with one transformer: it takes no last_image"):
        pipe.generate("the digit 3 moves up", steps=1, last_image=image(0), progress=False)


@pytest.mark.parametrize("case", ["i2v", "ti2v_image"])
def test_step_cache_drives_one_expert_layouts(parts, case, tmp_path, monkeypatch):
    """A step cache on an I2V (image cross-attention, 36 channels) and a TI2V (per-token timesteps) folder:
    threshold 0 gives exactly the uncached video, a huge one skips calls (first and last computed) and stays finite;
    a two-expert folder is refused in one line (each expert would need its own cache)."""
    from dfm.pipeline.caching import CacheError

    monkeypatch.setenv("DFM_CACHE_DIR", str(tmp_path))  # first-use calibrations go here, not to ~/.cache
    _, kw, _, _ = CASES[case]
    pipe = load_pipeline(build(parts, case.removesuffix("_image"), "unipc"))
    args = dict(num_frames=FRAMES, height=SIZE, width=SIZE, steps=6, seeds=[3], progress=False, **kw)
    plain = pipe.generate(PROMPTS[0], **args)
    for method in ("magcache", "teacache", "fbcache"):
        assert torch.equal(pipe.generate(PROMPTS[0], cache=method, cache_threshold=0, **args).videos, plain.videos)
        skipped = pipe.generate(PROMPTS[0], cache=method, cache_threshold=1e9, **args)
        assert 2 <= skipped.stack_evals < plain.stack_evals == 6, method
        assert torch.isfinite(skipped.videos).all()
    two = load_pipeline(build(parts, "a14b_t2v", "unipc"))
    with pytest.raises(CacheError, match="two-expert") as e:
        two.generate(PROMPTS[0], cache="magcache", num_frames=FRAMES, height=SIZE, width=SIZE, steps=3,
                     progress=False)
    assert "\n" not in str(e.value)
