"""Run folders (issue 13, "work that is lost"): a fresh run never mixes into an existing one (refused, or moved aside
with train.overwrite=true), a resumed run writes where it was read from, nothing is written into models/, and the
one-line errors around --resume (a missing path, hand-edited state.json, overrides on both sides, non-UTF-8 YAML).
Tiny models, CPU; `cli.main` in-process except for the torchrun case."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_train import ROOT, losses, reference, write_config  # noqa: F401  (reference: the fixture)

from dfm import cli
from dfm.checkpoint import list_checkpoints, load_checkpoint


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def main(capsys, *args) -> tuple[int, list[str]]:
    """`dfm ARGS` in-process: (exit code, stderr lines); stdout is dropped."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip().splitlines()


def one_line_error(rc: int, err: list[str]) -> str:
    assert rc == 2 and "Traceback" not in "\n".join(err), err
    assert len(err) == 1 or err[-1].startswith("dfm train: error:"), err
    return err[-1]


# --- a fresh run into a run folder ------------------------------------------------------------------------------


def test_a_fresh_run_into_a_run_folder_is_refused_then_overwrite_moves_it_aside(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml")
    out = tmp_path / "r1"
    assert main(capsys, "train", "--config", cfg, f"train.output_dir={out}")[0] == 0  # 6 steps
    before = snapshot(out)
    # the same folder again, fresh: one line, and not a byte of the old run changes
    rc, err = main(capsys, "train", "--config", cfg, f"train.output_dir={out}", "train.max_steps=2")
    line = one_line_error(rc, err)
    assert len(err) == 1 and "already holds a run" in line and str(out) in line
    assert "--resume" in line and "train.overwrite=true" in line and "train.output_dir" in line
    assert snapshot(out) == before
    # train.overwrite=true moves the old run aside, whole, and says where
    rc, err = main(capsys, "train", "--config", cfg, f"train.output_dir={out}", "train.max_steps=2",
                   "train.overwrite=true")
    assert rc == 0, err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r1.old-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before
    assert any(str(aside[0]) in line for line in err), err
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002"]
    assert sorted(losses(out)) == [1, 2]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["overwrite"] is False  # an action, not kept
    # the run it started is an ordinary run: --resume continues it
    assert main(capsys, "train", "--resume", out, "train.max_steps=3")[0] == 0
    assert sorted(losses(out)) == [1, 2, 3]


def test_a_folder_with_other_files_is_used_and_its_files_are_left_alone(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml")
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert main(capsys, "train", "--config", cfg, f"train.output_dir={out}", "train.max_steps=1")[0] == 0
    assert (out / "notes.txt").read_text() == "mine\n" and sorted(losses(out)) == [1]


def test_nothing_is_trained_into_the_repositorys_models_folder(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml")
    target = ROOT / "models" / "test_run_folders_never"
    rc, err = main(capsys, "train", "--config", cfg, f"train.output_dir={target}", "train.max_steps=1")
    line = one_line_error(rc, err)
    assert "models/" in line and "dfm export" in line and not target.exists()


# --- resuming ---------------------------------------------------------------------------------------------------


def test_resume_writes_where_it_was_read_from(tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path / "c.yaml")
    for d in ("w1", "w2", "elsewhere"):
        (tmp_path / d).mkdir()
    monkeypatch.chdir(tmp_path / "w1")
    assert main(capsys, "train", "--config", cfg, "train.output_dir=runs/A", "train.max_steps=3")[0] == 0
    moved = tmp_path / "elsewhere" / "B"
    shutil.move(tmp_path / "w1" / "runs" / "A", moved)
    monkeypatch.chdir(tmp_path / "w2")  # neither the run's old place nor its new one
    rc, err = main(capsys, "train", "--resume", moved, "train.max_steps=6")
    assert rc == 0, err
    assert [p.name for p in list_checkpoints(moved / "checkpoints")] == ["step_00000003", "step_00000006"]
    assert sorted(losses(moved)) == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "w2" / "runs").exists() and not (tmp_path / "w1" / "runs" / "A").exists()
    differ = [line for line in err if "differ from its config.yaml" in line]
    assert len(differ) == 1 and "train.max_steps 3 -> 6" in differ[0] and "output_dir" not in differ[0], err
    state = load_checkpoint(moved / "checkpoints" / "step_00000006")["state"]
    first = load_checkpoint(moved / "checkpoints" / "step_00000003")["state"]
    assert state["run"] == first["run"] and state["run"]  # one run, resumed


def test_resuming_an_earlier_step_moves_the_later_checkpoints_aside(reference, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(reference["out"], run)
    untouched = snapshot(reference["out"])
    rc, err = main(capsys, "train", "--resume", run / "checkpoints" / "step_00000003")
    assert rc == 0, err
    aside = list((run / "checkpoints").glob("superseded-*/step_00000006"))
    assert len(aside) == 1 and any(str(aside[0].parent) in line for line in err), err
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000003", "step_00000006"]
    assert losses(run) == reference["losses"]  # the resumed course, bit-identical
    assert snapshot(reference["out"]) == untouched  # the folder named in the copied config.yaml: not written


def test_resume_of_a_path_that_does_not_exist_or_holds_no_checkpoint(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml")
    for args in (["--resume", "/nonexistent/run"], ["--config", cfg, "--resume", "/nonexistent/run"]):
        line = one_line_error(*main(capsys, "train", *args))
        assert "/nonexistent/run" in line and "not found" in line and "needs --config" not in line
    (tmp_path / "empty").mkdir()
    line = one_line_error(*main(capsys, "train", "--resume", tmp_path / "empty"))
    assert "no checkpoint" in line and "needs --config" not in line


def test_overrides_on_both_sides_of_resume(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml")
    out = tmp_path / "run"
    assert main(capsys, "train", "--config", cfg, f"train.output_dir={out}", "train.max_steps=2")[0] == 0
    rc, err = main(capsys, "train", "optim.lr=0.002", "--resume", out, "train.max_steps=3")
    assert rc == 0, err
    differ = [line for line in err if "differ from its config.yaml" in line]
    assert len(differ) == 1 and "optim.lr 0.001 -> 0.002" in differ[0] and "train.max_steps 2 -> 3" in differ[0]
    # `--resume key=value`: the latest checkpoint under output_dir, and the override
    rc, err = main(capsys, "train", "--config", cfg, f"train.output_dir={out}", "--resume", "train.max_steps=4")
    assert rc == 0, err
    assert sorted(losses(out)) == [1, 2, 3, 4]
    # what would split or restart the run is refused in one line
    line = one_line_error(*main(capsys, "train", "--resume", out, f"train.output_dir={tmp_path / 'other'}"))
    assert "train.output_dir" in line and not (tmp_path / "other").exists()
    line = one_line_error(*main(capsys, "train", "--resume", out, "train.overwrite=true"))
    assert "train.overwrite" in line
    assert sorted(losses(out)) == [1, 2, 3, 4]


@pytest.mark.parametrize("edit", ["not json", "step text", "state list", "param groups", "step mismatch",
                                  "optimizer scalars"])
def test_a_hand_edited_state_json_is_a_one_line_error(tmp_path, capsys, edit):
    cfg = write_config(tmp_path / "c.yaml", train={"max_steps": 2, "checkpoint_every": 0})
    out = tmp_path / "run"
    assert main(capsys, "train", "--config", cfg, f"train.output_dir={out}")[0] == 0
    path = out / "checkpoints" / "step_00000002" / "state.json"
    meta = json.loads(path.read_text())
    if edit == "not json":
        path.write_text(path.read_text()[:-10])
    else:
        if edit == "step text":
            meta["step"] = "two"
        elif edit == "state list":
            meta["state"] = [1, 2]
        elif edit == "param groups":
            meta["optimizer"]["param_groups"] = "lr=1"
        elif edit == "step mismatch":
            meta["step"] = 7
        elif edit == "optimizer scalars":
            meta["optimizer"]["scalars"] = {"zero": {"step": 1}}
        path.write_text(json.dumps(meta))
    line = one_line_error(*main(capsys, "train", "--config", cfg, f"train.output_dir={out}", "train.max_steps=3",
                                "--resume"))
    assert "state.json" in line and "step_00000002" in line, line


def test_a_recipe_that_is_not_utf8_is_a_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes(write_config(tmp_path / "c.yaml").read_bytes() + "# caf\u00e9\n".encode("latin-1"))
    line = one_line_error(*main(capsys, "train", "--config", cfg, "--dry-run"))
    assert str(cfg) in line and "UTF-8" in line


# --- SIGTERM under torchrun ---------------------------------------------------------------------------------------

TORCHRUN_SIGTERM = """
import os, signal, sys
import dfm.training.trainer as T
_step = T.Trainer.train_step
def train_step(self, step, micro):
    if step + 1 == 2 and self.info.rank == 0:
        os.kill(os.getppid(), signal.SIGTERM)   # the torchrun agent: it passes SIGTERM on to every worker
    return _step(self, step, micro)
T.Trainer.train_step = train_step
from dfm.cli import main
sys.exit(main({args!r}))
"""


def test_sigterm_to_torchrun_saves_one_collective_checkpoint(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", train={"checkpoint_every": 0, "max_steps": 50})
    out = tmp_path / "run"
    script = tmp_path / "worker.py"
    script.write_text(TORCHRUN_SIGTERM.format(args=["train", "--config", str(cfg), f"train.output_dir={out}"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    log = proc.stdout[-3000:] + proc.stderr[-5000:]
    ckpts = list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 1, log  # one checkpoint, written by the two ranks together
    step = load_checkpoint(ckpts[0])["step"]
    assert 2 <= step < 50 and load_checkpoint(ckpts[0])["state"]["world_size"] == 2, log
    assert log.count("stopped by SIGTERM") == 1, log  # rank 0 says it, once
