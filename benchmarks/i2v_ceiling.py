"""The ceiling of `dfm eval --image`'s readings: the real held-out clips it draws its images from, raw and after the
shipped digits VAE's encode + decode (every shipped latent model draws through that decoder).

    python benchmarks/i2v_ceiling.py [--num 120] [--seed 0] [--vae models/vae_digits]

identity: every frame where a digit is visible reads the image's digit; identity_frames: the fraction of such
frames; digit: the video's majority reading (dfm eval's digit accuracy) is the image's digit.
"""

import argparse

import numpy as np
import torch

from dfm.evaluate import analyze, default_digit_size
from dfm.evaluate_image import image_items
from dfm.vae import load_vae


def readings(videos: torch.Tensor, items: list[dict]) -> dict:
    ident, frames, digit = [], [], []
    for it, r in zip(items, analyze(videos, default_digit_size(*videos.shape[-2:]))):
        shown = [f for f in r["frame_digits"] if f >= 0]
        ident.append(bool(shown) and all(f == it["digit"] for f in shown))
        frames += [f == it["digit"] for f in shown]
        digit.append(r["digit"] == it["digit"])
    return {"identity": np.mean(ident), "identity_frames": np.mean(frames), "digit": np.mean(digit)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", default="models/vae_digits", help="a VAE folder (the one every shipped latent model holds)")
    args = p.parse_args()
    torch.set_num_threads(1)
    vae = load_vae(args.vae).eval()
    items = image_items(args.num, 9, 16, args.seed)
    video = torch.stack([it["video"] for it in items])  # [N, 3, 9, 16, 16]
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(video[i:i + 40])) for i in range(0, len(video), 40)]).clamp(-1, 1)
    print(f"{args.num} held-out clips (seed {args.seed}), VAE {args.vae}\n")
    print("| clips | identity | identity_frames | digit |\n|---|---|---|---|")
    for name, v in (("real", video), (f"through {args.vae}", recon)):
        r = readings(v, items)
        print(f"| {name} | {r['identity']:.3f} | {r['identity_frames']:.3f} | {r['digit']:.3f} |")


if __name__ == "__main__":
    main()
