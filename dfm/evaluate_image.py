"""`dfm eval --image` (image-to-video) and `dfm eval --captions heldout` (held-out paraphrases), on dfm.evaluate.

    dfm eval --model PATH --image               # held-out clips' first frames + their captions -> scores
    dfm eval --reference --image                # the real held-out clips themselves: the ceiling
    dfm eval --model PATH --captions heldout    # text-to-video, prompts in templates no training caption used

Image-to-video: item i is clip i of the test split (MovingDigits("test", seed=--seed): digit images the model
never saw), its first frame the image and its caption the prompt (the template grammar, or with --captions
heldout a held-out paraphrase: dfm.data.captions); the ground truth is the clip's digit and direction, never read
back from the text. Scores (dfm.evaluate's readings of each video):
- first-frame PSNR: 10 log10(1 / MSE) of frame 0 against the given image, both in [0, 1] (per video, capped at
  100 dB, then the mean);
- identity: the fraction of videos in which the classifier reads the image's digit in every frame where a digit
  is visible (identity_frames: the fraction of such frames);
- digit / direction accuracy, temporal consistency, frame agreement, motion smoothness as in `dfm eval`.
"""

from __future__ import annotations

import functools
import json
import sys

import numpy as np
import torch

from dfm.data.captions import paraphrase_for
from dfm.data.digits import MovingDigits, caption_for
from dfm.evaluate import (EvalError, _colors, _load_pipeline, analyze, default_digit_size, eval_prompts, evaluate,
                          format_table, score, training_data_config)
from dfm.io import atomic_path
from dfm.pipeline.commands import check_output, set_threads
from dfm.video import write_contact_sheet

PSNR_CAP = 100.0


def image_items(num: int, num_frames: int, size: int, seed: int = 0, captions: str = "template") -> list[dict]:
    """Held-out clips: {"video" [3, F, S, S], "prompt", "digit", "direction", "color"} (one white digit each)."""
    data = MovingDigits("test", num_frames=num_frames, size=size, length=num, seed=seed)
    items = []
    for i in range(num):
        item = data[i]
        prompt = caption_for(item["digit"], item["direction"]) if captions == "template" else \
            paraphrase_for(item["digit"], item["direction"], rng=np.random.default_rng([seed, i, 11]), heldout=True)
        items.append({"video": item["video"], "prompt": prompt, "digit": item["digit"],
                      "direction": item["direction"], "color": None})
    return items


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1], read in [0, 1] (capped at PSNR_CAP)."""
    mse = float((((a.float() - b.float()) / 2) ** 2).mean())
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else 10 * float(np.log10(1 / mse))


def evaluate_image(pipeline, num: int = 40, seed: int = 0, steps=None, guidance_scale=None, sampler=None,
                   batch_size: int = 8, captions: str = "template", reference: bool = False, sheet=None,
                   log=None) -> dict:
    """Image-to-video scores of `pipeline` (or of the real clips with `reference`); see the module docstring."""
    d = pipeline.defaults if not reference else {"num_frames": 9, "height": 16}
    items = image_items(num, int(d["num_frames"]), int(d["height"]), seed, captions)
    videos, seconds, nfe = [], 0.0, 0
    for start in range(0, num, max(1, batch_size)):
        batch = items[start:start + batch_size]
        if reference:
            videos.append(torch.stack([it["video"] for it in batch]))
            continue
        gen = pipeline.generate([it["prompt"] for it in batch], image=[it["video"][:, 0] for it in batch],
                                steps=steps, sampler=sampler, guidance_scale=guidance_scale,
                                seeds=[seed + start + i for i in range(len(batch))], progress=False)
        videos.append(gen.videos.float().cpu())
        seconds, nfe = seconds + float(gen.seconds), gen.nfe
        if log is not None:
            log(f"{start + len(batch)}/{num} videos, {seconds:.1f} s")
    videos = torch.cat(videos)  # [N, 3, F, H, W]
    if not bool(torch.isfinite(videos).all()):
        raise EvalError("the videos hold NaN or inf: broken weights or diverged sampling")
    digit_size = default_digit_size(*videos.shape[-2:])
    records = analyze(videos, digit_size)
    summary = score(records, items)
    same, frames = [], []
    for it, r, v in zip(items, records, videos):
        r["first_frame_psnr"] = psnr(v[:, 0], it["video"][:, 0])
        shown = [f for f in r["frame_digits"] if f >= 0]
        r["identity"] = bool(shown) and all(f == it["digit"] for f in shown)
        same.append(r["identity"])
        frames.extend(f == it["digit"] for f in shown)
    result = {**summary, "first_frame_psnr": float(np.mean([r["first_frame_psnr"] for r in records])),
              "identity": float(np.mean(same)), "identity_frames": float(np.mean(frames)) if frames else 0.0,
              "nfe": nfe, "seconds_per_video": seconds / num, "num_videos": num, "seed": seed, "captions": captions,
              "steps": steps, "guidance_scale": guidance_scale, "reference": reference,
              "videos": [{"prompt": it["prompt"], "expected_digit": it["digit"],
                          "expected_direction": it["direction"], **r} for it, r in zip(items, records)]}
    if sheet is not None:  # each row: the given image, then the video's frames (image-to-video: frame 0 its decode)
        given = torch.stack([it["video"][:, :1] for it in items]).to(videos)  # [N, 3, 1, H, W]
        write_contact_sheet(sheet, torch.cat([given, videos], dim=2),
                            labels=[f"{it['digit']} {it['direction']} -> {r['digit']} {r['direction']}"
                                    for it, r in zip(items, records)])
    return result


IMAGE_COLUMNS = ("first_frame_psnr", "identity", "identity_frames", "digit_accuracy", "direction_accuracy",
                 "temporal_consistency", "frame_agreement", "nfe")


def image_table(results: list[dict]) -> str:
    head = ["captions", *IMAGE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["captions"]] + [f"{r[k]:.2f}" if k == "first_frame_psnr" else
                                   (str(r[k]) if k == "nfe" else f"{r[k]:.3f}") for k in IMAGE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heldout_prompts(num: int, colors=None, seed: int = 0) -> list[dict]:
    """dfm eval's fixed prompt set (digit x direction), each prompt a held-out paraphrase of the same truth."""
    items = eval_prompts(num, colors, seed)
    for i, it in enumerate(items):
        it["prompt"] = paraphrase_for(it["digit"], it["direction"], it["color"],
                                      rng=np.random.default_rng([seed, i, 13]), heldout=True)
    return items


def run(args, plain) -> int:
    """`dfm eval` with --image or --captions heldout; `plain` (dfm.evaluate.run_eval) otherwise."""
    if not args.image and args.captions == "template":
        return plain(args)
    log = functools.partial(print, "dfm eval:", file=sys.stderr)
    set_threads(args.threads)
    [check_output(p, flag, suffix) for flag, p, suffix in (("--sheet", args.sheet, ".png"), ("--json", args.json, ".json")) if p]
    if args.reference and not args.image:
        raise EvalError("--reference --captions heldout scores the same clips as --reference; use --model")
    pipeline = None if args.reference else _load_pipeline(args.model, args.device)
    if args.image:
        result = evaluate_image(pipeline, args.num, args.seed, args.steps, args.guidance, args.sampler,
                                args.batch_size, args.captions, args.reference, args.sheet, log)
        table = image_table([result])
    else:
        colors = _colors(args.colors) if args.colors is not None else \
            training_data_config(args.model, pipeline)[1].get("colors") or None
        result = evaluate(pipeline, prompts=heldout_prompts(args.num, colors, args.seed), seed=args.seed,
                          steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance,
                          batch_size=args.batch_size, sheet=args.sheet, log=log)
        result["captions"] = "heldout"
        table = format_table([result])
    source = "reference: held-out Moving Digits clips" if args.reference else args.model
    print(f"# dfm eval{' --image' if args.image else ''} (captions: {args.captions}): {source}\n\n{table}")
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({"model": None if args.reference else str(args.model), "results": [result]},
                                      indent=1) + "\n")
    return 0


def add_commands(sub) -> None:
    """Adds --image and --captions to `dfm eval` (registered by dfm.evaluate)."""
    p = sub.choices.get("eval")
    if p is None:
        return
    p.add_argument("--image", action="store_true", help="image-to-video: held-out clips' first frames with their "
                   "captions; first-frame PSNR, identity, direction (dfm/evaluate_image.py)")
    p.add_argument("--captions", choices=("template", "heldout"), default="template",
                   help="prompt wording: the caption grammar (default) or held-out paraphrases (templates no "
                        "training caption used)")
    plain = p.get_default("func")
    p.set_defaults(func=functools.partial(run, plain=plain))
