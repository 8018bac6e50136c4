"""`dfm train --config RECIPE model.init_from=WAN_FOLDER lora.rank=R` on a diffusers Wan 2.1 folder: the recipe
takes the folder's transformer config, VAE, UMT5 encoder and scheduler shift (printed by --dry-run); the run's
checkpoint holds only adapters; `dfm export RUN OUT --lora-only` loads into diffusers' WanPipeline of the same
folder (load_lora_weights) and gives dfm's video (the oracle); load_pipeline(RUN) is the folder + the adapters.
Two-expert folders without model.expert (test_lora_wan_experts.py), other Wan folders and folders that are
neither dfm's nor Wan's get one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")

from test_wan_pipeline import FRAMES, PROMPTS, SIZE, noise, wan_folders  # noqa: E402,F401  (wan_folders: fixture)

from dfm import cli  # noqa: E402
from dfm.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from dfm.models import WAN_CONFIGS  # noqa: E402
from dfm.models.lora import adapters  # noqa: E402
from dfm.pipeline import WAN_NEGATIVE_PROMPT, load_pipeline  # noqa: E402
from dfm.video import write_video  # noqa: E402

GEN = dict(num_frames=FRAMES, height=SIZE, width=SIZE, steps=4, seeds=[3, 4], guidance_scale=5.0, progress=False)
LORA = ["lora.rank=4", "lora.alpha=8", "train.max_steps=3", "optim.lr=3e-2", "optim.ema_decay=0"]


def write_recipe(root):
    """A tiny video folder (png sequences of 5 frames with captions) and a recipe that names no model at all."""
    clips = root / "clips"
    clips.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, caption in enumerate(["a cat and a dog bake a cake", "a red car drives at night"]):
        write_video(clips / f"clip{i}", torch.rand(3, FRAMES, SIZE, SIZE, generator=g) * 2 - 1)
        (clips / f"clip{i}.txt").write_text(caption)
    recipe = {"data": {"dataset": "folder", "root": str(clips), "num_frames": FRAMES, "size": SIZE},
              "train": {"batch_size": 2, "log_every": 1, "device": "cpu", "progress": False, "tensorboard": False,
                        "threads": 1}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root / "recipe.yaml"


@pytest.fixture(scope="module")
def run(wan_folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_wan")
    recipe = write_recipe(root)
    folder = wan_folders["unipc"]  # UniPC, flow_shift 3
    args = ["train", "--config", str(recipe), f"model.init_from={folder}", f"train.output_dir={root / 'run'}", *LORA]
    assert cli.main(args) == 0
    return {"root": root, "recipe": recipe, "folder": folder, "run": root / "run", "args": args}


def test_dry_run_shows_the_folders_model(run, capsys):
    assert cli.main([*run["args"], "--dry-run"]) == 0
    cfg, folder = yaml.safe_load(capsys.readouterr().out), run["folder"]
    assert cfg["autoencoder"]["name"] == str(folder / "vae")
    assert cfg["text"]["encoder"] == str(folder / "text_encoder") and cfg["text"]["trainable"] is False
    assert cfg["sampling"]["shift"] == 3.0 and cfg["sampling"]["sampler"] == "flow:unipc"
    t = json.loads((folder / "transformer" / "config.json").read_text())
    assert cfg["model"]["arch"] == "wan"
    assert all(cfg["model"]["overrides"].get(k, v) == v for k, v in t.items() if k in ("num_layers", "ffn_dim"))
    assert cfg["model"]["overrides"]["attention_head_dim"] == t["attention_head_dim"]  # not the tiny size's 16
    # the recipe's own settings win
    assert cli.main([*run["args"], "sampling.shift=7", "model.overrides={num_layers: 1}", "--dry-run"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["sampling"]["shift"] == 7.0 and cfg["model"]["overrides"]["num_layers"] == 1


def test_run_exports_a_lora_diffusers_loads(run, tmp_path):
    state = load_checkpoint(latest_checkpoint(run["run"] / "checkpoints"))
    assert state["step"] == 3 and state["model"] and all(k.startswith("lora.layers.") for k in state["model"])
    out = tmp_path / "wan_lora.safetensors"
    assert cli.main(["export", str(run["run"]), str(out), "--lora-only"]) == 0

    ours = load_pipeline(run["folder"])
    plain = ours.generate(PROMPTS, **GEN).videos
    ours.load_lora(out)
    tuned = ours.generate(PROMPTS, **GEN).videos
    assert (tuned - plain).abs().max() > 1e-3  # three steps at lr 3e-2 moved the adapters

    pipe = diffusers.WanPipeline.from_pretrained(str(run["folder"]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out.parent), weight_name=out.name, adapter_name="run")
    frames = pipe(prompt=PROMPTS, negative_prompt=WAN_NEGATIVE_PROMPT, height=SIZE, width=SIZE, num_frames=FRAMES,
                  num_inference_steps=GEN["steps"], guidance_scale=GEN["guidance_scale"], latents=noise(GEN["seeds"]),
                  output_type="pt").frames  # [B, F, 3, H, W] in [0, 1]
    torch.testing.assert_close(tuned, frames.permute(0, 2, 1, 3, 4) * 2 - 1, atol=1e-5, rtol=0)

    from_run = load_pipeline(run["run"])  # the Wan folder (its sampler, shift, UMT5, VAE) + the run's adapters
    assert list(adapters(from_run.transformer)) == ["default"] and from_run.defaults == ours.defaults
    torch.testing.assert_close(from_run.generate(PROMPTS, **GEN).videos, tuned, atol=1e-6, rtol=0)
    assert cli.main(["export", str(run["run"]), str(tmp_path / "merged")]) == 2  # no dfm folder of a Wan model
    assert not (tmp_path / "merged").exists()


def test_unsupported_init_from_folders_get_one_line(run, tmp_path, capsys):
    def refused(folder, *words):
        assert cli.main(["train", "--config", str(run["recipe"]), f"model.init_from={folder}", "lora.rank=2",
                         f"train.output_dir={tmp_path / 'x'}", "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err
        assert not (tmp_path / "x").exists()

    def variant(name, **index):
        folder = tmp_path / name
        shutil.copytree(run["folder"], folder)
        meta = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**meta, **index}))
        return folder

    refused(variant("two", transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875),
            "two-expert Wan 2.2", "model.expert=high")  # trained one expert at a time: test_lora_wan_experts.py
    refused(variant("i2v", _class_name="WanImageToVideoPipeline"), "image-to-video", "Wan 2.1 text-to-video")
    refused(variant("sd", _class_name="StableDiffusionPipeline"), "neither a dfm model folder", "diffusers Wan")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.bin").write_bytes(b"x")
    refused(tmp_path / "other", "neither a dfm model folder", "diffusers Wan")


def test_a_released_size_is_named_not_overridden(run, tmp_path, capsys):
    """A folder whose transformer is Wan2.1-T2V-1.3B's (config.json only: --dry-run loads no weights)."""
    folder = tmp_path / "wan13b"
    shutil.copytree(run["folder"], folder)
    (folder / "transformer" / "config.json").write_text(json.dumps(WAN_CONFIGS["1.3B"].to_diffusers()))
    assert cli.main(["train", "--config", str(run["recipe"]), f"model.init_from={folder}", "lora.rank=2",
                     "--dry-run"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["size"] == "1.3B" and cfg["model"]["overrides"] == {}
