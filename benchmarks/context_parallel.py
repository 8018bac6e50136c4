"""Context parallelism: what one rank holds and how long a step takes, CP 1 vs 2, and what Ulysses and ring
attention send per layer at Wan's sizes.

    python benchmarks/context_parallel.py                          # 2 gloo processes on this machine, then the table
    python benchmarks/context_parallel.py --tokens 1024,2048 --repeats 3 --layers 2 --dim 128

Part 1 (measured; it starts `torchrun --nproc_per_node 2` itself): a WanModel (random weights, --dim / --layers,
head dim 32) on one sample of growing token counts, forward + backward of a fixed loss, in three ways:
CP 1 (rank 0 alone holds every token, rank 1 waits), CP 2 with Ulysses and CP 2 with ring attention. Memory is
the activation memory a rank holds for the backward pass: the bytes of every distinct tensor autograd saves in
the forward (torch.autograd.graph.saved_tensors_hooks, storages counted once), i.e. what grows with the tokens;
the weights are not in it. Time: wall seconds of forward + backward, median over --repeats rounds that alternate
the three ways in an order reversed every round (benchmarks/models.py's time_alternating), after one untimed
warm-up call of each, so load from other processes on this shared machine hits all alike; one CPU thread per
process. The outputs of the three agree (max diff, printed).

Part 2 (computed): bytes each rank sends per transformer layer for one forward, and forward + backward, at
Wan 2.1 1.3B / 14B, 81 frames of 480x832 (latents 21x60x104, patch 1x2x2: 32760 tokens), batch 2 (the batched
CFG pair), bf16, on 8 ranks. Ulysses: 4 all-to-alls (q, k, v, out) of B*L*D/N elements a rank, (N-1)/N of them
leaving it; the backward repeats them for the gradients. Ring: the K and V chunks (B*L/N*D each) go N-1 hops
forward; the backward sends K, V again N-1 hops and dK, dV N hops. The final all-gather of the output
(B*L*p*C_out elements) is per model, not per layer, and is listed separately.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

WAN = {"1.3B": {"dim": 1536, "heads": 12, "layers": 30}, "14B": {"dim": 5120, "heads": 40, "layers": 40}}


# ------------------------------------------------------------------------------------------ part 2: computed


def comm_bytes(dim: int, heads: int, tokens: int, n: int, batch: int = 2, elem: int = 2) -> dict:
    """Bytes one rank sends per layer (forward; forward + backward) for Ulysses and ring attention."""
    shard = batch * tokens / n * dim * elem  # one [B, L/N, D] tensor
    ulysses_fwd = 4 * shard * (n - 1) / n
    ring_fwd = 2 * shard * (n - 1)
    return {"ulysses_fwd": ulysses_fwd, "ulysses_fwdbwd": 2 * ulysses_fwd, "ring_fwd": ring_fwd,
            "ring_fwdbwd": ring_fwd + 2 * shard * (n - 1) + 2 * shard * n, "ulysses_possible": heads % n == 0}


def table_comm(n: int = 8) -> None:
    tokens = 21 * (60 // 2) * (104 // 2)  # 81x480x832 -> latents 21x60x104 -> 1x2x2 patches
    out_gather = 2 * tokens * 4 * 16 * 2 * (n - 1) / n  # B * L * (p*C_out = 64) bf16, the received part
    print(f"\n## Communication per layer and rank: Wan 2.1 at 81x480x832 ({tokens} tokens), batch 2, bf16, {n} ranks\n")
    print("| model | D | heads | Ulysses fwd | ring fwd | Ulysses fwd+bwd | ring fwd+bwd | ring / Ulysses | "
          "per forward (all layers): Ulysses / ring |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, c in WAN.items():
        b = comm_bytes(c["dim"], c["heads"], tokens, n)
        note = "" if b["ulysses_possible"] else f" (impossible: {n} does not divide {c['heads']} heads; auto = ring)"
        mb = lambda x: f"{x / 2**20:.0f} MiB"  # noqa: E731
        print(f"| {name} | {c['dim']} | {c['heads']} | {mb(b['ulysses_fwd'])}{note} | {mb(b['ring_fwd'])} | "
              f"{mb(b['ulysses_fwdbwd'])} | {mb(b['ring_fwdbwd'])} | {b['ring_fwd'] / b['ulysses_fwd']:.1f}x | "
              f"{b['ulysses_fwd'] * c['layers'] / 2**30:.2f} / {b['ring_fwd'] * c['layers'] / 2**30:.2f} GiB |")
    print(f"\n(plus one all-gather of the output per forward: {out_gather / 2**20:.1f} MiB received a rank)")


# ------------------------------------------------------------------------------------------ part 1: measured


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from models import time_alternating  # benchmarks/models.py

    from dfm.models import WanModel
    from dfm.models.context_parallel import ContextParallel, enable_context_parallel
    from dfm.models.wan import WanConfig

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    cfg = WanConfig(num_attention_heads=args.dim // 32, attention_head_dim=32, in_channels=4, out_channels=4,
                    text_dim=32, freq_dim=64, ffn_dim=4 * args.dim, num_layers=args.layers)
    torch.manual_seed(0)
    model = WanModel(cfg)
    cps = {"ulysses": ContextParallel(None, "ulysses"), "ring": ContextParallel(None, "ring")}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved too (by F.linear), not counted
    rows = []
    for tokens in args.tokens:
        w = int(math.sqrt(tokens / 4))  # one latent frame... of 4 frames: grid (4, h, w) with h*w = tokens / 4
        h = tokens // 4 // w
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 4, 4, 2 * h, 2 * w, generator=g)
        t, ctx = torch.tensor([500.0]), torch.randn(1, 8, 32, generator=g)
        weight = torch.randn(x.shape, generator=g)
        outs, saved = {}, {}

        def step(way):
            def run():
                enable_context_parallel(model, cps.get(way))
                if way == "cp1" and rank != 0:  # CP 1: rank 0 alone
                    dist.barrier()
                    return
                model.zero_grad(set_to_none=True)
                seen = {}

                def pack(tensor):
                    try:
                        key = tensor.untyped_storage().data_ptr()
                        if key not in weights:
                            seen[key] = max(seen.get(key, 0), tensor.untyped_storage().nbytes())
                    except (RuntimeError, NotImplementedError):
                        pass
                    return tensor

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = model(x, t, ctx)
                saved[way] = sum(seen.values())
                (out * weight).sum().backward()
                outs[way] = out.detach()
                if way == "cp1":
                    dist.barrier()
            return run

        runs = {way: step(way) for way in ("cp1", "ulysses", "ring")}
        for run in runs.values():  # warm-up (the first collectives of a kind set up their buffers)
            run()
        wall, _ = time_alternating(runs, args.repeats, torch.device("cpu"), lambda k: None)
        diff = max((outs[k] - outs["cp1"]).abs().max().item() for k in ("ulysses", "ring")) if rank == 0 else 0.0
        peers = [None] * dist.get_world_size()
        dist.all_gather_object(peers, {k: saved.get(k, 0) for k in runs})
        rows.append({"tokens": h * w * 4, "grid": (4, h, w), "saved": [p for p in peers],
                     "seconds": {k: statistics.median(v) for k, v in wall.items()}, "max_diff": diff})
    if rank == 0:
        Path(args.json).write_text(json.dumps(rows))
    enable_context_parallel(model, None)
    dist.barrier()
    dist.destroy_process_group()


def table_measured(rows, args) -> None:
    print(f"\n## CP 1 vs 2 on this machine: WanModel dim {args.dim}, {args.layers} layers, head dim 32, batch 1, "
          f"fp32, gloo, 1 thread per process, median of {args.repeats}\n")
    print("| tokens | saved activations, CP 1 | CP 2 Ulysses (per rank) | CP 2 ring (per rank) | CP2/CP1 memory "
          "(Ulysses, ring) | s fwd+bwd CP 1 | CP 2 Ulysses | CP 2 ring | CP1/CP2 time (Ulysses, ring) | max diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cp1 = r["saved"][0]["cp1"]
        uly = max(p["ulysses"] for p in r["saved"])
        ring = max(p["ring"] for p in r["saved"])
        s = r["seconds"]
        mb = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
        print(f"| {r['tokens']} | {mb(cp1)} | {mb(uly)} | {mb(ring)} | {uly / cp1:.2f}, {ring / cp1:.2f} | "
              f"{s['cp1']:.3f} | {s['ulysses']:.3f} | {s['ring']:.3f} | {s['cp1'] / s['ulysses']:.2f}, "
              f"{s['cp1'] / s['ring']:.2f} | {r['max_diff']:.1e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="1024,2048,4096", help="token counts (comma-separated)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ranks", type=int, default=8, help="ranks of the computed communication table")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.tokens = [int(t) for t in str(args.tokens).split(",")]
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--json", str(out), "--tokens", ",".join(map(str, args.tokens)), "--dim", str(args.dim),
               "--layers", str(args.layers), "--repeats", str(args.repeats)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run(cmd, check=True, env=env)
        table_measured(json.loads(out.read_text()), args)
    table_comm(args.ranks)


if __name__ == "__main__":
    main()
