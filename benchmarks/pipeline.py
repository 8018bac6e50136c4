"""Seconds per video: dfm's pipeline against diffusers' WanPipeline on the same Wan 2.1 folder and settings.

    python benchmarks/pipeline.py --quick          # tiny folder, a few seconds: a smoke test of the script
    python benchmarks/pipeline.py                  # small folder (dim 256, 4 layers), 17 frames at 128x128
    python benchmarks/pipeline.py --device cuda    # the same on a GPU

A random Wan 2.1 text-to-video model (WanTransformer3DModel, AutoencoderKLWan, UMT5EncoderModel, a sentencepiece
tokenizer trained here, UniPC with flow sigmas as the released folders use) is saved in the diffusers layout once;
dfm's `load_pipeline` and diffusers' `WanPipeline.from_pretrained` load that folder. Both generate the same videos
(same prompt, Wan's negative prompt, the same initial latents, guidance 5, UniPC): the outputs are compared before
timing. The timed call is the whole generation: text encoding, the sampling loop, VAE decoding (wall-clock and
process CPU time; with one thread the CPU time is the number that load from other processes disturbs least).
dfm's text cache is cleared before every call, so neither side reuses an encoding. Times are medians over repeats
that alternate the two pipelines, the order reversed every round (diffusers, dfm, dfm, diffusers, ...:
benchmarks/models.py's `time_alternating`); the ratio is diffusers' time over dfm's.

Where the difference comes from: diffusers runs the conditional and the unconditional branch as two forwards of
batch B per step; dfm runs them as one forward of batch 2B (dfm.diffusion.guidance.CFGDenoiser), plus dfm's WAN
kernels (fused q/k/v, one complex-multiply RoPE; see benchmarks/models.py).

On CPU the default is one thread (--threads 0: torch's default), as in benchmarks/models.py.

Measured 2026-12-02 on this project's 2-core CPU machine (1 thread, fp32, load average 2.2 at start and ~2.9 at
the end from other jobs, so the CPU-time ratio is the result; `python benchmarks/pipeline.py --repeats 5`),
outputs equal to 2.8e-6:

    | pipeline  | wall s / video (median) | CPU s / video (median) | diffusers / dfm (wall, CPU) |
    | diffusers | 5.627                   | 5.115                  | 1.00x, 1.00x                |
    | dfm       | 4.970                   | 4.686                  | 1.13x, 1.09x                |

The VAE decode and the text encoder cost both sides the same; the CUDA path has not been run (no GPU was lent).

The i2v rows (issue 16) run the same parts as a WanImageToVideoPipeline folder (36-channel transformer with CLIP
image cross-attention, a random CLIPVisionModel, a colour-gradient first frame) against diffusers'
WanImageToVideoPipeline in the same run. Measured 2026-12-02, 1 thread, under a load average of 11.7 on the 2
cores (wall times are inflated and noisy; the CPU-time ratio is the result; `python benchmarks/pipeline.py
--repeats 3`), outputs equal to 2.8e-6 (t2v) and 6.0e-7 (i2v):

    | layout | pipeline                            | wall s (median) | CPU s (median) | diffusers / dfm (wall, CPU) |
    | t2v    | diffusers (WanPipeline)             | 30.014          | 5.930          | 1.00x, 1.00x                |
    | t2v    | dfm                                 | 24.332          | 5.488          | 1.23x, 1.08x                |
    | i2v    | diffusers (WanImageToVideoPipeline) | 24.548          | 6.072          | 1.00x, 1.00x                |
    | i2v    | dfm                                 | 16.690          | 4.867          | 1.47x, 1.25x                |

diffusers' I2V runs CFG as two forwards of batch B per step, dfm as one of batch 2B (as for t2v).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import save_wan_folder, time_alternating, tiny_t5_tokenizer  # noqa: E402  (benchmarks/models.py)

from dfm.pipeline import WAN_NEGATIVE_PROMPT, load_pipeline  # noqa: E402

PROMPT = "a cat and a dog bake a cake together in a kitchen"
SENTENCES = [PROMPT, "the digit 7 moves to the left", "sunlight streams through the window onto the table",
             "a red car drives along a wet street at night", WAN_NEGATIVE_PROMPT]

CONFIGS = {  # transformer, text encoder, VAE, video
    "tiny": dict(heads=2, head_dim=12, layers=2, ffn=48, text_dim=32, text_layers=2, vae_dim=3, frames=5, size=32),
    "small": dict(heads=4, head_dim=64, layers=4, ffn=1024, text_dim=64, text_layers=2, vae_dim=3, frames=17,
                  size=128),
}


def build_folder(root: Path, c: dict) -> Path:
    """A random Wan 2.1 pipeline saved in diffusers' layout (the released folders' scheduler settings)."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    tok = tiny_t5_tokenizer(root, SENTENCES)
    text = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=len(tok), d_model=c["text_dim"], d_kv=16, d_ff=2 * c["text_dim"], num_layers=c["text_layers"],
        num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=c["heads"], attention_head_dim=c["head_dim"], in_channels=16,
        out_channels=16, text_dim=c["text_dim"], freq_dim=64, ffn_dim=c["ffn"], num_layers=c["layers"])
    vae = diffusers.AutoencoderKLWan(base_dim=c["vae_dim"], z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    return save_wan_folder(root, tok, text, vae, transformer)


def build_i2v_folder(root: Path, c: dict) -> Path:
    """The same parts as an image-to-video folder (WanImageToVideoPipeline): a 36-channel transformer with CLIP
    image cross-attention and a random CLIPVisionModel (penultimate hidden state, as Wan 2.1 I2V)."""
    import diffusers
    import transformers

    torch.manual_seed(1)
    tok = tiny_t5_tokenizer(root, SENTENCES)
    text = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=len(tok), d_model=c["text_dim"], d_kv=16, d_ff=2 * c["text_dim"], num_layers=c["text_layers"],
        num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    dim = c["heads"] * c["head_dim"]
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=c["heads"], attention_head_dim=c["head_dim"], in_channels=36,
        out_channels=16, text_dim=c["text_dim"], freq_dim=64, ffn_dim=c["ffn"], num_layers=c["layers"],
        image_dim=c["text_dim"], added_kv_proj_dim=dim)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=c["text_dim"], intermediate_size=2 * c["text_dim"], num_hidden_layers=2, num_attention_heads=4,
        image_size=64, patch_size=16))
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    vae = diffusers.AutoencoderKLWan(base_dim=c["vae_dim"], z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0, num_train_timesteps=1000, solver_order=2)
    folder = root / "wan_i2v"
    diffusers.WanImageToVideoPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer,
                                      scheduler=scheduler, image_encoder=clip,
                                      image_processor=processor).save_pretrained(folder)
    return folder


def first_frame(size: int):
    """A deterministic picture (a colour gradient) as the I2V input."""
    from PIL import Image

    ramp = torch.linspace(0, 255, size)
    rgb = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                       255 - ramp[None, :].expand(size, size)], dim=-1)
    return Image.fromarray(rgb.to(torch.uint8).numpy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tiny config (a smoke test)")
    ap.add_argument("--config", choices=list(CONFIGS), default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1, help="videos per call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    args = ap.parse_args()
    import diffusers

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    name = args.config or ("tiny" if args.quick else "small")
    c = CONFIGS[name]
    device = torch.device(args.device)
    rows, diffs = {}, {}
    for layout in ("t2v", "i2v"):
        with tempfile.TemporaryDirectory(prefix="dfm_bench_pipeline_") as tmp:
            diffs[layout], wall, cpu_s = bench(layout, Path(tmp), c, args, device)
        rows[layout] = ({k: [t / args.batch for t in v] for k, v in wall.items()},
                        {k: [t / args.batch for t in v] for k, v in cpu_s.items()})
    tokens = (1 + (c["frames"] - 1) // 4) * (c["size"] // 16) ** 2
    cpu = platform.processor() or platform.machine()
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu ({cpu}, {torch.get_num_threads()} thread(s))")
    print(f"device: {where}; torch {torch.__version__}, diffusers {diffusers.__version__}; fp32")
    print(f"config {name}: transformer {c['layers']} layers, dim {c['heads'] * c['head_dim']}; {c['frames']} frames at "
          f"{c['size']}x{c['size']} ({tokens} video tokens, 512 text tokens); UniPC {args.steps} steps, guidance 5, "
          f"batch {args.batch}; {args.repeats} alternating repeats (order reversed every round); load average "
          f"{load:.1f} at start; max |dfm - diffusers| = {diffs['t2v']:.2e} (t2v), {diffs['i2v']:.2e} (i2v)")
    print()
    print("| layout | pipeline | wall s / video (median) | min | max | CPU s / video (median) | diffusers / dfm (wall, CPU) |")
    print("|---|---|---|---|---|---|---|")
    for layout, (times, cpu_times) in rows.items():
        med = {k: statistics.median(v) for k, v in times.items()}
        cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
        peer = "diffusers" + (" (WanImageToVideoPipeline)" if layout == "i2v" else " (WanPipeline)")
        for label in ("diffusers", "dfm"):
            v = times[label]
            print(f"| {layout} | {peer if label == 'diffusers' else 'dfm'} | {med[label]:.3f} | {min(v):.3f} | "
                  f"{max(v):.3f} | {cpu_med[label]:.3f} | {med['diffusers'] / med[label]:.2f}x, "
                  f"{cpu_med['diffusers'] / cpu_med[label]:.2f}x |")


def bench(layout: str, tmp: Path, c: dict, args, device):
    """(max |dfm - diffusers|, wall, CPU seconds per run) of one layout's folder."""
    import diffusers

    folder = build_folder(tmp, c) if layout == "t2v" else build_i2v_folder(tmp, c)
    ours = load_pipeline(folder, device=device)
    cls = diffusers.WanPipeline if layout == "t2v" else diffusers.WanImageToVideoPipeline
    theirs = cls.from_pretrained(str(folder), local_files_only=True).to(device)
    theirs.set_progress_bar_config(disable=True)
    image = {} if layout == "t2v" else {"image": first_frame(c["size"])}
    seeds = list(range(args.batch))
    shape = ours.latent_shape(c["frames"], c["size"], c["size"])
    latents = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds])
    settings = dict(num_frames=c["frames"], height=c["size"], width=c["size"], steps=args.steps,
                    guidance_scale=5.0)

    def run_dfm():
        ours.text.clear_cache()
        return ours.generate([PROMPT] * args.batch, seeds=seeds, progress=False, **settings, **image).videos

    def run_diffusers():
        frames = theirs(prompt=[PROMPT] * args.batch, negative_prompt=WAN_NEGATIVE_PROMPT, height=c["size"],
                        width=c["size"], num_frames=c["frames"], num_inference_steps=args.steps,
                        guidance_scale=5.0, latents=latents.clone().to(device), output_type="pt",
                        **image).frames
        return frames.permute(0, 2, 1, 3, 4) * 2 - 1  # [B, 3, F, H, W] in [-1, 1]

    with torch.no_grad():
        diff = (run_dfm().cpu() - run_diffusers().cpu()).abs().max().item()  # also the warm-up
        runs = {"diffusers": run_diffusers, "dfm": run_dfm}
        wall, cpu_s = time_alternating(runs, args.repeats, device, lambda name: None)
    return diff, wall, cpu_s


if __name__ == "__main__":
    main()
