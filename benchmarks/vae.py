"""dfm's causal VAE beside diffusers' AutoencoderKLWan (the Wan 2.1 VAE) at a comparable size: encode and decode
time and peak memory on the same clip, printed as a markdown table.

    python benchmarks/vae.py            # 17 frames at 64x64
    python benchmarks/vae.py --full     # and 17 frames at 256x256

Both are 4x8x8 with 16 latent channels and widths 32-64-128-128 (Wan: base_dim=32, dim_mult [1, 2, 4, 4]; dfm:
base_channels=32, channel_mult [1, 2, 4, 4]), two residual blocks per level, random weights, fp32. Wan also has
a spatial self-attention block in its middle; dfm has none. dfm runs the whole clip at once by default and
frame-chunked with `chunk=1` (one latent frame per call, as diffusers always does).

Time: one subprocess per (operation, size) holds the models and, after one warm-up call each, times `--repeats`
rounds that alternate them, the order reversed every round (benchmarks/models.py's `time_alternating`), so load
from other processes hits all alike; medians of wall-clock and process CPU time (with one thread the CPU time is
the number that load disturbs least). Peak memory of one later call: on CUDA, max_memory_allocated above what was
allocated before; on the CPU, how far the call raises the process's resident set above what it was before (Linux
VmHWM, reset through /proc/self/clear_refs), in a fresh subprocess per (model, operation, size), with glibc's mmap
threshold fixed at 64 KiB so that freed tensors leave the resident set. It counts the convolutions' scratch
buffers too: on few frames (chunk=1) oneDNN picks im2col-style kernels whose buffers can outweigh the activations
saved by chunking.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

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


def _call(vae, model: str, op: str, size: int, frames: int, dev: torch.device):
    """(fn, arg): one encode of a random clip or one decode of random latents, as `model` runs it."""
    kwargs = {"chunk": 1} if model.endswith("chunk=1") else {}
    if op == "encode":
        video = torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(0)).to(dev) * 2 - 1
        return (lambda x: vae.encode(x, **kwargs)), video
    shape = vae.latent_shape(frames, size, size)
    return (lambda z: vae.decode(z, **kwargs)), torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).to(dev)


def time_worker(op: str, size: int, frames: int, repeats: int, device: str) -> dict:
    """All models in this process, timed alternately: {model: {"ms": [...], "cpu_ms": [...]}}."""
    from models import time_alternating  # benchmarks/models.py

    dev = torch.device(device)
    vaes = {"dfm": build("dfm").to(dev), "diffusers Wan": build("diffusers Wan").to(dev)}
    calls = {m: _call(vaes["diffusers Wan" if m == "diffusers Wan" else "dfm"], m, op, size, frames, dev)
             for m in MODELS}
    runs = {m: (lambda fn=fn, arg=arg: fn(arg)) for m, (fn, arg) in calls.items()}
    with torch.no_grad():
        for run in runs.values():  # warm-up: one-time costs (oneDNN primitives, allocator pools) stay out
            run()
        wall, cpu = time_alternating(runs, repeats, dev, lambda m: None)
    return {m: {"ms": [1000 * t for t in wall[m]], "cpu_ms": [1000 * t for t in cpu[m]]} for m in MODELS}


def memory_worker(model: str, op: str, size: int, frames: int, repeats: int, device: str) -> dict:
    """Peak memory of one call of one model, alone in this process, after 1 + `repeats` calls (the allocator in the
    state the timed calls leave it): {"peak_mb": float, "params": int}."""
    dev = torch.device(device)
    vae = build(model).to(dev)
    fn, arg = _call(vae, model, op, size, frames, dev)
    with torch.no_grad():
        for _ in range(1 + repeats):
            fn(arg)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(arg)
            torch.cuda.synchronize()
            peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            _return_freed_blocks()
            fn(arg)
            base = _reset_peak_rss()
            fn(arg)
            peak_mb = (_status_kib("VmHWM") - base) / 1024
    return {"peak_mb": peak_mb, "params": sum(p.numel() for p in vae.parameters())}


def measure(worker: list[str], frames: int, repeats: int, device: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, *worker, "--frames", str(frames), "--repeats", str(repeats), "--device", device,
           "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{' '.join(worker)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="also 17 frames at 256x256")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "OP", "SIZE"), help=argparse.SUPPRESS)
    p.add_argument("--time-worker", nargs=2, metavar=("OP", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        model, op, size = args.worker
        print(json.dumps(memory_worker(model, op, int(size), args.frames, args.repeats, args.device)))
        return
    if args.time_worker:
        op, size = args.time_worker
        print(json.dumps(time_worker(op, int(size), args.frames, args.repeats, args.device)))
        return

    sizes = [64, 256] if args.full else [64]
    print(f"device {args.device}, {args.threads} thread(s), fp32, batch 1, {args.frames} frames, median of "
          f"{args.repeats} alternating rounds after a warm-up; load average {os.getloadavg()[0]:.1f} at start; "
          f"torch {torch.__version__}\n")
    params = {}
    rows = []
    for size in sizes:
        for op in ("encode", "decode"):
            times = measure(["--time-worker", op, str(size)], args.frames, args.repeats, args.device, args.threads)
            results = {}
            for model in MODELS:
                r = measure(["--worker", model, op, str(size)], args.frames, args.repeats, args.device, args.threads)
                results[model] = {**r, **times[model]}
                params[model] = r["params"]
                print(f"  {model:14s} {op} {size}x{size}: {statistics.median(times[model]['ms']):9.1f} ms "
                      f"(CPU {statistics.median(times[model]['cpu_ms']):9.1f} ms), peak {r['peak_mb']:8.1f} MB",
                      file=sys.stderr)
            rows.append((size, op, results))
    print(f"parameters: dfm {params['dfm'] / 1e6:.2f} M, diffusers Wan {params['diffusers Wan'] / 1e6:.2f} M\n")
    print("| clip | op | dfm ms | dfm chunk=1 ms | diffusers Wan ms | Wan / dfm time (wall, CPU) | dfm MB "
          "| dfm chunk=1 MB | diffusers Wan MB | Wan / dfm chunk=1 memory |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size, op, r in rows:
        ms = {m: statistics.median(r[m]["ms"]) for m in MODELS}
        cpu = {m: statistics.median(r[m]["cpu_ms"]) for m in MODELS}
        mb = {m: r[m]["peak_mb"] for m in MODELS}
        print(f"| {args.frames}x{size}x{size} | {op} | {ms['dfm']:.0f} | {ms['dfm chunk=1']:.0f} | "
              f"{ms['diffusers Wan']:.0f} | {ms['diffusers Wan'] / ms['dfm']:.2f}x, "
              f"{cpu['diffusers Wan'] / cpu['dfm']:.2f}x | {mb['dfm']:.0f} | "
              f"{mb['dfm chunk=1']:.0f} | {mb['diffusers Wan']:.0f} | "
              f"{mb['diffusers Wan'] / max(mb['dfm chunk=1'], 1e-9):.2f}x |")


if __name__ == "__main__":
    main()
