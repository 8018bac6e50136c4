"""Training with context parallelism on 2 gloo processes (train.context_parallel=2): each sample's tokens split over
both ranks, against one process on the same global batch. WAN/flow under DDP with Ulysses on 75 tokens (padded
to 76), and DiT/EDM under FSDP2 with ring attention, grad_accum=2 and activation checkpointing: the losses, the
pre-clip gradient norms (the gradients' scale) and the weights equal the 1-process run's; a CP run's checkpoint
resumes in one process and a 1-process checkpoint resumes under CP, each equal to the uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from dfm.checkpoint import latest_checkpoint, load_checkpoint
from dfm.config import ConfigError, load_config
from dfm.training import TrainConfig, train
from test_distributed import DIT, assert_same_weights, grad_norms, losses, one_process, torchrun, write_config

WAN_ODD = ["data.num_frames=3", "data.size=10"]  # (3, 5, 5) = 75 patch tokens of (1, 2, 2)
CP2 = ["train.context_parallel=2"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp_train")
    wan, dit = write_config(tmp / "wan.yaml"), write_config(tmp / "dit.yaml", DIT)
    one_process(wan, tmp / "one_2", *WAN_ODD, "train.max_steps=2")  # resumed under CP below
    torchrun([["train", "--config", str(wan), f"train.output_dir={tmp / 'wan'}", *WAN_ODD, *CP2,
               "train.validate_every=3", "sampling.steps=2"],  # validation: every rank samples, rank 0 writes
              ["train", "--config", str(dit), f"train.output_dir={tmp / 'dit'}", "train.parallel=fsdp",
               "train.grad_accum=2", "train.activation_checkpointing=true", "train.context_parallel_mode=ring", *CP2],
              ["train", "--config", str(wan), f"train.output_dir={tmp / 'wan_2'}", *WAN_ODD, *CP2, "train.max_steps=2"],
              ["train", "--config", str(wan), "--resume", str(tmp / "one_2"), *WAN_ODD, *CP2]], tmp)
    return {"tmp": tmp, "wan": wan, "dit": dit}


def attention_calls(run) -> dict:
    """The CP self-attention forwards of each kind that the run's last checkpoint records."""
    ckpt = latest_checkpoint(run / "checkpoints")
    return load_checkpoint(ckpt)["state"]["context_parallel"]["attention_calls"]


def assert_same_run(run, ref, rtol=1e-5):
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(losses(ref)), rtol=rtol, atol=0)
    torch.testing.assert_close(torch.tensor(grad_norms(run)), torch.tensor(grad_norms(ref)), rtol=rtol, atol=0)
    # 3e-5: AdamW divides near-zero gradients by their own size, so the split's rounding reaches the weights (an AMD
    # EPYC: 1.2e-5 on a text-encoder bias of 0.003; losses and gradient norms above agree to 1e-5)
    assert_same_weights(run, ref, atol=3e-5)


def test_wan_ddp_ulysses_padded_equals_one_process(launched, tmp_path):
    one_process(launched["wan"], tmp_path / "one", *WAN_ODD)
    assert len(losses(launched["tmp"] / "wan")) == 3
    sheet = launched["tmp"] / "wan" / "samples" / "step_00000003" / "contact_sheet.png"
    assert sheet.is_file() and len(list(sheet.parent.glob("*.mp4"))) == 4  # the first 4 captions
    calls = attention_calls(launched["tmp"] / "wan")
    assert calls["ulysses"] >= 3 * 2 and calls["ring"] == 0, calls  # 3 steps x 2 blocks at least: it did shard
    assert_same_run(launched["tmp"] / "wan", tmp_path / "one")


def test_dit_fsdp_ring_accumulation_checkpointing_equals_one_process(launched, tmp_path):
    one_process(launched["dit"], tmp_path / "one", "train.grad_accum=2")
    assert len(losses(launched["tmp"] / "dit")) == 3
    calls = attention_calls(launched["tmp"] / "dit")
    assert calls["ring"] >= 3 * 2 * 2 and calls["ulysses"] == 0, calls  # 3 steps x 2 micro-batches x 2 blocks
    assert_same_run(launched["tmp"] / "dit", tmp_path / "one")


def test_checkpoints_move_between_cp_and_one_process(launched, tmp_path):
    tmp = launched["tmp"]
    one_process(launched["wan"], tmp_path / "one", *WAN_ODD)  # 3 uninterrupted steps of one process
    # a CP checkpoint (step 2) resumed by one process, and a 1-process checkpoint resumed under CP (done above)
    train(load_config(TrainConfig, launched["wan"], [f"train.output_dir={tmp / 'wan_2'}", *WAN_ODD]), resume="latest")
    for run in (tmp / "wan_2", tmp / "one_2"):
        assert len(losses(run)) == 3
        assert_same_run(run, tmp_path / "one")


def test_a_degree_that_does_not_divide_the_world_is_one_line(launched, tmp_path):
    with pytest.raises(ConfigError, match="context_parallel=2 does not divide the world size 1") as e:
        train(load_config(TrainConfig, launched["wan"], [f"train.output_dir={tmp_path / 'x'}", *CP2]))
    assert "\n" not in str(e.value)


def test_dp2_x_cp2_on_four_processes_equals_one_process(tmp_path):
    """4 gloo processes, a DP 2 x CP 2 mesh (CP groups {0, 1} and {2, 3}; DDP over all four): WAN, ring attention
    (forced: 2 heads), 75 tokens, against one process on the same global batch of 4."""
    wan = write_config(tmp_path / "wan.yaml")
    torchrun([["train", "--config", str(wan), f"train.output_dir={tmp_path / 'dpcp'}", *WAN_ODD, *CP2,
               "train.context_parallel_mode=ring", "train.max_steps=2"]], tmp_path, nproc=4)
    one_process(wan, tmp_path / "one", *WAN_ODD, "train.max_steps=2")
    assert attention_calls(tmp_path / "dpcp")["ring"] >= 2 * 2
    assert_same_run(tmp_path / "dpcp", tmp_path / "one")
