"""Speed and memory of dfm's WAN against diffusers' WanTransformer3DModel at identical configurations, and of
the flat DiT against the hourglass DiT as the token count grows (--hdit).

    python benchmarks/models.py --quick                    # small config, under a minute on one CPU core
    python benchmarks/models.py                            # small and large configs, a few minutes
    python benchmarks/models.py --device cuda --dtype bf16 --configs 1.3B    # 480x832, 81 frames
    python benchmarks/models.py --hdit                     # DiT-S vs hourglass-S at 256 and 1024 tokens
    python benchmarks/models.py --hdit --tokens 256,1024,4096              # and 4096 (minutes per row on a CPU)

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

(Those % of ceiling were measured before `flops` counted the CPU attention kernel, which torch's counter
leaves out: they count the matmuls only.)

Flat DiT-S (12 blocks, width 384, full attention) against hourglass-S (32.0M vs 32.5M parameters: levels of
2/2/3 blocks, widths 256/384/512, 2x8x8 window attention at the two fine levels, full at the coarsest), one
forward+backward of batch 1, fp32, 1 thread of a shared Intel Xeon (median CPU times; `--hdit`, and
`--hdit --tokens 4096 --repeats 3`):

    tokens   GFLOP flat / hourglass       CPU ms flat / hourglass        peak MiB flat / hourglass
       256      36.9 /   9.5   3.9x        346 /  145   2.4x              250 / 248   1.0x
      1024     198.2 /  38.4   5.2x       1638 /  428   3.8x              568 / 291   1.9x
      4096    1604.5 / 154.5  10.4x      11974 / 1456   8.2x             1892 / 780   2.4x

The flat DiT's cost grows like L^2 (attention) plus L (the rest); the hourglass's stays near linear in L, since
its full attention sees L/16 tokens. Most of its parameters sit at the coarse levels, so at equal parameters it
also does ~4x fewer FLOPs per token at small L. It runs at a lower fraction of the matmul peak (smaller GEMMs at
the fine widths, window bookkeeping).

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
import dataclasses
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

from dfm.models import DIT_CONFIGS, DiT, WanConfig, WanModel  # noqa: E402


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


def tiny_t5_tokenizer(root: Path, sentences: list[str]):
    """A small unigram sentencepiece model trained on `sentences` with T5's id layout (pad 0, eos 1, unk 2), as a
    transformers T5Tokenizer: the stand-in for UMT5's tokenizer in the random Wan folders of the benchmarks."""
    import sentencepiece as spm
    import transformers

    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences * 4), model_prefix=str(root / "sp"),
                                   vocab_size=120, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(root / "sp.model"))
    return transformers.T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())],
                                    extra_ids=0)


def save_wan_folder(root: Path, tok, text, vae, transformer) -> Path:
    """root/wan: a diffusers WanPipeline folder of these parts with the released folders' scheduler (UniPC, flow
    sigmas, shift 3, order 2)."""
    import diffusers

    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0, num_train_timesteps=1000, solver_order=2)
    folder = root / "wan"
    diffusers.WanPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer,
                          scheduler=scheduler).save_pretrained(folder)
    return folder


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


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return torch.utils.flop_counter.sdpa_flop_count(query, key, value)  # shapes: the counter passes shapes


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return torch.utils.flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# torch's FLOP counter knows the CUDA attention kernels but not the CPU one, which it would count as 0
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def flops(run) -> int:
    with torch.utils.flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        run()
    return counter.get_total_flops()


def time_alternating(runs: dict, repeats: int, device, before_each) -> tuple[dict, dict]:
    """Wall and process-CPU seconds of each run over `repeats` rounds, alternating who goes first each round (so
    load from other processes hits all alike); `before_each(name)` runs untimed before each call."""
    wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}
    for i in range(repeats):
        for k in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            before_each(k)
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            runs[k]()
            sync(device)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return wall, cpu


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
            wall, cpu = time_alternating(runs, repeats, device, lambda k: (ref.zero_grad(set_to_none=True),
                                                                           ours.zero_grad(set_to_none=True)))
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


# ------------------------------------------------------------------------------- flat vs hourglass DiT


# latent (F, H, W) with patch (1, 2, 2) -> F * H/2 * W/2 tokens
HDIT_LATENTS = {256: (4, 16, 16), 1024: (4, 32, 32), 4096: (4, 64, 64), 16384: (4, 128, 128)}


def describe_dit(name: str) -> str:
    cfg = DIT_CONFIGS[name]
    if not cfg.hourglass:
        return f"{name}: {cfg.depth} blocks of width {cfg.dim}, {cfg.attention} attention"
    return (f"{name}: blocks per level {cfg.depths} (down and up below the coarsest), widths {cfg.level_widths}, "
            f"attention {cfg.level_attentions} (window {cfg.window}), merges {cfg.level_merges}, {cfg.skip} skips")


def bench_hdit(size: str, tokens: list[int], device, dtype, repeats: int, use_cpu_time: bool) -> list:
    """Forward+backward of the flat DiT `size` and the hourglass `hourglass-{size}` (about the same parameter
    count) on one latent video of each token count; no text. Rows: (tokens, model, params, GFLOP, wall ms,
    cpu ms, peak MiB)."""
    for name in (size, f"hourglass-{size}"):
        print("  " + describe_dit(name), flush=True)
    rows = []
    for n in tokens:
        latent = HDIT_LATENTS[n]
        torch.manual_seed(0)
        nets = {name: DiT(dataclasses.replace(DIT_CONFIGS[name], in_channels=4, patch_size=(1, 2, 2))).to(device)
                for name in (size, f"hourglass-{size}")}
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 4, *latent, generator=g).to(device, dtype)
        t = torch.tensor([0.5], device=device)

        def runner(net):
            def run():
                net(x, t).float().square().mean().backward()
            return run

        runs = {}
        for name, net in nets.items():
            if dtype != torch.float32:
                net.cast(dtype)
            runs[name] = runner(net)
        stats = {}
        for name, run in runs.items():
            stats[name] = {"flops": flops(run), "mem": peak_bytes(run, device)}
            run()  # warm-up
        wall, cpu = time_alternating(runs, repeats, device, lambda k: nets[k].zero_grad(set_to_none=True))
        for k, net in nets.items():
            params = sum(p.numel() for p in net.parameters())
            rows.append((n, k, params, stats[k]["flops"] / 1e9, 1e3 * statistics.median(wall[k]),
                         1e3 * statistics.median(cpu[k]), stats[k]["mem"] / 2**20))
            print(f"  {n:6d} tokens  {k:14s} {rows[-1][3]:9.1f} GFLOP  {rows[-1][4]:9.1f} ms  "
                  f"{rows[-1][6]:8.1f} MiB", flush=True)
        del nets, runs
        gc.collect()
    return rows


def print_hdit_table(rows, header, use_cpu_time):
    print("\n" + header)
    print("one forward+backward of batch 1 (latent 4 x F x H x W, patch 1x2x2, no text); ms: medians; GFLOP: "
          "matmul+attention FLOPs of the pass;\nGFLOP/s over the median "
          f"{'CPU' if use_cpu_time else 'wall'} time; peak MiB: allocated during the pass, weight gradients "
          "included (4 bytes x params);\nflat/hourglass: the flat DiT's cost over the hourglass's")
    print(f"{'tokens':>6s} {'model':14s} {'params':>8s} {'GFLOP':>9s} {'wall ms':>9s} {'cpu ms':>9s} {'GFLOP/s':>8s} "
          f"{'peak MiB':>9s}")
    by_tokens = {}
    for n, model, params, gflop, wall, cpu, mib in rows:
        by_tokens.setdefault(n, []).append((gflop, wall, cpu, mib))
        rate = gflop / (cpu if use_cpu_time else wall) * 1e3
        print(f"{n:6d} {model:14s} {params / 1e6:7.1f}M {gflop:9.1f} {wall:9.1f} {cpu:9.1f} {rate:8.1f} {mib:9.1f}")
        if len(by_tokens[n]) == 2:
            (fg, fw, fc, fm), (hg, hw, hc, hm) = by_tokens[n]
            print(f"{n:6d} {'flat/hourglass':14s} {'':8s} {fg / hg:8.2f}x {fw / hw:8.2f}x {fc / hc:8.2f}x {'':8s} "
                  f"{fm / hm:8.2f}x")


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
    parser.add_argument("--hdit", action="store_true", help="flat DiT vs hourglass DiT instead of WAN vs diffusers")
    parser.add_argument("--hdit-size", default="S", help="with --hdit: the flat size X, compared with hourglass-X "
                                                          "(tiny, S, B)")
    parser.add_argument("--tokens", default="256,1024", help=f"with --hdit: token counts, from {list(HDIT_LATENTS)}")
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
    if args.hdit:
        header = f"device: {device.type} ({name}); dtype {args.dtype}; torch {torch.__version__}"
        print(header, flush=True)
        tokens = [int(t) for t in args.tokens.split(",")]
        rows = bench_hdit(args.hdit_size, tokens, device, dtype, args.repeats or 5, use_cpu_time)
        print_hdit_table(rows, header, use_cpu_time)
        return
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
