"""Speed and memory of dfm's WAN against diffusers' WanTransformer3DModel at identical configurations.

    python benchmarks/models.py --quick                    # small config, under a minute on one CPU core
    python benchmarks/models.py                            # small and large configs, a few minutes
    python benchmarks/models.py --device cuda --dtype bf16 --configs 1.3B    # 480x832, 81 frames

Both models get the same weights (dfm loads diffusers' state dict) and the same inputs; the outputs are
compared first. Times are medians over repeats that alternate the two models (so load from other processes
hits both alike); "fwd" runs under no_grad, "fwd+bwd" backpropagates a mean-square loss. GFLOP/s counts the
matmul/attention FLOPs of one pass (torch.utils.flop_counter) over the median time, against the device's
measured matmul throughput in the same dtype (the ceiling). Peak memory is what the pass allocates above the
weights: tracked tensor storage on CPU, torch.cuda.max_memory_allocated on CUDA.

On CPU the default is one thread (--threads 0: torch's default): on a machine shared with other processes,
OpenMP threads that wait for each other make multi-threaded timings swing by 5-10x. Both the wall-clock and
the process CPU time are reported; with one thread the CPU time is the robust number under load.

The CUDA/bf16 path has not been run on a GPU yet.

Measured on this project's CPU (AMD EPYC, AVX2, 1 of 2 cores, shared with other jobs; fp32; medians), dfm is
1.00-1.06x diffusers, not the 1.25x aimed for, at 45-51% (small) and 71-77% (large) of the matmul ceiling:

    small  fwd      diffusers 189.7 ms  dfm 179.7 ms  1.06x     fwd+bwd  606.4 / 606.4 ms  1.00x (best 1.05x)
    large  fwd      diffusers  2872 ms  dfm  2817 ms  1.02x     fwd+bwd   9074 /  8729 ms  1.04x (best 1.02x)

Where the time goes (profile of the small case): the GEMMs already run at the core's peak (~80 GFLOP/s), the
CPU flash-attention kernel runs at ~30 GFLOP/s (a head-dim-64 GEMM does no better on this CPU, so neither an
explicit bmm/softmax attention nor a hand-written backward was faster), GELU-tanh takes ~6%; what dfm removes
(separate q/k/v GEMMs, the strided RoPE and its scatter writes, unfused modulation/residual ops, casts) is most
of the remaining ~20%, so 1.25x cannot be reached in eager fp32 with equal outputs. torch.compile of the blocks
(`WanModel.compile_blocks`) gave no further gain here. On a GPU, where kernel launches and memory traffic of
the small ops cost relatively more, the same changes should matter more; that is not measured yet.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils._python_dispatch
import torch.utils._pytree
import torch.utils.flop_counter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfm.models import WanConfig, WanModel  # noqa: E402


@dataclass
class Case:
    name: str
    config: WanConfig
    batch: int
    latent: tuple[int, int, int]  # (F, H, W) latent frames and size
    text_tokens: int
    checkpointing: bool = False  # activation checkpointing in both models (memory for fwd+bwd)


CASES = {
    "tiny": Case("tiny", WanConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                   text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2),
                 batch=2, latent=(2, 4, 4), text_tokens=8),  # smoke test of the script itself
    "small": Case("small", WanConfig(num_attention_heads=4, attention_head_dim=64, text_dim=256, ffn_dim=1024,
                                     num_layers=4), batch=2, latent=(8, 16, 16), text_tokens=128),
    "large": Case("large", WanConfig(num_attention_heads=12, attention_head_dim=128, text_dim=4096, ffn_dim=8960,
                                     num_layers=2), batch=1, latent=(4, 32, 32), text_tokens=512),
    # Wan 2.1 1.3B at 480x832, 81 frames: latent 21 x 60 x 104 (VAE stride 4, 8, 8)
    "1.3B": Case("1.3B", WanConfig(), batch=1, latent=(21, 60, 104), text_tokens=512, checkpointing=True),
}


# ---------------------------------------------------------------------------------------------- measuring


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensor storage allocated while active (CPU; weights excluded)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes = {}

    def _free(self, key):
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.sizes:
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_ceiling(device, dtype, n: int, repeats: int, clock) -> float:
    """Measured GFLOP/s of an n x n x n matmul (best of `repeats`: a ceiling)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = clock()
        a @ b
        sync(device)
        times.append(clock() - t0)
    return 2 * n**3 / min(times) / 1e9


def make_models(case: Case, device, dtype):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    cfg = case.config.to_diffusers()
    ref = WanTransformer3DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    ours = WanModel(case.config).eval()
    ours.load_state_dict(ref.state_dict())
    ref.to(device=device, dtype=dtype)
    ours.to(device)
    if dtype != torch.float32:
        ours.cast(dtype)
    if case.checkpointing:
        ref.enable_gradient_checkpointing()
        ours.gradient_checkpointing = True
    return ref, ours


def make_inputs(case: Case, device, dtype):
    g = torch.Generator().manual_seed(1)
    cfg = case.config
    x = torch.randn(case.batch, cfg.in_channels, *case.latent, generator=g)
    t = torch.linspace(900.0, 100.0, case.batch)
    context = torch.randn(case.batch, case.text_tokens, cfg.text_dim, generator=g)
    return x.to(device, dtype), t.to(device), context.to(device, dtype)


def runner(model, is_ref, inputs, backward):
    x, t, context = inputs

    def run():
        out = model(x, t, context, return_dict=False)[0] if is_ref else model(x, t, context)
        if backward:
            out.float().square().mean().backward()
        return out

    return run


def peak_bytes(run, device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _LiveBytes() as tracker:
        run()
    return tracker.peak


def flops(run) -> int:
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def bench_case(case: Case, device, dtype, repeats: int, rows: list, use_cpu_time: bool):
    ref, ours = make_models(case, device, dtype)
    inputs = make_inputs(case, device, dtype)
    with torch.no_grad():
        diff = (runner(ref, True, inputs, False)().float() - runner(ours, False, inputs, False)().float()).abs().max().item()
    tokens = math.prod(case.latent) // math.prod(case.config.patch_size)
    print(f"\n[{case.name}] dim {case.config.dim}, {case.config.num_layers} layers, {case.config.num_attention_heads} heads, "
          f"ffn {case.config.ffn_dim}, latent {case.latent}, batch {case.batch}, {tokens} tokens, "
          f"{case.text_tokens} text tokens; max |dfm - diffusers| = {diff:.2e}", flush=True)
    results = {}
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        runs = {"diffusers": runner(ref, True, inputs, backward), "dfm": runner(ours, False, inputs, backward)}
        grad = torch.enable_grad() if backward else torch.no_grad()
        with grad:
            n_flops = flops(runs["dfm"])
            mem = {k: peak_bytes(r, device) for k, r in runs.items()}
            for r in runs.values():  # warm-up
                r()
            wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}
            for i in range(repeats):
                for k in (list(runs) if i % 2 == 0 else list(runs)[::-1]):  # alternate who goes first
                    ref.zero_grad(set_to_none=True)
                    ours.zero_grad(set_to_none=True)
                    sync(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    runs[k]()
                    sync(device)
                    wall[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
        for k in runs:
            results[k] = (statistics.median(wall[k]), statistics.median(cpu[k]), min(cpu[k]))
            gflops = n_flops / results[k][1 if use_cpu_time else 0] / 1e9
            rows.append((case.name, mode, k, *(1e3 * r for r in results[k]), mem[k] / 2**20, gflops))
        ratios = [a / b for a, b in zip(results["diffusers"], results["dfm"])]
        rows.append((case.name, mode, "speed-up", *ratios, None, None))
        print(f"  {mode:8s} diffusers {results['diffusers'][0] * 1e3:9.1f} ms   dfm {results['dfm'][0] * 1e3:9.1f} ms   "
              f"diffusers/dfm = {ratios[0]:.2f}x (CPU time: median {ratios[1]:.2f}x, best {ratios[2]:.2f}x)", flush=True)
    del ref, ours
    gc.collect()


def print_table(rows, header, ceiling):
    print("\n" + header)
    print("wall/cpu ms: medians; best ms: the fastest CPU time; speed-up: diffusers time / dfm time")
    print(f"{'config':8s} {'pass':8s} {'model':10s} {'wall ms':>9s} {'cpu ms':>9s} {'best ms':>9s} {'peak MiB':>9s} "
          f"{'GFLOP/s':>8s} {'% ceiling':>9s}")
    for name, mode, model, wall, cpu, best, mib, gflops in rows:
        if model == "speed-up":
            print(f"{name:8s} {mode:8s} {model:10s} {wall:8.2f}x {cpu:8.2f}x {best:8.2f}x")
        else:
            print(f"{name:8s} {mode:8s} {model:10s} {wall:9.1f} {cpu:9.1f} {best:9.1f} {mib:9.1f} {gflops:8.1f} "
                  f"{100 * gflops / ceiling:8.0f}%")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small config only, fewer repeats")
    parser.add_argument("--configs", default=None, help=f"comma-separated, from {list(CASES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1; 0: torch's default)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and dtype != torch.float32:
        print("warning: bf16 on a CPU without native bf16 is ~500x slower than fp32", flush=True)
    names = args.configs.split(",") if args.configs else (["small"] if args.quick else ["small", "large"])
    repeats = args.repeats or 7
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        name = torch.cuda.get_device_name(device)
    else:
        name = (f"{_cpu_name()}, {torch.get_num_threads()} thread(s) of {os.cpu_count()}, "
                f"load average {os.getloadavg()[0]:.1f} at start")
    n = 8192 if device.type == "cuda" else (2048 if dtype == torch.float32 else 256)
    # single-threaded CPU: GFLOP/s and the ceiling from process CPU time, which other processes do not inflate
    use_cpu_time = device.type == "cpu" and torch.get_num_threads() == 1
    clock = time.process_time if use_cpu_time else time.perf_counter
    ceiling = matmul_ceiling(device, dtype, n, repeats=5, clock=clock)
    print(f"device: {device.type} ({name}); dtype {args.dtype}; torch {torch.__version__}", flush=True)
    rows = []
    for case_name in names:
        bench_case(CASES[case_name], device, dtype, repeats, rows, use_cpu_time)
    ceiling = max(ceiling, matmul_ceiling(device, dtype, n, repeats=5, clock=clock))  # measured before and after
    header = (f"device: {device.type} ({name}); dtype {args.dtype}; torch {torch.__version__}\n"
              f"matmul ceiling {ceiling:.0f} GFLOP/s ({n}^3, best measured); GFLOP/s = matmul+attention FLOPs / "
              f"median {'CPU' if use_cpu_time else 'wall'} time")
    print_table(rows, header, ceiling)


if __name__ == "__main__":
    main()
