"""`dfm eval-ink`: `dfm eval`'s scores plus the brightness of the digits ("ink"), for a model with LoRAs stacked
on it: the measure of the faint-ink LoRA recipe (configs/lora_faint_ink_digits.yaml), whose style no caption names.

    dfm eval-ink --model models/wan_flow_digits                                          # before
    dfm eval-ink --model models/wan_flow_digits --lora runs/lora_faint_ink.safetensors   # after

ink of a video = the 99th percentile of its foreground intensity (dfm.evaluate.foreground: the brightest channel
above each frame's background, in [0, 1]); the table gives its mean over the videos. Real Moving Digits clips
measure 0.87 at full brightness (data.ink 1) and 0.43 at data.ink 0.5 (8 clips of 9 x 16 x 16)."""

from __future__ import annotations

import sys

import torch

from dfm.evaluate import evaluate, foreground, format_table
from dfm.pipeline.commands import check_output, set_threads
from dfm.pipeline.folders import load_pipeline
from dfm.pipeline.lora import check_lora_files, parse_lora_arg


def ink_level(videos: torch.Tensor) -> torch.Tensor:
    """videos [B, 3, F, H, W] in [-1, 1] -> [B]: the 99th percentile of each video's foreground intensity."""
    _, intensity, _ = foreground(videos)  # [B, F, H, W] in [0, 1]
    return intensity.flatten(1).quantile(0.99, dim=1)


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


def run_eval_ink(args) -> int:
    set_threads(args.threads)
    if args.sheet:
        check_output(args.sheet, "--sheet", ".png")
    check_lora_files(p for p, _ in args.lora)
    pipe = load_pipeline(args.model)
    for path, scale in args.lora:
        pipe.load_lora(path, scale)
    if not args.threads:
        torch.set_num_threads(1)  # the digits models are small: threads only add waiting
    rec = _Recording(pipe)
    result = evaluate(rec, num_videos=args.num, seed=args.seed, steps=args.steps, guidance_scale=args.guidance,
                      sheet=args.sheet)
    ink = ink_level(torch.cat(rec.videos))
    loras = ", ".join(f"{p} x{s:g}" for p, s in args.lora) or "none"
    print(f"# dfm eval-ink: {args.model}, LoRA: {loras}\n")
    print(format_table([result]))
    print(f"\nink (99th percentile of foreground intensity, mean over {len(ink)} videos): {ink.mean():.3f} "
          f"(min {ink.min():.3f}, max {ink.max():.3f})")
    print("dfm eval-ink: done", file=sys.stderr)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("eval-ink", help="dfm eval's scores plus the digits' brightness, with LoRAs",
                       description="Score a model (with --lora files stacked on it) on dfm eval's fixed Moving Digits "
                                   "prompts, and measure the brightness of the digits it draws (ink).")
    p.add_argument("--model", required=True, help="a dfm model folder, a trainer run or checkpoint")
    p.add_argument("--lora", action="append", default=[], type=parse_lora_arg, metavar="PATH[:SCALE]",
                   help="a LoRA file to add (repeatable)")
    p.add_argument("--num", type=int, default=40, help="videos (default 40: every digit x direction)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sheet", metavar="PNG", help="contact sheet of the videos with what was read")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=run_eval_ink)
