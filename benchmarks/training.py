"""Training-step throughput of the demo recipe: dfm's WanModel against diffusers' WanTransformer3DModel as the
backbone, in one run.

    python benchmarks/training.py                                   # configs/wan_flow_digits.yaml, its batch
    python benchmarks/training.py --steps 3 train.batch_size=4      # quicker; key=value overrides as in `dfm train`
    python benchmarks/training.py --device cuda                     # bf16 autocast (train.precision=auto)

A "step" is the trainer's own `Trainer.train_step`: text encoding with conditioning dropout, the flow-matching
loss, backward, gradient clipping, AdamW and the EMA update, on one global batch. The diffusers variant is the
same trainer state with `module.net` replaced by a WanTransformer3DModel of the same config and the same initial
weights (dfm's state dict is in diffusers' layout), called as `net(x, t, context=...)` -> `hidden_states=x,
timestep=t, encoder_hidden_states=context` (it takes no text mask: it attends to the padding, as Wan does).

Times are medians over steps that alternate the two backbones (so load from other processes hits both alike);
both wall-clock and process CPU time are shown. GFLOP/step counts the matmul / convolution / attention FLOPs of
one step (torch.utils.flop_counter, forward + backward); GFLOP/s is that over the median wall time. On CPU the
default is one thread (--threads 0: torch's default), because on a shared machine OpenMP threads waiting for each
other make multi-threaded timings swing by several times.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfm import distributed as D  # noqa: E402
from dfm.config import load_config  # noqa: E402
from dfm.train import EMA, DiffusionModule, Trainer, TrainConfig, build_optimizer, collate_batch, GlobalOrder  # noqa: E402


class DiffusersWan(torch.nn.Module):
    """diffusers' WanTransformer3DModel behind dfm's backbone call `net(x, t, context=, context_mask=)`."""

    def __init__(self, dfm_net: torch.nn.Module):
        super().__init__()
        from diffusers import WanTransformer3DModel

        c = dfm_net.config
        self.model = WanTransformer3DModel(
            patch_size=tuple(c.patch_size), num_attention_heads=c.num_attention_heads,
            attention_head_dim=c.attention_head_dim, in_channels=c.in_channels, out_channels=c.out_channels,
            text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers,
            cross_attn_norm=c.cross_attn_norm, qk_norm="rms_norm_across_heads", eps=c.eps,
            rope_max_seq_len=c.rope_max_seq_len)
        self.model.load_state_dict(dfm_net.state_dict())  # dfm's state_dict() is in diffusers' layout

    def forward(self, x, t, context, context_mask=None):
        return self.model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]


def variant(trainer: Trainer, net: torch.nn.Module) -> Trainer:
    """A copy of the trainer's state that trains `net` (and its own copy of the text encoder) from scratch state."""
    t = copy.copy(trainer)
    text = copy.deepcopy(trainer.module.text)
    t.module = t.model = DiffusionModule(net, text, trainer.cfg.diffusion, trainer.cfg.text.null).to(trainer.info.device)
    t.optimizer = build_optimizer(t.module, trainer.cfg.optim)
    t.ema = EMA(t.module, trainer.cfg.optim.ema_decay, trainer.cfg.optim.ema_warmup)
    t.trainable = [p for p in t.module.parameters() if p.requires_grad]
    return t


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(trainer: Trainer, step: int, batch: dict) -> tuple[float, float]:
    sync(trainer.info.device)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train_step(step, [batch])
    sync(trainer.info.device)
    return time.perf_counter() - wall, time.process_time() - cpu


def step_flops(trainer: Trainer, batch: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.train_step(0, [batch])
    return counter.get_total_flops()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "wan_flow_digits.yaml"))
    p.add_argument("--steps", type=int, default=5, help="timed steps per backbone (after one warm-up step)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(TrainConfig, args.config, [*args.overrides, f"train.output_dir={tmp}",
                                                     f"train.device={args.device}", "train.tensorboard=false",
                                                     "train.progress=false"])
        if cfg.model.arch != "wan":
            raise SystemExit(f"{args.config}: model.arch={cfg.model.arch}; this benchmark compares WAN backbones")
        trainer = Trainer(cfg, info=D.init_distributed(cfg.train.device))
        data = GlobalOrder(trainer.dataset, cfg.train.seed, cfg.data.shuffle)
        batch = collate_batch([data[g] for g in range(cfg.train.batch_size)])

        torch.manual_seed(0)
        runs = {"dfm WanModel": variant(trainer, copy.deepcopy(trainer.module.net)),
                "diffusers WanTransformer3DModel": variant(trainer, DiffusersWan(trainer.module.net))}
        # the same function: velocities agree on one input (no text mask, which diffusers does not take)
        dev = trainer.info.device
        x = batch["video"][:2].to(dev)
        ctx = torch.randn(2, 5, trainer.module.text.dim, device=dev)
        with torch.no_grad():
            outs = [r.module.net(x, torch.tensor([300.0, 800.0], device=dev), context=ctx) for r in runs.values()]
        agree = (outs[0] - outs[1]).abs().max().item()

        flops = {name: step_flops(r, batch) for name, r in runs.items()}
        for r in runs.values():  # warm-up
            timed_step(r, 1, batch)
        times = {name: [] for name in runs}
        for i in range(args.steps):
            for name, r in runs.items():
                times[name].append(timed_step(r, 2 + i, batch))

    B = cfg.train.batch_size
    m = cfg.model.overrides
    print(f"# training step, {args.config} (WAN dim {trainer.module.net.config.dim}, {trainer.module.net.config.num_layers} "
          f"layers, {cfg.data.num_frames}x{cfg.data.size}x{cfg.data.size} video, batch {B}, flow matching)")
    print(f"# torch {torch.__version__}, {dev}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"median of {args.steps} alternating steps; max |v_dfm - v_diffusers| = {agree:.2e}")
    print(f"{'backbone':34s} {'params':>8s} {'wall s':>8s} {'cpu s':>8s} {'samples/s':>10s} {'GFLOP/step':>11s} {'GFLOP/s':>8s}")
    rates = {}
    for name, r in runs.items():
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        n = sum(p.numel() for p in r.module.net.parameters())
        rates[name] = B / wall
        print(f"{name:34s} {n / 1e6:7.2f}M {wall:8.3f} {cpu:8.3f} {B / wall:10.2f} {flops[name] / 1e9:11.2f} "
              f"{flops[name] / 1e9 / wall:8.2f}")
    a, b = rates.values()
    print(f"ratio dfm / diffusers: {a / b:.2f}x samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
