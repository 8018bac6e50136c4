"""`dfm train ... model.init_from=FOLDER` on diffusers Wan image-to-video folders, with the folder's own
conditioning layout, against diffusers as the oracle on tiny random folders (built as test_wan_family_pipeline):

- TI2V (Wan 2.2 5B layout, 48-channel VAE, expand_timesteps): conditioning.mode=frame. The transformer inputs of a
  training step (a clip whose first frame is the image, at the first step's noise level) are what diffusers'
  WanImageToVideoPipeline feeds its transformer for that image: the noisy latents with the first latent frame
  replaced by E(image), per-token timesteps 0 there, the UMT5 context.
- I2V (Wan 2.1, 36 channels, CLIP image cross-attention): conditioning.mode=concat with the folder's CLIP. The
  inputs: [x_s, mask, E(frame 0, zeros...)], the timestep, the CLIP features of the frame, the UMT5 context.
- Full and LoRA runs train; a LoRA exported from the run loads into diffusers' pipeline of the folder
  (load_lora_weights) and gives dfm's image-to-video video to 1e-5; load_pipeline(RUN) is the folder + adapters."""

from __future__ import annotations

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")
pytest.importorskip("ftfy")  # diffusers' WanImageToVideoPipeline does not run without it

from PIL import Image  # noqa: E402

from dfm import cli  # noqa: E402
from dfm.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from dfm.config import load_config  # noqa: E402
from dfm.models import WanModel  # noqa: E402
from dfm.pipeline import PipelineError, load_pipeline  # noqa: E402
from dfm.training.config import TrainConfig  # noqa: E402
from dfm.training.trainer import Trainer  # noqa: E402
from dfm.video import write_video  # noqa: E402
from test_wan_family_pipeline import FRAMES, NEGATIVE, SIZE, build, make_parts, noise  # noqa: E402

CAPTIONS = ["a cat and a dog bake a cake", "a red car drives at night"]
LORA = ["lora.rank=4", "lora.alpha=8", "optim.lr=3e-2", "optim.ema_decay=0"]
GEN = dict(num_frames=FRAMES, height=SIZE, width=SIZE, steps=4, seeds=[3, 4], guidance_scale=5.0, progress=False)


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    """A tiny TI2V folder, two png-sequence clips with captions and a recipe that names no model."""
    root = tmp_path_factory.mktemp("ti2v_train")
    parts = make_parts(root)
    folder = build(parts, "ti2v", "unipc")
    clips = root / "clips"
    clips.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, caption in enumerate(CAPTIONS):
        write_video(clips / f"clip{i}", torch.rand(3, FRAMES, SIZE, SIZE, generator=g) * 2 - 1)
        (clips / f"clip{i}.txt").write_text(caption)
    recipe = {"data": {"dataset": "folder", "root": str(clips), "num_frames": FRAMES, "size": SIZE},
              "train": {"batch_size": 2, "log_every": 1, "device": "cpu", "progress": False, "tensorboard": False,
                        "threads": 1, "max_steps": 3}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return {"root": root, "folder": folder, "recipe": root / "recipe.yaml", "clips": clips, "parts": parts}


def config(ti2v, out, *overrides) -> TrainConfig:
    return load_config(TrainConfig, str(ti2v["recipe"]), [f"model.init_from={ti2v['folder']}",
                                                          f"train.output_dir={out}", *overrides])


def first_frame(ti2v, caption: str) -> Image.Image:
    return Image.open(ti2v["clips"] / f"clip{CAPTIONS.index(caption)}" / "00000.png").convert("RGB")


def recorded(module):
    """Record the keyword-complete inputs of the first call of `module` (a forward pre-hook)."""
    seen = {}

    def hook(mod, args, kwargs):
        if not seen:
            names = ["x", "t", "context"] if isinstance(mod, WanModel) else ["hidden_states", "timestep",
                                                                              "encoder_hidden_states"]
            seen.update({n: a for n, a in zip(names, args)}, **kwargs)

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def test_ti2v_training_inputs_are_what_diffusers_feeds_its_transformer(ti2v, tmp_path):
    cfg = config(ti2v, tmp_path / "run", "conditioning.probability=1", "text.dropout=0", "train.batch_size=1")
    pipe = diffusers.WanImageToVideoPipeline.from_pretrained(str(ti2v["folder"]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(2)
    t0 = float(pipe.scheduler.timesteps[0])  # the first step's timestep (UniPC's are integers: 999)

    trainer = Trainer(cfg)
    assert cfg.conditioning.mode == "frame"  # the folder's layout
    trainer.module.timesteps.sample = lambda n, generator=None, device=None: torch.full((n,), t0 / 1000, device=device)
    ours, handle = recorded(trainer.module.net)
    batch = next(iter(trainer.loader()))
    trainer.train_step(0, [batch])  # x_s = (1 - s) x0 + s eps, frame 0 clean; these latents go to diffusers too
    handle.remove()
    caption = batch["caption"][0]

    theirs, handle = recorded(pipe.transformer)
    pipe(prompt=caption, image=first_frame(ti2v, caption), height=SIZE, width=SIZE, num_frames=FRAMES,
         num_inference_steps=2, guidance_scale=1.0, latents=ours["x"].clone(), output_type="latent")
    handle.remove()

    x, h = ours["x"], theirs["hidden_states"]  # [1, 48, 2, 2, 2]: E(clip) at t = 0 on frame 0, noise elsewhere
    assert x.shape == h.shape and h[:, :, 0].abs().max() > 0.1
    torch.testing.assert_close(x, h, atol=1e-5, rtol=0)  # frame 0: E(the clip) == diffusers' E(image)
    t, ts = ours["t"], theirs["timestep"].float()  # [1, L] per token: 0 on frame 0's tokens, t0 on the rest
    assert t.shape == ts.shape and ts.max() == t0 and ts[0, 0] == 0 == t[0, 0]
    torch.testing.assert_close(t, ts, atol=1e-3, rtol=0)  # training's fp32 s * 1000 against the integer
    # the UMT5 context zero-padded to 512 tokens and no mask: the transformer attends to the padding, as diffusers'
    assert ours.get("context_mask") is None and theirs.get("attention_mask") is None
    torch.testing.assert_close(ours["context"], theirs["encoder_hidden_states"], atol=1e-6, rtol=0)


def test_ti2v_layout_in_dry_run_and_conflicts_refused(ti2v, tmp_path, capsys):
    args = ["train", "--config", str(ti2v["recipe"]), f"model.init_from={ti2v['folder']}",
            f"train.output_dir={tmp_path / 'x'}", "--dry-run"]
    assert cli.main(args) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["conditioning"]["mode"] == "frame" and cfg["autoencoder"]["name"] == str(ti2v["folder"] / "vae")
    assert cfg["text"]["mask"] is False  # trained as diffusers samples: the zero padding attended, no mask
    for bad in ("conditioning.mode=concat", "conditioning.last=true"):
        assert cli.main([*args, bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "TI2V" in err and "conditioning.mode=frame" in err, err
    assert not (tmp_path / "x").exists()


def test_ti2v_full_fine_tune_starts_at_the_folder_and_trains(ti2v, tmp_path):
    cfg = config(ti2v, tmp_path / "full")
    trainer = Trainer(cfg)
    folder = WanModel.from_pretrained(ti2v["folder"] / "transformer").state_dict()
    net = trainer.module.net.state_dict()
    assert all(torch.equal(net[k], folder[k]) for k in folder)
    result = trainer.run()
    assert result["step"] == 3
    after = trainer.module.net.state_dict()
    assert all(not torch.equal(after[k], folder[k]) for k in ("blocks.0.attn1.to_q.weight", "proj_out.weight"))
    pipe = load_pipeline(tmp_path / "full")  # the run's model takes the image
    image = first_frame(ti2v, CAPTIONS[0])
    out = pipe.generate(CAPTIONS[:1], image=image, steps=2, seeds=[0], num_frames=FRAMES, height=SIZE, width=SIZE,
                        progress=False)
    assert torch.isfinite(out.videos).all() and out.videos.std() > 1e-3


def test_ti2v_lora_run_exports_a_lora_diffusers_loads(ti2v, tmp_path):
    assert cli.main(["train", "--config", str(ti2v["recipe"]), f"model.init_from={ti2v['folder']}",
                     f"train.output_dir={tmp_path / 'run'}", *LORA]) == 0
    state = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert state["step"] == 3 and all(k.startswith("lora.layers.") for k in state["model"])
    out = tmp_path / "ti2v_lora.safetensors"
    assert cli.main(["export", str(tmp_path / "run"), str(out), "--lora-only"]) == 0
    assert out.is_file()

    image = first_frame(ti2v, CAPTIONS[1])
    ours = load_pipeline(ti2v["folder"])
    plain = ours.generate(CAPTIONS, image=image, negative_prompt=NEGATIVE, **GEN).videos
    ours.load_lora(out)
    tuned = ours.generate(CAPTIONS, image=image, negative_prompt=NEGATIVE, **GEN).videos
    assert (tuned - plain).abs().max() > 1e-3  # three steps at lr 3e-2 moved the adapters

    pipe = diffusers.WanImageToVideoPipeline.from_pretrained(str(ti2v["folder"]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out.parent), weight_name=out.name, adapter_name="run")
    frames = pipe(prompt=CAPTIONS, negative_prompt=NEGATIVE, image=image, height=SIZE, width=SIZE,
                  num_frames=FRAMES, num_inference_steps=GEN["steps"], guidance_scale=GEN["guidance_scale"],
                  latents=noise(GEN["seeds"], 48, (2, 2, 2)), output_type="pt").frames  # [B, F, 3, H, W] in [0, 1]
    torch.testing.assert_close(tuned, frames.permute(0, 2, 1, 3, 4) * 2 - 1, atol=1e-5, rtol=0)

    from_run = load_pipeline(tmp_path / "run")  # the TI2V folder (its layout, sampler) + the run's adapters
    torch.testing.assert_close(from_run.generate(CAPTIONS, image=image, negative_prompt=NEGATIVE, **GEN).videos,
                               tuned, atol=1e-6, rtol=0)



# ================================================================================ Wan 2.1 I2V (concat + CLIP)


@pytest.fixture(scope="module")
def i2v(ti2v):
    """A tiny Wan 2.1 I2V folder (36 channels, CLIP image cross-attention) and the same clips and recipe."""
    return {**ti2v, "folder": build(ti2v["parts"], "i2v", "unipc")}


@pytest.fixture(scope="module")
def flf2v(ti2v):
    """A tiny Wan 2.1 FLF2V folder (the I2V layout with the CLIP position table: first and last frames)."""
    return {**ti2v, "folder": build(ti2v["parts"], "flf2v", "unipc")}


def last_frame(case, caption: str) -> Image.Image:
    return Image.open(case["clips"] / f"clip{CAPTIONS.index(caption)}" / f"{FRAMES - 1:05d}.png").convert("RGB")


@pytest.fixture(params=["i2v", "flf2v"])
def i2v_or_flf2v(request, i2v, flf2v):
    """The Wan 2.1 I2V folder, or the FLF2V one with the last frame given too."""
    return {**(i2v if request.param == "i2v" else flf2v), "last": request.param == "flf2v"}


def images(case, caption: str) -> dict:
    """The image arguments of both sides' pipelines for a clip: its first frame (and last, FLF2V)."""
    return {"image": first_frame(case, caption), **({"last_image": last_frame(case, caption)} if case["last"] else {})}


def test_i2v_training_inputs_are_what_diffusers_feeds_its_transformer(i2v_or_flf2v, tmp_path):
    i2v = i2v_or_flf2v
    pipe = diffusers.WanImageToVideoPipeline.from_pretrained(str(i2v["folder"]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(2)
    t0 = float(pipe.scheduler.timesteps[0])

    cfg = config(i2v, tmp_path / "run", "text.dropout=0", "train.batch_size=1")
    trainer = Trainer(cfg)
    c = cfg.conditioning
    assert (c.mode, c.probability, c.image_encoder, c.last) == ("concat", 1.0, str(i2v["folder"]), i2v["last"])
    trainer.module.timesteps.sample = lambda n, generator=None, device=None: torch.full((n,), t0 / 1000, device=device)
    ours, handle = recorded(trainer.module.net)
    batch = next(iter(trainer.loader()))
    trainer.train_step(0, [batch])
    handle.remove()
    caption = batch["caption"][0]

    theirs, handle = recorded(pipe.transformer)
    pipe(prompt=caption, **images(i2v, caption), height=SIZE, width=SIZE, num_frames=FRAMES,
         num_inference_steps=2, guidance_scale=1.0, latents=ours["x"][:, :16].clone(), output_type="latent")
    handle.remove()

    x, h = ours["x"], theirs["hidden_states"]  # [1, 16 + 4 + 16, 2, 4, 4]: x_s, mask, E(frame 0, zeros... (, last))
    assert x.shape == h.shape == (1, 36, 2, 4, 4) and h[:, 20:].abs().max() > 0.1
    assert bool(h[:, 16:20, -1].amax() == 1) == i2v["last"]  # the mask marks the last frame given (FLF2V)
    torch.testing.assert_close(x, h, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["t"].float().reshape(-1), theirs["timestep"].float().reshape(-1), atol=1e-3,
                               rtol=0)
    img, their_img = ours["image_context"], theirs["encoder_hidden_states_image"]  # [1, 17 (FLF2V 34), 20] CLIP
    their_img = their_img.reshape(1, -1, their_img.shape[-1])  # FLF2V [2, 17, 20]: the image embedder's own view
    assert img.shape == their_img.shape == (1, 34 if i2v["last"] else 17, 20) and img.abs().max() > 0.1
    torch.testing.assert_close(img, their_img, atol=1e-5, rtol=0)
    assert ours.get("context_mask") is None
    torch.testing.assert_close(ours["context"], theirs["encoder_hidden_states"], atol=1e-6, rtol=0)


def test_i2v_lora_run_exports_a_lora_diffusers_loads(i2v_or_flf2v, tmp_path):
    i2v = i2v_or_flf2v
    assert cli.main(["train", "--config", str(i2v["recipe"]), f"model.init_from={i2v['folder']}",
                     f"train.output_dir={tmp_path / 'run'}", *LORA]) == 0
    out = tmp_path / "i2v_lora.safetensors"
    assert cli.main(["export", str(tmp_path / "run"), str(out), "--lora-only"]) == 0

    image = images(i2v, CAPTIONS[0])
    ours = load_pipeline(i2v["folder"])
    plain = ours.generate(CAPTIONS, **image, negative_prompt=NEGATIVE, **GEN).videos
    ours.load_lora(out)
    tuned = ours.generate(CAPTIONS, **image, negative_prompt=NEGATIVE, **GEN).videos
    assert (tuned - plain).abs().max() > 1e-3

    pipe = diffusers.WanImageToVideoPipeline.from_pretrained(str(i2v["folder"]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out.parent), weight_name=out.name, adapter_name="run")
    frames = pipe(prompt=CAPTIONS, negative_prompt=NEGATIVE, **image, height=SIZE, width=SIZE,
                  num_frames=FRAMES, num_inference_steps=GEN["steps"], guidance_scale=GEN["guidance_scale"],
                  latents=noise(GEN["seeds"]), output_type="pt").frames
    torch.testing.assert_close(tuned, frames.permute(0, 2, 1, 3, 4) * 2 - 1, atol=1e-5, rtol=0)
    from_run = load_pipeline(tmp_path / "run")
    torch.testing.assert_close(from_run.generate(CAPTIONS, **image, negative_prompt=NEGATIVE, **GEN).videos,
                               tuned, atol=1e-6, rtol=0)


def test_i2v_full_fine_tune_trains_and_its_run_takes_an_image(i2v, tmp_path, capsys):
    trainer = Trainer(config(i2v, tmp_path / "full", "train.max_steps=2", "train.validate_every=2",
                             "sampling.steps=2"))
    folder = WanModel.from_pretrained(i2v["folder"] / "transformer").state_dict()
    assert all(torch.equal(trainer.module.net.state_dict()[k], folder[k]) for k in folder)
    assert trainer.run()["step"] == 2
    samples = {p.name for p in (tmp_path / "full" / "samples" / "step_00000002").iterdir()}
    assert "i2v_00.mp4" in samples and "i2v_contact_sheet.png" in samples and "00.mp4" not in samples, samples
    pipe = load_pipeline(tmp_path / "full")
    out = pipe.generate(CAPTIONS[:1], image=first_frame(i2v, CAPTIONS[0]), steps=2, seeds=[0], num_frames=FRAMES,
                        height=SIZE, width=SIZE, progress=False)
    assert torch.isfinite(out.videos).all() and out.videos.std() > 1e-3
    with pytest.raises(PipelineError, match="needs an image"):
        pipe.generate(CAPTIONS[:1], steps=2, num_frames=FRAMES, height=SIZE, width=SIZE, progress=False)
    args = ["train", "--config", str(i2v["recipe"]), f"model.init_from={i2v['folder']}",
            f"train.output_dir={tmp_path / 'x'}", "--dry-run"]
    capsys.readouterr()
    for bad, words in (("conditioning.mode=frame", "conditioning.mode=concat"),
                       ("conditioning.probability=0.3", "probability 1")):
        assert cli.main([*args, bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "I2V" in err and words in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("layout", ["ti2v", "i2v", "flf2v"])
def test_a_full_run_samples_as_its_folder(ti2v, i2v, flf2v, tmp_path, layout):
    """At lr 0 a full fine-tune's weights are the folder's, and load_pipeline(RUN) samples as the folder does (its
    scheduler's integer timesteps and UniPC options): the folder's (diffusers-exact) image-to-video video; so does
    the dfm folder `dfm export RUN OUT` writes."""
    case = {"ti2v": ti2v, "i2v": i2v, "flf2v": flf2v}[layout]
    case = {**case, "last": layout == "flf2v"}
    assert cli.main(["train", "--config", str(case["recipe"]), f"model.init_from={case['folder']}",
                     f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "optim.lr=0",
                     "optim.ema_decay=0"]) == 0
    image = images(case, CAPTIONS[0])
    want = load_pipeline(case["folder"]).generate(CAPTIONS, **image, negative_prompt=NEGATIVE, **GEN).videos
    got = load_pipeline(tmp_path / "run").generate(CAPTIONS, **image, negative_prompt=NEGATIVE, **GEN).videos
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # measured 1.8e-6 (TI2V)
    if case["last"]:
        with pytest.raises(PipelineError, match="FLF2V fine-tune: it needs last_image too"):
            load_pipeline(tmp_path / "run").generate(CAPTIONS, image=image["image"], **GEN)
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "model")]) == 0
    exported = load_pipeline(tmp_path / "model")  # a dfm folder: integer timesteps kept in its "diffusion" entry
    assert exported.diffusion.get("integer_timesteps") is True
    torch.testing.assert_close(exported.generate(CAPTIONS, **image, negative_prompt=NEGATIVE, **GEN).videos, want,
                               atol=1e-5, rtol=0)
