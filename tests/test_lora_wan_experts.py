"""A LoRA on one expert of a two-expert Wan 2.2 A14B folder: `dfm train ... model.init_from=FOLDER
model.expert=high|low lora.rank=R` freezes `transformer` (high) or `transformer_2` (low) and trains on that
expert's flow times only; `dfm export RUN OUT --lora-only` loads into diffusers' WanPipeline of the folder
(load_lora_weights, with load_into_transformer_2=True for low) and gives dfm's video (load_pipeline(FOLDER) +
load_lora on that expert, found from the file's metadata) to 1e-5; load_pipeline(RUN) gives the same video.
Without model.expert (or with it on a one-transformer folder) the command is refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

from test_wan_family_pipeline import FRAMES, NEGATIVE, SIZE, build, make_parts, noise  # noqa: E402
from test_lora_wan_folder import write_recipe  # noqa: E402
from test_wan_pipeline import PROMPTS  # noqa: E402

from dfm import cli  # noqa: E402
from dfm.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from dfm.diffusion.flow import TimestepSampler  # noqa: E402
from dfm.models.lora import adapters  # noqa: E402
from dfm.pipeline import load_pipeline  # noqa: E402
from dfm.pipeline.lora import LoRAError, describe_lora, parse_lora_arg  # noqa: E402
from dfm.training import init_from  # noqa: E402

BOUNDARY = 0.875  # the a14b_t2v folder's boundary_ratio; timestep_scale = num_train_timesteps = 1000
GEN = dict(num_frames=FRAMES, height=SIZE, width=SIZE, steps=6, seeds=[3, 4], guidance_scale=5.0,
           guidance_scale_2=2.0, negative_prompt=NEGATIVE, progress=False)
LORA = ["lora.rank=4", "lora.alpha=8", "train.max_steps=3", "optim.lr=3e-2", "optim.ema_decay=0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_experts")
    folder = build(make_parts(root), "a14b_t2v", "unipc")
    write_recipe(root)  # test_lora_wan_folder's tiny captioned clips and model-free recipe
    return root, folder, root / "recipe.yaml"


def train(setup, expert):
    root, folder, recipe = setup
    out = root / f"run_{expert}"
    if not out.exists():
        sampled = []
        original = init_from.ExpertTimesteps.sample

        def spy(self, *a, **kw):
            s = original(self, *a, **kw)
            sampled.extend(s.tolist())
            return s

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(init_from.ExpertTimesteps, "sample", spy)
            assert cli.main(["train", "--config", str(recipe), f"model.init_from={folder}", f"model.expert={expert}",
                             f"train.output_dir={out}", *LORA]) == 0
        (out / "sampled.json").write_text(json.dumps(sampled))
    return out, json.loads((out / "sampled.json").read_text())


def test_expert_times_are_rescaled_into_the_range():
    g = torch.Generator().manual_seed(0)
    for name in ("uniform", "logit_normal"):
        sampler = TimestepSampler(name, shift=3.0)
        high = init_from.ExpertTimesteps(sampler, "high", BOUNDARY).sample(4096, g)
        low = init_from.ExpertTimesteps(sampler, "low", BOUNDARY).sample(4096, g)
        assert high.min() >= BOUNDARY and high.max() <= 1 and low.min() >= 0 and low.max() < BOUNDARY
        assert high.max() - high.min() > 0.1 and low.max() - low.min() > 0.7  # the ranges are used, not a point
    ones = type("Ones", (), {"sample": lambda self, n, g=None, d=None: torch.ones(n)})()  # s = 1 exactly
    assert init_from.ExpertTimesteps(ones, "low", BOUNDARY).sample(2).max() < BOUNDARY
    assert init_from.ExpertTimesteps(ones, "high", BOUNDARY).sample(2).min() == 1


@pytest.mark.parametrize("expert", ["high", "low"])
def test_one_expert_lora_matches_diffusers(setup, expert, tmp_path):
    root, folder, _ = setup
    run, sampled = train(setup, expert)
    assert len(sampled) == 3 * 2  # three steps of two samples, each time drawn in the expert's range
    assert all(BOUNDARY <= s <= 1 for s in sampled) if expert == "high" else all(0 <= s < BOUNDARY for s in sampled)
    state = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert state["step"] == 3 and all(k.startswith("lora.layers.") for k in state["model"])
    out = tmp_path / f"{expert}.safetensors"
    assert cli.main(["export", str(run), str(out), "--lora-only"]) == 0
    assert ("load_into_transformer_2" in describe_lora(out)) == (expert == "low")

    ours = load_pipeline(folder)
    plain = ours.generate(PROMPTS, **GEN).videos
    ours.load_lora(out)  # the expert from the file's metadata
    tuned = ours.generate(PROMPTS, **GEN).videos
    (entry,) = ours.source["lora"]
    assert entry["expert"] == expert
    experts = ours.transformer.net.experts  # IntegerTimesteps -> WanFamilyNet: [high, low]
    assert [len(adapters(e)) for e in experts] == ([1, 0] if expert == "high" else [0, 1])
    assert (tuned - plain).abs().max() > 1e-3
    ours.unload_lora()
    ours.load_lora(out, expert=expert)  # the same, named
    torch.testing.assert_close(ours.generate(PROMPTS, **GEN).videos, tuned, atol=0, rtol=0)
    ours.unload_lora()
    other = "low" if expert == "high" else "high"
    ours.load_lora(out, expert=other)  # the same file on the other expert (it fits: same shapes) is another video
    assert (ours.generate(PROMPTS, **GEN).videos - tuned).abs().max() > 1e-3

    pipe = diffusers.WanPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out.parent), weight_name=out.name, adapter_name="run",
                           load_into_transformer_2=expert == "low")
    frames = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_frames=FRAMES,
                  num_inference_steps=GEN["steps"], guidance_scale=GEN["guidance_scale"],
                  guidance_scale_2=GEN["guidance_scale_2"], latents=noise(GEN["seeds"]),
                  output_type="pt").frames  # [B, F, 3, H, W] in [0, 1]
    torch.testing.assert_close(tuned, frames.permute(0, 2, 1, 3, 4) * 2 - 1, atol=1e-5, rtol=0)

    from_run = load_pipeline(run)  # the folder + the run's adapters on its expert
    assert [e.get("expert") for e in from_run.source["lora"]] == [expert]
    torch.testing.assert_close(from_run.generate(PROMPTS, **GEN).videos, tuned, atol=1e-6, rtol=0)


def test_expert_is_required_and_only_for_two_experts(setup, tmp_path, capsys):
    root, folder, recipe = setup

    def refused(init, *words, extra=()):
        assert cli.main(["train", "--config", str(recipe), f"model.init_from={init}", "lora.rank=2", *extra,
                         f"train.output_dir={tmp_path / 'x'}", "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err
        assert not (tmp_path / "x").exists()

    refused(folder, "two-expert Wan 2.2", "model.expert=high", "model.expert=low")
    refused(folder, "model.expert", "high", extra=["model.expert=middle"])
    one = tmp_path / "one"
    shutil.copytree(folder, one)
    meta = json.loads((one / "model_index.json").read_text())
    meta.pop("boundary_ratio"), meta.pop("transformer_2")
    (one / "model_index.json").write_text(json.dumps(meta))
    refused(one, "model.expert=low", "one transformer", extra=["model.expert=low"])
    assert cli.main(["train", "--config", str(recipe), f"model.init_from={folder}", "model.expert=low",
                     "lora.rank=2", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["expert"] == "low"
    with pytest.raises(LoRAError, match="one transformer"):
        load_pipeline(one).load_lora(tmp_path / "missing.safetensors", expert="low")


def test_lora_flag_picks_the_expert(setup, tmp_path, capsys):
    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0) and parse_lora_arg("a.safetensors").expert is None
    arg = parse_lora_arg("c:/x/a.safetensors:0.5:low")
    assert arg == ("c:/x/a.safetensors", 0.5) and arg.expert == "low"
    arg = parse_lora_arg("a.safetensors:high")
    assert arg == ("a.safetensors", 1.0) and arg.expert == "high"
    root, folder, _ = setup
    run, _ = train(setup, "low")
    lora = tmp_path / "low.safetensors"
    assert cli.main(["export", str(run), str(lora), "--lora-only"]) == 0
    video = tmp_path / "v.mp4"
    base = ["generate", "a red car at night", "--model", str(folder), "--frames", str(FRAMES), "--height", str(SIZE),
            "--width", str(SIZE), "--steps", "2", "--seed", "0", "--no-progress"]
    assert cli.main([*base, "--lora", f"{lora}:0.5:low", "--out", str(video)]) == 0 and video.is_file()
    one = tmp_path / "one"
    shutil.copytree(folder, one, ignore=shutil.ignore_patterns("transformer_2"))
    meta = json.loads((one / "model_index.json").read_text())
    meta.pop("boundary_ratio"), meta.pop("transformer_2")
    (one / "model_index.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert cli.main([*base[:3], str(one), *base[4:], "--lora", f"{lora}:low", "--out", str(tmp_path / "w.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "one transformer" in err and "drop the suffix" in err, err


@pytest.fixture(scope="module")
def i2v_setup(setup):
    """The same clips and recipe with a tiny two-expert Wan 2.2 A14B image-to-video folder (36 channels, no CLIP,
    boundary_ratio 0.9)."""
    root, _, recipe = setup
    (root / "i2v_parts").mkdir(exist_ok=True)
    parts = make_parts(root / "i2v_parts")
    return root, build(parts, "a14b_i2v", "unipc"), recipe


@pytest.mark.parametrize("expert", ["high", "low"])
def test_a14b_image_to_video_expert_lora_matches_diffusers(i2v_setup, expert, tmp_path):
    """A LoRA on one expert of an A14B image-to-video folder trains with the folder's layout (concat [x, mask,
    E(frame 0, zeros...)], every sample conditioned, no CLIP) on that expert's times; the exported file in
    diffusers' WanImageToVideoPipeline gives dfm's image-to-video video to 1e-5, and so does load_pipeline(RUN)."""
    from PIL import Image

    root, folder, recipe = i2v_setup
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(recipe), f"model.init_from={folder}", f"model.expert={expert}",
                     f"train.output_dir={run}", *LORA, "train.validate_every=3", "sampling.steps=2"]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["conditioning"]["mode"] == "concat" and config["conditioning"]["probability"] == 1
    assert not config["conditioning"]["image_encoder"]
    samples = {p.name for p in (run / "samples" / "step_00000003").iterdir()}
    assert "i2v_00.mp4" in samples and "00.mp4" not in samples, samples  # image-to-video only
    out = tmp_path / f"{expert}.safetensors"
    assert cli.main(["export", str(run), str(out), "--lora-only"]) == 0

    image = Image.open(root / "clips" / "clip0" / "00000.png").convert("RGB")
    gen = {**GEN, "image": image}
    ours = load_pipeline(folder)
    plain = ours.generate(PROMPTS, **gen).videos
    ours.load_lora(out)
    tuned = ours.generate(PROMPTS, **gen).videos
    assert (tuned - plain).abs().max() > 1e-3

    pipe = diffusers.WanImageToVideoPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out.parent), weight_name=out.name, adapter_name="run",
                           load_into_transformer_2=expert == "low")
    frames = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, image=image, height=SIZE, width=SIZE, num_frames=FRAMES,
                  num_inference_steps=GEN["steps"], guidance_scale=GEN["guidance_scale"],
                  guidance_scale_2=GEN["guidance_scale_2"], latents=noise(GEN["seeds"]), output_type="pt").frames
    torch.testing.assert_close(tuned, frames.permute(0, 2, 1, 3, 4) * 2 - 1, atol=1e-5, rtol=0)
    from_run = load_pipeline(run)
    torch.testing.assert_close(from_run.generate(PROMPTS, **gen).videos, tuned, atol=1e-6, rtol=0)
