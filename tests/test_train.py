"""The trainer (issue 4): exact resume (also after SIGKILL mid-run and mid-checkpoint), guards for bad inputs
(unknown keys, NaN loss, corrupt videos and checkpoints), the CLI, schedules and data order. Tiny models, CPU."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dfm import cli
from dfm.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from dfm.config import ConfigError, config_yaml, load_config
from dfm.model import DiffusionModule, backbone_config, build_text_encoder
from dfm.training import OptimConfig, StepBatches, TrainConfig, lr_at, train
from dfm.training.config import config_changes
from dfm.training.data import GlobalOrder, build_dataset, keep_captions

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "model": {"arch": "wan", "size": "tiny", "overrides": {"num_layers": 1}},
    "diffusion": {"paradigm": "flow"},
    "data": {"dataset": "digits", "num_frames": 2, "size": 8, "length": 64},
    "text": {"dim": 16, "layers": 1, "heads": 2, "max_length": 16},
    "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine", "ema_decay": 0.9},
    "train": {"max_steps": 6, "batch_size": 4, "log_every": 1, "checkpoint_every": 3, "keep_checkpoints": 2,
              "progress": False, "seed": 3},
}


def write_config(path: Path, **sections) -> Path:
    data = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        data[section].update(values)
    path.write_text(yaml.safe_dump(data))
    return path


def tiny(tmp_path: Path, name: str = "run", *overrides: str, **sections) -> TrainConfig:
    cfg_file = write_config(tmp_path / f"{name}.yaml", **sections)
    return load_config(TrainConfig, cfg_file, [f"train.output_dir={tmp_path / name}", *overrides])


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def run_cli(*args, env_code: str = "", timeout=120) -> subprocess.CompletedProcess:
    """`python -m dfm ...` in a subprocess, after running `env_code` (the test's own hooks) in it."""
    code = f"import sys\n{env_code}\nfrom dfm.cli import main\nsys.exit(main({list(args)!r}))"
    # the same thread count as this process, so float reductions run in the same order as the in-process runs
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """6 uninterrupted steps (with a validation pass at step 6): per-step losses and final weights."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = tiny(tmp, "ref", "train.validate_every=6", "sampling.steps=2",
               "train.val_prompts=[the digit 1 moves up, the digit 2 moves down]")
    result = train(cfg)
    out = Path(cfg.train.output_dir)
    return {"losses": losses(out), "out": out, "result": result,
            "model": load_checkpoint(latest_checkpoint(out / "checkpoints"))["model"]}


def test_run_writes_metrics_checkpoints_and_samples(reference):
    out = reference["out"]
    assert sorted(reference["losses"]) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for v in reference["losses"].values())
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "grad_norm", "steps_per_s", "samples_per_s"} <= set(record)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000003", "step_00000006"]
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
            "config.yaml", "text.json"} <= {p.name for p in ckpt.iterdir()}
    state = json.loads((ckpt / "state.json").read_text())["state"]
    assert state["step"] == 6 and state["data_position"] == 24
    samples = out / "samples" / "step_00000006"
    assert (samples / "00.mp4").stat().st_size > 0 and (samples / "01.mp4").is_file()
    assert (samples / "contact_sheet.png").stat().st_size > 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 6
    # TensorBoard event files hold the same losses as metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    tb_losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert tb_losses == pytest.approx(reference["losses"])


def test_resume_continues_with_identical_losses(reference, tmp_path):
    cfg = tiny(tmp_path, "run", "train.max_steps=3")
    train(cfg)
    cfg = tiny(tmp_path, "run")  # the full run, resumed from step 3
    train(cfg, resume="latest")
    assert losses(tmp_path / "run") == reference["losses"]  # rtol 0: bit-identical on the CPU
    resumed = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))["model"]
    for k, v in reference["model"].items():
        assert torch.equal(resumed[k], v), k


def test_resume_names_the_settings_that_differ_from_the_checkpoint(tmp_path, capsys):
    train(tiny(tmp_path, "run", "train.max_steps=2"))
    capsys.readouterr()
    train(tiny(tmp_path, "run", "train.max_steps=3", "optim.lr=0.002"), resume="latest")
    err = capsys.readouterr().err
    notice = [line for line in err.splitlines() if "differ from its config.yaml" in line]
    assert len(notice) == 1, err
    listed = notice[0].split("config.yaml: ", 1)[1].split(" (the new values", 1)[0]
    assert listed == "optim.lr 0.001 -> 0.002, train.max_steps 2 -> 3"  # only what changed
    train(tiny(tmp_path, "run", "train.max_steps=3", "optim.lr=0.002"), resume="latest")  # nothing left to do
    assert "differ from its config.yaml" not in capsys.readouterr().err


def test_config_changes_edge_cases(tmp_path):
    cfg = tiny(tmp_path, "run")
    saved = tmp_path / "config.yaml"
    assert config_changes(saved, cfg) == []  # missing
    for text in ("", "[1, 2]\n", "a: [unclosed\n"):  # empty, not a mapping, not YAML: nothing to compare
        saved.write_text(text)
        assert config_changes(saved, cfg) == []
    saved.write_text(config_yaml(cfg))
    assert config_changes(saved, cfg) == []
    data = yaml.safe_load(saved.read_text())
    del data["optim"]["lr"]
    data["train"]["retired_key"] = 1
    saved.write_text(yaml.safe_dump(data))
    assert config_changes(saved, cfg) == ["optim.lr (absent) -> 0.001", "train.retired_key 1 -> (absent)"]


KILL_AT_STEP = """
import os, signal, dfm.training.trainer as T
_step = T.Trainer.train_step
def train_step(self, step, micro):
    if step + 1 == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return _step(self, step, micro)
T.Trainer.train_step = train_step
"""

KILL_IN_CHECKPOINT = """
import os, signal, dfm.checkpoint as C
_save = C.save_safetensors
def save_safetensors(tensors, path, *a, **k):
    _save(tensors, path, *a, **k)
    if "step_{step:08d}.tmp" in str(path) and str(path).endswith("model.safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)   # half a checkpoint on disk
C.save_safetensors = save_safetensors
"""


def test_sigkill_mid_checkpoint_and_mid_run_then_resume(reference, tmp_path):
    cfg_file = write_config(tmp_path / "c.yaml")
    out = tmp_path / "killed"
    args = ["train", "--config", str(cfg_file), f"train.output_dir={out}"]
    # 1) killed while writing the step-6 checkpoint: step 3 survives, the half-written folder is ignored
    proc = run_cli(*args, env_code=KILL_IN_CHECKPOINT.format(step=6))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000003"]
    assert list((out / "checkpoints").glob("step_00000006.tmp-*"))
    # 2) resumed, then killed mid-run at step 5 (between checkpoints)
    proc = run_cli(*args, "--resume", env_code=KILL_AT_STEP.format(step=5))
    assert proc.returncode == -9, proc.stderr[-2000:]
    # 3) resumed again (here, in-process) to the end: every step's loss equals the uninterrupted run's
    assert train(load_config(TrainConfig, cfg_file, [f"train.output_dir={out}"]), resume="latest")["step"] == 6
    assert losses(out) == reference["losses"]
    assert not list((out / "checkpoints").glob("*.tmp-*"))


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = DiffusionModule.loss

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        return out * float("nan") if calls["n"] == 5 else out  # step 5

    monkeypatch.setattr(DiffusionModule, "loss", loss)
    cfg_file = write_config(tmp_path / "c.yaml")
    rc = cli.main(["train", "--config", str(cfg_file), f"train.output_dir={tmp_path / 'nan'}",
                   "train.checkpoint_every=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert "loss is nan at step 5" in err[-1] and "optim.lr" in err[-1] and "step_00000004" in err[-1]
    assert "Traceback" not in "\n".join(err)
    ckpt = latest_checkpoint(tmp_path / "nan" / "checkpoints")
    assert ckpt.name == "step_00000004"
    assert all(torch.isfinite(v).all() for v in load_checkpoint(ckpt)["model"].values())


def test_nan_guard_names_the_last_checkpoint_that_is_really_good(tmp_path, monkeypatch, capsys):
    """Weights blown up to ~6e29 at step 4 (the loss still finite), the checkpoint written, then a NaN loss at
    step 5: the good checkpoint is step 2, and the message says step 4's is not one and why."""
    from dfm.training import Trainer

    real_step, calls = Trainer.train_step, {"n": 0}
    real_loss = DiffusionModule.loss

    def train_step(self, step, micro):
        out = real_step(self, step, micro)
        if step + 1 == 4:
            with torch.no_grad():
                next(p for p in self.module.parameters() if p.ndim == 2).mul_(1e30)
        return out

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        out = real_loss(self, *args, **kwargs)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(DiffusionModule, "loss", loss)
    cfg_file = write_config(tmp_path / "c.yaml")
    out = tmp_path / "nan"
    rc = cli.main(["train", "--config", str(cfg_file), f"train.output_dir={out}", "train.checkpoint_every=2",
                   "train.keep_checkpoints=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "\n".join(err)
    last = err[-1]
    assert "loss is nan at step 5" in last and re.search(r"last good checkpoint is \S*step_00000002", last), last
    assert re.search(r"step_00000004 is not .*weights up to \S+e\+\d\d", last), last  # named, and why
    states = {p.name: json.loads((p / "state.json").read_text())["state"] for p in list_checkpoints(out / "checkpoints")}
    assert states["step_00000002"]["health"]["good"] and not states["step_00000004"]["health"]["good"]
    assert math.isfinite(states["step_00000004"]["loss"])  # the loss alone did not tell


SIGNAL_AT_STEP = """
import os, signal, dfm.training.trainer as T
_step = T.Trainer.train_step
def train_step(self, step, micro):
    if step + 1 == {step}:
        os.kill(os.getpid(), signal.{sig})
    return _step(self, step, micro)
T.Trainer.train_step = train_step
"""


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_sigint_and_sigterm_save_a_checkpoint_then_exit_with_the_usual_code(reference, tmp_path, sig, code):
    cfg_file = write_config(tmp_path / "c.yaml", train={"checkpoint_every": 0})
    out = tmp_path / "stopped"
    proc = run_cli("train", "--config", str(cfg_file), f"train.output_dir={out}",
                   env_code=SIGNAL_AT_STEP.format(step=4, sig=sig))
    assert proc.returncode == code, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000004"]  # step 4 finished, saved
    last = proc.stderr.strip().splitlines()[-1]
    assert f"stopped by {sig} at step 4" in last and "--resume" in last and "Traceback" not in proc.stderr, last
    assert not list((out / "checkpoints").glob("*.tmp-*"))
    assert train(load_config(TrainConfig, cfg_file, [f"train.output_dir={out}"]), resume="latest")["step"] == 6
    assert losses(out) == reference["losses"]  # nothing lost: the same run as an uninterrupted one


def test_unknown_keys_are_one_line_errors(tmp_path, capsys):
    cfg_file = write_config(tmp_path / "c.yaml")
    assert cli.main(["train", "--config", str(cfg_file), "train.max_stepz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.max_stepz" in err and "max_steps" in err and "log_every" in err
    assert cli.main(["train", "--config", str(cfg_file), "model.overrides.num_layerz=3", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num_layerz" in err and "num_layers" in err
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="divisible"):
        train(tiny(tmp_path, "x", "train.batch_size=3", "train.grad_accum=2"))


def test_dry_run_prints_resolved_config_and_writes_nothing(tmp_path, capsys):
    cfg_file = write_config(tmp_path / "c.yaml")
    out = tmp_path / "dry"
    assert cli.main(["train", "--config", str(cfg_file), f"train.output_dir={out}", "optim.lr=5e-4",
                     "model.overrides.num_layers=2", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 5e-4 and printed["model"]["overrides"]["num_layers"] == 2
    assert printed["text"]["null"] == "empty" and printed["text"]["dropout"] == 0.1
    assert not out.exists()


def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(reference, tmp_path, capsys):
    import shutil

    out = tmp_path / "corrupt"
    shutil.copytree(reference["out"] / "checkpoints", out / "checkpoints")
    (latest_checkpoint(out / "checkpoints") / "model.safetensors").write_bytes(b"not a safetensors file")
    cfg_file = write_config(tmp_path / "c.yaml")
    rc = cli.main(["train", "--config", str(cfg_file), f"train.output_dir={out}", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0 and "Traceback" not in "\n".join(err), err
    said = [line for line in err if "step_00000006" in line and "step_00000003" in line]
    assert said and "model.safetensors" in said[0] and "intact" in said[0], err  # which one, and why
    assert losses(out) == {s: v for s, v in reference["losses"].items() if s > 3}  # steps 4..6 redone exactly
    # a step_* folder named explicitly is what the user chose: no fallback, one line naming the way on
    bad = out / "checkpoints" / "step_00000006"
    (bad / "ema.safetensors").write_bytes(b"garbage")
    rc = cli.main(["train", "--config", str(cfg_file), f"train.output_dir={out}", "--resume", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "corrupt" in err[0] and "step_00000003" in err[0], err
    # nothing intact at all: one line
    for ckpt in list_checkpoints(out / "checkpoints"):
        (ckpt / "model.safetensors").write_bytes(b"garbage")
    rc = cli.main(["train", "--config", str(cfg_file), f"train.output_dir={out}", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no intact checkpoint" in err[0], err


def test_corrupt_video_in_folder_is_skipped(tmp_path):
    from dfm.video import write_video

    root = tmp_path / "videos"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        write_video(root / f"clip{i}.mp4", torch.rand(3, 4, 8, 8, generator=g) * 2 - 1, fps=8)
        (root / f"clip{i}.txt").write_text(f"clip number {i}")
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    (root / "broken.txt").write_text("broken clip")
    cfg = tiny(tmp_path, "folder", "train.max_steps=2", "train.batch_size=2",
               data={"dataset": "folder", "root": str(root), "num_frames": 2, "size": 8})
    with pytest.warns(UserWarning, match="broken.mp4"):
        result = train(cfg)
    assert result["step"] == 2 and math.isfinite(result["loss"])


def test_folder_aspect_buckets_give_single_shape_batches(tmp_path):
    from dfm.video import write_video

    root = tmp_path / "videos"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate([(8, 16), (16, 8)] * 3):  # landscape and portrait clips
        write_video(root / f"clip{i}.mp4", torch.rand(3, 4, h, w, generator=g) * 2 - 1, fps=8)
        (root / f"clip{i}.txt").write_text(f"clip number {i}")
    data = {"dataset": "folder", "root": str(root), "num_frames": 2, "size": 8, "buckets": [[8, 16], [16, 8]]}
    cfg = tiny(tmp_path, "buckets", "train.max_steps=4", "train.batch_size=2", data=data)
    order = GlobalOrder(build_dataset(cfg), seed=0, batch_size=2)
    shapes = [{tuple(order[g]["video"].shape) for g in range(2 * k, 2 * k + 2)} for k in range(6)]  # 2 epochs
    assert all(len(s) == 1 for s in shapes) and {s.pop() for s in shapes} == {(3, 2, 8, 16), (3, 2, 16, 8)}
    result = train(cfg)
    assert result["step"] == 4 and math.isfinite(result["loss"])


def test_max_minutes_stops_with_a_checkpoint(tmp_path):
    cfg = tiny(tmp_path, "timed", "train.max_steps=50", "train.max_minutes=1e-6", "train.log_every=2",
               "train.checkpoint_every=0")
    result = train(cfg)
    assert result["step"] == 2  # the first log step after the limit
    assert [p.name for p in list_checkpoints(Path(cfg.train.output_dir) / "checkpoints")] == ["step_00000002"]


def test_wan_backbone_with_edm_and_zeros_null(tmp_path):
    cfg = tiny(tmp_path, "edm", "train.max_steps=2", "train.grad_accum=2", "text.null=zeros",
               "diffusion.paradigm=edm", "train.validate_every=2", "sampling.steps=2",
               "train.val_prompts=[the digit 4 moves up]")
    result = train(cfg)
    assert math.isfinite(result["loss"])
    assert (tmp_path / "edm" / "samples" / "step_00000002" / "contact_sheet.png").is_file()


def test_checkpoint_loads_into_a_fresh_module(reference):
    ckpt = latest_checkpoint(reference["out"] / "checkpoints")
    cfg = load_config(TrainConfig, ckpt / "config.yaml")
    vocab = json.loads((ckpt / "text.json").read_text())["vocab"]
    from dfm.models import WanModel

    text = build_text_encoder(cfg.text, vocab)
    module = DiffusionModule(WanModel(backbone_config(cfg.model, 3, text.dim)), text, cfg.diffusion)
    module.load_state_dict(load_checkpoint(ckpt)["ema"])


# --- pieces -------------------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine():
    o = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr=0.1)
    assert [lr_at(s, o, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, o, 14) == pytest.approx(1.0) and lr_at(9, o, 14) == pytest.approx(0.55)
    assert lr_at(14, o, 14) == pytest.approx(0.1) and lr_at(100, o, 14) == pytest.approx(0.1)
    assert lr_at(10, OptimConfig(lr=0.5, warmup_steps=0), 14) == 0.5


def test_step_batches_partition_the_global_batch():
    one = list(StepBatches(2, 4, 8, 1, 0, 1))
    two = [list(StepBatches(2, 4, 8, 2, r, 2)) for r in range(2)]  # 2 ranks x 2 micro-batches of 2
    assert one == [list(range(16, 24)), list(range(24, 32))]
    for step in range(2):
        parts = [two[r][step * 2 + a] for r in range(2) for a in range(2)]
        assert sorted(sum(parts, [])) == one[step]


def test_conditioning_dropout_is_per_sample_and_about_the_rate():
    keep = keep_captions(0, range(4000), 0.1)
    assert 0.08 < 1 - sum(keep) / len(keep) < 0.12
    assert keep_captions(0, [17, 3], 0.1) == [keep[17], keep[3]]  # independent of the batch it sits in
    assert all(keep_captions(0, range(100), 0.0))


def test_python_dash_m_dfm_dispatches_to_the_cli(tmp_path, monkeypatch, capsys):
    import runpy

    cfg_file = write_config(tmp_path / "c.yaml")
    monkeypatch.setattr(sys, "argv", ["dfm", "train", "--config", str(cfg_file), "--dry-run"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("dfm", run_name="__main__")
    assert exit_info.value.code == 0 and "max_steps: 6" in capsys.readouterr().out


def test_dit_backbone_with_flow(tmp_path):
    cfg = tiny(tmp_path, "ditflow", "train.max_steps=2", "train.activation_checkpointing=true",
               model={"arch": "dit", "overrides": {"dim": 32, "heads": 2, "freq_dim": 32, "depth": 1}})
    assert math.isfinite(train(cfg)["loss"])
