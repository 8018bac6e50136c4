"""The ceiling a LoRA on models/wan_flow_digits can reach for a concept: real Moving Digits clips of each candidate
concept, read raw and after the shipped VAE's encode + decode (a transformer LoRA can only draw what the VAE
decodes). Digit and direction accuracy (dfm.evaluate.analyze) and each concept's own reading:
ink (dfm.evaluate_lora.ink_level), red (the fraction of videos whose colour reads "red"), speed
(dfm.evaluate_lora.speed_level, pixels per frame along the motion) and bounce (the fraction of videos whose
track reverses). Same clips (seed, index) for every candidate: only the concept differs.

    .venv/bin/python benchmarks/lora_ceiling.py [--clips 200]
"""
import argparse

import torch

from dfm.data.digits import MovingDigits
from dfm.evaluate import analyze
from dfm.evaluate_lora import ink_level, reverses, speed_level
from dfm.pipeline import load_pipeline

CANDIDATES = {  # name -> MovingDigits options (the shipped model's clips: 9 frames of 16x16, one white digit)
    "normal (the base's data)": {},
    "half ink": {"ink": 0.5},
    "red ink": {"colors": ["red"]},
    "half speed": {"speed": 0.375},
    "bounce, speed 1.5": {"bounce": True, "speed": 1.5},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    vae = load_pipeline("models/wan_flow_digits").vae
    print(f"{args.clips} test-split clips per row, seed 0\n")
    print("| concept | clips | digit acc | direction acc | ink | red | speed px/frame | bounce |")
    print("|---|---|---|---|---|---|---|---|")
    for name, options in CANDIDATES.items():
        data = MovingDigits("test", num_frames=9, size=16, num_digits=1, length=args.clips, seed=0, **options)
        items = [data[i] for i in range(len(data))]
        video = torch.stack([it["video"] for it in items])  # [N, 3, 9, 16, 16]
        with torch.no_grad():
            recon = torch.cat([vae.decode(vae.encode(video[i:i + 50])) for i in range(0, len(video), 50)])
        for kind, v in (("real", video), ("VAE recon", recon)):
            rec = analyze(v)
            digit = sum(r["digit"] == it["digit"] for r, it in zip(rec, items)) / len(items)
            direction = sum(r["direction"] == it["direction"] for r, it in zip(rec, items)) / len(items)
            red = sum(r["color"] == "red" for r in rec) / len(rec)
            bounce = sum(reverses(r) for r in rec) / len(rec)
            print(f"| {name} | {kind} | {digit:.3f} | {direction:.3f} | {ink_level(v).mean():.3f} | {red:.3f} | "
                  f"{speed_level(rec).mean():.3f} | {bounce:.3f} |")


if __name__ == "__main__":
    main()
