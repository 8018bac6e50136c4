"""Step caching: speed and quality across thresholds, dfm's caches side by side with diffusers' hooks.

    python benchmarks/cache.py                   # the shipped WAN and DiT (40 eval prompts) + a random Wan folder
    python benchmarks/cache.py --quick           # fewer prompts, thresholds and repeats: a smoke test
    python benchmarks/cache.py --skip-wan-folder # the shipped models only
    python benchmarks/cache.py --only-wan-folder # the random Wan folder against diffusers' hooks only

Shipped models (models/wan_flow_digits, models/dit_edm_digits; their default sampler, guidance 3, 20 steps): the 40
prompts of `dfm eval` (seeds 0-39, batches of 8) are generated uncached and with each cache at each threshold.
Per row: block-stack evaluations per generate call (a batched cond + uncond forward is one), seconds per video of
the whole generate calls (median over alternating repeats), `dfm eval`'s digit / direction accuracy and temporal
consistency, and PSNR / max |error| of the videos (in [-1, 1], peak-to-peak 2) against the uncached videos of the
same seeds.

Random Wan folder (diffusers layout, benchmarks/pipeline.py's "small" transformer: 4 layers, dim 256, at 9 frames
of 64x64; UniPC,
guidance 5, Wan's negative prompt, 20 steps): dfm's pipeline with its three caches and diffusers' WanPipeline
with its FirstBlockCache and MagCache hooks (diffusers.hooks, on its WanTransformer3DModel loaded from the same
folder; MagCache's ratios from its own calibration mode on this folder), both from the same initial latents.
diffusers runs cond and uncond as two forwards of batch 1 and keeps a cache per branch; dfm runs one forward of
batch 2 and one cache, so compute is counted batch-weighted on the last block (two batch-1 passes = one batch-2
pass = one block-stack evaluation; "stack work" is the fraction of the uncached count). Quality: PSNR / max error against the same pipeline's uncached video (the two uncached videos agree
to ~1e-6, printed). A random model is not a trained one: its residuals change differently from step to step, so
this part compares the two implementations on equal inputs, not the caches' quality on real content.

Timing: every configuration of a table is timed in each round, the order reversed every round
(benchmarks/models.py's `time_alternating`), one CPU thread; the machine is shared, so medians, and the Wan-folder
table also gives process CPU seconds (less disturbed by other processes than wall seconds)."""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import time_alternating  # noqa: E402  (benchmarks/models.py)
from pipeline import CONFIGS, PROMPT, build_folder  # noqa: E402  (benchmarks/pipeline.py)

from dfm.evaluate import analyze, digit_classifier, default_digit_size, eval_prompts, score  # noqa: E402
from dfm.pipeline import WAN_NEGATIVE_PROMPT, load_pipeline  # noqa: E402
from dfm.pipeline.caching import calibration_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = {"magcache": (0.3, 0.5, 0.65, 0.8), "teacache": (0.1, 0.2, 0.3, 0.5), "fbcache": (0.1, 0.2, 0.3, 0.45)}
QUICK_THRESHOLDS = {"magcache": (0.65,), "teacache": (0.3,), "fbcache": (0.1,)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a - b).pow(2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def shipped(name: str, num: int, repeats: int, thresholds: dict, batch: int = 8) -> list[dict]:
    pipe = load_pipeline(ROOT / "models" / name)
    calibration_for(pipe)  # once, untimed (the folder's cache.json, else the user store, else now)
    expected = eval_prompts(num)
    prompts, seeds = [e["prompt"] for e in expected], list(range(num))
    configs = {"none": (None, None), **{f"{m} {t:g}": (m, t) for m, ts in thresholds.items() for t in ts}}
    videos, evals = {}, {}

    def make(label):
        method, thr = configs[label]

        def go():
            out, n = [], []
            for i in range(0, num, batch):
                g = pipe.generate(prompts[i:i + batch], seeds=seeds[i:i + batch], steps=20, progress=False,
                                  cache=method or "none", cache_threshold=thr)
                out.append(g.videos)
                n.append(g.stack_evals)
            videos[label], evals[label] = torch.cat(out), statistics.mean(n)
        return go

    runs = {label: make(label) for label in configs}
    for go in runs.values():
        go()  # warm-up; keeps the videos
    wall, _ = time_alternating(runs, repeats, torch.device("cpu"), lambda label: None)
    size = default_digit_size(*videos["none"].shape[-2:])
    digit_classifier(size)
    rows = []
    for label in configs:
        s = score(analyze(videos[label], size), expected)
        rows.append({"model": name, "cache": label, "evals": evals[label], "nfe": 20,
                     "s_per_video": statistics.median(wall[label]) / num, "digit": s["digit_accuracy"],
                     "direction": s["direction_accuracy"], "consistency": s["temporal_consistency"],
                     "psnr": psnr(videos[label], videos["none"]),
                     "max_err": float((videos[label] - videos["none"]).abs().max())})
    return rows


def print_shipped(rows: list[dict], num: int) -> None:
    base = {r["model"]: r for r in rows if r["cache"] == "none"}
    print("| model | cache threshold | block-stack evals / call | fewer | s / video | speed-up | digit acc | "
          "direction acc | consistency | PSNR dB | max err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = base[r["model"]]
        print(f"| {r['model']} | {r['cache']} | {r['evals']:.1f} | {b['evals'] / r['evals']:.2f}x | "
              f"{r['s_per_video']:.4f} | {b['s_per_video'] / r['s_per_video']:.2f}x | {r['digit']:.3f} | "
              f"{r['direction']:.3f} | {r['consistency']:.3f} | {r['psnr']:.1f} | {r['max_err']:.3f} |")
    print(f"\n({num} videos per row; digit acc x {num} = videos)")


class Passes:
    """Full block-stack passes of a transformer, counted on its last block's feed-forward (runs only when the
    whole stack runs, under dfm's caches and diffusers' hooks alike), weighted by the batch it ran on."""

    def __init__(self, last_ffn):
        self.samples = 0
        self.handle = last_ffn.register_forward_hook(lambda m, a, o: setattr(self, "samples",
                                                                              self.samples + a[0].shape[0]))


def wan_folder(repeats: int, steps: int, thresholds: dict) -> tuple[list[dict], float]:
    import diffusers
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

    c = {**CONFIGS["small"], "frames": 9, "size": 64}
    with tempfile.TemporaryDirectory(prefix="dfm_bench_cache_") as tmp:
        folder = build_folder(Path(tmp), c)
        ours = load_pipeline(folder)
        theirs = diffusers.WanPipeline.from_pretrained(str(folder), local_files_only=True)
        theirs.set_progress_bar_config(disable=True)
        shape = ours.latent_shape(c["frames"], c["size"], c["size"])
        latents = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
        kw = dict(num_frames=c["frames"], height=c["size"], width=c["size"], steps=steps, guidance_scale=5.0,
                  negative_prompt=WAN_NEGATIVE_PROMPT)
        dfm_passes = Passes(ours.module.net.net.blocks[-1].ffn)
        hf_passes = Passes(theirs.transformer.blocks[-1].ffn)

        def call_theirs():
            frames = theirs(prompt=[PROMPT], negative_prompt=WAN_NEGATIVE_PROMPT, height=c["size"], width=c["size"],
                            num_frames=c["frames"], num_inference_steps=steps, guidance_scale=5.0,
                            latents=latents.clone(), output_type="pt").frames
            return frames.permute(0, 2, 1, 3, 4) * 2 - 1  # [1, 3, F, H, W] in [-1, 1]

        # diffusers' MagCache ratios: its calibration mode on this folder (it prints them, per branch)
        theirs.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), torch.no_grad():
            call_theirs()
        theirs.transformer.disable_cache()
        lists = [ast.literal_eval(line) for line in printed.getvalue().splitlines() if line.startswith("[") and not line.startswith("[M")]
        mag_ratios = [statistics.mean(v) for v in zip(*lists)]
        calibration_for(ours, num_frames=c["frames"], height=c["size"], width=c["size"], guidance_scale=5.0)
        configs = {"dfm none": ("dfm", None, None), "diffusers none": ("diffusers", None, None)}
        for m, ts in thresholds.items():
            configs.update({f"dfm {m} {t:g}": ("dfm", m, t) for t in ts})
        for t in thresholds["fbcache"]:
            configs[f"diffusers FirstBlockCache {t:g}"] = ("diffusers", FirstBlockCacheConfig(threshold=t), t)
        for t in thresholds["magcache"]:
            configs[f"diffusers MagCache {t:g}"] = ("diffusers", MagCacheConfig(
                threshold=t, num_inference_steps=steps, mag_ratios=mag_ratios), t)
        videos, work, evals = {}, {}, {}

        def make(label):
            who, method, _ = configs[label]

            def go():
                counter = dfm_passes if who == "dfm" else hf_passes
                counter.samples = 0
                with torch.no_grad():
                    if who == "dfm":
                        ours.text.clear_cache()
                        videos[label] = ours.generate([PROMPT], seeds=[0], progress=False, cache=method or "none",
                                                      cache_threshold=configs[label][2], **kw).videos
                    else:
                        if method is not None:
                            theirs.transformer.enable_cache(method)
                        try:
                            videos[label] = call_theirs()
                        finally:
                            if method is not None:
                                theirs.transformer.disable_cache()
                evals[label] = counter.samples / 2  # batch-weighted: a batch-2 pass = two batch-1 passes = 1
                work[label] = counter.samples / (2 * steps)  # cond + uncond: 2 samples per step uncached
            return go

        runs = {label: make(label) for label in configs}
        for go in runs.values():
            go()
        wall, cpu = time_alternating(runs, repeats, torch.device("cpu"), lambda label: None)
    agree = float((videos["dfm none"] - videos["diffusers none"]).abs().max())
    rows = []
    for label, (who, _, _) in configs.items():
        ref = videos[f"{who} none"]
        rows.append({"cache": label, "evals": evals[label], "work": work[label], "s": statistics.median(wall[label]),
                     "cpu": statistics.median(cpu[label]),
                     "psnr": psnr(videos[label], ref), "max_err": float((videos[label] - ref).abs().max())})
    return rows, agree


def print_wan(rows: list[dict], agree: float, steps: int) -> None:
    base = {r["cache"].split()[0]: r["cpu"] for r in rows if r["cache"].endswith("none")}
    print(f"Random Wan folder (4 layers, dim 256, 9 frames at 64x64; UniPC {steps} steps, guidance 5, Wan's negative "
          f"prompt); max |dfm - diffusers| uncached = {agree:.1e}\n")
    print("| pipeline, cache, threshold | block-stack evals (cond+uncond = 1) | stack work | wall s | CPU s | "
          "CPU speed-up (vs own uncached) | PSNR dB (vs own uncached) | max err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cache']} | {r['evals']:.1f} | {r['work']:.2f} | {r['s']:.3f} | {r['cpu']:.3f} | "
              f"{base[r['cache'].split()[0]] / r['cpu']:.2f}x | {r['psnr']:.1f} | {r['max_err']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 prompts, one threshold per method, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num", type=int, default=40, help="eval prompts per shipped model")
    ap.add_argument("--steps", type=int, default=20, help="steps on the Wan folder")
    ap.add_argument("--skip-wan-folder", action="store_true")
    ap.add_argument("--only-wan-folder", action="store_true", help="the random Wan folder against diffusers only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    thresholds = QUICK_THRESHOLDS if args.quick else THRESHOLDS
    num, repeats = (8, 1) if args.quick else (args.num, args.repeats)
    if args.quick:
        args.steps = 10
    print(f"torch {torch.__version__}, 1 thread; load average {os.getloadavg()[0]:.1f} at start\n")
    if not args.only_wan_folder:
        rows = [r for name in ("wan_flow_digits", "dit_edm_digits") for r in shipped(name, num, repeats, thresholds)]
        print_shipped(rows, num)
        print()
    if not args.skip_wan_folder:
        print_wan(*wan_folder(repeats, args.steps, thresholds), args.steps)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
