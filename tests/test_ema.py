"""The EMA of the weights (dfm.training.optim.EMA), against independent oracles: torch.optim.swa_utils.AveragedModel
doing the averaging, with the decay of dfm's documented schedule written out here,

    decay(n) = min(decay, (1 + n) / (10 + n))    after n updates (n = 0 at the first), or `decay` without warm-up,

and diffusers' EMAModel for that warm-up formula. Every shipped model is EMA weights, so the trainer's checkpoint is
checked too: ema.safetensors of a real `train()` run is the oracle's EMA of the recorded weight trajectory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dfm.checkpoint import latest_checkpoint, load_checkpoint
from dfm.config import load_config
from dfm.training import EMA, TrainConfig, Trainer


def warmup_decay(decay: float, n: int) -> float:
    """The schedule, written out independently of dfm: n updates done before this one."""
    return min(decay, (1 + n) / (10 + n))


def oracle(init: list[torch.Tensor], decay: float, warmup: bool) -> tuple[AveragedModel, nn.ParameterList]:
    """An AveragedModel over a holder of the weights, primed with the initial weights (its first update copies)."""
    holder = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in init])
    if warmup:
        # AveragedModel passes how many updates it has averaged: 1 after the priming copy, so n = num_averaged - 1
        def avg_fn(avg, current, num_averaged):
            d = warmup_decay(decay, int(num_averaged) - 1)
            return d * avg + (1 - d) * current

        ref = AveragedModel(holder, avg_fn=avg_fn)
    else:
        ref = AveragedModel(holder, multi_avg_fn=get_ema_multi_avg_fn(decay))
    ref.update_parameters(holder)  # n_averaged 0 -> copy: the EMA starts at the initial weights, as dfm's does
    return ref, holder


def ema_of(trajectory: list[list[torch.Tensor]], init: list[torch.Tensor], decay: float, warmup: bool):
    ref, holder = oracle(init, decay, warmup)
    for weights in trajectory:
        with torch.no_grad():
            for h, w in zip(holder, weights):
                h.copy_(w)
        ref.update_parameters(holder)
    return [p.detach() for p in ref.module]


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_matches_averaged_model_over_a_trajectory(warmup):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    net[1].bias.requires_grad_(False)  # frozen parameters are not averaged
    trainable = [p for p in net.parameters() if p.requires_grad]
    init = [p.detach().clone() for p in trainable]
    decay = 0.7  # the warm-up caps at n = 20; 30 updates cover both sides
    ema = EMA(net, decay, warmup=warmup)
    trajectory = []
    for n in range(30):
        with torch.no_grad():
            for p in trainable:
                p.add_(torch.randn_like(p))  # a random walk: every update moves the weights by O(1)
        trajectory.append([p.detach().clone() for p in trainable])
        ema.update(n)
    expected = ema_of(trajectory, init, decay, warmup)
    assert len(ema.shadow) == len(expected) == 3
    for s, e in zip(ema.shadow, expected):
        # measured max |diff| 9.5e-7 with warm-up, 0 without (lerp vs the written-out formula, fp32): atol ~10x that;
        # a swapped weight moves it by 1.3, a skipped warm-up by 6.0e-3 (measured on planted copies)
        torch.testing.assert_close(s, e, rtol=0, atol=1e-5)
    # and the schedule's values themselves
    if warmup:
        assert [ema.decay_at(n) for n in (0, 1, 2, 20, 21, 1000)] == pytest.approx([0.1, 2 / 11, 3 / 12, 0.7, 0.7, 0.7])
    else:
        assert ema.decay_at(0) == ema.decay_at(1000) == decay


def test_first_updates_weigh_the_new_weights_as_the_warm_up_says():
    """By hand: from s0 = 0 and weights 1, the first update gives 1 - decay(0) = 0.9, the second 0.9 + (1 - 0.9) *
    (1 - 2/11); without warm-up 1 - decay."""
    for warmup, first in [(True, 0.9), (False, 1 - 0.99)]:
        net = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(net.weight)
        ema = EMA(net, 0.99, warmup=warmup)
        with torch.no_grad():
            net.weight.fill_(1.0)
        ema.update(0)
        assert ema.shadow[0].item() == pytest.approx(first, rel=1e-6)
        ema.update(1)
        d1 = 2 / 11 if warmup else 0.99
        assert ema.shadow[0].item() == pytest.approx(first + (1 - first) * (1 - d1), rel=1e-6)


def test_warm_up_schedule_is_diffusers_emamodel_formula():
    """diffusers' EMAModel(use_ema_warmup=False) decays by min(decay, (1 + s) / (10 + s)) at its step s = number of
    earlier steps; it copies at s = 0 (decay 0) where dfm takes decay(0) = 0.1, so the two agree from n = 1 on."""
    from diffusers.training_utils import EMAModel

    decay = 0.99  # capped from n = 891 on
    ref = EMAModel(nn.Linear(1, 1).parameters(), decay=decay, use_ema_warmup=False, update_after_step=0)
    ema = EMA(nn.Linear(1, 1), decay, warmup=True)
    for n in range(1, 2000):
        assert ema.decay_at(n) == pytest.approx(ref.get_decay(n + 1), rel=1e-12), n  # optimization_step = n + 1
    assert ref.get_decay(1) == 0.0 and ema.decay_at(0) == pytest.approx(0.1)


TINY = {
    "model": {"arch": "wan", "size": "tiny", "overrides": {"num_layers": 1}},
    "diffusion": {"paradigm": "flow"},
    "data": {"dataset": "digits", "num_frames": 2, "size": 8, "length": 64},
    "text": {"dim": 16, "layers": 1, "heads": 2, "max_length": 16},
    # decay 0.3: the warm-up (0.1, 0.18, 0.25) rules the first three updates, the cap the last three
    "optim": {"lr": 1e-2, "warmup_steps": 0, "ema_decay": 0.3},
    "train": {"max_steps": 6, "batch_size": 4, "log_every": 1, "checkpoint_every": 0, "progress": False, "seed": 11,
              "tensorboard": False},
}


class RecordingTrainer(Trainer):
    """The trainer, recording the trainable weights before the first update and after every one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.initial = [p.detach().clone() for _, p in self.named]
        self.trajectory: list[list[torch.Tensor]] = []

    def train_step(self, step, micro_batches):
        out = super().train_step(step, micro_batches)
        self.trajectory.append([p.detach().clone() for _, p in self.named])
        return out


@pytest.mark.parametrize("warmup", [True, False])
def test_trainer_checkpoint_ema_is_the_oracle_ema_of_the_weight_trajectory(tmp_path, warmup):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(json.loads(json.dumps(TINY))))
    cfg = load_config(TrainConfig, cfg_file, [f"train.output_dir={tmp_path / 'run'}", f"optim.ema_warmup={warmup}"])
    trainer = RecordingTrainer(cfg)
    trainer.run()
    assert len(trainer.trajectory) == 6
    ckpt = load_checkpoint(latest_checkpoint(Path(cfg.train.output_dir) / "checkpoints"))
    expected = ema_of(trainer.trajectory, trainer.initial, 0.3, warmup)
    names = [n for n, _ in trainer.named]
    for name, e, last in zip(names, expected, trainer.trajectory[-1]):
        # measured max |diff| 2.4e-7 with warm-up, 0 without (fp32 rounding of two spellings of one formula): atol
        # 4x that; planted in a copy, a swapped weight moves it by 1.8e-2, a skipped warm-up by 3.2e-5
        torch.testing.assert_close(ckpt["ema"][name], e, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(ckpt["model"][name], last, rtol=0, atol=0, msg=name)
    # the weights moved enough that the EMA is far from them (else the comparison above would prove little)
    gap = max((ckpt["ema"][n] - w).abs().max().item() for n, w in zip(names, trainer.trajectory[-1]))
    assert gap > 1e-3, gap
    # what is not trained is the model's own in the EMA file
    for name in ckpt["model"].keys() - set(names):
        assert torch.equal(ckpt["ema"][name], ckpt["model"][name]), name
