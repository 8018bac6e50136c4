"""The slow-motion LoRA recipe's data option and `dfm eval-lora`'s readings and tests (dfm/evaluate_lora.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats
import torch

from dfm import cli
from dfm.data import MovingDigits
from dfm.evaluate import analyze
from dfm.evaluate_lora import drop_test, paired_drop_test, reverses, speed_level
from dfm.training import TrainConfig
from dfm.training.data import build_dataset


def test_data_speed_changes_the_motion_and_nothing_else():
    """data.speed reaches MovingDigits; same index, same caption, digit and direction, at the asked speed; the
    video reads back as that speed (real clips: the centroid moves with the glyph)."""
    cfg = TrainConfig()
    cfg.data.num_frames, cfg.data.size, cfg.data.length = 9, 16, 8
    normal = build_dataset(cfg)
    cfg.data.speed = 0.375
    slow = build_dataset(cfg)
    assert normal.speed == 0.75 and slow.speed == 0.375
    for i in range(8):
        a, b = normal[i], slow[i]
        assert (a["caption"], a["digit"], a["direction"]) == (b["caption"], b["digit"], b["direction"])
        steps = (b["positions"][0, 1:] - b["positions"][0, :-1]).norm(dim=-1)  # [F-1] px per frame
        torch.testing.assert_close(steps, torch.full_like(steps, 0.375), atol=1e-5, rtol=0)
    for data, speed in ((normal, 0.75), (slow, 0.375)):
        videos = torch.stack([data[i]["video"] for i in range(8)])
        records = analyze(videos)
        torch.testing.assert_close(speed_level(records), torch.full((8,), speed, dtype=torch.float32),
                                   atol=0.02, rtol=0)
        assert all(r["direction"] == data[i]["direction"] for i, r in enumerate(records))
        assert not any(reverses(r) for r in records)


def test_reverses_reads_a_bounce():
    """A clip that bounces (the dataset says so) reverses; the speed reading is its path per frame."""
    data = MovingDigits("test", num_frames=9, size=16, bounce=True, speed=1.5, length=8, seed=0)
    items = [data[i] for i in range(8)]
    records = analyze(torch.stack([it["video"] for it in items]))
    assert all(it["bounces"] for it in items) and all(reverses(r) for r in records)
    assert float(speed_level(records).mean()) > 1.0


def test_drop_test_against_scipy():
    """The pooled z-test squared is scipy's uncorrected chi-square of the 2x2 table, its one-sided p half of the
    two-sided one in the direction of the drop; the McNemar p is scipy's exact binomial test of b in b + c."""
    for k_base, k_new, n in ((110, 101, 120), (39, 35, 40), (30, 34, 40), (60, 60, 120)):
        z, p = drop_test(k_base, n, k_new, n)
        chi2, p_two, _, _ = scipy.stats.chi2_contingency([[k_base, n - k_base], [k_new, n - k_new]], correction=False)
        assert z * z == pytest.approx(chi2, rel=1e-9)
        assert p == pytest.approx(p_two / 2 if k_new <= k_base else 1 - p_two / 2, rel=1e-9)
    assert drop_test(40, 40, 40, 40) == (0.0, 1.0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        before, after = rng.random(60) < 0.9, rng.random(60) < 0.85
        b, c, p = paired_drop_test(before.tolist(), after.tolist())
        assert (b, c) == (int((before & ~after).sum()), int((after & ~before).sum()))
        assert p == pytest.approx(scipy.stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue, rel=1e-9)
    assert paired_drop_test([True, False], [True, False]) == (0, 0, 1.0)


def test_eval_lora_command(tmp_path, capsys):
    """`dfm eval-lora` on the shipped model: a row per seed set and the total, --json, --against itself gives
    no change and p = 1; an existing --json or another seed set is refused in one line (exit 2)."""
    args = ["eval-lora", "--model", "models/wan_flow_digits", "--num", "3", "--seeds", "0,100", "--steps", "2",
            "--threads", "1"]
    assert cli.main(args + ["--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "| seeds 0-2 | 3 |" in out and "| seeds 100-102 | 3 |" in out and "| all | 6 |" in out
    saved = json.loads((tmp_path / "a.json").read_text())
    assert len(saved["videos"]) == 6 and {"speed", "ink", "correct_digit"} <= set(saved["videos"][0])
    assert cli.main(args + ["--against", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "| digit acc |" in out and "| +0.000 | 0.00, 1.000 | 0, 0, 1.000 |" in out
    assert cli.main(args + ["--json", str(tmp_path / "a.json")]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(args[:-4] + ["--seeds", "5", "--steps", "2", "--against", str(tmp_path / "a.json")]) == 2
    assert "same --seeds" in capsys.readouterr().err


def test_the_recipe_resolves_and_a_bad_speed_is_one_line(tmp_path, capsys):
    """configs/lora_slow_digits.yaml: a LoRA on the shipped model at half speed; a speed that leaves the frame is
    refused in one line (exit 2) before a run folder is written."""
    assert cli.main(["train", "--config", "configs/lora_slow_digits.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "speed: 0.375" in out and "rank: 16" in out and "wan_flow_digits" in out
    run = tmp_path / "run"
    assert cli.main(["train", "--config", "configs/lora_slow_digits.yaml", "data.speed=3",
                     f"train.output_dir={run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data: speed 3 px/frame leaves the frame" in err[0] and not run.exists()
