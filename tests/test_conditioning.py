"""Image conditioning (issue 21): first-frame (frame) and channel-concat (concat) training, and image-to-video
with the models it trains; paraphrased captions. Analytic cases of the loss, bit-exact equalities of runs,
and the pipeline's first frame against the VAE's decode of the given image's latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfm.checkpoint import latest_checkpoint, load_checkpoint
from dfm.conditioning import ConditioningConfig, frame_flow_loss, frame_mask, token_timesteps
from dfm.config import ConfigError
from dfm.data import MovingDigits
from dfm.data.digits import parse_caption
from dfm.evaluate import eval_prompts
from dfm.data.captions import DIRECTION_PHRASES, NUMBER_WORDS, TEMPLATES, all_paraphrases, paraphrase_for
from dfm.diffusion.flow import TimestepSampler, flow_loss
from dfm.pipeline import load_pipeline, save_pipeline
from dfm.pipeline.folders import pipeline_from_checkpoint
from dfm.training import train
from dfm.training.conditioning import conditioned_samples
from dfm.training.trainer import Trainer, validation_seed
from tests.test_train import losses, tiny

# ---------------------------------------------------------------------------------------------- captions


def test_paraphrases_name_the_truth_and_the_clip_does_not_change():
    plain = MovingDigits(num_frames=3, size=16, length=20, seed=5)
    para = MovingDigits(num_frames=3, size=16, length=20, seed=5, captions="paraphrase")
    for i in range(20):
        a, b = plain[i], para[i]
        assert torch.equal(a["video"], b["video"]) and a["digit"] == b["digit"]  # the clip is the same
        words = f" {b['caption']} "
        assert f" {a['digit']} " in words or f" {NUMBER_WORDS[a['digit']]} " in words
        assert any(f" {p} " in words for p in DIRECTION_PHRASES[a["direction"]])
        others = [p for d, ps in DIRECTION_PHRASES.items() if d != a["direction"] for p in ps]
        assert not any(f" {p} " in words.replace(" to the ", " to_the ") for p in others if " " not in p)
    assert para[3]["caption"] == MovingDigits(num_frames=3, size=16, length=20, seed=5, captions="paraphrase")[3]["caption"]
    assert len({para[i]["caption"] for i in range(20)}) > 15  # varied


def test_heldout_templates_are_disjoint_and_use_known_words():
    assert not set(TEMPLATES["train"]) & set(TEMPLATES["heldout"]) and TEMPLATES["heldout"]
    train_texts = {c for d in range(10) for di in DIRECTION_PHRASES for c in all_paraphrases(d, di)}
    held = {c for d in range(10) for di in DIRECTION_PHRASES for c in all_paraphrases(d, di, heldout=True)}
    assert not train_texts & held  # no held-out caption is ever a training caption
    vocab = {w for c in train_texts for w in c.split()}
    assert {w for c in held for w in c.split()} <= vocab
    rng = np.random.default_rng(0)
    assert paraphrase_for(8, "up", "orange", rng=rng, heldout=True) in \
        set(all_paraphrases(8, "up", "orange", heldout=True))
    assert "an one" not in " ".join(all_paraphrases(1, "up")) and "an eight" in " ".join(all_paraphrases(8, "up"))


# ---------------------------------------------------------------------------------------------- the loss


def test_frame_loss_gives_clean_frames_t0_and_zero_weight():
    torch.manual_seed(0)
    x0 = torch.randn(3, 2, 4, 2, 3)  # [B, C, f, h, w]; 6 tokens per frame
    conditioned = torch.tensor([True, False, True])
    seen = {}

    def velocity(x, t, given=None):
        seen.update(x=x.clone(), t=token_timesteps(t, given, 6))
        v = torch.randn_like(x)
        return v

    def gens():
        return [torch.Generator().manual_seed(i) for i in range(3)]

    sampling = TimestepSampler("uniform")
    loss = frame_flow_loss(velocity, x0, conditioned, generator=gens(), sampling=sampling, timestep_scale=1000.0)
    s = torch.stack([sampling.sample(1, [g])[0] for g in gens()])
    t = seen["t"].view(3, 4, 6)
    assert torch.all(t[0, 0] == 0) and torch.all(t[2, 0] == 0) and torch.allclose(t[1, 0], s[1] * 1000)
    assert torch.allclose(t[:, 1:], (s * 1000)[:, None, None].expand(3, 3, 6))
    assert torch.equal(seen["x"][0, :, 0], x0[0, :, 0]) and torch.equal(seen["x"][2, :, 0], x0[2, :, 0])
    assert not torch.equal(seen["x"][1, :, 0], x0[1, :, 0])

    # zero weight: whatever the model says on the given frame, the loss is the same; elsewhere it is flow_loss
    def fixed(first_value):
        def v(x, t, given=None):
            out = torch.zeros_like(x)
            out[:, :, 0] = first_value
            return out
        return v

    a = frame_flow_loss(fixed(0.0), x0, conditioned, generator=gens(), sampling=sampling)
    b = frame_flow_loss(fixed(1e3), x0, conditioned, generator=gens(), sampling=sampling)
    assert torch.equal(a[[0, 2]], b[[0, 2]]) and not torch.equal(a[1], b[1])
    ref = flow_loss(lambda x, t: torch.zeros_like(x), x0, generator=gens(), sampling=sampling)
    assert torch.allclose(a[1], ref[1], rtol=1e-6)  # unconditioned: the plain loss (same draws)
    eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in
                       [_after_time(i, sampling) for i in range(3)]])
    want0 = ((eps[0] - x0[0])[:, 1:] ** 2).mean()  # v = 0: the error on frames 1.. only
    assert torch.allclose(a[0], want0, rtol=1e-5)
    assert loss.shape == (3,)


def _after_time(i, sampling):
    g = torch.Generator().manual_seed(i)
    sampling.sample(1, [g])
    return g


def test_frame_mask_counts_frame_zero_tf_times():
    m = frame_mask(9, (1, 8, 5, 4, 4), 2)  # 9 frames -> 5 latent frames, tf 2
    assert m.shape == (1, 2, 5, 4, 4) and m[:, :, 0].eq(1).all() and m[:, :, 1:].eq(0).all()


def test_conditioned_samples_depend_on_the_sample_only():
    a = conditioned_samples(3, range(1000), 0.5)
    assert a[10:20] == conditioned_samples(3, range(10, 20), 0.5) and 400 < sum(a) < 600
    assert not any(conditioned_samples(3, range(100), 0.0)) and all(conditioned_samples(3, range(100), 1.0))


# ---------------------------------------------------------------------------------------------- training


def test_probability_zero_is_todays_run_bit_for_bit(tmp_path):
    base = tiny(tmp_path, "plain", "train.max_steps=3")
    train(base)
    cond = tiny(tmp_path, "p0", "train.max_steps=3", "conditioning.mode=frame", "conditioning.probability=0")
    train(cond)
    a = load_checkpoint(latest_checkpoint(tmp_path / "plain" / "checkpoints"))["model"]
    b = load_checkpoint(latest_checkpoint(tmp_path / "p0" / "checkpoints"))["model"]
    assert losses(tmp_path / "plain") == losses(tmp_path / "p0")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["frame", "concat"])
def test_conditioned_training_resumes_exactly(tmp_path, mode):
    args = (f"conditioning.mode={mode}", "conditioning.probability=0.5")
    full = tiny(tmp_path, "full", "train.max_steps=4", *args)
    train(full)
    part = tiny(tmp_path, "part", "train.max_steps=2", *args)
    train(part)
    train(tiny(tmp_path, "part", "train.max_steps=4", *args), resume="latest")
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    a = load_checkpoint(latest_checkpoint(tmp_path / "full" / "checkpoints"))["model"]
    b = load_checkpoint(latest_checkpoint(tmp_path / "part" / "checkpoints"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = tiny(tmp_path, "plain", "train.max_steps=4")
    train(plain)
    assert losses(tmp_path / "plain") != losses(tmp_path / "full")  # conditioning changed the run


def test_unsupported_combinations_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="conditioning.last=true gives the last frame too: set conditioning.mode"):
        Trainer(tiny(tmp_path, "a", "conditioning.mode=none", "conditioning.last=true"))
    with pytest.raises(ConfigError, match=r"conditioning.probability must be in \[0, 1\]"):
        Trainer(tiny(tmp_path, "b", "conditioning.mode=frame", "conditioning.probability=2"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------- image-to-video


@pytest.fixture(scope="module")
def frame_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frame")
    cfg = tiny(tmp, "run", "train.max_steps=2", "conditioning.mode=frame", "conditioning.probability=0.5",
               "data.num_frames=3")
    train(cfg)
    return tmp / "run"


def test_image_to_video_keeps_the_given_first_frame(frame_run, tmp_path):
    pipe = pipeline_from_checkpoint(frame_run)
    image = torch.rand(3, 8, 8) * 2 - 1
    out = pipe.generate(["the digit 3 moves up"] * 2, image=image, steps=3, seeds=[1, 2], progress=False)
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # the uint8 PNG the pipeline reads
    latents = pipe.vae.encode(pixels[None, :, None])  # identity autoencoder: E(image) = image
    want = pipe.vae.decode(latents)[0, :, 0]
    assert torch.allclose(out.videos[0, :, 0], want, atol=1e-6) and torch.allclose(out.videos[1, :, 0], want, atol=1e-6)
    assert not torch.allclose(out.videos[0, :, 1:], out.videos[1, :, 1:])  # the rest is sampled
    t2v = pipe.generate("the digit 3 moves up", steps=3, seed=1, progress=False)  # no image: text-to-video
    assert not torch.allclose(t2v.videos[0, :, 0], want, atol=1e-3)
    folder = save_pipeline(pipe, tmp_path / "model")  # the folder records the mode and loads with it
    again = load_pipeline(folder).generate(["the digit 3 moves up"] * 2, image=image, steps=3, seeds=[1, 2],
                                           progress=False)
    assert torch.equal(again.videos, out.videos)


def test_image_to_video_with_a_causal_vae_decodes_the_images_latents(tmp_path):
    """With models/vae_digits (causal: pixel frame 0 has latent frame 0 alone) the first frame of the video is
    the decode of E(image): the decode of the whole clip's frame 0 equals that of the first latent frame alone."""
    cfg = tiny(tmp_path, "vae", "train.max_steps=1", "conditioning.mode=frame", "data.num_frames=9",
               "data.size=16", "autoencoder.name=models/vae_digits")
    train(cfg)
    pipe = pipeline_from_checkpoint(tmp_path / "vae")
    clip = MovingDigits(split="test", num_frames=9, size=16, length=1)[0]["video"]  # [3, 9, 16, 16]
    out = pipe.generate("the digit 3 moves up", image=clip[:, 0], steps=2, seed=0, progress=False)
    pixels = ((clip[:, 0].clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    first = pipe.vae.encode(pixels[None, :, None])  # [1, C, 1, h, w]
    want = pipe.vae.decode(first)[0, :, 0].clamp(-1, 1)
    assert torch.allclose(out.videos[0, :, 0], want, atol=1e-5)


def test_concat_model_takes_mask_and_image_channels(tmp_path):
    cfg = tiny(tmp_path, "cat", "train.max_steps=2", "conditioning.mode=concat", "conditioning.probability=0.5",
               "data.num_frames=3")
    train(cfg)
    pipe = pipeline_from_checkpoint(tmp_path / "cat")
    assert pipe.transformer.config.in_channels == 3 + 1 + 3  # C + tf + C (identity autoencoder: tf 1)
    image = torch.rand(3, 8, 8) * 2 - 1
    with_image = pipe.generate("the digit 3 moves up", image=image, steps=2, seed=0, progress=False)
    without = pipe.generate("the digit 3 moves up", steps=2, seed=0, progress=False)
    assert not torch.allclose(with_image.videos, without.videos)  # the image reaches the model
    again = load_pipeline(save_pipeline(pipe, tmp_path / "model"))
    assert torch.equal(again.generate("the digit 3 moves up", image=image, steps=2, seed=0,
                                      progress=False).videos, with_image.videos)


# ---------------------------------------------------------------------------------------------- dfm eval --image


def test_image_eval_reference_is_the_ceiling_and_a_model_scores(frame_run, tmp_path):
    from dfm.evaluate_image import evaluate_image, heldout_prompts, psnr

    ref = evaluate_image(None, num=8, reference=True)
    assert ref["first_frame_psnr"] == 100.0 and ref["direction_accuracy"] == 1.0 and ref["identity"] >= 0.75
    x = torch.zeros(3, 4, 4)
    assert psnr(x, x + 0.2) == pytest.approx(10 * np.log10(1 / 0.01))  # 0.2 in [-1, 1] is 0.1 in [0, 1]
    pipe = pipeline_from_checkpoint(frame_run)  # 3 frames of 8x8, two training steps
    pipe.defaults.update(steps=2)
    got = evaluate_image(pipe, num=2, batch_size=2, sheet=tmp_path / "sheet.png")
    assert got["first_frame_psnr"] > 40  # the given frame comes back (up to the PNG rounding)
    from PIL import Image
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("L"), dtype=float)
    given, frame0 = sheet[-10:-2, 2:10], sheet[-10:-2, 12:20]  # last row: the given image, then the video's frame 0
    assert sheet.shape[1] == 2 + (3 + 1) * (8 + 2) and given.std() > 0 and np.abs(given - frame0).max() <= 2
    assert 0 <= got["identity"] <= 1 and len(got["videos"]) == 2
    items = heldout_prompts(6)
    for it in items:  # none is a template caption (the grammar dfm eval parses)
        with pytest.raises(ValueError):
            parse_caption(it["prompt"])
    assert [(it["digit"], it["direction"]) for it in items] == [(it["digit"], it["direction"]) for it in eval_prompts(6)]


def test_dfm_eval_image_and_heldout_flags(tmp_path, capsys):
    from dfm import cli

    assert cli.main(["eval", "--reference", "--image", "--num", "4"]) == 0
    assert "first_frame_psnr" in capsys.readouterr().out
    assert cli.main(["eval", "--reference", "--captions", "heldout", "--num", "4"]) == 2
    assert "use --model" in capsys.readouterr().err


def test_concat_trains_and_conditions_a_dit_with_edm(tmp_path):
    """concat needs no per-token noise levels: the DiT and EDM take it as extra input channels."""
    cfg = tiny(tmp_path, "ditedm", "train.max_steps=2", "conditioning.mode=concat", "conditioning.probability=1",
               "diffusion.paradigm=edm", "data.num_frames=3",
               model={"arch": "dit", "overrides": {"dim": 32, "heads": 2, "freq_dim": 32, "depth": 1}})
    train(cfg)
    pipe = pipeline_from_checkpoint(tmp_path / "ditedm")
    assert pipe.transformer.config.in_channels == 7
    image = torch.rand(3, 8, 8) * 2 - 1
    a = pipe.generate("the digit 3 moves up", image=image, steps=2, seed=0, progress=False).videos
    b = pipe.generate("the digit 3 moves up", image=-image, steps=2, seed=0, progress=False).videos
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def test_last_frame_is_given_too_with_last():
    x0 = torch.randn(2, 2, 4, 1, 1)
    seen = {}

    def velocity(x, t, given=None):
        seen["given"] = given
        out = torch.zeros_like(x)
        out[:, :, [0, -1]] = 1e3  # whatever the model says on the given frames
        return out

    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    loss = frame_flow_loss(velocity, x0, torch.tensor([True, False]), last=True, generator=gens)
    assert seen["given"].tolist() == [[True, False, False, True], [False] * 4]
    assert loss[0] < 100 < loss[1]  # the given frames carry no loss; the unconditioned sample's do


@pytest.fixture(scope="module")
def t2v_folder(tmp_path_factory):
    """A text-to-video model folder (template captions) to fine-tune from."""
    tmp = tmp_path_factory.mktemp("t2v")
    train(tiny(tmp, "run", "train.max_steps=2", "data.num_frames=3"))
    return save_pipeline(pipeline_from_checkpoint(tmp / "run"), tmp / "model")


FINE_TUNE = ("conditioning.mode=frame", "conditioning.probability=0.5", "data.num_frames=3", "data.captions=paraphrase")


def test_init_from_a_dfm_folder_loads_it_and_grows_the_vocabulary_by_word(t2v_folder, tmp_path):
    """A full fine-tune (model.init_from, no lora.rank): step 0 is the folder's weights, EMA included; the text
    encoder keeps the folder's words (their rows) and learns the paraphrases' new words from fresh rows."""
    from dfm.distributed import derive_seed
    from dfm.model import build_text_encoder
    from dfm.text import UNK, SmallTextEncoder

    cfg = tiny(tmp_path, "ft", f"model.init_from={t2v_folder}", *FINE_TUNE)
    trainer = Trainer(cfg)
    old = load_pipeline(t2v_folder)
    old_sd, net_sd = old.transformer.state_dict(), trainer.module.net.state_dict()
    assert old_sd.keys() == net_sd.keys() and all(torch.equal(net_sd[k], old_sd[k]) for k in old_sd)
    ema = dict(zip(trainer.ema.names, trainer.ema.shadow))
    assert all(torch.equal(ema[n], p) for n, p in trainer.module.named_parameters())  # EMA starts at the weights
    text, old_text = trainer.module.text, SmallTextEncoder.from_pretrained(t2v_folder / "text_encoder")
    vocab, old_vocab = text.tokenizer.vocab, old_text.tokenizer.vocab
    assert vocab[: len(old_vocab)] == old_vocab and {"seven", "upward"} <= set(vocab[len(old_vocab):])
    torch.manual_seed(derive_seed(cfg.train.seed, 0xC0DE))  # what the trainer initialises a fresh encoder with
    fresh = build_text_encoder(cfg.text, vocab).embed.weight
    rows, old_rows = text.embed.weight, old_text.embed.weight
    assert torch.equal(rows[: len(old_vocab)], old_rows)  # every word of the folder keeps its row
    assert torch.equal(rows[len(old_vocab):], fresh[len(old_vocab):])  # new words: fresh rows
    assert not torch.equal(fresh[: len(old_vocab)], old_rows)
    state = {k: v for k, v in text.state_dict().items() if k != "embed.weight"}
    assert all(torch.equal(v, old_text.state_dict()[k]) for k, v in state.items())
    ids, mask = old_text.tokenizer(["the digit 3 moves up"], 16)
    new_ids, new_mask = text.tokenizer(["the digit 3 moves up"], 16)
    assert torch.equal(text(new_ids, new_mask), old_text(ids, mask))  # a caption of known words reads the same
    ids, _ = text.tokenizer(["a seven drifting upward"], 16)
    assert UNK not in ids.tolist()[0]  # no <unk>: the new words are known


def test_init_from_fine_tune_resumes_exactly_and_generates(t2v_folder, tmp_path):
    args = (f"model.init_from={t2v_folder}", *FINE_TUNE)
    train(tiny(tmp_path, "full", "train.max_steps=4", *args))
    train(tiny(tmp_path, "part", "train.max_steps=2", *args))
    train(tiny(tmp_path, "part", "train.max_steps=4", *args), resume="latest")
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    a = load_checkpoint(latest_checkpoint(tmp_path / "full" / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "part" / "checkpoints"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    pipe = load_pipeline(tmp_path / "full")  # the run is a whole model: it takes an image and the new words
    out = pipe.generate(["a seven drifting upward"], image=torch.zeros(3, 8, 8), steps=2, seeds=[0], progress=False)
    assert torch.isfinite(out.videos).all()


def test_a_concat_run_validates_text_to_video(tmp_path):
    """The validation videos of a concat run are text-to-video (mask 0, y 0, as its unconditioned samples), the
    same as the checkpoint's pipeline gives without an image."""
    cfg = tiny(tmp_path, "run", "train.max_steps=2", "conditioning.mode=concat", "train.validate_every=2",
               "sampling.steps=2", "train.val_prompts=[the digit 1 moves up]")
    trainer = Trainer(cfg)
    trainer.run()
    assert (tmp_path / "run" / "samples" / "step_00000002" / "contact_sheet.png").is_file()
    with trainer.ema.swapped():
        ours = trainer.validation_videos(["the digit 1 moves up"])
    pipe = pipeline_from_checkpoint(tmp_path / "run")
    seeds = [validation_seed(cfg.train.seed, 0)]
    theirs = pipe.generate(["the digit 1 moves up"], seeds=seeds, steps=2, progress=False).videos
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_a_frame_run_validates_text_and_image_to_video(tmp_path):
    """A conditioned run's validation also makes image-to-video videos: the first frames of the training items the
    default prompts come from, the same noise; they are what the checkpoint's pipeline gives for that image."""
    cfg = tiny(tmp_path, "run", "train.max_steps=2", "conditioning.mode=frame", "train.validate_every=2",
               "sampling.steps=2", "data.num_frames=3")
    trainer = Trainer(cfg)
    trainer.run()
    folder = tmp_path / "run" / "samples" / "step_00000002"
    prompts = (folder / "prompts.txt").read_text().splitlines()
    names = {p.name for p in folder.iterdir()}
    assert {"00.mp4", "contact_sheet.png", "i2v_00.mp4", "i2v_contact_sheet.png"} <= names, names
    assert len([n for n in names if n.startswith("i2v_") and n.endswith(".mp4")]) == len(prompts) == 4
    first = trainer.dataset[1]["video"][:, 0]  # [3, H, W]: item 1's first frame, prompt 1's image
    assert torch.equal(trainer.val_frames[0][1], first) and trainer.val_frames[1] is None
    assert (folder / "i2v_prompts.txt").read_text().splitlines() == prompts == trainer.i2v_prompts()
    pipe = pipeline_from_checkpoint(tmp_path / "run")
    theirs = pipe.generate([prompts[1]], image=first, seeds=[validation_seed(cfg.train.seed, 1)], steps=2,
                           progress=False).videos
    with trainer.ema.swapped():
        ours = trainer.validation_videos(prompts, frames=trainer.val_frames[:2])
    torch.testing.assert_close(ours[1:2], theirs, atol=1e-5, rtol=0)
    plain = trainer.validation_videos(prompts)
    assert (ours - plain).abs().max() > 1e-3  # the image changed the video


def test_image_to_video_validation_pairs_each_frame_with_its_own_caption(tmp_path):
    """With train.val_prompts given and no train.val_images, the image-to-video videos take the training items'
    frames with those items' captions, not the given prompts (which would ask a 3 of an image of a 9)."""
    asked = ["the digit 3 moves to the right", "the digit 7 moves up"]
    cfg = tiny(tmp_path, "run", "train.max_steps=1", "conditioning.mode=frame", "train.validate_every=1",
               "sampling.steps=1", "data.num_frames=3", f"train.val_prompts=[{asked[0]},{asked[1]}]")
    trainer = Trainer(cfg)
    trainer.run()
    folder = tmp_path / "run" / "samples" / "step_00000001"
    captions = [trainer.dataset[i]["caption"] for i in range(2)]
    assert captions != asked  # the run's first items are other digits and directions
    assert (folder / "prompts.txt").read_text().splitlines() == asked
    assert (folder / "i2v_prompts.txt").read_text().splitlines() == captions == trainer.i2v_prompts()
    assert all(torch.equal(trainer.val_frames[0][i], trainer.dataset[i]["video"][:, 0]) for i in range(2))


def test_val_images_are_checked_before_the_run(tmp_path, capsys):
    from dfm import cli

    picture = tmp_path / "seven.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 255, 255)).save(picture)
    cfg = tiny(tmp_path, "ok", "train.max_steps=1", "conditioning.mode=frame", "train.validate_every=1",
               "sampling.steps=2", "data.num_frames=3", f"train.val_images=[{picture}]",
               "train.val_prompts=[the digit 7 moves up]")
    train(cfg)
    assert (tmp_path / "ok" / "samples" / "step_00000001" / "i2v_00.mp4").is_file()
    base = ["train", "--config", str(tmp_path / "ok" / "config.yaml"), f"train.output_dir={tmp_path / 'bad'}"]
    for extra, words in ((["train.val_images=[nowhere.png]"], "cannot read train.val_images nowhere.png"),
                         (["conditioning.mode=none", f"train.val_images=[{picture}]"], "remove train.val_images"),
                         ([f"train.val_images=[{picture},{picture}]"], "2 images for 1 validation prompts")):
        capsys.readouterr()
        assert cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
        assert not (tmp_path / "bad").exists()


def test_info_shows_the_conditioning(frame_run, tmp_path, capsys):
    from dfm import cli

    folder = save_pipeline(pipeline_from_checkpoint(frame_run), tmp_path / "model")
    for path in (frame_run, folder):
        assert cli.main(["info", str(path)]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("conditioning"))
        assert "frame (image-to-video" in line and "first latent frame" in line, line
    plain = tiny(tmp_path, "plain", "train.max_steps=1")
    train(plain)
    assert cli.main(["info", str(tmp_path / "plain")]) == 0
    assert "none (text-to-video only)" in capsys.readouterr().out
