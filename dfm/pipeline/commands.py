"""`dfm generate`, `dfm info` and `dfm export` (registered by dfm.cli through `add_commands`)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch

from dfm.errors import first_line
from dfm.pipeline.folders import DEFAULT_MODEL, export_checkpoint, load_pipeline
from dfm.pipeline.info import describe
from dfm.pipeline.lora import check_lora_experts, check_lora_files, describe_lora, parse_lora_arg
from dfm.pipeline.pipeline import GRID_NAMES, PipelineError, check_seed
from dfm.pipeline.wan_family import check_folder_inputs, read_image
from dfm.video import write_contact_sheet, write_video


def _interval(text: str) -> tuple[float, float]:
    """--guidance-interval LO,HI -> (lo, hi); argparse turns a ValueError into its one-line usage error."""
    lo, hi = (float(v) for v in text.split(","))
    return lo, hi


_interval.__name__ = "LO,HI"  # argparse: "invalid LO,HI value: ..."


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "video"


def check_output(path: str | Path, flag: str, suffix: str = ".mp4") -> Path:
    """A one-line PipelineError, before any work, when `path` cannot be written as a file: it is a folder, a folder
    on its way is a file, or the nearest existing folder is not writable (a read-only disk)."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{flag} {path} is a folder; give a file name, e.g. {path / ('out' + suffix)}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise PipelineError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(f"{flag} {path}: cannot write in {parent} (read-only or no permission); choose "
                            f"another path")
    return path


def resolve_device(name: str) -> str:
    """--device auto | cpu | cuda -> the device, or a one-line PipelineError when CUDA is asked for and absent."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise PipelineError(f"--device cuda but {why}; use --device cpu (or auto)")
    return name


def set_threads(threads: int) -> None:
    """--threads N: N > 0 sets torch's CPU threads; 0 keeps the default (dfm.cli sets one that fits the machine's
    load, and `Pipeline.cpu_threads` takes one thread for small generations)."""
    if threads < 0:
        raise PipelineError(f"--threads must be >= 0 (0: automatic), got {threads}")
    if threads:
        torch.set_num_threads(threads)


def model_path(model: str | Path) -> Path:
    """--model as a path; the default, the shipped model, also from outside the repository."""
    if str(model) == DEFAULT_MODEL and not Path(model).exists():
        return Path(__file__).resolve().parents[2] / DEFAULT_MODEL
    return Path(model)


def write_outputs(out, path: Path, scale: int = 0) -> tuple[list[Path], Path]:
    """A Generation's videos at `path` (several: path_00.mp4, ...) and its contact sheet at path.png; `scale` > 0
    enlarges N times for viewing (0: tiny videos up to >= 128 px). Returns (videos written, sheet)."""
    videos = out.videos  # [B, 3, F, H, W]
    scale = scale if scale > 0 else max(1, 128 // min(videos.shape[-2:]))  # auto: tiny videos to >= 128 px
    if scale > 1:  # for viewing only: whole pixels, no smoothing
        videos = videos.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    written = []
    for i, video in enumerate(videos):
        target = path if len(out.videos) == 1 else path.with_name(f"{path.stem}_{i:02d}{path.suffix}")
        written.append(write_video(target, video, fps=out.fps, pad_odd=True))
    return written, write_contact_sheet(path.with_suffix(".png"), videos, labels=out.prompts)


def cmd_generate(args) -> int:
    set_threads(args.threads)
    device = resolve_device(args.device)
    if args.seed is not None:
        check_seed(args.seed, "--seed", len(args.prompt))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.out:  # before minutes of sampling: the name, and that the videos and the contact sheet can be written
        if Path(args.out).suffix.lower() not in (".mp4", ".gif"):
            raise PipelineError(f"--out {args.out}: use a .mp4 or .gif file name")
        out = Path(args.out)
        several = len(args.prompt) > 1
        for target in ([out.with_name(f"{out.stem}_{i:02d}{out.suffix}") for i in range(len(args.prompt))]
                       if several else [out]) + [out.with_suffix(".png")]:
            check_output(target, "--out")
    else:
        check_output(Path("outputs") / "video.mp4", "the default output folder")
    images = {k: read_image(v, f"--{k.replace('_', '-')}") for k, v in (("image", args.image),
                                                                         ("last_image", args.last_image)) if v}
    model = model_path(args.model)
    check_folder_inputs(model, images.get("image"), images.get("last_image"), args.guidance_2)  # before loading
    check_lora_files(p for p, _ in args.lora)
    check_lora_experts(model, args.lora)
    pipe = load_pipeline(model, device=device, dtype=dtype, context_parallel=args.context_parallel,
                         context_parallel_mode=args.context_parallel_mode)
    for arg in args.lora:  # stacked, in the order given
        pipe.load_lora(*arg, expert=arg.expert)
    if not args.threads and device == "cpu":  # a small generation: one thread (threads only add waiting)
        settings = pipe.settings(args.frames, args.height, args.width, args.steps, args.sampler, args.guidance,
                                 args.guidance_rescale, args.guidance_interval, args.grid, args.shift)
        if pipe.cpu_threads(settings, batch=len(args.prompt)):
            torch.set_num_threads(1)
    out = pipe.generate(args.prompt, negative_prompt=args.negative, num_frames=args.frames, height=args.height,
                        width=args.width, steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance,
                        shift=args.shift, seed=args.seed, progress=not args.no_progress,
                        guidance_rescale=args.guidance_rescale, guidance_interval=args.guidance_interval,
                        grid=args.grid, guidance_scale_2=args.guidance_2, **images)
    if args.context_parallel != 1:  # every rank made the same videos: rank 0 writes them
        from dfm.pipeline.context_parallel import is_writer, leave_launch

        writer = is_writer()
        leave_launch()
        if not writer:
            return 0
    path = Path(args.out) if args.out else Path("outputs") / f"{_slug(out.prompts[0])}_s{out.seeds[0]}.mp4"
    if path.suffix.lower() not in (".mp4", ".gif"):
        raise PipelineError(f"--out {path}: use a .mp4 or .gif file name")
    written, sheet = write_outputs(out, path, args.scale)
    for p in written:
        print(p)
    print(sheet)
    s = out.settings
    extra = "".join([f" rescale {s['guidance_rescale']:g}" if s["guidance_rescale"] else "",
                     f" interval {s['guidance_interval'][0]:g},{s['guidance_interval'][1]:g}"
                     if s["guidance_interval"] else ""])
    print(f"dfm generate: {len(written)} video(s) of {s['num_frames']} frames at {s['height']}x{s['width']}, "
          f"{s['sampler']} {s['steps']} steps on the {s['grid']} grid, guidance {s['guidance_scale']:g}{extra}, "
          f"seeds {out.seeds}; NFE {out.nfe}, {out.seconds:.2f} s", file=sys.stderr)
    return 0


def _unreadable_weights(path: Path) -> Path | None:
    """The first *.safetensors file under `path` whose header safetensors cannot read (a truncated download)."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]:
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except (SafetensorError, OSError):
            return f
    return None


def cmd_info(args) -> int:
    from safetensors import SafetensorError

    set_threads(args.threads)
    try:
        text = describe_lora(args.path) if str(args.path).endswith(".safetensors") else describe(args.path)
    except SafetensorError as e:  # a truncated or garbled weights file: name it (generate's loaders do too)
        bad = _unreadable_weights(Path(args.path)) or args.path
        raise PipelineError(f"could not read {bad}: {first_line(e)}. The file is corrupt or truncated; download or "
                            f"export it again") from None
    print(text)
    return 0


def cmd_export(args) -> int:
    if args.lora_only:
        from dfm.pipeline.folders import pipeline_from_checkpoint
        from dfm.pipeline.lora import check_lora_target, export_lora

        check_lora_target(args.out, args.format, args.force)  # before loading anything
        pipe = pipeline_from_checkpoint(args.checkpoint, ema=not args.no_ema)
        print(export_lora(pipe, args.out, args.format, args.force))
        return 0
    out = export_checkpoint(args.checkpoint, args.out, ema=not args.no_ema, overwrite=args.force,
                            num_frames=args.frames, height=args.height, width=args.width, fps=args.fps,
                            steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance, shift=args.shift)
    print(out)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="generate videos from text prompts",
                       description="Generate a video from a text prompt with a dfm model folder, a diffusers Wan 2.1 "
                                   "folder or a trainer checkpoint. Writes the video (.mp4 or .gif) and a PNG "
                                   "contact sheet beside it; prints their paths, the NFE and the seconds taken. "
                                   "Unset options take the model's defaults (dfm info MODEL).")
    p.add_argument("prompt", nargs="+", help="the text prompt (several: one video each)")
    p.add_argument("--negative", default=None, help="negative prompt (default: the model's; Wan: its recommended "
                   "one, dfm models: the null conditioning)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder or checkpoint (default {DEFAULT_MODEL})")
    p.add_argument("--sampler", default=None, help="SPACE:METHOD such as flow:unipc, flow:euler, edm:heun, "
                   "edm:dpmpp_2m (a bare method looks in the model's own space first)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps")
    p.add_argument("--guidance", "--guidance-scale", dest="guidance", type=float, default=None,
                   help="classifier-free guidance scale w in [0, 100] (1 = off, 0 = unconditional)")
    p.add_argument("--guidance-rescale", type=float, default=None, metavar="PHI",
                   help="guidance rescale phi in [0, 1] (Lin et al. 2023; 0 = plain CFG), on the model's own "
                        "prediction (flow: velocity, EDM: x0)")
    p.add_argument("--guidance-interval", type=_interval, default=None, metavar="LO,HI",
                   help="guide only where LO < noise level <= HI, in the model's noise levels (flow models: flow "
                        "time s in [0, 1], 1 = pure noise; EDM models: sigma); the conditional model elsewhere "
                        "(Kynkaanniemi et al. 2024)")
    p.add_argument("--grid", default=None, help=f"sampling grid: {', '.join(GRID_NAMES)} (default: the model's; "
                   "logsnr: the few-step log-SNR grid)")
    p.add_argument("--shift", type=float, default=None,
                   help="flow grid shift (flow models; a Wan folder defaults to its scheduler's flow_shift, else "
                        "5.0; diffusers' Wan example: 5.0 at 720p, 3.0 at 480p)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first video, an integer in [0, 2^32) "
                   "(video i: seed + i; random if unset; printed)")
    p.add_argument("--frames", type=int, default=None, help="number of frames")
    p.add_argument("--height", type=int, default=None, help="frame height in pixels")
    p.add_argument("--width", type=int, default=None, help="frame width in pixels")
    p.add_argument("--out", default=None, help="output .mp4 or .gif (default outputs/<prompt>_s<seed>.mp4)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: automatic: one for small "
                   "models and videos, else the cores the machine's load leaves free)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="transformer precision (bf16 on GPUs; the CPU is fastest in fp32)")
    p.add_argument("--scale", type=int, default=0, help="write the video and contact sheet N times larger "
                   "(nearest neighbour, for viewing; default 0 = auto: small videos up to at least 128 px)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--context-parallel", type=int, default=1, metavar="N", help="under torchrun: split the "
                   "transformer's tokens over N ranks (Ulysses or ring attention); rank 0 writes")
    p.add_argument("--context-parallel-mode", default="auto", choices=["auto", "ulysses", "ring"],
                   help="how self-attention sees every rank's tokens (auto: Ulysses when N divides the heads)")
    p.add_argument("--lora", action="append", default=[], type=parse_lora_arg, metavar="PATH[:SCALE][:high|:low]",
                   help="add a LoRA file (diffusers/PEFT, original Wan/ComfyUI or kohya keys) with SCALE (default 1); "
                        "repeat to stack several; two-expert Wan 2.2: :low puts it on transformer_2 (default: the "
                        "file's dfm metadata, else :high, the transformer)")
    p.add_argument("--image", default=None, metavar="PATH", help="first frame (Wan I2V / FLF2V / 2.2 folders)")
    p.add_argument("--last-image", default=None, metavar="PATH", help="last frame (Wan FLF2V folders)")
    p.add_argument("--guidance-2", type=float, default=None, metavar="W",
                   help="guidance of the low-noise expert (Wan 2.2 A14B; default the folder's)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="describe a model folder or a trainer checkpoint",
                       description="Print what a dfm model folder, a diffusers Wan 2.1 folder or a trainer "
                                   "checkpoint holds: arch, paradigm, parameters per part, latent and text sizes, "
                                   "sampling defaults.")
    p.add_argument("path", help="model folder, checkpoint (step_* folder), run directory or LoRA .safetensors file")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: automatic)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("export", help="turn a trainer checkpoint into a model folder",
                       description="Write a dfm model folder (model_index.json, transformer/, text_encoder/, vae/, "
                                   "config.yaml) from a trainer checkpoint, with the EMA weights unless --no-ema. "
                                   "Sampling defaults come from the training config unless set here. A `dfm "
                                   "train-vae` run directory exports its finished VAE (RUN/model) instead: the only "
                                   "way a trained model reaches the repository's models/ folder.")
    p.add_argument("checkpoint", help="a step_* folder, its checkpoints/ folder or the run directory (latest); or "
                   "a train-vae run directory")
    p.add_argument("out", help="the model folder to write (new or empty)")
    p.add_argument("--no-ema", action="store_true", help="export the trained weights instead of the EMA")
    p.add_argument("--lora-only", action="store_true", help="a LoRA run: write only its adapter, as OUT.safetensors")
    p.add_argument("--format", default="diffusers", choices=["diffusers", "comfyui"], help="with --lora-only: "
                   "diffusers (PEFT keys + metadata, as WanPipeline.save_lora_weights) or comfyui (original Wan keys)")
    p.add_argument("--force", action="store_true", help="replace OUT if it is a model folder that dfm export wrote "
                   "(atomically); any other non-empty folder is refused")
    p.add_argument("--sampler", default=None, help="default sampler (SPACE:METHOD)")
    p.add_argument("--steps", type=int, default=None, help="default steps (training: sampling.steps)")
    p.add_argument("--guidance", type=float, default=None, help="default guidance (training: sampling.guidance_scale)")
    p.add_argument("--shift", type=float, default=None, help="default flow shift (training: sampling.shift)")
    p.add_argument("--frames", type=int, default=None, help="default frames (training: data.num_frames)")
    p.add_argument("--height", type=int, default=None, help="default height (training: data.size)")
    p.add_argument("--width", type=int, default=None, help="default width (training: data.size)")
    p.add_argument("--fps", type=float, default=None, help="default fps (training: data.fps or sampling.fps)")
    p.set_defaults(func=cmd_export)

