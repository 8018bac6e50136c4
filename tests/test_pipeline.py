"""The text-to-video pipeline (dfm.pipeline): trainer checkpoint -> `dfm export` -> model folder -> `load_pipeline` ->
`generate`, for a tiny WAN + flow and a tiny DiT + EDM model trained two steps; seeds, agreement with
a hand-written sampler, every sampler on both paradigms, input validation, and the `dfm generate / info / export` CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from dfm import cli
from dfm import distributed as D
from dfm.config import load_config
from dfm.errors import UserError
from dfm.diffusion.samplers import SamplingError, resolve_sampler, sampler_names
from dfm.diffusion.schedules import sampling_grid
from dfm.pipeline import Generation, PipelineError, export_checkpoint, load_pipeline
from dfm.pipeline.folders import _text_module
from dfm.training import TrainConfig, Trainer, train
from dfm.training.trainer import validation_seed

PROMPTS = ["the digit 1 moves up", "the digit 2 moves down", "the digit 3 moves to the left"]

TINY = {
    "wan_flow": {
        "model": {"arch": "wan", "size": "tiny", "overrides": {"num_layers": 1}},
        "diffusion": {"paradigm": "flow"},
    },
    "dit_edm": {
        "model": {"arch": "dit", "size": "tiny", "overrides": {"depth": 1, "dim": 32, "heads": 2}},
        "diffusion": {"paradigm": "edm"},
    },
}
COMMON = {
    "data": {"dataset": "digits", "num_frames": 2, "size": 8, "length": 64},
    "text": {"dim": 16, "layers": 1, "heads": 2, "max_length": 12},
    "optim": {"lr": 1e-3},
    "train": {"max_steps": 2, "batch_size": 2, "log_every": 1, "checkpoint_every": 0, "progress": False,
              "tensorboard": False, "seed": 5},
    "sampling": {"steps": 3, "guidance_scale": 3.0, "shift": 2.0},
}


def tiny_config(tmp: Path, name: str) -> TrainConfig:
    data = {**json.loads(json.dumps(COMMON)), **TINY[name]}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(TrainConfig, path, [f"train.output_dir={tmp / name}"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (config, checkpoint, exported EMA folder, exported trained-weights folder)} for both models."""
    tmp = tmp_path_factory.mktemp("pipeline")
    out = {}
    for name in TINY:
        cfg = tiny_config(tmp, name)
        ckpt = Path(train(cfg)["checkpoint"])
        ema = export_checkpoint(ckpt, tmp / f"{name}_model")
        raw = export_checkpoint(ckpt, tmp / f"{name}_raw", ema=False)
        out[name] = (cfg, ckpt, ema, raw)
    return out


@pytest.fixture(scope="module")
def pipes(runs):
    return {name: load_pipeline(r[2]) for name, r in runs.items()}


# ------------------------------------------------------------------------------------------- model folders


@pytest.mark.parametrize("name", list(TINY))
def test_export_writes_a_model_folder(runs, name):
    cfg, ckpt, folder, _ = runs[name]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["format"] == "dfm" and index["arch"] == cfg.model.arch
    assert index["paradigm"] == cfg.diffusion.paradigm
    assert index["source"] == {"checkpoint": str(ckpt), "step": 2, "weights": "ema"}
    # defaults from the training config
    d = index["defaults"]
    assert (d["num_frames"], d["height"], d["width"], d["steps"], d["guidance_scale"]) == (2, 8, 8, 3, 3.0)
    assert d["fps"] == cfg.sampling.fps and d["negative_prompt"] is None
    assert d["sampler"] == ("flow:euler" if name == "wan_flow" else "edm:heun")  # sampling.sampler "auto"
    assert d["shift"] == (2.0 if name == "wan_flow" else None)
    assert {p.name for p in folder.iterdir()} >= {"model_index.json", "transformer", "text_encoder", "vae",
                                                  "config.yaml"}
    assert yaml.safe_load((folder / "config.yaml").read_text())["model"]["arch"] == cfg.model.arch


@pytest.mark.parametrize("name", list(TINY))
def test_exported_weights_are_the_ema_or_the_trained_ones(runs, pipes, name):
    from dfm.checkpoint import load_checkpoint

    _, ckpt, _, raw = runs[name]
    saved = load_checkpoint(ckpt)
    for folder_pipe, key in ((pipes[name], "ema"), (load_pipeline(raw), "model")):
        own = {**{f"net.{k}": v for k, v in D.named_tensors(folder_pipe.transformer).items()},
               **{f"text.{k}": v for k, v in D.named_tensors(_text_module(folder_pipe.text)).items()}}
        assert set(own) == set(saved[key])
        for k, v in saved[key].items():
            assert torch.equal(own[k], v), k
    assert any(not torch.equal(saved["ema"][k], saved["model"][k]) for k in saved["model"])  # they differ


@pytest.mark.parametrize("name", list(TINY))
def test_generate_shapes_and_cost(pipes, name):
    pipe = pipes[name]
    out = pipe.generate(PROMPTS[:2], seed=3, progress=False)
    assert isinstance(out, Generation)
    assert out.videos.shape == (2, 3, 2, 8, 8) and out.videos.dtype == torch.float32
    assert out.videos.abs().max() <= 1 and torch.isfinite(out.videos).all()
    assert out.seeds == [3, 4] and out.prompts == PROMPTS[:2] and out.fps == pipe.defaults["fps"]
    # NFE per video: flow Euler one per step; EDM Heun two per step except the last (to sigma = 0)
    assert out.nfe == (3 if name == "wan_flow" else 2 * 3 - 1)
    assert out.seconds > 0


@pytest.mark.parametrize("name", list(TINY))
def test_batch_of_seeds_equals_single_runs(pipes, name):
    pipe = pipes[name]
    batch = pipe.generate(PROMPTS, seeds=[11, 12, 13], steps=2, sampler="edm:euler_ancestral", progress=False)
    for i, (prompt, seed) in enumerate(zip(PROMPTS, [11, 12, 13])):
        one = pipe.generate(prompt, seed=seed, steps=2, sampler="edm:euler_ancestral", progress=False)
        torch.testing.assert_close(one.videos[0], batch.videos[i], atol=2e-5, rtol=0)
    other = pipe.generate(PROMPTS[0], seed=99, steps=2, sampler="edm:euler_ancestral", progress=False)
    assert (other.videos[0] - batch.videos[0]).abs().max() > 1e-3  # the seed matters
    several = pipe.generate(PROMPTS[0], seeds=[11, 14], steps=2, progress=False)  # one prompt, two seeds
    assert several.prompts == [PROMPTS[0]] * 2 and several.seeds == [11, 14]


def hand_sampled(module, text, vae, prompts, seeds, steps, guidance, paradigm, shift=2.0):
    """An oracle written out here from the papers, sharing nothing with dfm's samplers, grids, guidance or
    adapters: the network and its text encoder, called directly, with classifier-free guidance on the network's
    output and the empty prompt as the null branch. Flow: Euler in s on SD3's shifted grid (s = 1 pure noise,
    v = eps - x0). EDM: Heun (EDM Algorithm 1) on the Karras grid, D the network's EDM preconditioning."""
    ctx, mask = text.encode(prompts)
    null, null_mask = text.encode([""] * len(prompts))
    L = max(ctx.shape[1], null.shape[1])
    pad = lambda c, m: (torch.nn.functional.pad(c, (0, 0, 0, L - c.shape[1])),  # noqa: E731
                        torch.nn.functional.pad(m, (0, L - m.shape[1])))
    (ctx, mask), (null, null_mask) = pad(ctx.float(), mask), pad(null.float(), null_mask)
    shape = (vae.channels, *vae.latent_shape(2, 8, 8)[1:])
    noise = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds])

    def guided(f, x, t):  # f(x, t, context, mask) for both branches, one batch each
        c, u = f(x, t, ctx, mask), f(x, t, null, null_mask)
        return u + guidance * (c - u)

    with torch.no_grad():
        if paradigm == "flow":
            s = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]  # 1, ..., 1/n
            s = (shift * s / (1 + (shift - 1) * s)).tolist() + [0.0]  # SD3's static shift
            x = noise
            v = lambda x, t, c, m: module.net(x, torch.full((len(x),), 1000 * t), context=c, context_mask=m)  # noqa: E731
            for t, t_next in zip(s, s[1:]):
                x = x + (t_next - t) * guided(v, x, t)  # dx/ds = v
        else:
            rho, lo, hi = 7.0, 0.002, 80.0
            i = torch.arange(steps, dtype=torch.float64) / (steps - 1)
            sig = ((hi ** (1 / rho) + i * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho).tolist() + [0.0]  # EDM eq. 5
            D = lambda x, t, c, m: module.edm_denoiser()(x, torch.full((len(x),), t), context=c, context_mask=m)  # noqa: E731
            x = noise * sig[0]
            for t, t_next in zip(sig, sig[1:]):
                d = (x - guided(D, x, t)) / t
                x_next = x + (t_next - t) * d
                if t_next > 0:  # Heun's correction at (x_next, t_next)
                    x_next = x + (t_next - t) * (d + (x_next - guided(D, x_next, t_next)) / t_next) / 2
                x = x_next
        return vae.decode(x).clamp(-1, 1)


@pytest.mark.parametrize("name", list(TINY))
def test_trainer_validation_and_exported_folder_match_a_hand_written_sampler(runs, name, tmp_path):
    """The trainer's validation videos and the exported folder's `generate` are the same videos, and both are what
    the oracle above samples with the same network, prompts and noise."""
    cfg, ckpt, _, raw = runs[name]
    trainer_cfg = load_config(TrainConfig, ckpt / "config.yaml", [f"train.output_dir={tmp_path / 'resumed'}"])
    trainer = Trainer(trainer_cfg, resume=str(ckpt))
    trainer.module.eval()
    validation = trainer.validation_videos(PROMPTS)  # the sampling section: 3 steps, guidance 3, shift 2
    seeds = [validation_seed(cfg.train.seed, i) for i in range(len(PROMPTS))]  # the trainer's validation noise
    pipe = load_pipeline(raw)
    got = pipe.generate(PROMPTS, seeds=seeds, progress=False)
    torch.testing.assert_close(got.videos, validation, atol=1e-5, rtol=0)
    oracle = hand_sampled(pipe.module, pipe.text, pipe.vae, PROMPTS, seeds, 3, 3.0, cfg.diffusion.paradigm)
    torch.testing.assert_close(got.videos, oracle, atol=1e-4, rtol=0)
    assert (oracle - oracle.mean()).abs().max() > 1e-3  # not a constant image


@pytest.mark.parametrize("name", list(TINY))
def test_every_sampler_runs(pipes, name):
    pipe = pipes[name]
    names = sampler_names(pipe.paradigm)
    assert len(names) == len(set(names)) >= 20
    for sampler in names:
        out = pipe.generate(PROMPTS[0], seed=0, steps=3, sampler=sampler, progress=False)
        assert torch.isfinite(out.videos).all(), sampler
        assert out.nfe >= 2 and out.settings["sampler"] == sampler


@pytest.mark.parametrize("name", list(TINY))
def test_first_order_samplers_agree_across_spaces(pipes, name):
    """Euler in flow time s and Euler in EDM sigma on the same grid are the same method (one ODE under the exact
    change of variables sigma = s / (1 - s)), and so is DDIM: the exact adapters of dfm.diffusion.paths carry either
    model to either space."""
    pipe = pipes[name]
    ref = pipe.generate(PROMPTS[:2], seed=1, steps=4, sampler="flow:euler", progress=False).videos
    for other in ("edm:euler", "edm:ddim"):
        got = pipe.generate(PROMPTS[:2], seed=1, steps=4, sampler=other, progress=False).videos
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    heun = pipe.generate(PROMPTS[:2], seed=1, steps=4, sampler="edm:heun", progress=False).videos
    assert (heun - ref).abs().max() > 1e-4  # a different method does differ


def test_negative_prompt_and_guidance(pipes):
    pipe = pipes["wan_flow"]
    base = pipe.generate(PROMPTS[0], seed=2, steps=2, progress=False).videos
    neg = pipe.generate(PROMPTS[0], seed=2, steps=2, negative_prompt="the digit 9 moves up", progress=False).videos
    assert (neg - base).abs().max() > 1e-4  # a negative prompt is used, not ignored
    cond_only = pipe.generate(PROMPTS[0], seed=2, steps=2, guidance_scale=1.0, progress=False)
    assert (cond_only.videos - base).abs().max() > 1e-4
    # guidance 1 with any negative prompt is the conditional model alone
    cond_neg = pipe.generate(PROMPTS[0], seed=2, steps=2, guidance_scale=1.0, negative_prompt="x", progress=False)
    torch.testing.assert_close(cond_neg.videos, cond_only.videos, atol=0, rtol=0)


def test_callback_and_progress(pipes, capsys):
    seen = []
    pipes["dit_edm"].generate(PROMPTS[0], seed=0, steps=4, sampler="edm:dpmpp_2m", progress=False,
                              callback=lambda info: seen.append((info["i"], info["steps"], info["denoised"].shape)))
    assert [s[0] for s in seen] == [0, 1, 2, 3] and all(s[1] == 4 for s in seen)
    assert seen[0][2] == (1, 3, 2, 8, 8)
    pipes["dit_edm"].generate(PROMPTS[0], seed=0, steps=2, progress=True)
    assert "generate" in capsys.readouterr().err  # tqdm on stderr


def test_grids():
    g = sampling_grid("flow_shifted", 4, shift=3.0)
    assert g.kind == "flow" and g.values[0] == 1 and g.values[-1] == 0
    assert g.sigmas()[0] == 1e6 and g.sigmas()[-1] == 0  # s = 1 is evaluated at SIGMA_INF
    assert torch.equal(g.flow_times(), g.values.float())
    k = sampling_grid("karras", 5, sigma_min=0.002, sigma_max=80.0)
    torch.testing.assert_close(k.flow_times()[:-1].double(), k.values[:-1] / (1 + k.values[:-1]))
    with pytest.raises(SamplingError, match="unknown sampling grid"):
        sampling_grid("linear", 3)


def test_sampler_names():
    assert resolve_sampler("euler", "flow").name == "flow:euler"
    assert resolve_sampler("euler", "edm").name == "edm:euler"
    assert resolve_sampler("lms", "flow").name == "edm:lms"  # only in the EDM space
    assert resolve_sampler("midpoint", "edm").name == "flow:midpoint"
    assert resolve_sampler("edm:unipc", "flow").name == "edm:unipc"
    assert resolve_sampler("auto", "edm").name == "edm:heun"


# ---------------------------------------------------------------------------------------------- validation


def test_invalid_arguments(pipes):
    pipe = pipes["wan_flow"]
    with pytest.raises(SamplingError, match=r"unknown sampler 'foo'; use one of: flow:dopri5, .*edm:unipc"):
        pipe.generate(PROMPTS[0], sampler="foo")
    with pytest.raises(SamplingError, match="unknown sampler 'edm:midpoint'"):
        pipe.generate(PROMPTS[0], sampler="edm:midpoint")
    with pytest.raises(PipelineError, match="prompt 1 is empty"):
        pipe.generate([PROMPTS[0], "  "])
    with pytest.raises(PipelineError, match="no prompt"):
        pipe.generate([])
    long = " ".join(["the digit 1 moves up"] * 3)  # 15 words + <bos> > max_length 12
    with pytest.raises(PipelineError, match="prompt 0 is 16 tokens long; .* at most 12"):
        pipe.generate(long)
    with pytest.raises(PipelineError, match="negative prompt 0 is 16 tokens"):
        pipe.generate(PROMPTS[0], negative_prompt=long)
    with pytest.raises(PipelineError, match=r"must be multiples of 2x2 \(VAE factor 1 x patch 2x2\)"):
        pipe.generate(PROMPTS[0], height=7)
    with pytest.raises(PipelineError, match="num_frames must be a positive integer"):
        pipe.generate(PROMPTS[0], num_frames=0)
    with pytest.raises(PipelineError, match="3 seeds for 2 prompts"):
        pipe.generate(PROMPTS[:2], seeds=[1, 2, 3])
    with pytest.raises(PipelineError, match="steps must be a positive integer"):
        pipe.generate(PROMPTS[0], steps=0)
    with pytest.raises(PipelineError, match="shift must be positive"):
        pipe.generate(PROMPTS[0], shift=0.0)
    with pytest.raises(PipelineError, match="shift applies to flow-matching models"):
        pipes["dit_edm"].generate(PROMPTS[0], shift=3.0)
    with pytest.raises(SamplingError, match="flow sampler 'unipc' has no option 'bogus'; its options are: order"):
        pipe.generate(PROMPTS[0], sampler="flow:unipc", sampler_options={"bogus": 1})


def test_other_sizes_and_frame_counts(pipes):
    out = pipes["dit_edm"].generate(PROMPTS[0], seed=0, steps=2, num_frames=3, height=12, width=16,
                                    progress=False)
    assert out.videos.shape == (1, 3, 3, 12, 16)


def test_bad_folders(runs, tmp_path):
    missing = tmp_path / "models" / "wan_flow_digits"
    with pytest.raises(PipelineError, match=r"model folder .*models/wan_flow_digits not found \(the shipped model"):
        load_pipeline(missing)
    folder = tmp_path / "copy"
    shutil.copytree(runs["wan_flow"][2], folder)
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(PipelineError, match="model_index.json is not valid JSON"):
        load_pipeline(folder)
    shutil.rmtree(folder)
    shutil.copytree(runs["wan_flow"][2], folder)
    shutil.rmtree(folder / "transformer")
    with pytest.raises(PipelineError, match="transformer is missing; export the model again"):
        load_pipeline(folder)
    shutil.rmtree(folder)
    shutil.copytree(runs["wan_flow"][2], folder)
    weights = folder / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="text_encoder"):
        load_pipeline(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="has no model_index.json"):
        load_pipeline(tmp_path / "empty")
    with pytest.raises(PipelineError, match="exists and is not empty"):
        export_checkpoint(runs["wan_flow"][1], runs["wan_flow"][2])


def test_checkpoint_loads_directly(runs, pipes):
    """A run directory or a step_* folder loads as a pipeline (EMA weights), the same as its export."""
    cfg, ckpt, _, _ = runs["dit_edm"]
    for path in (ckpt, Path(cfg.train.output_dir)):
        pipe = load_pipeline(path)
        a = pipe.generate(PROMPTS[0], seed=4, steps=2, progress=False).videos
        b = pipes["dit_edm"].generate(PROMPTS[0], seed=4, steps=2, progress=False).videos
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------- CLI


def test_cli_generate_writes_video_and_contact_sheet(runs, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    code = cli.main(["generate", PROMPTS[0], "--model", str(runs["wan_flow"][2]), "--steps", "2", "--seed", "7",
                     "--out", str(out), "--no-progress", "--sampler", "flow:unipc", "--guidance", "2"])
    assert code == 0
    captured = capsys.readouterr()
    assert str(out) in captured.out and str(out.with_suffix(".png")) in captured.out
    assert "NFE 2" in captured.err and "seeds [7]" in captured.err and "flow:unipc" in captured.err
    assert out.stat().st_size > 0 and out.with_suffix(".png").stat().st_size > 0
    from dfm.video import read_video

    assert read_video(out).shape == (3, 2, 128, 128)  # [3, F, H, W]: 8x8 frames scaled up 16x for viewing
    gif = tmp_path / "two.gif"
    assert cli.main(["generate", PROMPTS[0], PROMPTS[1], "--model", str(runs["dit_edm"][2]), "--steps", "2",
                     "--out", str(gif), "--no-progress", "--scale", "1"]) == 0
    assert read_video(tmp_path / "two_00.gif").shape == (3, 2, 8, 8)
    assert (tmp_path / "two_00.gif").is_file() and (tmp_path / "two_01.gif").is_file()
    assert (tmp_path / "two.png").is_file()


def test_cli_errors_are_one_line(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", "the digit 1 moves up", "--model", "models/wan_flow_digits/../wan_flow_digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wan_flow_digits not found; pass --model PATH" in err
    assert cli.main(["generate", "x", "--model", str(runs["wan_flow"][2]), "--sampler", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown sampler 'nope'" in err
    assert cli.main(["generate", "x", "--model", str(runs["wan_flow"][2]), "--out", "v.avi", "--steps", "1",
                     "--no-progress"]) == 2
    assert "use a .mp4 or .gif" in capsys.readouterr().err


def test_cli_info(runs, capsys):
    cfg, ckpt, folder, _ = runs["wan_flow"]
    assert cli.main(["info", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "dfm model folder" in text and "wan (WanModel, 1 blocks, width 32" in text and "flow" in text
    n = sum(p.numel() for p in load_pipeline(folder).transformer.parameters())
    assert f"({n:,})" in text  # transformer parameters, read from the safetensors header
    assert cli.main(["info", str(Path(cfg.train.output_dir))]) == 0
    text = capsys.readouterr().out
    assert "trainer checkpoint, step 2" in text and f"({n:,})" in text and "ema.safetensors" in text
    assert cli.main(["info", str(runs["dit_edm"][2])]) == 0
    text = capsys.readouterr().out
    assert "dit (DiT, 1 blocks, width 32" in text and "edm" in text and "karras" in text


def test_cli_export_with_overrides(runs, tmp_path, capsys):
    out = tmp_path / "exported"
    assert cli.main(["export", str(runs["dit_edm"][1]), str(out), "--no-ema", "--steps", "7", "--sampler",
                     "dpmpp_2m", "--guidance", "1.5", "--fps", "12"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    d = json.loads((out / "model_index.json").read_text())
    assert d["defaults"]["steps"] == 7 and d["defaults"]["sampler"] == "edm:dpmpp_2m"
    assert d["defaults"]["guidance_scale"] == 1.5 and d["defaults"]["fps"] == 12
    assert d["source"]["weights"] == "model"
    assert cli.main(["export", str(runs["dit_edm"][1]), str(out)]) == 2  # exists
    assert "--force" in capsys.readouterr().err
    assert cli.main(["export", str(runs["dit_edm"][1]), str(out), "--force"]) == 0
    assert math.isclose(json.loads((out / "model_index.json").read_text())["defaults"]["guidance_scale"], 3.0)


# ------------------------------------------------------------------------- guidance rescale, interval, grid


@pytest.mark.parametrize("name", list(TINY))
def test_guidance_rescale_interval_and_grid_change_the_videos(pipes, name):
    pipe = pipes[name]
    run = lambda **kw: pipe.generate(PROMPTS[0], seed=0, steps=4, progress=False,  # noqa: E731
                                     **{"guidance_scale": 4.0, **kw}).videos
    plain = run()
    torch.testing.assert_close(run(guidance_rescale=0.0), plain, atol=0, rtol=0)  # 0: plain CFG
    top = 1.0 if pipe.paradigm == "flow" else 1e9
    torch.testing.assert_close(run(guidance_interval=(0.0, top)), plain, atol=0, rtol=0)  # every level: plain CFG
    for kw in ({"guidance_rescale": 0.7}, {"guidance_interval": (0.0, top / 2 if name == "wan_flow" else 1.0)},
               {"grid": "logsnr"}):
        assert (run(**kw) - plain).abs().max() > 1e-4, kw
    # no guidance anywhere == guidance 1
    empty = (0.0, 1e-6) if pipe.paradigm == "flow" else (0.0, 1e-9)
    torch.testing.assert_close(run(guidance_interval=empty), run(guidance_scale=1.0), atol=1e-6, rtol=0)
    out = pipe.generate(PROMPTS[0], seed=0, steps=4, progress=False, guidance_rescale=0.5, grid="logsnr")
    assert out.settings["guidance_rescale"] == 0.5 and out.settings["grid"] == "logsnr"


def test_logsnr_grid_for_a_flow_model_starts_at_pure_noise(pipes):
    g = pipes["wan_flow"].grid(6, 1.0, "logsnr")
    assert g.kind == "flow" and float(g.values[0]) == 1.0 and float(g.values[-1]) == 0.0


def test_bad_guidance_settings_are_one_line_errors(pipes):
    pipe = pipes["wan_flow"]
    with pytest.raises(PipelineError, match=r"guidance_interval 0.9,0.2: give the noise levels .*flow times s"):
        pipe.generate(PROMPTS[0], guidance_interval=(0.9, 0.2))
    with pytest.raises(PipelineError, match="guidance_rescale must be in"):
        pipe.generate(PROMPTS[0], guidance_rescale=2.0)
    with pytest.raises(PipelineError, match="unknown sampling grid 'bogus'; use one of flow_shifted"):
        pipe.generate(PROMPTS[0], grid="bogus")


def test_cli_guidance_flags(runs, tmp_path, capsys):
    folder = str(runs["wan_flow"][2])
    out = tmp_path / "a.mp4"
    assert cli.main(["generate", PROMPTS[0], "--model", folder, "--seed", "0", "--steps", "3", "--no-progress",
                     "--guidance-rescale", "0.5", "--guidance-interval", "0.1,0.9", "--grid", "logsnr",
                     "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # argparse's one-line usage error
        cli.main(["generate", PROMPTS[0], "--model", folder, "--guidance-interval", "0.9"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--guidance-interval" in err and "LO,HI" in err and len(err.strip().splitlines()) == 1


def test_trainer_refuses_a_validation_prompt_it_cannot_read_before_training(tmp_path):
    long = " ".join(["the digit 1 moves up"] * 3)  # 16 tokens > text.max_length 12
    cfg = tiny_config(tmp_path, "wan_flow")
    cfg.train.validate_every, cfg.train.val_prompts = 1, [long]
    from dfm.config import ConfigError

    with pytest.raises(ConfigError, match="train.val_prompts / sampling: prompt 0 is 16 tokens long"):
        Trainer(cfg)
    assert not (tmp_path / "wan_flow" / "checkpoints").exists()


def test_old_config_keys_load_moved_and_are_named_on_the_command_line(tmp_path):
    old = {"diffusion": {"paradigm": "flow", "shift": 3.0, "logit_mean": 0.3, "weighting": "linear"},
           "train": {"val_steps": 7, "val_guidance": 2.5, "val_shift": 4.0}}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    cfg = load_config(TrainConfig, path)
    f = cfg.diffusion.flow
    assert (f.shift, f.weighting_slope, f.logit_mean, f.weighting) == (3.0, 3.0, 0.3, "linear")  # shift was both
    assert (cfg.sampling.steps, cfg.sampling.guidance_scale, cfg.sampling.shift) == (7, 2.5, 4.0)
    from dfm.config import ConfigError

    with pytest.raises(ConfigError, match=r"'train.val_steps' is now 'sampling.steps'; write sampling.steps=3"):
        load_config(TrainConfig, None, ["train.val_steps=3"])


# ------------------------------------------------------------------ issue 13: what `dfm export` may replace
# --force replaces a model folder that dfm export wrote (and nothing else), atomically; OUT is checked first.


def _export(capsys, *args) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = cli.main(["export", *map(str, args)])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_export_force_never_deletes_other_files(runs, tmp_path, capsys):
    ckpt = runs["wan_flow"][1]
    notes = tmp_path / "p"
    notes.mkdir()
    (notes / "notes.txt").write_text("x\n")
    rc, err = _export(capsys, ckpt, notes, "--force")
    assert rc == 2 and len(err) == 1 and "not a dfm model folder" in err[0], err
    assert (notes / "notes.txt").read_text() == "x\n" and sorted(p.name for p in notes.iterdir()) == ["notes.txt"]
    # a model folder with a file of the user's inside: refused too, naming it
    model = tmp_path / "model"
    shutil.copytree(runs["wan_flow"][2], model)
    (model / "notes.txt").write_text("mine\n")
    rc, err = _export(capsys, ckpt, model, "--force")
    assert rc == 2 and len(err) == 1 and "notes.txt" in err[0], err
    assert (model / "notes.txt").read_text() == "mine\n"


def test_export_force_replaces_a_model_folder_atomically(runs, tmp_path, capsys, monkeypatch):
    from dfm.pipeline import folders

    model = tmp_path / "model"
    shutil.copytree(runs["dit_edm"][2], model)
    (model / "model_index.json").write_text((model / "model_index.json").read_text().replace('"steps": 3', '"steps": 9'))
    before = {str(p.relative_to(model)): p.read_bytes() for p in model.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(folders, "_save_transformer", broken)  # the write fails halfway
    rc, err = _export(capsys, runs["dit_edm"][1], model, "--force")
    assert rc == 2 and len(err) == 1 and "No space left" in err[0], err
    assert {str(p.relative_to(model)): p.read_bytes() for p in model.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left
    monkeypatch.undo()
    rc, err = _export(capsys, runs["dit_edm"][1], model, "--force")
    assert rc == 0, err
    assert json.loads((model / "model_index.json").read_text())["defaults"]["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_export_out_is_checked_before_any_work(runs, tmp_path, capsys, monkeypatch):
    from dfm.pipeline import folders

    def no_work(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before OUT was checked")

    monkeypatch.setattr(folders, "pipeline_from_checkpoint", no_work)
    a_file = tmp_path / "model.bin"
    a_file.write_text("x")
    for out in (a_file, a_file / "model"):
        rc, err = _export(capsys, runs["wan_flow"][1], out)
        assert rc == 2 and len(err) == 1 and "is a file" in err[0], err
    assert a_file.read_text() == "x"


def test_export_of_a_vae_run_is_how_a_vae_reaches_models(tmp_path, capsys):
    from test_vae import SMALL_RUN, TINY as VAE_TINY

    from dfm.training.vae_trainer import VAETrainConfig, train_vae
    from dfm.vae import load_vae

    run = tmp_path / "vae_run"
    train_vae(load_config(VAETrainConfig, None, VAE_TINY + SMALL_RUN + [f"train.output_dir={run}",
                                                                      "train.eval_clips=2"]))
    out = tmp_path / "vae_digits"
    rc, err = _export(capsys, run, out)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "eval.json", "model.safetensors"]
    a, b = load_vae(out).state_dict(), load_vae(run / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _export(capsys, run, out)[0] == 2  # exists: --force to replace
    assert _export(capsys, run, out, "--force")[0] == 0
    rc, err = _export(capsys, run, tmp_path / "x", "--steps", "4")
    assert rc == 2 and len(err) == 1 and "steps" in err[0] and not (tmp_path / "x").exists()


# ============================================================================================================
# issue 13 (results wrong without a word; outputs checked before the work): non-finite stages, guidance and
# seed ranges, unknown words, the thread default, --out checked before sampling


def _broken(pipe, part: str, value=float("nan")):
    """A copy of `pipe` whose `part` ("transformer", "text") has one non-finite weight tensor, and its name."""
    import copy

    pipe = copy.deepcopy(pipe)
    module = {"transformer": pipe.transformer, "text": pipe.text}[part]
    name, tensor = next((n, t) for n, t in module.state_dict().items() if t.is_floating_point() and t.ndim >= 1)
    tensor.fill_(value)  # state_dict tensors share the parameters' storage
    if part == "text":
        pipe.text.clear_cache()  # the copy's cache holds rows encoded with the good weights
    return pipe, name


def test_non_finite_weights_fail_naming_the_stage_and_the_part(pipes):
    """NaN/inf anywhere gave a black (or grey) video and exit 0; now one line names the stage and the tensor."""
    import copy
    import types

    pipe, name = _broken(pipes["wan_flow"], "transformer")
    with pytest.raises(PipelineError) as info:
        pipe.generate(PROMPTS[0], seed=0, progress=False)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and message.startswith("sampling gave ")
    assert f"the transformer's weights hold NaN or inf (1 tensor, e.g. {name})" in message
    pipe, name = _broken(pipes["dit_edm"], "text", float("inf"))
    with pytest.raises(PipelineError, match=f"^text encoding gave .* text encoder's weights .*{name}"):
        pipe.generate(PROMPTS[0], seed=0, progress=False)
    pipe = copy.copy(pipes["wan_flow"])  # a VAE whose decoder gives NaN (the tiny models decode by identity)
    pipe.vae = types.SimpleNamespace(decode=lambda z: torch.full((z.shape[0], 3, 2, 8, 8), float("nan")),
                                     latent_shape=pipe.vae.latent_shape, channels=pipe.vae.channels)
    with pytest.raises(PipelineError, match="^VAE decoding gave 384 non-finite values .* of 384; the weights are "
                                            "finite, so sampling diverged"):
        pipe.generate(PROMPTS[0], seed=0, progress=False)


def test_cli_generate_on_nan_weights_is_exit_2_and_writes_nothing(runs, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan_model"
    shutil.copytree(runs["wan_flow"][2], folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    key = sorted(sd)[0]
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, weights)
    out = tmp_path / "v.mp4"
    assert cli.main(["generate", PROMPTS[0], "--model", str(folder), "--steps", "2", "--out", str(out),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sampling gave" in err[0] and "NaN or inf" in err[0] and not out.exists()


def test_guidance_and_seed_ranges_are_stated_and_enforced(pipes):
    from dfm.pipeline.pipeline import GUIDANCE_MAX, SEED_LIMIT

    pipe = pipes["wan_flow"]
    assert GUIDANCE_MAX == 100 and SEED_LIMIT == 2**32
    for w in (-5, -0.1, 100.5, 1e6):
        with pytest.raises(PipelineError, match=r"guidance_scale must be in \[0, 100\]"):
            pipe.generate(PROMPTS[0], guidance_scale=w, steps=1, progress=False)
    for w in (0, 100):  # the ends are allowed: the unconditional model, and strong guidance
        pipe.generate(PROMPTS[0], guidance_scale=w, steps=1, seed=0, progress=False)
    for seed in (-1, 2**32, 2**70):
        with pytest.raises(PipelineError, match=r"seed .* is out of range: seeds are integers in \[0, 4294967295\]"):
            pipe.generate(PROMPTS[0], seed=seed, steps=1, progress=False)
    with pytest.raises(PipelineError, match=r"must be an integer"):
        pipe.generate(PROMPTS[0], seed=1.5, steps=1, progress=False)
    with pytest.raises(PipelineError, match=r"\[0, 4294967294\] \(one per video: seed to seed \+ 1\)"):
        pipe.generate(PROMPTS[:2], seed=2**32 - 1, steps=1, progress=False)  # seed + 1 would alias seed 0
    with pytest.raises(PipelineError, match=r"seeds\[1\] -3 is out of range"):
        pipe.generate(PROMPTS[:2], seeds=[0, -3], steps=1, progress=False)
    last = pipe.generate(PROMPTS[0], seed=2**32 - 1, steps=1, progress=False)
    assert last.seeds == [2**32 - 1]
    with pytest.raises(PipelineError, match=r"seeds\[0\] 1099511627781 is out of range"):
        pipe.generate(PROMPTS[0], seeds=[2**40 + 5], steps=1, progress=False)  # a seeds list is checked as strictly
    # the trainer's validation seeds are 64-bit hashes taken to the range: what torch's generator reads of them
    full = D.derive_seed(5, 1, 2)
    a = torch.randn(4, generator=torch.Generator().manual_seed(full))
    assert torch.equal(a, torch.randn(4, generator=torch.Generator().manual_seed(validation_seed(5, 1))))


def test_unknown_words_warn_once_per_word_set(runs):
    import warnings

    from dfm.text import UnknownWordsWarning

    pipe = load_pipeline(runs["wan_flow"][2])  # a fresh encoder: nothing said yet
    with pytest.warns(UnknownWordsWarning, match=r"does not know 'a', 'cat', 'surfing' .* it knows \d+ words: "):
        pipe.generate("a cat surfing", seed=0, steps=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.generate("a cat surfing", seed=1, steps=1, progress=False)  # same words: said already
        pipe.generate("the cat a surfing", seed=1, steps=1, progress=False)
        pipe.generate(PROMPTS[0], seed=1, steps=1, progress=False)


def test_small_generations_run_on_one_thread(pipes, runs, tmp_path, monkeypatch):
    from dfm.pipeline import Pipeline

    pipe = pipes["wan_flow"]
    assert pipe.cpu_threads(pipe.settings()) == 1  # 8x8 frames of a 1-block model: far below SMALL_WORK
    big = pipe.settings(num_frames=2, height=8, width=8)
    big["shape"] = (big["shape"][0], 2000, 1000, 1000)  # as if the video were huge
    assert pipe.cpu_threads(big) is None
    seen = []
    original = Pipeline.generate
    monkeypatch.setattr(Pipeline, "generate", lambda self, *a, **k: seen.append(torch.get_num_threads())
                        or original(self, *a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cli.main(["generate", PROMPTS[0], "--model", str(runs["wan_flow"][2]), "--steps", "1", "--out",
                         str(tmp_path / "v.mp4"), "--no-progress"]) == 0
        assert seen == [1] and torch.get_num_threads() == 2  # restored after the command
        assert cli.main(["generate", PROMPTS[0], "--model", str(runs["wan_flow"][2]), "--steps", "1", "--out",
                         str(tmp_path / "v.mp4"), "--no-progress", "--threads", "2"]) == 0
        assert seen == [1, 2]  # --threads N wins
    finally:
        torch.set_num_threads(before)


def test_cli_generate_checks_out_before_loading_or_sampling(runs, tmp_path, capsys, monkeypatch):
    """--out naming a folder was found only after sampling (IsADirectoryError); a file on the way
    (--out file/x.mp4) and a read-only folder gave tracebacks. Now: one line, before the model is loaded."""
    from dfm.pipeline import commands

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(commands, "load_pipeline", no_work)
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "a.png").mkdir()  # the contact sheet's name
    cases = [([str(tmp_path / "folder.mp4")], "folder.mp4 is a folder; give a file name"),
             ([str(tmp_path / "file" / "x.mp4")], "file is a file, not a folder"),
             ([str(tmp_path / "file" / "deeper" / "x.gif")], "file is a file, not a folder"),
             ([str(tmp_path / "a.mp4")], "a.png is a folder")]
    for out, expected in cases:
        assert cli.main(["generate", PROMPTS[0], "--model", str(runs["wan_flow"][2]), "--out", *out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (out, err)
    (tmp_path / "b_01.mp4").mkdir()  # several prompts: b_00.mp4, b_01.mp4
    assert cli.main(["generate", PROMPTS[0], PROMPTS[1], "--out", str(tmp_path / "b.mp4")]) == 2
    assert "b_01.mp4 is a folder" in capsys.readouterr().err
    monkeypatch.setattr(commands.os, "access", lambda path, mode: False)  # a read-only disk (root ignores modes)
    assert cli.main(["generate", PROMPTS[0], "--out", str(tmp_path / "c.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write in {tmp_path} (read-only or no permission)" in err[0]
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", PROMPTS[0]]) == 2  # the default folder, outputs/, is checked too
    assert "the default output folder" in capsys.readouterr().err
