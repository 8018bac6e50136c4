"""Step caching on a trained model: dfm's caches vs diffusers' hooks in the same sampling loop, speed/PSNR curves.

    python benchmarks/cache_vs_diffusers.py               # 40 eval prompts, seeds 0-39, 20 steps, 2 timed rounds
    python benchmarks/cache_vs_diffusers.py --num 8 --repeats 1   # a quick look

The shipped models/wan_flow_digits transformer is saved in diffusers' layout, so the same weights load into dfm's
WanModel and into diffusers' WanTransformer3DModel. Both run inside dfm's `Pipeline.generate` (the swap is
`pipe.module.net`): the same text embeddings from the shipped text encoder, the same sampler (flow:euler, shift 3,
20 steps), the same guidance (3, cond + uncond as ONE batched forward), the same per-seed initial noise, one
prompt per generate call. diffusers' Wan forward takes no text mask; its attention processor does, so a forward
pre-hook on each `attn2` hands it the mask dfm's cross-attention uses (without it the two models differ on padded
prompts). The uncached videos agree to ~1e-6 (printed). The caches:

  dfm        magcache / teacache / fbcache (`generate(cache=...)`, calibration from the user store or made now);
             "-reuse" rows: the same rule with the cached residual reused as it is (`forecast = False`), to show
             what the first-order forecast of a skipped step's residual buys
  diffusers  `WanTransformer3DModel.enable_cache(MagCacheConfig | FirstBlockCacheConfig | TaylorSeerCacheConfig)`,
             defaults apart from the threshold (MagCache: max_skip_steps 3, retention_ratio 0.2), MagCache's ratios
             from its own `calibrate=True` mode on dfm's calibration prompts (20 steps, seed 0); TaylorSeer in its
             lite mode (every block skipped between full steps, `proj_out`'s output forecast to first order in the
             step index; cache_interval N = a full step every N, 3 warm-up steps, factors in fp32 on the CPU);
             enabled afresh for every video.

Compute is counted the same way on both sides, by forward hooks on every block's feed-forward (a skipped block
never reaches it, under either side's hooks): "stack evals" = full passes of the block stack per video (the last
block's count; 20 uncached), "compute" = blocks run / blocks per stack, which adds first-block cache's extra
first-block pass on a skipped step (1/num_layers each; num_layers = 4 here, so it is not small). Curves are
compared on "compute". Quality: PSNR (peak-to-peak 2, over all videos) and max |error| against the uncached video of
the same seed from the same side, and dfm eval's digit / direction accuracy. Timing: every configuration once per
round, the order reversed each round, one thread, median seconds per video (the machine is shared).
The "at equal compute" table puts each diffusers point against dfm's curve of the same method (and dfm's best
method) linearly interpolated at the same compute.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import time_alternating  # noqa: E402  (benchmarks/models.py)

from dfm.evaluate import analyze, default_digit_size, digit_classifier, eval_prompts, score  # noqa: E402
from dfm.pipeline import load_pipeline  # noqa: E402
from dfm.pipeline.caching import CALIBRATION_PROMPTS, build_cache, calibration_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# thresholds that skip something at 20 steps, up to where each curve stops moving
DFM = {"magcache": (0.1, 0.2, 0.3, 0.5, 0.65, 0.8, 1.2), "teacache": (0.1, 0.2, 0.3, 0.5, 0.8),
       "fbcache": (0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.9)}
HF = {"MagCache": (0.02, 0.06, 0.12, 0.24, 0.5), "FirstBlockCache": (0.1, 0.15, 0.2, 0.3, 0.5),
      "TaylorSeer": (2, 3, 4, 5)}  # TaylorSeer: its cache_interval (a full step every N steps)
FREE_LAST = (0.2, 0.3, 0.45)
REUSE = {"magcache": (0.2, 0.5, 0.8), "fbcache": (0.1, 0.2, 0.45)}  # dfm's rules without the forecast
PEER = {"MagCache": "magcache", "FirstBlockCache": "fbcache", "TaylorSeer": None}


class DiffusersWan(torch.nn.Module):
    """dfm's WanModel call `net(x, t, context, context_mask=)` on a diffusers WanTransformer3DModel."""

    def __init__(self, hf, config):
        super().__init__()
        self.hf, self.config, self.mask = hf, config, None
        for block in hf.blocks:  # WanTransformerBlock calls attn2(h, ctx, None, None): the mask goes in slot 2
            block.attn2.register_forward_pre_hook(self._with_mask, with_kwargs=True)

    def _with_mask(self, module, args, kwargs):
        if self.mask is None:
            return None
        return (*args[:2], self.mask[:, None, None, :], *args[3:]), kwargs  # [B, 1, 1, Lc] bool: attend

    def forward(self, x, t, context, context_mask=None, image_context=None):
        self.mask = context_mask
        try:
            t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])  # [B] on 0..1000
            return self.hf(x, t, context, return_dict=False)[0]
        finally:
            self.mask = None


class BlockWork:
    """Blocks run, counted on each block's feed-forward (only a computed block reaches it)."""

    def __init__(self, blocks):
        self.calls = [0] * len(blocks)
        for i, b in enumerate(blocks):
            b.ffn.register_forward_hook(lambda m, a, o, i=i: self.calls.__setitem__(i, self.calls[i] + 1))

    def reset(self):
        self.calls = [0] * len(self.calls)

    def stack_evals(self) -> int:
        return self.calls[-1]

    def compute(self) -> float:
        return sum(self.calls) / len(self.calls)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a - b).pow(2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(4.0 / mse))


def diffusers_mag_ratios(pipe, wrapped, steps: int) -> list[float]:
    """MagCache's own calibration (`calibrate=True`, it prints the ratios) on dfm's calibration prompts."""
    from diffusers.hooks import MagCacheConfig

    hf, printed = wrapped.hf, io.StringIO()
    hf.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        with contextlib.redirect_stdout(printed), hf.cache_context("dfm"):
            pipe.generate(list(CALIBRATION_PROMPTS), seed=0, steps=steps, progress=False)
    finally:
        hf.disable_cache()
    lines = [ln for ln in printed.getvalue().splitlines() if ln.startswith("[") and not ln.startswith("[M")]
    return [float(v) for v in ast.literal_eval(lines[-1])]


def configs(args, mag_ratios):
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    out = {"dfm none": ("dfm", None, None), "diffusers none": ("diffusers", None, None)}
    for m, ts in DFM.items():
        out.update({f"dfm {m} {t:g}": ("dfm", m, t) for t in ts})
    for t in FREE_LAST:  # dfm's rule without its forced last step: what that step costs at equal compute
        out[f"dfm fbcache-free-last {t:g}"] = ("dfm", "fbcache-free-last", t)
    for m, ts in REUSE.items():  # dfm's rule reusing the cached residual as it is: what the forecast buys
        out.update({f"dfm {m}-reuse {t:g}": ("dfm", f"{m}-reuse", t) for t in ts})
    for t in HF["MagCache"]:
        out[f"diffusers MagCache {t:g}"] = ("diffusers", lambda t=t: MagCacheConfig(
            threshold=t, num_inference_steps=args.steps, mag_ratios=list(mag_ratios)), t)
    for t in HF["FirstBlockCache"]:
        out[f"diffusers FirstBlockCache {t:g}"] = ("diffusers", lambda t=t: FirstBlockCacheConfig(threshold=t), t)
    for n in HF["TaylorSeer"]:  # lite mode: the blocks skipped, proj_out forecast (first order, in fp32 on CPU)
        out[f"diffusers TaylorSeer {n}"] = ("diffusers", lambda n=n: TaylorSeerCacheConfig(
            cache_interval=n, max_order=1, taylor_factors_dtype=torch.float32, use_lite_mode=True), n)
    return out


def run_all(args) -> tuple[list[dict], float]:
    from diffusers import WanTransformer3DModel

    folder = Path(args.model)
    pipe = load_pipeline(folder)
    ours = pipe.module.net
    theirs = DiffusersWan(WanTransformer3DModel.from_pretrained(str(folder / "transformer")).eval(), ours.config)
    work = {"dfm": BlockWork(ours.blocks), "diffusers": BlockWork(theirs.hf.blocks)}
    nets = {"dfm": ours, "diffusers": theirs}
    expected = eval_prompts(args.num)
    prompts, seeds = [e["prompt"] for e in expected], list(range(args.num))
    with torch.no_grad():
        calibration_for(pipe)  # untimed: the folder's cache.json, else the user store, else made now
        pipe.module.net = theirs
        mag_ratios = diffusers_mag_ratios(pipe, theirs, args.steps)
        pipe.module.net = ours
    table = configs(args, mag_ratios)
    videos, stack, compute = {}, {}, {}

    def make(label):
        who, method, thr = table[label]

        def go():
            pipe.module.net, counter = nets[who], work[who]
            counter.reset()
            out = []
            for p, s in zip(prompts, seeds):
                if who == "dfm" and method in ("fbcache-free-last", *(f"{m}-reuse" for m in REUSE)):
                    cache = build_cache(pipe, method.split("-")[0], thr)
                    cache.force_last = method != "fbcache-free-last"
                    cache.forecast = not method.endswith("-reuse")
                    g = pipe.generate([p], seeds=[s], steps=args.steps, progress=False, cache=cache)
                elif who == "dfm":
                    g = pipe.generate([p], seeds=[s], steps=args.steps, progress=False, cache=method or "none",
                                      cache_threshold=thr)
                elif method is None:
                    g = pipe.generate([p], seeds=[s], steps=args.steps, progress=False)
                else:
                    theirs.hf.enable_cache(method())  # fresh state per video
                    try:
                        with theirs.hf.cache_context("dfm"):
                            g = pipe.generate([p], seeds=[s], steps=args.steps, progress=False)
                    finally:
                        theirs.hf.disable_cache()
                out.append(g.videos)
            videos[label] = torch.cat(out)
            stack[label], compute[label] = counter.stack_evals() / args.num, counter.compute() / args.num
            pipe.module.net = ours
        return go

    runs = {label: make(label) for label in table}
    with torch.no_grad():
        for who in nets:  # warm-up, one short video per side
            pipe.module.net = nets[who]
            pipe.generate([prompts[0]], seeds=[0], steps=2, progress=False)
        pipe.module.net = ours
        wall, _ = time_alternating(runs, args.repeats, torch.device("cpu"), lambda label: None)  # videos: the last
        # round's (every round gives the same: the runs are deterministic)
    size = default_digit_size(*videos["dfm none"].shape[-2:])
    digit_classifier(size)
    agree = float((videos["dfm none"] - videos["diffusers none"]).abs().max())
    rows = []
    for label, (who, method, thr) in table.items():
        ref = videos[f"{who} none"]
        s = score(analyze(videos[label], size), expected)
        name = "none" if method is None else (method if who == "dfm" else label.split()[1])
        rows.append({"label": label, "who": who, "method": name, "threshold": thr, "stack": stack[label],
                     "compute": compute[label], "s": statistics.median(wall[label]) / args.num,
                     "psnr": psnr(videos[label], ref), "max_err": float((videos[label] - ref).abs().max()),
                     "digit": s["digit_accuracy"], "direction": s["direction_accuracy"]})
    return rows, agree


def curve_at(rows: list[dict], x: float) -> float | None:
    """PSNR of a curve (rows of one method) at compute x, linear in x between its points; None outside them."""
    pts = sorted((r["compute"], r["psnr"]) for r in rows if np.isfinite(r["psnr"]))  # skipping points only
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if not xs[0] <= x <= xs[-1]:
        return None
    best = {}
    for a, b in zip(xs, ys):  # equal compute, several thresholds: the best one
        best[a] = max(best.get(a, -1.0), b)
    xs, ys = sorted(best), [best[a] for a in sorted(best)]
    return float(np.interp(x, xs, ys))


def print_tables(rows: list[dict], agree: float, args) -> None:
    base = {r["who"]: r for r in rows if r["method"] == "none"}
    print(f"{args.num} prompts x 1 seed each, {args.steps} steps flow:euler, guidance 3, one prompt per call; "
          f"max |dfm - diffusers| uncached video = {agree:.1e}\n")
    print("| side | cache | threshold | stack evals / video | compute / video | s / video | speed-up | PSNR dB | "
          "max err | digit acc | direction acc |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["who"], r["method"], -r["compute"])):
        b = base[r["who"]]
        thr = "-" if r["threshold"] is None else f"{r['threshold']:g}"
        print(f"| {r['who']} | {r['method']} | {thr} | {r['stack']:.2f} | {r['compute']:.2f} | {r['s']:.4f} | "
              f"{b['s'] / r['s']:.2f}x | {r['psnr']:.1f} | {r['max_err']:.3f} | {r['digit']:.3f} | "
              f"{r['direction']:.3f} |")
    by = lambda who, m: [r for r in rows if r["who"] == who and r["method"] in (m, "none")]  # noqa: E731
    best = lambda x: max((v for m in DFM if (v := curve_at(by("dfm", m), x)) is not None), default=None)  # noqa
    print("\nAt equal compute (dfm's curve interpolated at each diffusers point):\n")
    print("| diffusers cache | threshold | compute / video | diffusers PSNR dB | dfm same method PSNR dB | "
          "difference | dfm best method PSNR dB | difference | dfm fbcache, last step not forced |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in [r for r in rows if r["who"] == "diffusers" and r["method"] != "none" and np.isfinite(r["psnr"])]:
        peer = PEER[r["method"]]
        same, top = None if peer is None else curve_at(by("dfm", peer), r["compute"]), best(r["compute"])
        free = curve_at(by("dfm", "fbcache-free-last"), r["compute"]) if r["method"] == "FirstBlockCache" else None
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        diff = lambda v: "-" if v is None else f"{v - r['psnr']:+.1f}"  # noqa: E731
        print(f"| {r['method']} | {r['threshold']:g} | {r['compute']:.2f} | {r['psnr']:.1f} | {fmt(same)} | "
              f"{diff(same)} | {fmt(top)} | {diff(top)} | {fmt(free)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "wan_flow_digits"))
    ap.add_argument("--num", type=int, default=40, help="eval prompts (seeds 0..num-1)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds (each makes every video)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; load average {os.getloadavg()[0]:.1f} at start\n")
    rows, agree = run_all(args)
    print_tables(rows, agree, args)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
