"""The video VAEs (dfm.vae): causality, shapes, the image path, temporal chunks and spatial tiles against the whole
video, latent normalisation, files, the Wan 2.1 loader against diffusers, bad inputs, training and evaluation.
Tiny models, CPU."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from dfm import cli
from dfm.config import ConfigError, load_config
from dfm.data import MovingDigits
from dfm.errors import UserError
from dfm.training.vae_trainer import VAETrainConfig, psnr, train_vae
from dfm.vae import (
    CausalVAE,
    CausalVAEConfig,
    IdentityVAE,
    VAEError,
    blend_tiles,
    fit_latent_stats,
    load_vae,
)
from dfm.video import read_video


def tiny_vae(spatial=4, temporal=2, channels=4, base=4, seed=0, res=1) -> CausalVAE:
    levels = spatial.bit_length() - 1
    torch.manual_seed(seed)
    cfg = CausalVAEConfig(spatial_factor=spatial, temporal_factor=temporal, latent_channels=channels,
                          base_channels=base, channel_mult=[1] + [2] * levels, num_res_blocks=res)
    vae = CausalVAE(cfg).eval()
    for m in vae.modules():  # random weights in the zero-initialised residual convs too: every layer is tested
        if isinstance(m, torch.nn.Conv3d):
            m.reset_parameters()
    return vae


def video(batch=2, frames=9, size=16, seed=0) -> torch.Tensor:
    return torch.rand(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def digits(frames, size, count=2, digits=2) -> torch.Tensor:
    data = MovingDigits(num_frames=frames, size=size, num_digits=digits, colors=["red", "cyan"], length=count)
    return torch.stack([data[i]["video"] for i in range(count)])


# ---------------------------------------------------------------------------------------- the causal VAE


@torch.no_grad()
def test_encoder_is_causal_in_time():
    """Latent j sees pixel frames <= 2j: changing frame 5 leaves latents 0..2 bit-identical and changes 3 and 4."""
    vae, x = tiny_vae(), video(frames=9)
    z = vae.encode(x)
    x2 = x.clone()
    x2[:, :, 5] += 0.5
    change = (vae.encode(x2) - z).abs().amax(dim=(0, 1, 3, 4))  # [f]
    assert torch.all(change[:3] == 0)
    assert torch.all(change[3:] > 1e-4)


@torch.no_grad()
def test_decoder_is_causal_in_time():
    """Latent j decodes to frames 2j-1 and 2j: changing it leaves frames < 2j - 1 unchanged."""
    vae = tiny_vae()
    z = vae.encode(video(frames=9))
    z2 = z.clone()
    z2[:, :, 3] += 1.0
    change = (vae.decode(z2) - vae.decode(z)).abs().amax(dim=(0, 1, 3, 4))  # [F]
    assert torch.all(change[:5] == 0)
    assert change[5] > 1e-4


@pytest.mark.parametrize("spatial,temporal", [(4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4)])
@torch.no_grad()
def test_shapes_for_each_compression(spatial, temporal):
    vae = tiny_vae(spatial, temporal, channels=3)
    frames, size = 1 + 2 * temporal, 2 * spatial
    assert (vae.spatial_factor, vae.temporal_factor, vae.channels) == (spatial, temporal, 3)
    z = vae.encode(video(frames=frames, size=size))
    assert tuple(z.shape) == (2, *vae.latent_shape(frames, size, size)) == (2, 3, 3, 2, 2)
    assert tuple(vae.decode(z).shape) == (2, 3, frames, size, size)
    assert vae.latent_shape(1, size, size) == (3, 1, 2, 2)  # an image


@torch.no_grad()
def test_image_is_a_one_frame_video():
    """The first frame is encoded alone: an image's latent is the video's first latent frame, and decodes to it."""
    vae, x = tiny_vae(), video(frames=9)
    z = vae.encode(x)
    z_image = vae.encode(x[:, :, :1])
    assert z_image.shape == (2, 4, 1, 4, 4)
    torch.testing.assert_close(z_image, z[:, :, :1], atol=1e-5, rtol=0)
    torch.testing.assert_close(vae.decode(z[:, :, :1]), vae.decode(z)[:, :, :1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("temporal", [2, 4])
@torch.no_grad()
def test_temporal_chunks_equal_the_whole_video(temporal):
    vae = tiny_vae(temporal=temporal)
    x = video(frames=1 + 4 * temporal)  # 5 latent frames
    z, y = vae.encode(x), vae.decode(vae.encode(x))
    for chunk in (1, 2, 3):
        torch.testing.assert_close(vae.encode(x, chunk=chunk), z, atol=1e-5, rtol=0)
        torch.testing.assert_close(vae.decode(z, chunk=chunk), y, atol=1e-5, rtol=0)
    assert vae.chunk_sizes(1 + 4 * temporal, 2, latent=False) == [1 + temporal, 2 * temporal, 2 * temporal - temporal]


@torch.no_grad()
def test_any_split_of_the_stream_equals_the_whole():
    """The causal cache carries the frames a window still needs, so even splits that cut a stride-2 window work."""
    vae, x = tiny_vae(), video(frames=9)
    whole = vae.encoder(x, {})
    cache = {}
    pieces = [vae.encoder(p, cache) for p in x.split([2, 3, 1, 3], dim=2)]
    torch.testing.assert_close(torch.cat(pieces, dim=2), whole, atol=1e-5, rtol=0)


@torch.no_grad()
def test_spatial_tiles_stay_within_tolerance():
    """Tiles of 64 px with 32 px overlap on 96 px frames, blended linearly: relative RMS error under 3% (measured
    1.0% encode, 1.2% decode), 4-5x below abutting tiles; a tile as large as the frame is the untiled path.
    All convs get He-normal weights so that every layer carries signal across the whole receptive field (~22 px
    radius), as in a trained model; the zero-initialised residual branches would make tiling nearly exact."""
    vae, x = tiny_vae(seed=1), digits(frames=3, size=96)
    for m in vae.modules():
        if isinstance(m, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(m.weight)

    def rel(a, b):
        return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())

    z, y = vae.encode(x), vae.decode(vae.encode(x))
    enc, dec = rel(vae.encode(x, tile=64, overlap=32), z), rel(vae.decode(z, tile=64, overlap=32), y)
    enc0, dec0 = rel(vae.encode(x, tile=64, overlap=0), z), rel(vae.decode(z, tile=64, overlap=0), y)
    assert 0 < enc < 0.03 and 0 < dec < 0.03, (enc, dec)
    assert enc < enc0 and dec < dec0, (enc, enc0, dec, dec0)
    assert torch.equal(vae.encode(x, tile=96), z)


@torch.no_grad()
def test_blend_tiles_of_a_pointwise_function_are_exact():
    """With no receptive field (a pointwise map) tiling must be exact: the blend weights sum to one everywhere."""
    x = torch.randn(1, 2, 3, 40, 24)

    def pool(t):
        return torch.nn.functional.avg_pool3d(t, (1, 4, 4)) * 3

    def up(t):
        return t.repeat_interleave(4, dim=-1).repeat_interleave(4, dim=-2) - 1

    torch.testing.assert_close(blend_tiles(pool, x, 16, 8, 4, down=True), pool(x))
    torch.testing.assert_close(blend_tiles(up, x, 32, 12, 4, down=False), up(x))


@torch.no_grad()
def test_normalisation_round_trip_and_fitted_statistics():
    vae, x = tiny_vae(), video(frames=5)
    mean, _ = vae.moments(x)
    vae.latents_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    vae.latents_std.copy_(torch.tensor([2.0, 0.5, 1.5, 3.0]))
    z = vae.encode(x)
    torch.testing.assert_close(z * vae.latents_std.view(1, -1, 1, 1, 1) + vae.latents_mean.view(1, -1, 1, 1, 1), mean)
    torch.testing.assert_close(vae.denormalize(vae.normalize(mean)), mean)
    torch.testing.assert_close(vae.decode(z), vae.decode_raw(mean).clamp(-1, 1), atol=1e-5, rtol=0)
    # measured statistics make the encoded latents zero-mean, unit-std per channel on the data they were fitted on
    fit_latent_stats(vae, [x[:1], x[1:]])
    z = vae.encode(x).transpose(0, 1).flatten(1)  # [C, N]
    torch.testing.assert_close(z.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(1, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)


@torch.no_grad()
def test_save_and_load_round_trip(tmp_path):
    vae, x = tiny_vae(temporal=4), video(frames=5)
    fit_latent_stats(vae, [x])
    vae.save_pretrained(tmp_path / "vae", extra={"trained_on": {"num_frames": 5, "size": 16}})
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["type"] == "causal_vae" and config["temporal_factor"] == 4
    loaded = load_vae(tmp_path / "vae")
    assert isinstance(loaded, CausalVAE) and loaded.config == vae.config and not loaded.training
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(loaded.encode(x), vae.encode(x))
    IdentityVAE().save_pretrained(tmp_path / "identity")
    assert isinstance(load_vae(tmp_path / "identity"), IdentityVAE) and isinstance(load_vae("identity"), IdentityVAE)


# -------------------------------------------------------------------------------------------- Wan 2.1 VAE


@torch.no_grad()
def test_wan_vae_matches_diffusers(tmp_path):
    """A tiny random AutoencoderKLWan (4x8x8) saved as a diffusers folder loads behind load_vae; encode and decode
    equal diffusers' calls with WanPipeline's normalisation (z - mean) / std and z * std + mean."""
    from diffusers import AutoencoderKLWan

    mean, std = [0.3, -0.2, 0.1, -0.5], [1.5, 0.7, 2.0, 1.1]
    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std).eval()
    ref.save_pretrained(tmp_path / "wan")
    vae = load_vae(tmp_path / "wan")
    assert (vae.channels, vae.temporal_factor, vae.spatial_factor) == (4, 4, 8)
    assert vae.latent_shape(5, 16, 16) == (4, 2, 2, 2)
    x = video(batch=1, frames=5, size=16)
    m, s = torch.tensor(mean).view(1, -1, 1, 1, 1), torch.tensor(std).view(1, -1, 1, 1, 1)
    z = vae.encode(x)
    expected = (ref.encode(x).latent_dist.mode() - m) / s
    assert z.shape == (1, 4, 2, 2, 2)
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vae.decode(z), ref.decode(z * s + m).sample, atol=1e-5, rtol=1e-5)
    with pytest.raises(VAEError, match="1 \\+ 4\\*n"):
        vae.latent_shape(6, 16, 16)


def test_wan_vae_without_diffusers_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(UserError, match="pip install diffusers"):
        load_vae(tmp_path)


def test_wan_vae_with_corrupt_weights_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "base_dim": 8, "z_dim": 4}))
    with pytest.raises(VAEError, match="diffusion_pytorch_model.safetensors is missing"):
        load_vae(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(VAEError, match="diffusion_pytorch_model.safetensors"):
        load_vae(tmp_path)


# ---------------------------------------------------------------------------------------------- bad input


def test_latent_shape_rejects_unrepresentable_clips():
    vae = tiny_vae(temporal=2)
    with pytest.raises(VAEError, match="1 \\+ 2\\*n frames \\(1, 3, 5, 7, ...\\), got 8") as e:
        vae.latent_shape(8, 16, 16)
    assert "\n" not in str(e.value)
    with pytest.raises(VAEError, match="divisible by 4.*got 18x16"):
        vae.latent_shape(9, 18, 16)
    with pytest.raises(VAEError, match="got 0"):
        vae.latent_shape(0, 16, 16)
    with pytest.raises(VAEError, match=r"\[B, 3, F, H, W\]"):
        vae.encode(torch.zeros(3, 9, 16, 16))
    with pytest.raises(VAEError, match="divisible by 4"):
        vae.encode(video(frames=9, size=10))
    with pytest.raises(VAEError, match=r"latents \[B, 4, f, h, w\]"):
        vae.decode(torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(VAEError, match="channel_mult needs"):
        CausalVAE(CausalVAEConfig(spatial_factor=8, channel_mult=[1, 2]))
    with pytest.raises(VAEError, match="temporal_factor"):
        CausalVAE(CausalVAEConfig(temporal_factor=3))


def test_missing_or_corrupt_files_are_one_line_errors_naming_the_file(tmp_path):
    with pytest.raises(VAEError, match="not found"):
        load_vae(tmp_path / "nowhere")
    tiny_vae().save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "model.safetensors"
    good = weights.read_bytes()
    weights.unlink()
    with pytest.raises(VAEError, match=f"{weights} is missing"):
        load_vae(tmp_path / "vae")
    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(VAEError, match=f"{weights} is corrupt") as e:
        load_vae(tmp_path / "vae")
    assert "\n" not in str(e.value)
    weights.write_bytes(good)
    config = tmp_path / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "latent_channels": 6}))  # weights do not fit
    with pytest.raises(VAEError, match="does not match config.json"):
        load_vae(tmp_path / "vae")
    config.write_text("{ not json")
    with pytest.raises(VAEError, match=f"{config} is not valid JSON"):
        load_vae(tmp_path / "vae")
    config.write_text(json.dumps({"type": "mystery"}))
    with pytest.raises(VAEError, match="no known autoencoder"):
        load_vae(tmp_path / "vae")


# ---------------------------------------------------------------------------------- training and evaluation

TINY = ["model.base_channels=4", "model.latent_channels=2", "model.channel_mult=[1, 2, 2]", "data.num_frames=3",
        "data.size=8", "data.length=32", "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=2",
        "train.stats_clips=4", "train.eval_clips=2", "train.progress=false", "train.seed=5",
        "optim.schedule=constant"]  # a cosine schedule depends on max_steps, which the resume test changes


def _metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_train_vae_resumes_exactly_and_writes_the_model(tmp_path):
    full = load_config(VAETrainConfig, None, TINY + [f"train.output_dir={tmp_path / 'full'}", "train.max_steps=4"])
    result = train_vae(full)
    assert result["step"] == 4 and result["eval"]["compression_ratio"] == pytest.approx(3 * 3 * 64 / (2 * 2 * 2 * 2))
    # 2 steps, then --resume to 4: the same losses (same data, posterior noise and optimizer state)
    part = load_config(VAETrainConfig, None, TINY + [f"train.output_dir={tmp_path / 'part'}", "train.max_steps=2"])
    train_vae(part)
    part.train.max_steps = 4
    train_vae(part, resume="latest")
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=0), step
    # the model folder: weights, measured latent statistics, the clip it was trained on
    vae = load_vae(tmp_path / "full" / "model")
    assert not torch.equal(vae.latents_std, torch.ones(2)) and not torch.equal(vae.latents_mean, torch.zeros(2))
    config = json.loads((tmp_path / "full" / "model" / "config.json").read_text())
    assert config["trained_on"]["num_frames"] == 3 and config["trained_on"]["size"] == 8
    assert json.loads((tmp_path / "full" / "eval.json").read_text())["latent_shape"] == [2, 2, 2, 2]


def test_decoder_fine_tune_keeps_the_encoder_and_the_latent_space(tmp_path):
    first = load_config(VAETrainConfig, None, TINY + [f"train.output_dir={tmp_path / 'first'}", "train.max_steps=2"])
    train_vae(first)
    before = load_vae(tmp_path / "first" / "model")
    tune = load_config(VAETrainConfig, None, TINY + [f"train.output_dir={tmp_path / 'tune'}", "train.max_steps=3",
                                                     f"train.init_from={tmp_path / 'first' / 'model'}",
                                                     "train.train_encoder=false"])
    train_vae(tune)
    after = load_vae(tmp_path / "tune" / "model")
    video = torch.rand(2, 3, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(after.encode(video), before.encode(video))  # same encoder, same stats: same latents
        assert not torch.equal(after.decode(after.encode(video)), before.decode(before.encode(video)))
    for name, tensor in before.state_dict().items():
        assert torch.equal(after.state_dict()[name], tensor) == (not name.startswith("decoder.")), name
    with pytest.raises(VAEError, match="set train.init_from"):
        train_vae(load_config(VAETrainConfig, None, TINY + [f"train.output_dir={tmp_path / 'x'}",
                                                             "train.train_encoder=false"]))


def test_train_vae_config_checks():
    with pytest.raises(ConfigError, match="1 \\+ 2\\*n frames.*data.num_frames=8"):
        train_vae(load_config(VAETrainConfig, None, ["data.num_frames=8"]))
    with pytest.raises(ConfigError, match="unknown config key 'model.latent_channel'"):
        load_config(VAETrainConfig, None, ["model.latent_channel=4"])


ROOT = Path(__file__).resolve().parents[1]
SMALL_RUN = ["train.max_steps=1", "train.batch_size=2", "data.length=4", "train.stats_clips=2", "train.eval_clips=0",
             "train.checkpoint_every=0", "train.threads=0"]


def test_the_two_vae_recipes_write_their_models_under_output_dir_and_never_into_models(tmp_path, monkeypatch):
    """configs/vae_digits.yaml then configs/vae_digits_decoder.yaml, one step each, with train.output_dir moved:
    each model lands in OUTPUT/model (run from a scratch directory, so a wrong place is never the repository's)."""
    monkeypatch.chdir(tmp_path)
    stage1 = load_config(VAETrainConfig, ROOT / "configs" / "vae_digits.yaml",
                         SMALL_RUN + [f"train.output_dir={tmp_path / 'vae1'}"])
    assert train_vae(stage1)["model"] == str(tmp_path / "vae1" / "model")
    stage2 = load_config(VAETrainConfig, ROOT / "configs" / "vae_digits_decoder.yaml",
                         SMALL_RUN + [f"train.output_dir={tmp_path / 'vae2'}", f"train.init_from={tmp_path / 'vae1' / 'model'}"])
    assert train_vae(stage2)["model"] == str(tmp_path / "vae2" / "model")
    assert load_vae(tmp_path / "vae2" / "model").config == load_vae(tmp_path / "vae1" / "model").config
    assert not (tmp_path / "models").exists() and not (tmp_path / "runs").exists()


def test_train_vae_refuses_the_repositorys_models_folder_and_an_existing_run(tmp_path):
    shipped = ROOT / "models" / "vae_digits"
    before = {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()}
    for key, value in [("train.save_to", shipped), ("train.output_dir", ROOT / "models" / "vae_run")]:
        cfg = load_config(VAETrainConfig, None, TINY + SMALL_RUN + [f"train.output_dir={tmp_path / 'x'}",
                                                                     f"{key}={value}"])
        with pytest.raises(UserError, match=f"{key}=.*models/.*dfm export"):
            train_vae(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()} == before
    assert not (ROOT / "models" / "vae_run").exists() and not (tmp_path / "x").exists()
    # a fresh run into a folder that holds one: refused, the old run untouched
    cfg = load_config(VAETrainConfig, None, TINY + SMALL_RUN + [f"train.output_dir={tmp_path / 'run'}"])
    train_vae(cfg)
    weights = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a run.*--resume.*train.overwrite=true"):
        train_vae(cfg)
    assert (tmp_path / "run" / "model" / "model.safetensors").read_bytes() == weights


def test_train_vae_resume_writes_where_it_was_read_from(tmp_path, monkeypatch):
    import shutil

    cfg = load_config(VAETrainConfig, None, TINY + SMALL_RUN + ["train.output_dir=runs/v", "train.checkpoint_every=1"])
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    train_vae(cfg)
    shutil.move(tmp_path / "a" / "runs" / "v", tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    cfg.train.max_steps = 2
    result = train_vae(cfg, resume=str(tmp_path / "moved"))
    assert result["step"] == 2 and Path(result["model"]) == tmp_path / "moved" / "model"
    assert (tmp_path / "moved" / "checkpoints" / "step_00000002").is_dir() and not (tmp_path / "runs").exists()


def test_eval_vae_cli(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert cli.main(["eval-vae", "--model", "identity", "--frames", "3", "--size", "8", "--clips", "3",
                     "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| compression ratio (pixels*3 / latent elements) | 1.00 |" in table
    report = json.loads(out.read_text())
    assert report["psnr"] == pytest.approx(100.0) and report["clips"] == 3 and report["split"] == "test"
    # a trained-looking folder: frames and size come from its config.json
    vae = tiny_vae(channels=2)
    vae.save_pretrained(tmp_path / "vae", extra={"trained_on": {"num_frames": 5, "size": 8}})
    assert cli.main(["eval-vae", "--model", str(tmp_path / "vae"), "--clips", "2"]) == 0
    assert not (tmp_path / "vae" / "eval.json").exists()  # nothing written into the model folder unasked
    assert cli.main(["eval-vae", "--model", str(tmp_path / "vae"), "--clips", "2", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["latent_shape"] == [2, 3, 2, 2] and report["psnr"] < 30
    capsys.readouterr()
    assert cli.main(["eval-vae", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]


def test_psnr():
    x = torch.zeros(2, 3, 1, 2, 2)
    y = x.clone()
    y[1] += 0.2  # error 0.1 on the [0, 1] scale -> 20 dB
    torch.testing.assert_close(psnr(y, x), torch.tensor([100.0, 20.0]))


def test_trainer_uses_a_frozen_vae_folder(tmp_path):
    from dfm.model import build_autoencoder
    from dfm.training import TrainConfig

    tiny_vae(channels=2).save_pretrained(tmp_path / "vae")
    cfg = load_config(TrainConfig, None, [f"autoencoder.name={tmp_path / 'vae'}", "data.num_frames=5", "data.size=8"])
    clip = lambda: (cfg.data.num_frames, cfg.data.size, cfg.data.size)  # noqa: E731  (what the trainer passes)
    vae = build_autoencoder(cfg.autoencoder, clip())
    assert isinstance(vae, CausalVAE) and vae.channels == 2 and not vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    cfg.data.num_frames = 8
    with pytest.raises(ConfigError, match="autoencoder.name=.*1 \\+ 2\\*n frames"):
        build_autoencoder(cfg.autoencoder, clip())
    cfg.autoencoder.name = "identity"
    assert isinstance(build_autoencoder(cfg.autoencoder, clip()), IdentityVAE)


def test_diffusion_training_runs_in_the_latent_space_of_a_vae_folder(tmp_path):
    """dfm train with autoencoder.name=FOLDER: the backbone sees 2-channel latents [2, 3, 4, 4] and validation
    decodes them back to 5-frame 16x16 videos."""
    from dfm.training import TrainConfig, train

    tiny_vae(channels=2).save_pretrained(tmp_path / "vae")
    cfg = load_config(TrainConfig, None, [
        f"autoencoder.name={tmp_path / 'vae'}", "data.num_frames=5", "data.size=16", "data.length=8",
        "model.arch=wan", "model.size=tiny", "model.overrides={num_layers: 1}", "text.dim=16", "text.layers=1",
        "text.heads=2", "text.max_length=16", "train.max_steps=2", "train.batch_size=2", "train.progress=false",
        f"train.output_dir={tmp_path / 'run'}", "train.validate_every=2", "sampling.steps=2",
        "train.val_prompts=[the digit 1 moves up]", "train.tensorboard=false"])
    result = train(cfg)
    assert result["step"] == 2 and math.isfinite(result["loss"])
    sample = read_video(tmp_path / "run" / "samples" / "step_00000002" / "00.mp4")
    assert tuple(sample.shape) == (3, 5, 16, 16)


# ------------------------------------------------------------------ issue 13: only safetensors are ever loaded


def test_pickled_vae_weights_are_refused_by_name_never_unpickled(tmp_path):
    """A Wan VAE folder holding some *.safetensors plus diffusion_pytorch_model.bin: diffusers alone would unpickle
    the .bin (use_safetensors defaults to a fallback); load_vae refuses it, and a dfm VAE folder with only a
    pickled file is refused by name too."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    folder = tmp_path / "wan"
    ref.save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "other.safetensors")
    torch.save(ref.state_dict(), folder / "diffusion_pytorch_model.bin")
    with pytest.raises(VAEError) as info:
        load_vae(folder)
    message = str(info.value)
    assert "diffusion_pytorch_model.safetensors is missing" in message and "\n" not in message
    assert "diffusion_pytorch_model.bin is pickled and dfm loads only safetensors" in message
    assert "save_file(torch.load(FILE, weights_only=True)" in message  # how to convert

    tiny_vae().save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "model.safetensors"
    weights.rename(tmp_path / "vae" / "model.ckpt")
    with pytest.raises(VAEError, match="model.safetensors is missing; model.ckpt is pickled and dfm loads only"):
        load_vae(tmp_path / "vae")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_train_vae_saves_a_checkpoint_on_sigint_and_sigterm_and_resumes(tmp_path, monkeypatch, sig):
    """The signal arrives during step 2: the step finishes, its checkpoint is written, no model is exported (the
    run is not finished), and --resume continues to the end."""
    import os
    import signal

    import dfm.training.vae_trainer as V
    from dfm.checkpoint import list_checkpoints

    calls, real = [], V.vae_loss

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), getattr(signal, sig))
        return real(*args, **kwargs)

    monkeypatch.setattr(V, "vae_loss", loss)
    out = tmp_path / "v"
    cfg = load_config(VAETrainConfig, None, TINY + SMALL_RUN + [f"train.output_dir={out}", "train.max_steps=4"])
    result = train_vae(cfg)
    assert result["signal"] == getattr(signal, sig) and result["step"] == 2 and result["model"] is None
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002"]
    assert not (out / "model").exists()
    resumed = train_vae(cfg, resume=str(out))
    assert resumed["step"] == 4 and (out / "model" / "model.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored
