"""Multi-process training on gloo (CPU): 2-process DDP and FSDP2 runs reproduce a 1-process run with the same
global batch, and an FSDP2 checkpoint loads (and resumes) in one process. Tiny models; torchrun subprocesses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dfm.checkpoint import latest_checkpoint, load_checkpoint
from dfm.config import load_config
from dfm.distributed import derive_seed, sample_generators
from dfm.model import DiffusionModule, backbone_config, build_text_encoder
from dfm.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "model": {"arch": "wan", "size": "tiny", "overrides": {"num_layers": 2}},
    "diffusion": {"paradigm": "flow"},
    "data": {"dataset": "digits", "num_frames": 2, "size": 8, "length": 64},
    "text": {"dim": 16, "layers": 1, "heads": 2, "max_length": 16},
    "optim": {"lr": 1e-3, "warmup_steps": 1, "ema_decay": 0.9},
    "train": {"max_steps": 3, "batch_size": 4, "log_every": 1, "checkpoint_every": 3, "progress": False, "seed": 5},
}
DIT = {"model": {"arch": "dit", "size": "tiny", "overrides": {"dim": 32, "heads": 2, "freq_dim": 32}},
       "diffusion": {"paradigm": "edm"}}


def write_config(path: Path, extra: dict | None = None) -> Path:
    data = json.loads(json.dumps(TINY))
    for section, values in (extra or {}).items():
        data[section].update(values)
    path.write_text(yaml.safe_dump(data))
    return path


def losses(out: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


def grad_norms(out: Path) -> list[float]:
    """The global gradient norm of each step, before clipping: scale-sensitive where AdamW's update is not."""
    return losses(out, "grad_norm")


# AdamW as plain SGD with learning rate lr / eps = 0.1 (eps >> |g|: the update is lr * g / (|g| + eps)), so the
# weights see the gradients' size; weight decay off; 2 steps. optim.grad_clip stays 1.0, below the measured
# pre-clip norms (WAN 3.03, 2.91; DiT 1.95, 1.92): clipping bites, so the weights also check that the clip uses
# the global norm (an FSDP2 shard's own norm would scale each shard differently, which AdamW would hide).
SGD = ["optim.eps=100", "optim.lr=10", "optim.weight_decay=0", "optim.warmup_steps=0", "train.max_steps=2"]


def torchrun(runs: list[list[str]], tmp_path: Path, nproc: int = 2) -> None:
    """Each `dfm train` argument list in turn, inside ONE torchrun launch (the launch and the imports are most of
    the cost; each run sets up and tears down its own process group)."""
    script = tmp_path / "runs.py"
    script.write_text("import sys\nimport torch.distributed as dist\nfrom dfm.cli import main\n"
                      "dist.init_process_group('gloo')  # one group for all runs\n"
                      f"for args in {runs!r}:\n    rc = main(args)\n    if rc:\n        sys.exit(rc)\n"
                      "dist.barrier()\ndist.destroy_process_group()  # an undestroyed gloo group can abort at exit\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Two 2-process gloo runs, 3 steps each: WAN/flow under DDP, and DiT/EDM under FSDP2 with grad_accum=2
    (gradient sync skipped on the first micro-batch); then the same two pairs for 2 SGD-like steps (SGD above)."""
    tmp = tmp_path_factory.mktemp("dist")
    wan, dit = write_config(tmp / "wan.yaml"), write_config(tmp / "dit.yaml", DIT)
    torchrun([["train", "--config", str(wan), f"train.output_dir={tmp / 'ddp'}", "train.parallel=ddp"],
              ["train", "--config", str(dit), f"train.output_dir={tmp / 'fsdp'}", "train.parallel=fsdp",
               "train.grad_accum=2"],
              ["train", "--config", str(wan), f"train.output_dir={tmp / 'ddp_sgd'}", "train.parallel=ddp", *SGD],
              ["train", "--config", str(dit), f"train.output_dir={tmp / 'fsdp_sgd'}", "train.parallel=fsdp",
               "train.grad_accum=2", *SGD]], tmp)
    return {"tmp": tmp, "wan": wan, "dit": dit}


def one_process(cfg_file: Path, out: Path, *overrides: str) -> list[float]:
    train(load_config(TrainConfig, cfg_file, [f"train.output_dir={out}", *overrides]))
    return losses(out)


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa = load_checkpoint(latest_checkpoint(a / "checkpoints"))["model"]
    wb = load_checkpoint(latest_checkpoint(b / "checkpoints"))["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


def test_ddp_two_processes_match_one_process(launched, tmp_path):
    ref = one_process(launched["wan"], tmp_path / "one")
    ddp = losses(launched["tmp"] / "ddp")
    assert len(ddp) == 3
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(ref), rtol=1e-5, atol=0)
    # the gradients' scale: sum over the global batch / B on every rank count (a dropped world-size factor halves it)
    torch.testing.assert_close(torch.tensor(grad_norms(launched["tmp"] / "ddp")), torch.tensor(grad_norms(
        tmp_path / "one")), rtol=1e-5, atol=0)
    assert_same_weights(launched["tmp"] / "ddp", tmp_path / "one", atol=1e-5)


def test_fsdp2_trains_and_its_checkpoint_loads_and_resumes_in_one_process(launched, tmp_path):
    cfg_file, fsdp = launched["dit"], launched["tmp"] / "fsdp"
    ref = one_process(cfg_file, tmp_path / "one")
    torch.testing.assert_close(torch.tensor(losses(fsdp)), torch.tensor(ref), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(grad_norms(fsdp)), torch.tensor(grad_norms(tmp_path / "one")), rtol=1e-5,
                               atol=0)
    assert_same_weights(fsdp, tmp_path / "one", atol=1e-5)

    # the sharded run's checkpoint is a plain one: it loads into an unwrapped module ...
    ckpt = latest_checkpoint(fsdp / "checkpoints")
    cfg = load_config(TrainConfig, ckpt / "config.yaml")
    text = build_text_encoder(cfg.text, json.loads((ckpt / "text.json").read_text())["vocab"])
    from dfm.models import DiT

    module = DiffusionModule(DiT(backbone_config(cfg.model, 3, text.dim)), text, cfg.diffusion)
    module.load_state_dict(load_checkpoint(ckpt)["model"])
    # ... and one process resumes it (optimizer and EMA included) for two more steps, like the 1-process run
    resumed = train(load_config(TrainConfig, cfg_file, [f"train.output_dir={fsdp}", "train.max_steps=5"]),
                    resume="latest")
    cont = one_process(cfg_file, tmp_path / "one5", "train.max_steps=5")  # 5 steps of one process (constant lr)
    assert resumed["step"] == 5 and math.isfinite(resumed["loss"])
    torch.testing.assert_close(torch.tensor(losses(fsdp)), torch.tensor(cont), rtol=1e-4, atol=0)


@pytest.mark.parametrize("run, config", [("ddp_sgd", "wan"), ("fsdp_sgd", "dit")])
def test_gradients_and_sgd_steps_match_one_process_with_clipping(launched, tmp_path, run, config):
    """The gradients themselves, not an AdamW update (which is scale-invariant): DDP (WAN/flow) and FSDP2 with
    grad_accum=2 (DiT/EDM), 2 processes, against 1 process on the same global batch."""
    extra = ["train.grad_accum=2"] if run == "fsdp_sgd" else []
    one_process(launched[config], tmp_path / "one", *SGD, *extra)
    two, one = grad_norms(launched["tmp"] / run), grad_norms(tmp_path / "one")
    assert len(two) == 2 and min(one) > 1.0, one  # clipping (optim.grad_clip=1) bites at both steps
    # measured |relative difference| <= 1.5e-7 (0 at step 1); a dropped world-size factor halves the norms
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(losses(launched["tmp"] / run)), torch.tensor(losses(tmp_path / "one")),
                               rtol=1e-5, atol=0)
    # weights after 2 SGD-like steps of 0.1 x the clipped gradient: measured max |diff| 6.0e-8 (DDP), 7.5e-9 (FSDP2)
    assert_same_weights(launched["tmp"] / run, tmp_path / "one", atol=1e-6)


def test_sample_noise_is_independent_of_rank_and_batch():
    gens_all = sample_generators(0, range(4), 0)
    gens_rank1 = sample_generators(0, [2, 3], 0)
    a = torch.stack([torch.randn(5, generator=g) for g in gens_all])
    b = torch.stack([torch.randn(5, generator=g) for g in gens_rank1])
    assert torch.equal(a[2:], b)
    assert derive_seed(1, 2, 3) != derive_seed(1, 3, 2) and 0 <= derive_seed(7) < 2**63
