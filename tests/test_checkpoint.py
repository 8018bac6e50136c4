import os
import random
import stat

import numpy as np
import pytest
import torch

from dfm.checkpoint import (
    CheckpointError,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    run_config,
    save_checkpoint,
)
from dfm.errors import UserError
from dfm.io import save_safetensors
from dfm.models import CheckpointError as WeightsError


def _model_and_opt():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    return m, opt


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    m, opt = _model_and_opt()
    path = save_checkpoint(tmp_path, 3, m.state_dict(), ema=m.state_dict(), optimizer=opt.state_dict(),
                           state={"data_position": 15}, extra_files={"config.yaml": "a: 1\n"})
    ck = load_checkpoint(path)
    assert ck["step"] == 3 and ck["state"] == {"data_position": 15} and (path / "config.yaml").read_text() == "a: 1\n"

    m2, _ = _model_and_opt()
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(1.0)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    m2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["optimizer"])
    # both continue identically
    x = torch.randn(5, 4)
    for mm, oo in ((m, opt), (m2, opt2)):
        oo.zero_grad()
        mm(x).pow(2).mean().backward()
        oo.step()
    for a, b in zip(m.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rng_restore_replays_the_same_numbers(tmp_path):
    m, _ = _model_and_opt()
    path = save_checkpoint(tmp_path, 1, m.state_dict())
    a = (torch.rand(3), np.random.rand(2), random.random())
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    load_checkpoint(path, restore_rng_state=True)
    b = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_keep_last_k_and_stale_tmp_cleanup(tmp_path):
    m, _ = _model_and_opt()
    (tmp_path / "step_00000002.tmp-999").mkdir(parents=True)  # a save killed midway
    for s in (1, 2, 3, 4):
        save_checkpoint(tmp_path, s, m.state_dict(), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert not list(tmp_path.glob("*.tmp-*"))
    assert latest_checkpoint(tmp_path).name == "step_00000004"


def test_incomplete_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    m, _ = _model_and_opt()
    half = tmp_path / "step_00000009"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"garbage")
    assert latest_checkpoint(tmp_path) is None  # no state.json: not a checkpoint
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(half)
    good = save_checkpoint(tmp_path, 10, m.state_dict())
    (good / "model.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(good)


def test_one_checkpoint_error_for_training_checkpoints_and_model_weights():
    assert CheckpointError is WeightsError  # dfm.checkpoint's and dfm.models' are dfm.errors.CheckpointError
    for base in (UserError, RuntimeError, ValueError):  # what the two former classes were: old excepts still catch
        assert issubclass(CheckpointError, base)


def test_weight_files_get_the_usual_mode(tmp_path):
    save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o666 & ~mask  # not save_file's 0600


def test_find_checkpoint_and_run_config_from_any_path_a_user_gives(tmp_path):
    m, _ = _model_and_opt()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("a: 1\n")
    for step in (1, 2):
        save_checkpoint(run / "checkpoints", step, m.state_dict(), extra_files={"config.yaml": f"step: {step}\n"})
    step1, step2 = run / "checkpoints" / "step_00000001", run / "checkpoints" / "step_00000002"
    assert find_checkpoint(step1) == step1  # a step_* folder: itself
    assert find_checkpoint(run / "checkpoints") == step2  # a checkpoints folder: its latest
    assert find_checkpoint(run) == step2  # a run directory: its latest
    assert find_checkpoint(tmp_path / "missing") is None and find_checkpoint(tmp_path) is None
    assert run_config(step1).read_text() == "step: 1\n" and run_config(run) == run / "config.yaml"
    assert run_config(run / "checkpoints") == run / "config.yaml"  # the one beside it
    assert run_config(tmp_path / "missing") is None


def test_keep_last_k_never_deletes_another_runs_checkpoints(tmp_path):
    m, _ = _model_and_opt()
    for s in (10, 20, 30):  # an older run with higher step numbers
        save_checkpoint(tmp_path, s, m.state_dict(), state={"run": "old"}, keep=2)
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, s, m.state_dict(), state={"run": "new"}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003", "step_00000020",
                                                             "step_00000030"]


@pytest.mark.parametrize("meta", [{"step": "3"}, {"step": True}, {"step": -1}, {"step": 4}, {"state": [1]},
                                  {"optimizer": {"param_groups": "x"}}, {"optimizer": {"param_groups": [1]}},
                                  {"optimizer": []}, "[1, 2]"])
def test_a_hand_edited_state_json_is_a_checkpoint_error(tmp_path, meta):
    import json

    m, opt = _model_and_opt()
    path = save_checkpoint(tmp_path, 3, m.state_dict(), optimizer=opt.state_dict())
    good = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(meta if isinstance(meta, str) else json.dumps({**good, **meta}))
    with pytest.raises(CheckpointError, match="step_00000003.*state.json"):
        load_checkpoint(path)


def test_weight_health_is_finite_and_sane():
    from dfm.checkpoint import checkpoint_health

    ok = checkpoint_health({"w": torch.ones(3), "i": torch.arange(3)}, loss=0.5)
    assert ok["good"] and ok["max_abs_weight"] == 1.0
    big = checkpoint_health({"w": torch.tensor([1.0, -6e29])}, loss=0.5)
    assert not big["good"] and "6e+29" in big["why"]
    nan = checkpoint_health({"w": torch.tensor([1.0, float("nan")])}, loss=0.5)
    assert not nan["good"] and "not finite" in nan["why"]
    assert not checkpoint_health({"w": torch.ones(1)}, loss=float("inf"))["good"]


def test_pruning_keeps_the_newest_good_checkpoint_of_a_diverging_run(tmp_path):
    m, _ = _model_and_opt()
    for s, good in [(1, True), (2, True), (3, False), (4, False), (5, False)]:
        save_checkpoint(tmp_path, s, m.state_dict(), state={"run": "r", "health": {"good": good}}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004", "step_00000005"]
