"""A diffusers Wan 2.1 folder through dfm's pipeline, against diffusers' WanPipeline as the oracle.

A tiny random WanPipeline (WanTransformer3DModel, AutoencoderKLWan, UMT5EncoderModel, a sentencepiece tokenizer
trained here, and Wan's UniPC or FlowMatch Euler scheduler) is saved in the diffusers layout; dfm's `load_pipeline`
reads the folder and both pipelines run on the same prompts and the same initial latents. The decoded videos
must agree: that checks the text path (UMT5 rows trimmed and zero-padded to 512, no mask in the transformer), the
grid (diffusers' flow sigmas, shift), the integer timesteps, CFG with the negative prompt, UniPC, and the VAE's
latent normalisation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from dfm import cli  # noqa: E402
from dfm.errors import UserError  # noqa: E402
from dfm.pipeline import WAN_NEGATIVE_PROMPT, PipelineError, load_pipeline  # noqa: E402

SENTENCES = [
    "a cat and a dog bake a cake together in a kitchen",
    "the digit 7 moves to the left",
    "sunlight streams through the window onto the table",
    "a red car drives along a wet street at night",
    WAN_NEGATIVE_PROMPT,
]
PROMPTS = ["a cat and a dog bake a cake", "a red car at night"]
FRAMES, SIZE = 5, 32  # 2 latent frames of 4x4 (Wan VAE: 4x temporal, 8x spatial)


def tokenizer(folder):
    """A small unigram sentencepiece model with T5's id layout (pad 0, eos 1, unk 2) as a T5Tokenizer."""
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 4), model_prefix=str(folder / "sp"),
                                   vocab_size=120, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    return transformers.T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())],
                                    extra_ids=0)


def scheduler(kind: str, shift: float):
    if kind == "unipc":  # as in Wan-AI/Wan2.1-T2V-*-Diffusers
        return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 flow_shift=shift, num_train_timesteps=1000, solver_order=2)
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=1000)


@pytest.fixture(scope="module")
def wan_folders(tmp_path_factory):
    """{"unipc": folder, "euler": folder}: one tiny random model, saved with either scheduler."""
    root = tmp_path_factory.mktemp("wan_pipeline")
    torch.manual_seed(0)
    tok = tokenizer(root)
    text = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval()
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=32).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing that matters here, but make the output layer lively
        transformer.proj_out.weight.normal_(0, 0.2)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    out = {}
    for kind, shift in (("unipc", 3.0), ("euler", 5.0)):
        pipe = diffusers.WanPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer,
                                     scheduler=scheduler(kind, shift))
        pipe.save_pretrained(root / kind)
        out[kind] = root / kind
    return out


def diffusers_videos(folder, prompts, negative, latents, steps, guidance):
    """diffusers' WanPipeline on the folder: [B, 3, F, H, W] in [-1, 1]."""
    pipe = diffusers.WanPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt=prompts, negative_prompt=negative, height=SIZE, width=SIZE, num_frames=FRAMES,
                  num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                  output_type="pt").frames  # [B, F, 3, H, W] in [0, 1]
    return frames.permute(0, 2, 1, 3, 4) * 2 - 1


def noise(seeds):
    """dfm's initial latents: one generator per sample."""
    return torch.cat([torch.randn((1, 16, 2, 4, 4), generator=torch.Generator().manual_seed(s)) for s in seeds])


@pytest.mark.parametrize("kind,negative", [("unipc", None), ("unipc", "blurry, static"), ("euler", None)])
def test_matches_diffusers_wan_pipeline(wan_folders, kind, negative):
    pipe = load_pipeline(wan_folders[kind])
    assert pipe.kind == "wan" and pipe.defaults["negative_prompt"] == WAN_NEGATIVE_PROMPT
    assert pipe.defaults["sampler"] == ("flow:unipc" if kind == "unipc" else "flow:euler")
    assert pipe.defaults["shift"] == (3.0 if kind == "unipc" else 5.0)  # from the scheduler config
    seeds, steps, guidance = [3, 4], 6, 5.0
    out = pipe.generate(PROMPTS, negative_prompt=negative, num_frames=FRAMES, height=SIZE, width=SIZE, steps=steps,
                        guidance_scale=guidance, seeds=seeds, progress=False)
    expected = diffusers_videos(wan_folders[kind], PROMPTS, negative or WAN_NEGATIVE_PROMPT, noise(seeds), steps,
                                guidance)
    assert out.videos.shape == expected.shape == (2, 3, FRAMES, SIZE, SIZE)
    assert out.nfe == steps  # cond + uncond batched: one evaluation per step
    assert expected.std() > 1e-3
    torch.testing.assert_close(out.videos, expected, atol=1e-5, rtol=0)  # measured: 3e-7 (unipc), 6e-7 (euler)


def test_integer_timesteps_matter(wan_folders):
    """Feeding the exact 1000 s instead of Wan's int(1000 s) changes the video: the setting is not a no-op."""
    pipe = load_pipeline(wan_folders["unipc"])
    kw = dict(num_frames=FRAMES, height=SIZE, width=SIZE, steps=4, seed=0, progress=False)
    a = pipe.generate(PROMPTS[0], **kw).videos
    pipe.module.net = pipe.module.net.net  # unwrap IntegerTimesteps
    b = pipe.generate(PROMPTS[0], **kw).videos
    assert (a - b).abs().max() > 1e-5


def test_wan_validation(wan_folders):
    pipe = load_pipeline(wan_folders["unipc"])
    with pytest.raises(UserError, match=r"1 \+ 4\*n frames \(1, 5, 9, 13, ...\), got 4"):
        pipe.generate(PROMPTS[0], num_frames=4, height=SIZE, width=SIZE, steps=1)
    with pytest.raises(PipelineError, match=r"multiples of 16x16 \(VAE factor 8 x patch 2x2\)"):
        pipe.generate(PROMPTS[0], num_frames=FRAMES, height=24, width=SIZE, steps=1)
    with pytest.raises(PipelineError, match=r"tokens long; this model's text encoder reads at most 512"):
        pipe.generate(" ".join(["zebra quartz"] * 300), num_frames=FRAMES, height=SIZE, width=SIZE, steps=1)


def test_wan_folder_defects(wan_folders, tmp_path):
    folder = tmp_path / "wan"
    shutil.copytree(wan_folders["unipc"], folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(PipelineError, match=r"vae is missing; download the Wan 2.1 folder again"):
        load_pipeline(folder)
    shutil.rmtree(folder)
    shutil.copytree(wan_folders["unipc"], folder)
    (folder / "scheduler" / "scheduler_config.json").write_text("{")
    with pytest.raises(PipelineError, match="scheduler_config.json is not valid JSON"):
        load_pipeline(folder)
    index = json.loads((wan_folders["unipc"] / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanVACEPipeline"}))
    with pytest.raises(PipelineError, match="'WanVACEPipeline'; dfm loads dfm model folders and"):
        load_pipeline(folder)


def test_wan_info_and_cli(wan_folders, tmp_path, capsys):
    assert cli.main(["info", str(wan_folders["unipc"])]) == 0
    text = capsys.readouterr().out
    reference = diffusers.WanTransformer3DModel.from_pretrained(str(wan_folders["unipc"] / "transformer"))
    n = sum(p.numel() for p in reference.parameters())
    assert "diffusers Wan 2.1 folder" in text and f"({n:,})" in text and "layout                    T2V" in text
    assert "max_length 512" in text and "16 channels, temporal x4, spatial x8" in text
    assert "default sampler           flow:unipc" in text
    out = tmp_path / "wan.gif"
    assert cli.main(["generate", PROMPTS[0], "--model", str(wan_folders["unipc"]), "--frames", str(FRAMES),
                     "--height", str(SIZE), "--width", str(SIZE), "--steps", "2", "--seed", "1", "--out", str(out),
                     "--no-progress"]) == 0
    assert out.stat().st_size > 0 and out.with_suffix(".png").is_file()
    assert "NFE 2" in capsys.readouterr().err
