"""LoRA training (lora.rank, model.init_from): the base stays frozen, checkpoints / optimiser / EMA hold only the
adapters, a run resumes exactly after SIGKILL, load_pipeline(RUN) is the base with its adapters, and the exported
file (--lora-only) on the base model gives the run's video. DDP and FSDP2 (2-process gloo) match one process."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import torchrun
from test_train import KILL_AT_STEP, losses, run_cli, write_config

from dfm import cli
from dfm.checkpoint import latest_checkpoint, load_checkpoint
from dfm.config import load_config
from dfm.models.lora import adapters, lora_disabled
from dfm.pipeline import load_pipeline
from dfm.training import TrainConfig, train

LORA = ["lora.rank=2", "lora.alpha=4", "optim.lr=1e-2", "optim.warmup_steps=0"]
GEN = dict(num_frames=2, height=8, width=8, steps=3, seeds=[0, 1], progress=False)
PROMPTS = ["the digit 1 moves up", "the digit 2 moves down"]


def run(cfg_file, out, *overrides):
    cfg = load_config(TrainConfig, cfg_file, [f"train.output_dir={out}", *overrides])
    return train(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 6-step base run (the test_train recipe), then a 6-step LoRA run on it (checkpoints at 3 and 6, a
    validation at 6)."""
    tmp = tmp_path_factory.mktemp("lora_train")
    cfg_file = write_config(tmp / "c.yaml")
    run(cfg_file, tmp / "base")
    lora_args = [f"model.init_from={tmp / 'base'}", *LORA, "train.validate_every=6", "sampling.steps=2",
                 "train.val_prompts=[the digit 1 moves up]"]
    run(cfg_file, tmp / "lora", *lora_args)
    return {"tmp": tmp, "cfg": cfg_file, "base": tmp / "base", "lora": tmp / "lora", "args": lora_args}


def test_checkpoint_holds_only_adapters_and_the_base_is_untouched(runs):
    ckpt = latest_checkpoint(runs["lora"] / "checkpoints")
    state = load_checkpoint(ckpt)
    assert state["model"] and all(k.startswith("lora.layers.") for k in state["model"])
    assert state["ema"].keys() == state["model"].keys()
    n_opt = sum(v.numel() for v in load_file(ckpt / "optimizer.safetensors").values())
    n_lora = sum(v.numel() for v in state["model"].values())
    assert 2 * n_lora <= n_opt <= 2 * n_lora + 10 * len(state["model"])  # AdamW: 2 moments per adapter parameter
    base, tuned = load_pipeline(runs["base"]), load_pipeline(runs["lora"])
    assert list(adapters(tuned.transformer)) == ["default"]
    plain = base.generate(PROMPTS, **GEN).videos
    assert (tuned.generate(PROMPTS, **GEN).videos - plain).abs().max() > 1e-3  # the adapters learned something
    with lora_disabled(tuned.transformer):  # without them: exactly the base (frozen weights, same text encoder)
        assert torch.equal(tuned.generate(PROMPTS, **GEN).videos, plain)
    assert (runs["lora"] / "samples" / "step_00000006" / "contact_sheet.png").is_file()


def test_lora_run_resumes_exactly_after_sigkill(runs, tmp_path):
    out = tmp_path / "killed"
    args = ["train", "--config", str(runs["cfg"]), f"train.output_dir={out}", *runs["args"]]
    proc = run_cli(*args, env_code=KILL_AT_STEP.format(step=5))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert train(load_config(TrainConfig, runs["cfg"], [f"train.output_dir={out}", *runs["args"]]),
                 resume="latest")["step"] == 6
    assert losses(out) == losses(runs["lora"])  # bit-identical on the CPU
    a = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(runs["lora"] / "checkpoints"))
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_export_lora_only_on_the_base_gives_the_runs_video(runs, tmp_path, fmt, capsys):
    out = tmp_path / f"lora_{fmt}.safetensors"
    assert cli.main(["export", str(runs["lora"]), str(out), "--lora-only", "--format", fmt]) == 0
    assert cli.main(["export", str(runs["lora"]), str(out), "--lora-only"]) == 2  # exists: not overwritten
    assert "exists" in capsys.readouterr().err
    base = load_pipeline(runs["base"])
    base.load_lora(out)
    tuned = load_pipeline(runs["lora"])
    torch.testing.assert_close(base.generate(PROMPTS, **GEN).videos, tuned.generate(PROMPTS, **GEN).videos,
                               atol=1e-6, rtol=0)
    assert cli.main(["info", str(out)]) == 0
    assert "rank                      2" in capsys.readouterr().out


def test_generate_with_lora_flag(runs, tmp_path, capsys):
    lora = tmp_path / "l.safetensors"
    assert cli.main(["export", str(runs["lora"]), str(lora), "--lora-only"]) == 0
    video = tmp_path / "v.mp4"
    assert cli.main(["generate", "the digit 1 moves up", "--model", str(runs["base"]), "--lora", f"{lora}:0.5",
                     "--lora", str(lora), "--frames", "2", "--height", "8", "--width", "8", "--steps", "2",
                     "--seed", "0", "--out", str(video), "--no-progress"]) == 0
    assert video.is_file()
    assert cli.main(["generate", "x", "--model", str(runs["base"]), "--lora", str(tmp_path / "no.safetensors")]) == 2
    assert "--lora" in capsys.readouterr().err


def test_lora_config_errors(runs, tmp_path, capsys):
    cfg = str(runs["cfg"])
    assert cli.main(["train", "--config", cfg, f"train.output_dir={tmp_path / 'a'}", "lora.rank=2"]) == 2
    assert "model.init_from" in capsys.readouterr().err
    assert cli.main(["train", "--config", cfg, f"train.output_dir={tmp_path / 'b'}", "lora.rank=2",
                     f"model.init_from={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["train", "--config", cfg, f"train.output_dir={tmp_path / 'c'}", "lora.rank=2",
                     f"model.init_from={runs['base']}", "lora.targets=[nothing.*]"]) == 2
    assert "select no linear layer" in capsys.readouterr().err
    assert cli.main(["train", "--config", cfg, f"train.output_dir={tmp_path / 'd'}", "lora.rank=2",
                     f"model.init_from={runs['base']}", "model.overrides.num_layers=2"]) == 2
    assert "does not fit the model" in capsys.readouterr().err


def test_ddp_and_fsdp2_lora_runs_match_one_process(runs, tmp_path):
    args = [f"model.init_from={runs['base']}", *LORA, "train.max_steps=3"]
    torchrun([["train", "--config", str(runs["cfg"]), f"train.output_dir={tmp_path / p}", f"train.parallel={p}",
               *args] for p in ("ddp", "fsdp")], tmp_path)
    one = tmp_path / "one"
    run(runs["cfg"], one, *args)
    w1 = load_checkpoint(latest_checkpoint(one / "checkpoints"))["model"]
    for p in ("ddp", "fsdp"):
        assert losses(tmp_path / p).keys() == losses(one).keys() == {1, 2, 3}
        torch.testing.assert_close(torch.tensor(list(losses(tmp_path / p).values())),
                                   torch.tensor(list(losses(one).values())), rtol=1e-5, atol=0)
        w = load_checkpoint(latest_checkpoint(tmp_path / p / "checkpoints"))["model"]
        assert w.keys() == w1.keys()
        for k in w:
            torch.testing.assert_close(w[k], w1[k], rtol=0, atol=1e-5, msg=k)


def test_dit_edm_lora_with_activation_checkpointing(tmp_path):
    """DiT + EDM: a LoRA run with activation checkpointing takes the same steps as one without, and its run
    loads as the base with adapters."""
    dit = {"model": {"arch": "dit", "size": "tiny", "overrides": {"dim": 32, "heads": 2, "freq_dim": 32}},
           "diffusion": {"paradigm": "edm"}}
    cfg_file = write_config(tmp_path / "dit.yaml", **dit)
    run(cfg_file, tmp_path / "base", "train.max_steps=2")
    args = [f"model.init_from={tmp_path / 'base'}", *LORA, "train.max_steps=3", "lora.dropout=0.1"]
    run(cfg_file, tmp_path / "plain", *args)
    run(cfg_file, tmp_path / "ckpt", *args, "train.activation_checkpointing=true")
    assert losses(tmp_path / "plain") == losses(tmp_path / "ckpt")
    state = load_checkpoint(latest_checkpoint(tmp_path / "ckpt" / "checkpoints"))["model"]
    assert any("__attn__qkv." in k for k in state) and all(k.startswith("lora.") for k in state)
    tuned = load_pipeline(tmp_path / "ckpt")
    assert list(adapters(tuned.transformer)) == ["default"]
    assert tuned.generate(PROMPTS, **GEN).videos.isfinite().all()


def test_export_of_a_lora_run_as_a_folder_merges_the_adapters(runs, tmp_path):
    """`dfm export RUN FOLDER` of a LoRA run writes base + adapters merged: the folder gives the run's video."""
    assert cli.main(["export", str(runs["lora"]), str(tmp_path / "merged")]) == 0
    merged, tuned = load_pipeline(tmp_path / "merged"), load_pipeline(runs["lora"])
    assert not adapters(merged.transformer)
    torch.testing.assert_close(merged.generate(PROMPTS, **GEN).videos, tuned.generate(PROMPTS, **GEN).videos,
                               atol=1e-5, rtol=0)


def test_faint_ink_data_and_its_measure():
    """data.ink scales the digits' brightness and nothing else (same captions, same motion); ink_level reads it."""
    from dfm.data import MovingDigits
    from dfm.evaluate_lora import ink_level

    full, faint = (MovingDigits(num_frames=4, size=16, length=4, seed=1, ink=i) for i in (1.0, 0.5))
    for i in range(4):
        a, b = full[i], faint[i]
        assert a["caption"] == b["caption"]
        torch.testing.assert_close((b["video"] + 1) / 2, 0.5 * (a["video"] + 1) / 2, atol=1e-6, rtol=0)
    videos = [torch.stack([ds[i]["video"] for i in range(4)]) for ds in (full, faint)]
    torch.testing.assert_close(ink_level(videos[1]), 0.5 * ink_level(videos[0]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="ink must be in"):
        MovingDigits(ink=0)
