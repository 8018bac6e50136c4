"""Training-step throughput of the demo recipe: dfm's WanModel against diffusers' WanTransformer3DModel as the
backbone, in one run.

    python benchmarks/training.py                                   # configs/wan_flow_digits.yaml, its batch
    python benchmarks/training.py --steps 3 train.batch_size=4      # quicker; key=value overrides as in `dfm train`
    python benchmarks/training.py --device cuda                     # bf16 autocast (train.precision=auto)

A "step" is the trainer's own `Trainer.train_step`: text encoding with conditioning dropout, the flow-matching
loss, backward, gradient clipping, AdamW and the EMA update, on one global batch. The diffusers variant is the
same trainer state with `module.net` replaced by a WanTransformer3DModel of the same config and the same initial
weights (dfm's state dict is in diffusers' layout), called as `net(x, t, context=...)` -> `hidden_states=x,
timestep=t, encoder_hidden_states=context`.

Both timed sides compute the same function: diffusers' model takes no text mask (it attends to the padding, as
Wan does), so dfm's WanModel is timed without one too. The text encoder zero-pads, so both see the same padded
context [B, L, D] with exact zeros after the last token and neither masks it. The trainer itself passes the mask
to dfm's model; that call is timed as a third row (`--no-mask-row` leaves it out) and is not part of the ratio.
Agreement is checked on exactly the timed inputs: the first step (from identical weights) records each backbone's
inputs (noisy video, timesteps, encoded padded text: the same batch, per-sample generators and text encoder that
every timed step uses) and output; the inputs must be identical and the velocities are compared.

Times are medians over steps that alternate the backbones, in an order reversed every round (ABAB... / BABA...,
benchmarks/models.py's `time_alternating`), so load from other processes hits all alike; both wall-clock and
process CPU time are shown. GFLOP/step counts the matmul / convolution / attention FLOPs of one step
(torch.utils.flop_counter with benchmarks/models.py's CPU-attention counts, forward + backward); GFLOP/s is that
over the median CPU time with one CPU thread (which load from other processes inflates least), else over the median
wall time. On CPU the default is one thread (--threads 0: torch's default), because on a shared
machine OpenMP threads waiting for each other make multi-threaded timings swing by several times.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import flops, time_alternating  # noqa: E402  (benchmarks/models.py)

from dfm import distributed as D  # noqa: E402
from dfm.config import load_config  # noqa: E402
from dfm.model import DiffusionModule  # noqa: E402
from dfm.training import EMA, GlobalOrder, Trainer, TrainConfig, build_optimizer, collate_batch  # noqa: E402

DFM, DFM_MASK, DIFFUSERS = "dfm WanModel", "dfm WanModel + text mask", "diffusers WanTransformer3DModel"


class DiffusersWan(torch.nn.Module):
    """diffusers' WanTransformer3DModel behind dfm's backbone call `net(x, t, context=, context_mask=)`; it takes
    no text mask, so `context_mask` is dropped (the padded context, zeros after the last token, is attended to)."""

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


class Unmasked(torch.nn.Module):
    """dfm's WanModel called as diffusers' is: the padded context without the mask."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, t, context, context_mask=None):
        return self.net(x, t, context)


def variant(trainer: Trainer, net: torch.nn.Module) -> Trainer:
    """A copy of the trainer's state that trains `net` (and its own copy of the text encoder) from scratch state."""
    t = copy.copy(trainer)
    text = copy.deepcopy(trainer.module.text)
    t.module = t.model = DiffusionModule(net, text, trainer.cfg.diffusion, trainer.cfg.text.null).to(trainer.info.device)
    t.optimizer = build_optimizer(t.module, trainer.cfg.optim)
    t.ema = EMA(t.module, trainer.cfg.optim.ema_decay, trainer.cfg.optim.ema_warmup)
    t.trainable = [p for p in t.module.parameters() if p.requires_grad]
    return t


def first_step(trainer: Trainer, batch: dict) -> dict:
    """Step 0 under the FLOP counter, recording the backbone's first call: {"flops", "loss", "grad_norm",
    "inputs": (x, t, context, context_mask), "v": output}."""
    seen = {}

    def hook(module, args, kwargs, out):
        if "v" not in seen:
            x, t = args[:2]
            seen["inputs"] = (x.detach().clone(), t.detach().clone(), kwargs["context"].detach().clone(),
                              kwargs.get("context_mask"))
            seen["v"] = out.detach().clone()

    handle = trainer.module.net.register_forward_hook(hook, with_kwargs=True)
    try:
        result = {}
        result["flops"] = flops(lambda: result.update(zip(("loss", "grad_norm", "lr"), trainer.train_step(0, [batch]))))
    finally:
        handle.remove()
    return {**result, **seen}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "wan_flow_digits.yaml"))
    p.add_argument("--steps", type=int, default=5, help="timed steps per backbone (after one warm-up step)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-mask-row", action="store_true", help="leave out dfm's masked call (the trainer's own)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(TrainConfig, args.config, [*args.overrides, f"train.output_dir={tmp}",
                                                     f"train.device={args.device}", "train.tensorboard=false",
                                                     "train.progress=false"])
        if cfg.model.arch != "wan":
            raise SystemExit(f"{args.config}: model.arch={cfg.model.arch}; this benchmark compares WAN backbones")
        trainer = Trainer(cfg, info=D.init_distributed(cfg.train.device))
        dev = trainer.info.device
        data = GlobalOrder(trainer.dataset, cfg.train.seed, cfg.data.shuffle)
        batch = collate_batch([data[g] for g in range(cfg.train.batch_size)])

        torch.manual_seed(0)
        net = trainer.module.net
        runs = {DFM: variant(trainer, Unmasked(copy.deepcopy(net))), DIFFUSERS: variant(trainer, DiffusersWan(net))}
        if not args.no_mask_row:
            runs[DFM_MASK] = variant(trainer, copy.deepcopy(net))
        first = {name: first_step(r, batch) for name, r in runs.items()}  # identical states: the same inputs

        ref = first[DFM]["inputs"]
        for name, f in first.items():
            same = all(torch.equal(a, b) for a, b in zip(f["inputs"][:3], ref[:3]))
            if not same:
                raise SystemExit(f"{name}'s backbone saw other inputs than {DFM}'s in the first step")
        mask = ref[3]
        agree = (first[DFM]["v"] - first[DIFFUSERS]["v"]).abs().max().item()
        scale = first[DFM]["v"].abs().max().item()
        d_loss = abs(first[DFM]["loss"] - first[DIFFUSERS]["loss"])

        def stepper(r):
            step = iter(range(1, 10**9))
            return lambda: r.train_step(next(step), [batch])

        steps = {name: stepper(r) for name, r in runs.items()}
        for s in steps.values():  # warm-up: step 1
            s()
        wall, cpu = time_alternating(steps, args.steps, dev, lambda name: None)

    B = cfg.train.batch_size
    c = net.config
    padded = int((~mask).sum()) if mask is not None else 0
    print(f"# training step, {args.config} (WAN dim {c.dim}, {c.num_layers} layers, {cfg.data.num_frames}x"
          f"{cfg.data.size}x{cfg.data.size} video, batch {B}, flow matching)")
    print(f"# torch {torch.__version__}, {dev}, threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}, load average {load:.1f} at start; median of {args.steps} "
          f"steps per backbone, alternating (order reversed every round)")
    print(f"# timed inputs: batch {B}, text {tuple(ref[2].shape)} ({padded} of {ref[2].shape[0] * ref[2].shape[1]} "
          f"positions padding, zeros); on the first step's backbone inputs max |v_dfm - v_diffusers| = {agree:.2e} "
          f"(max |v| {scale:.2f}), |loss_dfm - loss_diffusers| = {d_loss:.1e}")
    if DFM_MASK in first:
        d_mask = (first[DFM_MASK]["v"] - first[DFM]["v"]).abs().max().item()
        print(f"# the trainer's own call (dfm with the text mask) is another function: max |v_mask - v_nomask| = "
              f"{d_mask:.2f}; not part of the ratio")
    by_cpu = dev.type == "cpu" and torch.get_num_threads() == 1
    print(f"{'backbone':34s} {'params':>8s} {'wall s':>8s} {'cpu s':>8s} {'samples/s':>10s} {'GFLOP/step':>11s} {'GFLOP/s':>8s}"
          f"{' (CPU time)' if by_cpu else ''}")
    med = {}
    for name, r in runs.items():
        med[name] = statistics.median(wall[name]), statistics.median(cpu[name])
        n = sum(p.numel() for p in r.module.net.parameters())
        fl = first[name]["flops"] / 1e9
        print(f"{name:34s} {n / 1e6:7.2f}M {med[name][0]:8.3f} {med[name][1]:8.3f} {B / med[name][0]:10.2f} "
              f"{fl:11.2f} {fl / med[name][1 if by_cpu else 0]:8.2f}")
    (wa, ca), (wb, cb) = med[DFM], med[DIFFUSERS]
    print(f"ratio dfm / diffusers (same inputs, no mask): {wb / wa:.2f}x samples/s by wall time, {cb / ca:.2f}x by CPU time")
    if DFM_MASK in med:
        print(f"the text mask costs dfm {med[DFM_MASK][1] / ca - 1:+.1%} CPU time per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
