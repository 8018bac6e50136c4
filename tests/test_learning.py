"""It learns: a tiny model trained by the real `train()` on Moving Digits (2 frames of 8x8 pixels) brings its training
loss well below where it starts, in 60 steps on a fixed seed: one WAN / flow-matching run, one DiT / EDM run (each
~6 s on one core). The other trainer tests compare the trainer with itself (resume, DDP); this one fails when the
gradients stop reaching the weights, the objective or its target is broken, or the optimizer does nothing useful.

The loss of each step is the batch mean at random noise levels, so the test averages the last 10 steps. Thresholds
sit between the measured value and where an untrained model stays (its loss at step 1), with margin for float
differences across machines. The untrained models' losses are in the comment above CASES."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dfm.config import load_config
from dfm.training import TrainConfig, train

BASE = {
    "model": {"arch": "wan", "size": "tiny", "overrides": {"num_layers": 2}},
    "diffusion": {"paradigm": "flow"},
    "data": {"dataset": "digits", "num_frames": 2, "size": 8, "length": 100_000},
    "text": {"dim": 16, "layers": 1, "heads": 2, "max_length": 16},
    "optim": {"lr": 1e-2, "warmup_steps": 5, "ema_decay": 0.9},
    "train": {"max_steps": 60, "batch_size": 8, "log_every": 1, "checkpoint_every": 0, "progress": False, "seed": 0,
              "tensorboard": False},
}
DIT = {"model": {"arch": "dit", "size": "tiny", "overrides": {"dim": 32, "heads": 2, "freq_dim": 32}},
       "diffusion": {"paradigm": "edm"}}

# (sections, threshold on the mean loss of steps 51-60). Measured (seed 0, CPU, 1 thread), 2026-12:
#   WAN / flow: step 1 2.16, steps 1-10 1.25, steps 51-60 0.360 (min 0.295)  -> below 0.5 (0.36 + 40%)
#   DiT / EDM:  step 1 2.52, steps 1-10 1.49, steps 51-60 0.725 (min 0.652)  -> below 0.9 (0.725 + 25%)
# With optim.lr=0 (nothing learnt) the means of steps 51-60 are 2.05 (WAN) and 1.81 (DiT): far above both.
CASES = {"wan_flow": ({}, 0.5), "dit_edm": (DIT, 0.9)}


def run(tmp_path: Path, sections: dict) -> list[float]:
    data = json.loads(json.dumps(BASE))
    data.update(sections)
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    train(load_config(TrainConfig, cfg_file, [f"train.output_dir={tmp_path / 'run'}"]))
    return [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_model_loss_falls_below_a_stated_value(tmp_path, case):
    sections, threshold = CASES[case]
    losses = run(tmp_path, sections)
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < threshold, (case, first, last)
    assert last < 0.6 * first, (case, first, last)  # measured ratios 0.29 (WAN) and 0.49 (DiT)
