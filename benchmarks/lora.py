"""Full fine-tuning vs LoRA (rank 16 and 64) on a WAN at the 1.3B width: trainable parameters, gradient and
optimiser memory, checkpoint size and the time of one AdamW step, side by side in one run.

    python benchmarks/lora.py                     # the 1.3B width (dim 1536, ffn 8960, text 4096), 2 blocks, CPU
    python benchmarks/lora.py --layers 30 --device cuda --dtype bf16    # the whole 1.3B model (not run yet)

One step = forward, mean-square loss against a random velocity target, backward, AdamW step, zero_grad. The
full fine-tune trains every parameter of its own copy of the model; the LoRA runs share one frozen base and swap
their adapters (dfm.models.lora, default targets: every attention projection and FFN layer) before each timed
step. Times are medians over rounds that alternate the order of the runs (the machine is shared: load from other
processes hits all alike); wall and process-CPU seconds are both printed (with one thread, CPU time is the robust
number under load). Optimiser memory is the bytes of AdamW's state after the first step (exp_avg, exp_avg_sq).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfm.models import WanConfig, WanModel  # noqa: E402
from dfm.models.lora import LoRA, add_lora, remove_lora  # noqa: E402


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.ndim > 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--frames", type=int, default=2, help="latent frames (latent 16 x F x 16 x 16: 64 F tokens)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = WanConfig(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=args.layers)  # 1.3B width
    torch.manual_seed(0)
    base = WanModel(cfg).to(dev)
    if dtype != torch.float32:
        base.cast(dtype)
    full = copy.deepcopy(base).train()
    base.requires_grad_(False).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, args.frames, 16, 16, generator=g).to(dev)
    target = torch.randn(x.shape, generator=g).to(dev)
    ctx = torch.randn(1, 32, cfg.text_dim, generator=g).to(dev)
    t = torch.tensor([500.0], device=dev)

    loras = {f"LoRA r{r}": LoRA.create(base, rank=r, alpha=r) for r in map(int, args.ranks.split(","))}
    for lora in loras.values():
        lora.to(dev)
        with torch.no_grad():  # as after some training: B no longer zero (the cost is the same either way)
            for p in lora.parameters():
                p.normal_(0, 0.01)
    runs = {"full": (full, list(full.parameters()))} | {k: (base, list(v.parameters())) for k, v in loras.items()}
    optimizers = {k: torch.optim.AdamW(params, lr=1e-5) for k, (_, params) in runs.items()}

    def use(name):  # the adapters of one LoRA run on the shared base
        remove_lora(base)
        if name in loras:
            add_lora(base, loras[name], name)

    def step(name):
        net, _ = runs[name]
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = (net(x, t, ctx).float() - target).square().mean()
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    for name in runs:  # warm-up, and the optimiser state exists
        use(name)
        step(name)
    wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}
    for i in range(args.repeats):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            use(name)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            step(name)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    total = sum(p.numel() for p in full.parameters())
    tokens = 16 * args.frames * 16 * 16 // 16 // 4
    print(f"WAN at the 1.3B width: dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.num_layers} blocks, {total / 1e6:.1f}M "
          f"parameters; {tokens} video + 32 text tokens, batch 1, {args.dtype} on {dev.type}, {torch.get_num_threads()} "
          f"thread(s); medians of {args.repeats} alternating rounds")
    head = (f"{'run':<10}{'trainable':>12}{'of model':>10}{'grads MB':>10}{'AdamW MB':>10}{'ckpt MB':>9}"
            f"{'step wall s':>13}{'step cpu s':>12}{'vs full':>9}")
    print(head)
    print("-" * len(head))
    ref = statistics.median(cpu["full"])
    for name, (_, params) in runs.items():
        n = sum(p.numel() for p in params)
        nbytes = sum(p.numel() * p.element_size() for p in params)
        c = statistics.median(cpu[name])
        print(f"{name:<10}{n:>12,}{n / total:>9.2%} {nbytes / 2**20:>9.1f}{state_bytes(optimizers[name]) / 2**20:>10.1f}"
              f"{nbytes / 2**20:>9.1f}{statistics.median(wall[name]):>13.3f}{c:>12.3f}{c / ref:>8.2f}x")


if __name__ == "__main__":
    main()
