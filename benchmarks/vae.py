"""dfm's causal VAE beside diffusers' AutoencoderKLWan (the Wan 2.1 VAE) at a comparable size: encode and decode
time and peak memory on the same clip, printed as a markdown table.

    python benchmarks/vae.py            # 17 frames at 64x64
    python benchmarks/vae.py --full     # and 17 frames at 256x256

Both are 4x8x8 with 16 latent channels and widths 32-64-128-128 (Wan: base_dim=32, dim_mult [1, 2, 4, 4]; dfm:
base_channels=32, channel_mult [1, 2, 4, 4]), two residual blocks per level, random weights, fp32. Wan also has
a spatial self-attention block in its middle; dfm has none. dfm runs the whole clip at once by default and
frame-chunked with `chunk=1` (one latent frame per call, as diffusers always does).

Time: the median of `--repeats` calls after one warm-up call. Peak memory of one later call: on CUDA,
max_memory_allocated above what was allocated before; on the CPU, how far the call raises the process's resident
set above what it was before (Linux VmHWM, reset through /proc/self/clear_refs), in a fresh subprocess per (model,
operation, size), with glibc's mmap threshold fixed at 64 KiB so that freed tensors leave the resident set. It
counts the convolutions' scratch buffers too: on few frames (chunk=1) oneDNN picks im2col-style kernels whose
buffers can outweigh the activations saved by chunking.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("dfm", "dfm chunk=1", "diffusers Wan")


def build(model: str):
    torch.manual_seed(0)
    if model.startswith("dfm"):
        from dfm.vae import CausalVAE, CausalVAEConfig

        return CausalVAE(CausalVAEConfig(spatial_factor=8, temporal_factor=4, latent_channels=16, base_channels=32,
                                         channel_mult=[1, 2, 4, 4], num_res_blocks=2)).eval()
    from diffusers import AutoencoderKLWan

    from dfm.vae import WanVAE

    return WanVAE(AutoencoderKLWan(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                   temperal_downsample=[False, True, True]).eval())


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise SystemExit(f"no {key} in /proc/self/status: CPU peak memory needs Linux")


def _return_freed_blocks() -> None:
    """Fix glibc's mmap threshold at 64 KiB (after the timing: it costs page faults), so every freed tensor leaves the
    resident set; by default the threshold grows after the first large free and later blocks stay in the heap."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)


def _reset_peak_rss() -> int:
    """Reset the peak resident set (VmHWM) to the current one (Linux clear_refs "5"); returns it in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def worker(model: str, op: str, size: int, frames: int, repeats: int, device: str) -> dict:
    """One measurement in this process: {"ms": [...], "peak_mb": float, "params": int}."""
    dev = torch.device(device)
    vae = build(model).to(dev)
    kwargs = {"chunk": 1} if model.endswith("chunk=1") else {}
    video = torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(0)).to(dev) * 2 - 1
    with torch.no_grad():
        if op == "encode":
            fn, arg = (lambda x: vae.encode(x, **kwargs)), video
        else:
            shape = vae.latent_shape(frames, size, size)
            fn, arg = (lambda z: vae.decode(z, **kwargs)), torch.randn(1, *shape, device=dev)

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize()

        fn(arg)  # warm-up: one-time costs (oneDNN primitives, allocator pools) stay out of the measurements
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(arg)
            sync()
            times.append(1000 * (time.perf_counter() - t0))
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(arg)
            sync()
            peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            _return_freed_blocks()
            fn(arg)
            base = _reset_peak_rss()
            fn(arg)
            peak_mb = (_status_kib("VmHWM") - base) / 1024
    return {"ms": times, "peak_mb": peak_mb, "params": sum(p.numel() for p in vae.parameters())}


def measure(model: str, op: str, size: int, frames: int, repeats: int, device: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", model, op, str(size), "--frames", str(frames), "--repeats",
           str(repeats), "--device", device, "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"worker {model} {op} {size} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="also 17 frames at 256x256")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "OP", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        model, op, size = args.worker
        print(json.dumps(worker(model, op, int(size), args.frames, args.repeats, args.device)))
        return

    sizes = [64, 256] if args.full else [64]
    print(f"device {args.device}, {args.threads} thread(s), fp32, batch 1, {args.frames} frames, median of "
          f"{args.repeats} calls after a warm-up; torch {torch.__version__}\n")
    params = {}
    rows = []
    for size in sizes:
        for op in ("encode", "decode"):
            results = {}
            for model in MODELS:
                r = measure(model, op, size, args.frames, args.repeats, args.device, args.threads)
                results[model] = r
                params[model] = r["params"]
                print(f"  {model:14s} {op} {size}x{size}: {statistics.median(r['ms']):9.1f} ms, peak "
                      f"{r['peak_mb']:8.1f} MB", file=sys.stderr)
            rows.append((size, op, results))
    print(f"parameters: dfm {params['dfm'] / 1e6:.2f} M, diffusers Wan {params['diffusers Wan'] / 1e6:.2f} M\n")
    print("| clip | op | dfm ms | dfm chunk=1 ms | diffusers Wan ms | Wan / dfm time | dfm MB | dfm chunk=1 MB "
          "| diffusers Wan MB | Wan / dfm chunk=1 memory |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size, op, r in rows:
        ms = {m: statistics.median(r[m]["ms"]) for m in MODELS}
        mb = {m: r[m]["peak_mb"] for m in MODELS}
        print(f"| {args.frames}x{size}x{size} | {op} | {ms['dfm']:.0f} | {ms['dfm chunk=1']:.0f} | "
              f"{ms['diffusers Wan']:.0f} | {ms['diffusers Wan'] / ms['dfm']:.2f}x | {mb['dfm']:.0f} | "
              f"{mb['dfm chunk=1']:.0f} | {mb['diffusers Wan']:.0f} | "
              f"{mb['diffusers Wan'] / max(mb['dfm chunk=1'], 1e-9):.2f}x |")


if __name__ == "__main__":
    main()
