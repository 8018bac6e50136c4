"""`dfm eval-lora`: `dfm eval`'s scores plus readings of what a LoRA recipe teaches that no caption names, for a
model with LoRAs stacked on it, on several seed sets at once (the measure of configs/lora_*_digits.yaml).

    dfm eval-lora --model models/wan_flow_digits --seeds 0,100,200                                      # before
    dfm eval-lora --model models/wan_flow_digits --lora runs/lora_slow.safetensors --seeds 0,100,200   # after

Readings of each video, meaned over the videos (real Moving Digits clips of 9 x 16 x 16, 200 test clips,
benchmarks/lora_ceiling.py: speed 0.750 at the data's default speed, 0.375 at half speed; ink 0.87 / 0.44):
- speed: pixels per frame along the motion, the track's path along its axis of motion (the axis with the longer
  path, as dfm.evaluate.motion_direction) over the frames it spans;
- ink: the 99th percentile of the video's foreground intensity (dfm.evaluate.foreground, in [0, 1]).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from dfm.evaluate import eval_prompts, evaluate, foreground
from dfm.pipeline.commands import check_output, set_threads
from dfm.pipeline.folders import load_pipeline
from dfm.pipeline.lora import check_lora_files, parse_lora_arg
from dfm.pipeline.pipeline import PipelineError


def ink_level(videos: torch.Tensor) -> torch.Tensor:
    """videos [B, 3, F, H, W] in [-1, 1] -> [B]: the 99th percentile of each video's foreground intensity."""
    _, intensity, _ = foreground(videos)  # [B, F, H, W] in [0, 1]
    return intensity.flatten(1).quantile(0.99, dim=1)


def _axis_path(track) -> tuple:
    """A centroid track [[row, col], ...] (NaN: no object) -> (frame indices [n], positions [n] along the axis
    with the longer path); None when fewer than 2 frames show the object."""
    t = torch.tensor(track, dtype=torch.float64)  # [F, 2]
    frames = torch.nonzero(~t.isnan().any(-1)).flatten()  # [n]
    if len(frames) < 2:
        return None
    points = t[frames]  # [n, 2]
    axis = int((points[1:] - points[:-1]).abs().sum(0).argmax())
    return frames.double(), points[:, axis]


def speed_level(records: list) -> torch.Tensor:
    """dfm.evaluate.analyze records -> [B] pixels per frame: sum |step| along the axis of motion / frames spanned
    (0 when fewer than 2 frames show an object)."""
    speeds = []
    for record in records:
        path = _axis_path(record["track"])
        if path is None:
            speeds.append(0.0)
            continue
        frames, p = path
        speeds.append(float((p[1:] - p[:-1]).abs().sum() / (frames[-1] - frames[0])))
    return torch.tensor(speeds)


def reverses(record: dict, threshold: float = 0.375) -> bool:
    """Whether an analyze record's track turns back along its axis of motion by `threshold` pixels from the
    farthest point it reached (a bounce), after first moving `threshold` from its start."""
    path = _axis_path(record["track"])
    if path is None:
        return False
    p = path[1].tolist()
    sign, extreme = 0.0, p[0]
    for value in p[1:]:
        if sign == 0.0:
            if abs(value - p[0]) >= threshold:
                sign, extreme = math.copysign(1.0, value - p[0]), value
        elif (value - extreme) * sign > 0:
            extreme = value
        elif (extreme - value) * sign >= threshold:
            return True
    return False


def drop_test(k_base: int, n_base: int, k_new: int, n_new: int) -> tuple:
    """One-sided two-proportion z-test (pooled) for "the new model's accuracy is lower than the base's":
    (z, p) with z = (p_new - p_base) / sqrt(p (1 - p) (1 / n_base + 1 / n_new)), p = Phi(z), the chance of a drop
    at least this large if both had the same accuracy. No variance (both 0% or both 100%): (0, 1)."""
    p_base, p_new, pooled = k_base / n_base, k_new / n_new, (k_base + k_new) / (n_base + n_new)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_base + 1 / n_new))
    if se == 0:
        return 0.0, 1.0
    z = (p_new - p_base) / se
    return z, 0.5 * math.erfc(-z / math.sqrt(2))


def paired_drop_test(base_correct: list, new_correct: list) -> tuple:
    """One-sided exact McNemar test on paired videos (same prompt and seed): (b, c, p) with b = right before and
    wrong after, c = wrong before and right after, p = P(X >= b) for X ~ Binomial(b + c, 1/2); p = 1 when b + c = 0."""
    b = sum(1 for x, y in zip(base_correct, new_correct) if x and not y)
    c = sum(1 for x, y in zip(base_correct, new_correct) if y and not x)
    n = b + c
    return b, c, sum(math.comb(n, i) for i in range(b, n + 1)) / 2 ** n if n else 1.0


def compare(base: dict, new: dict) -> str:
    """A markdown table comparing two --json results on the same prompts and seeds: accuracies with both tests,
    speed and ink. Raises PipelineError when the videos are not the same prompts and seeds."""
    key = [(v["prompt"], v["seed"]) for v in base["videos"]]
    if key != [(v["prompt"], v["seed"]) for v in new["videos"]]:
        raise PipelineError("the two results are not the same prompts and seeds; rerun both with the same --seeds and --num")
    lines = ["| reading | before | after | change | z-test z, p (one-sided) | McNemar b, c, p (one-sided) |",
             "|---|---|---|---|---|---|"]
    n = len(key)
    for name in ("digit", "direction"):
        before, after = ([bool(v[f"correct_{name}"]) for v in r["videos"]] for r in (base, new))
        z, p = drop_test(sum(before), n, sum(after), n)
        b, c, pm = paired_drop_test(before, after)
        lines.append(f"| {name} acc | {sum(before) / n:.3f} | {sum(after) / n:.3f} | {(sum(after) - sum(before)) / n:+.3f} "
                     f"| {z:.2f}, {p:.3f} | {b}, {c}, {pm:.3f} |")
    for name in ("speed", "ink"):
        before, after = (sum(v[name] for v in r["videos"]) / n for r in (base, new))
        lines.append(f"| {name} | {before:.3f} | {after:.3f} | {after - before:+.3f} | | |")
    return "\n".join(lines)


class _Recording:
    """A pipeline whose generated videos are kept (evaluate() scores them; ink_level reads them too)."""

    def __init__(self, pipe):
        self.pipe, self.videos = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, *args, **kwargs):
        out = self.pipe.generate(*args, **kwargs)
        self.videos.append(out.videos)
        return out


def _seeds(text: str) -> list:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas, e.g. 0,100,200") from None


def _row(label: str, records: list, videos: torch.Tensor) -> str:
    n = len(records)
    digit, direction = (sum(r[f"correct_{k}"] for r in records) for k in ("digit", "direction"))
    consistency = sum(r["temporal_consistency"] for r in records) / n
    return (f"| {label} | {n} | {digit} ({digit / n:.3f}) | {direction} ({direction / n:.3f}) | {consistency:.3f} | "
            f"{speed_level(records).mean():.3f} | {ink_level(videos).mean():.3f} |")


def _videos_of(seeds: list, num: int) -> list:
    """(prompt, seed) of every video `evaluate` makes for these seed sets, in order."""
    return [(want["prompt"], seed + i) for seed in seeds for i, want in enumerate(eval_prompts(num, seed=seed))]


def _read_against(path: str, seeds: list, num: int) -> dict:
    """The --against file, checked before any work: readable, and the same prompts and seeds as this run."""
    try:
        other = json.loads(Path(path).read_text())
        videos = [(v["prompt"], v["seed"]) for v in other["videos"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"--against {path}: not a `dfm eval-lora --json` file ({e}); write one with --json") from None
    if videos != _videos_of(seeds, num):
        raise PipelineError(f"--against {path}: its videos are not this run's prompts and seeds; rerun both with the "
                            f"same --seeds and --num (it has --seeds {','.join(map(str, other.get('seeds', [])))} "
                            f"--num {other.get('num')})")
    return other


def run_eval_lora(args) -> int:
    set_threads(args.threads)
    if args.sheet:
        check_output(args.sheet, "--sheet", ".png")
    if args.json:
        check_output(args.json, "--json", ".json")
        if Path(args.json).exists():
            raise PipelineError(f"--json {args.json} exists; remove it or choose another name (nothing is overwritten)")
    against = _read_against(args.against, args.seeds, args.num) if args.against else None
    check_lora_files(p for p, _ in args.lora)
    pipe = load_pipeline(args.model)
    for path, scale in args.lora:
        pipe.load_lora(path, scale)
    if not args.threads:
        torch.set_num_threads(1)  # the digits models are small: threads only add waiting
    loras = ", ".join(f"{p} x{s:g}" for p, s in args.lora) or "none"
    print(f"# dfm eval-lora: {args.model}, LoRA: {loras}\n")
    print("| seed set | videos | digit correct | direction correct | temporal consistency | speed px/frame | ink |")
    print("|---|---|---|---|---|---|---|")
    records, videos = [], []
    for i, seed in enumerate(args.seeds):
        rec = _Recording(pipe)
        result = evaluate(rec, num_videos=args.num, seed=seed, steps=args.steps, guidance_scale=args.guidance,
                          sheet=args.sheet if i == 0 else None)
        videos.append(torch.cat(rec.videos))
        records += result["videos"]
        print(_row(f"seeds {seed}-{seed + args.num - 1}", result["videos"], videos[-1]), flush=True)
    if len(args.seeds) > 1:
        print(_row("all", records, torch.cat(videos)))
    speeds, inks = speed_level(records).tolist(), ink_level(torch.cat(videos)).tolist()
    rows = [{k: v for k, v in r.items() if k != "track"} | {"speed": s, "ink": k} for r, s, k in zip(records, speeds, inks)]
    result = {"model": args.model, "lora": [[p, s] for p, s in args.lora], "seeds": args.seeds, "num": args.num,
              "videos": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if against is not None:
        print(f"\n## against {args.against} (kept: the drop is not significant at p < 0.05)\n")
        print(compare(against, result))
    print("dfm eval-lora: done", file=sys.stderr)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("eval-lora", help="dfm eval's scores plus speed and ink, with LoRAs, over seed sets",
                       description="Score a model (with --lora files stacked on it) on dfm eval's fixed Moving Digits "
                                   "prompts for each seed set, and read the speed and brightness (ink) of the digits "
                                   "it draws: what a LoRA recipe teaches without naming it in the captions.")
    p.add_argument("--model", required=True, help="a dfm model folder, a trainer run or checkpoint")
    p.add_argument("--lora", action="append", default=[], type=parse_lora_arg, metavar="PATH[:SCALE]",
                   help="a LoRA file to add (repeatable)")
    p.add_argument("--num", type=int, default=40, help="videos per seed set (default 40: every digit x direction)")
    p.add_argument("--seeds", type=_seeds, default=[0], help="seed sets, comma-separated (default 0)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--sheet", metavar="PNG", help="contact sheet of the first seed set's videos with what was read")
    p.add_argument("--json", metavar="FILE", help="write every video's readings (for a test between two runs)")
    p.add_argument("--against", metavar="FILE", help="a --json of another model on the same seeds (the base): "
                                                     "print both tests of a drop in accuracy")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=run_eval_lora)
