"""Digit/direction accuracy and ink of real Moving Digits clips, raw and after the shipped VAE's encode+decode,
at full and half ink: the ceiling a faint-ink LoRA on models/wan_flow_digits can reach."""
import torch
from dfm.data.digits import MovingDigits
from dfm.evaluate import analyze
from dfm.evaluate_ink import ink_level
from dfm.pipeline import load_pipeline

torch.set_num_threads(1)
vae = load_pipeline("models/wan_flow_digits").vae
print("| clips | ink | digit acc | direction acc | ink level |\n|---|---|---|---|---|")
for ink in (1.0, 0.5):
    data = MovingDigits("test", num_frames=9, size=16, num_digits=1, ink=ink, length=200, seed=0)
    items = [data[i] for i in range(len(data))]
    video = torch.stack([it["video"] for it in items])
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(video[i:i + 50])) for i in range(0, len(video), 50)])
    for name, v in (("real", video), ("VAE recon", recon)):
        rec = analyze(v)
        d = sum(r["digit"] == it["digit"] for r, it in zip(rec, items)) / len(items)
        dr = sum(r["direction"] == it.get("direction") for r, it in zip(rec, items)) / len(items)
        print(f"| {name} | {ink} | {d:.3f} | {dr:.3f} | {ink_level(v).mean():.3f} |")
