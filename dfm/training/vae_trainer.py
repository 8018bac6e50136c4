"""Training and evaluation of dfm's causal video VAE (dfm/vae.py) on Moving Digits: `dfm train-vae`, `dfm eval-vae`.

    dfm train-vae --config configs/vae_digits.yaml [--resume] [--dry-run] [key=value ...]
    dfm eval-vae --model models/vae_digits          # held-out PSNR and the compression ratio
"""

from __future__ import annotations

import math
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from dfm.checkpoint import (CheckpointError, list_checkpoints, load_newest_intact, resume_candidates, run_config,
                            save_checkpoint)
from dfm.config import ConfigError, config_yaml, load_config, save_config, to_dict
from dfm.data import MovingDigits
from dfm.distributed import derive_seed
from dfm.errors import first_line
from dfm.training.config import TrainingError
from dfm.training.data import GlobalOrder, StepBatches, collate_batch
from dfm.training.logging import Logger
from dfm.training.optim import lr_at
from dfm.training.runs import (RUN_ENTRIES, StopSignals, check_fresh, check_outside_models, move_aside, run_dir_of,
                              supersede)
from dfm.vae import (CausalVAE, CausalVAEConfig, VAEError, _read_json, _write_json, check_latent_shape,
                     fit_latent_stats, load_vae)


# ------------------------------------------------------------------------------------------------ training


@dataclass
class VAEDataConfig:
    num_frames: int = 9  # 1 + temporal_factor * n
    size: int = 16
    num_digits: int = 1
    colors: Optional[list[str]] = None
    bounce: bool = False
    length: int = 10_000  # items per epoch
    shuffle: bool = True


@dataclass
class VAELossConfig:
    """loss = l1 |x^ - x| + l2 (x^ - x)^2 + gradient |D x^ - D x| + kl KL(q(z|x) || N(0, I)), each a mean over
    elements (D: finite differences along time, height and width, a simple perceptual-free sharpness term)."""

    l1: float = 1.0
    l2: float = 0.0
    gradient: float = 0.0
    kl: float = 1e-4


@dataclass
class VAEOptimConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr: float = 0.0
    grad_clip: float = 1.0  # 0: no clipping


@dataclass
class VAERunConfig:
    max_steps: int = 1000
    batch_size: int = 16
    output_dir: str = "runs/vae"  # a folder that already holds a run is refused (dfm/training/runs.py)
    overwrite: bool = False  # a fresh run into output_dir moves the run there aside to <output_dir>.old-<time>
    save_to: Optional[str] = None  # the final model folder; default OUTPUT/model (never models/: `dfm export` it)
    init_from: Optional[str] = None  # a VAE folder whose weights (and latent mean/std) start a fresh run
    # false: fine-tune the decoder only. The encoder, hence the latents, their mean/std and every diffusion model
    # trained on them, stay exactly as they are; only the pictures decoded from latents get sharper.
    train_encoder: bool = True
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200  # 0: only at the end
    keep_checkpoints: int = 2  # 0 keeps all
    stats_clips: int = 512  # training clips for the latent mean/std
    eval_clips: int = 64  # held-out clips for the final PSNR (0: skip)
    threads: int = 0  # torch threads; 0: torch's default
    max_minutes: float = 0.0  # stop (with a checkpoint and the model) after this much wall time; 0: no limit
    progress: bool = True
    tensorboard: bool = False


@dataclass
class VAETrainConfig:
    model: CausalVAEConfig = field(default_factory=CausalVAEConfig)
    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    optim: VAEOptimConfig = field(default_factory=VAEOptimConfig)
    train: VAERunConfig = field(default_factory=VAERunConfig)


def check_vae_config(cfg: VAETrainConfig) -> None:
    """Cross-field checks; raises ConfigError."""
    try:
        cfg.model.check()
        m = cfg.model
        check_latent_shape(cfg.data.num_frames, cfg.data.size, cfg.data.size, m.latent_channels, m.temporal_factor,
                           m.spatial_factor, f"a {m.temporal_factor}x{m.spatial_factor}x{m.spatial_factor} VAE")
    except VAEError as e:
        raise ConfigError(f"{e} (data.num_frames={cfg.data.num_frames}, data.size={cfg.data.size})") from None
    t = cfg.train
    for key, value in [("train.max_steps", t.max_steps), ("train.batch_size", t.batch_size),
                       ("train.log_every", t.log_every)]:
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in [("train.checkpoint_every", t.checkpoint_every), ("train.stats_clips", t.stats_clips),
                       ("train.eval_clips", t.eval_clips), ("train.threads", t.threads),
                       ("train.max_minutes", t.max_minutes), ("train.keep_checkpoints", t.keep_checkpoints),
                       ("loss.kl", cfg.loss.kl), ("optim.grad_clip", cfg.optim.grad_clip)]:
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")


def vae_loss(recon: torch.Tensor, video: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
             weights: VAELossConfig) -> dict[str, torch.Tensor]:
    """The terms of `VAELossConfig` and their weighted sum "loss" (scalars)."""
    err = recon - video
    terms = {"l1": err.abs().mean(), "mse": err.pow(2).mean()}
    # KL(N(mean, var) || N(0, 1)) per latent element (Kingma & Welling 2014, appendix B)
    terms["kl"] = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    loss = weights.l1 * terms["l1"] + weights.l2 * terms["mse"] + weights.kl * terms["kl"]
    if weights.gradient:
        diffs = [(err.diff(dim=d).abs().mean()) for d in (2, 3, 4) if err.shape[d] > 1]
        terms["gradient"] = sum(diffs) / max(len(diffs), 1)
        loss = loss + weights.gradient * terms["gradient"]
    terms["loss"] = loss
    return terms


def psnr(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Per-clip PSNR in dB of [B, 3, F, H, W] videos in [-1, 1], on the [0, 1] scale (peak 1); capped at 100 dB."""
    mse = ((recon.float() - video.float()) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)  # [B]
    return 10 * torch.log10(1.0 / mse)


def _digits(cfg_data: VAEDataConfig, split: str, length: int, seed: int):
    return MovingDigits(split=split, num_frames=cfg_data.num_frames, size=cfg_data.size,
                        num_digits=cfg_data.num_digits, colors=cfg_data.colors, bounce=cfg_data.bounce,
                        length=length, seed=seed)


VAE_RUN_ENTRIES = (*RUN_ENTRIES, "model", "eval.json")  # what `dfm train-vae` writes into its output_dir


def _resolve_resume(out: Path, resume: Optional[str]) -> tuple[Optional[dict], Path]:
    """(the checkpoint to continue from, or None; the run folder): the newest intact checkpoint of the run, which
    continues where it was read from (PATH's run directory)."""
    if resume is None:
        return None, out
    if resume == "latest":
        candidates, explicit = list_checkpoints(out / "checkpoints")[::-1], False
        if not candidates:
            print(f"dfm: --resume: no checkpoint under {out / 'checkpoints'}; starting from step 0", file=sys.stderr)
            return None, out
    else:
        candidates, explicit = resume_candidates(resume)
        out = run_dir_of(candidates[0]) or out
    notice = lambda msg: print(f"dfm: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    return load_newest_intact(candidates, explicit, notice), out


def train_vae(cfg: VAETrainConfig, resume: Optional[str] = None) -> dict:
    """Train a CausalVAE on Moving Digits; returns {"step", "loss", "model", "checkpoint", "eval"}.

    The batch of step k is the global samples [kB, (k+1)B) in a per-epoch permutation and its posterior noise
    comes from a generator seeded by (seed, k), so `resume` (None, "latest" or a path) continues exactly, in the
    run folder it was read from. At the end the latent mean/std are measured on `train.stats_clips` training clips
    and the model is saved with save_pretrained to `train.save_to` (default OUTPUT/model); the held-out PSNR goes to
    OUTPUT/eval.json. A fresh run never goes into a folder holding a run (train.overwrite=true moves it aside), and
    nothing goes into the repository's models/ (`dfm export RUN models/NAME` puts a trained VAE there).
    """

    check_vae_config(cfg)
    t = cfg.train
    check_outside_models(t.output_dir, "train.output_dir")
    if t.save_to:
        check_outside_models(t.save_to, "train.save_to")
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    ckpt, out = _resolve_resume(Path(t.output_dir), resume)
    held = [] if resume is not None else check_fresh(out, t.overwrite, f"dfm train-vae --config {out / 'config.yaml'} "
                                                     f"--resume", VAE_RUN_ENTRIES)
    t.output_dir, t.overwrite = str(out), False
    ckpt_path = ckpt["path"] if ckpt else None
    start = int(ckpt["step"]) if ckpt else 0
    run_id = ckpt["state"].get("run") if ckpt else uuid.uuid4().hex[:16]

    torch.manual_seed(derive_seed(t.seed, 0xAE))
    vae = CausalVAE(cfg.model)
    if t.init_from and not ckpt:
        start_from = load_vae(t.init_from)
        if not isinstance(start_from, CausalVAE) or start_from.config != vae.config:
            raise VAEError(f"train.init_from={t.init_from} is not a causal VAE with this config's model section; "
                           f"copy the model section from its config.json")
        vae.load_state_dict(start_from.state_dict())
    if not t.train_encoder:
        if not t.init_from:
            raise VAEError("train.train_encoder=false fine-tunes a trained decoder: set train.init_from to a VAE folder")
        vae.encoder.requires_grad_(False)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    if ckpt:
        try:
            vae.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{ckpt_path} does not match this config ({first_line(e)[:120]}); "
                                  f"resume with {ckpt_path / 'config.yaml'}") from None
    # every check has passed: only now is the run folder written
    if held:
        print(f"dfm: train.overwrite=true: the run that was in {out} moved to {move_aside(out, held)}", file=sys.stderr)
    later, dest = supersede(out / "checkpoints", start) if ckpt else ([], None)
    if later:
        print(f"dfm: resuming from step {start}: the later checkpoints ({', '.join(later)}) moved to {dest}",
              file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out, True, t.tensorboard, start if ckpt else None)
    save_config(cfg, out / "config.yaml")
    if ckpt:
        log.notice(f"resuming from {ckpt_path} (step {start})")
    dataset = _digits(cfg.data, "train", cfg.data.length, t.seed)
    loader = DataLoader(GlobalOrder(dataset, t.seed, cfg.data.shuffle),
                        batch_sampler=StepBatches(start, t.max_steps, t.batch_size, 1, 0, 1),
                        collate_fn=collate_batch)
    bar = None
    if t.progress and start < t.max_steps:
        from tqdm import tqdm

        bar = log.bar = tqdm(total=t.max_steps, initial=start, desc="train-vae", dynamic_ncols=True, file=sys.stderr)

    def checkpoint(step: int) -> Path:
        state = {"step": step, "batch_size": t.batch_size, "seed": t.seed, "run": run_id}
        return save_checkpoint(out / "checkpoints", step, vae.state_dict(), optimizer=optimizer.state_dict(),
                               state=state, extra_files={"config.yaml": config_yaml(cfg)},
                               keep=t.keep_checkpoints)

    step, last, window, t0, began = start, {}, [], time.perf_counter(), time.perf_counter()
    last_ckpt = ckpt_path
    vae.train()
    stop = 0
    with StopSignals(torch.device("cpu")) as signals:
        for batch in loader:
            lr = lr_at(step, cfg.optim, t.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            video = batch["video"]  # [B, 3, F, H, W]
            recon, mean, logvar = vae(video, generator=torch.Generator().manual_seed(derive_seed(t.seed, step, 1)))
            terms = vae_loss(recon, video, mean, logvar, cfg.loss)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
            loss = float(terms["loss"].detach())
            if not math.isfinite(loss) or not math.isfinite(grad_norm):
                raise TrainingError(f"loss {loss} / gradient norm {grad_norm} at step {step + 1}: "
                                    f"training stopped; lower optim.lr (now {cfg.optim.lr:g}) or loss.kl")
            optimizer.step()
            step += 1
            window.append({k: float(v.detach()) for k, v in terms.items()})
            if bar is not None:
                bar.update(1)
            out_of_time = t.max_minutes > 0 and time.perf_counter() - began > 60 * t.max_minutes
            if step % t.log_every == 0 or step == t.max_steps or out_of_time:
                rate = len(window) / max(time.perf_counter() - t0, 1e-9)
                last = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                last["psnr"] = float(10 * math.log10(4.0 / max(last["mse"], 1e-10)))  # of the batch mean MSE
                log.metrics({"step": step, **last, "lr": lr, "grad_norm": grad_norm, "steps_per_s": rate,
                             "samples_per_s": rate * t.batch_size, "time": time.time()})
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", psnr=f"{last['psnr']:.1f}")
                window, t0 = [], time.perf_counter()
            stop = signals.agreed()  # SIGINT / SIGTERM: this step's checkpoint, then stop (--resume continues)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.max_steps or out_of_time or stop:
                last_ckpt = checkpoint(step)
            if stop:
                log.notice(f"{signals.name(stop)}: saved a checkpoint at step {step}; stopping (--resume continues)")
                break
            if out_of_time:
                log.notice(f"train.max_minutes={t.max_minutes:g} reached at step {step}; stopping")
                break
    log.close()
    if stop:
        return {"step": step, "loss": last.get("loss"), "model": None, "checkpoint": str(last_ckpt), "signal": stop}

    vae.eval()
    if t.train_encoder:  # a frozen encoder keeps the statistics it came with
        stats_set = _digits(cfg.data, "train", max(1, t.stats_clips), t.seed + 1)
        stats_loader = DataLoader(stats_set, batch_size=t.batch_size, collate_fn=collate_batch_videos)
        fit_latent_stats(vae, (b for b in stats_loader))
    target = Path(t.save_to) if t.save_to else out / "model"
    trained_on = {k: v for k, v in to_dict(cfg.data).items() if k in ("num_frames", "size", "num_digits", "colors",
                                                                       "bounce")}
    vae.save_pretrained(target, extra={"trained_on": {**trained_on, "steps": step}})
    result = {"step": step, "loss": last.get("loss"), "model": str(target),
              "checkpoint": str(last_ckpt) if last_ckpt else None}
    if t.eval_clips:
        report = evaluate_vae(vae, cfg.data.num_frames, cfg.data.size, clips=t.eval_clips,
                              batch_size=t.batch_size, num_digits=cfg.data.num_digits, colors=cfg.data.colors,
                              bounce=cfg.data.bounce)
        _write_json(out / "eval.json", report)
        result["eval"] = report
    return result


def collate_batch_videos(items: list[dict]) -> torch.Tensor:
    return torch.stack([it["video"] for it in items])


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_vae(vae: nn.Module, num_frames: int, size: int, *, clips: int = 64, batch_size: int = 16,
                 seed: int = 0, num_digits: int = 1, colors: Optional[list[str]] = None, bounce: bool = False,
                 chunk: Optional[int] = None, tile: Optional[int] = None, overlap: Optional[int] = None) -> dict:
    """Reconstruction quality on held-out Moving Digits clips (split="test": digit images never trained on).

    psnr: mean over clips of the per-clip PSNR (dB, [0, 1] scale); psnr_first_frame: frame 0 only (the image
    path); compression_ratio: pixels * 3 / latent elements."""
    shape = vae.latent_shape(num_frames, size, size)
    data = MovingDigits(split="test", num_frames=num_frames, size=size, num_digits=num_digits, colors=colors,
                        bounce=bounce, length=clips, seed=seed)
    scores, first, mses, enc_s, dec_s = [], [], [], 0.0, 0.0
    for video in DataLoader(data, batch_size=batch_size, collate_fn=collate_batch_videos):
        t0 = time.perf_counter()
        z = vae.encode(video, chunk=chunk, tile=tile, overlap=overlap)
        t1 = time.perf_counter()
        recon = vae.decode(z, chunk=chunk, tile=tile, overlap=overlap)
        t2 = time.perf_counter()
        enc_s, dec_s = enc_s + t1 - t0, dec_s + t2 - t1
        scores.append(psnr(recon, video))
        first.append(psnr(recon[:, :, :1], video[:, :, :1]))
        mses.append(((recon - video) / 2).pow(2).flatten(1).mean(1))
    scores, first, mses = torch.cat(scores), torch.cat(first), torch.cat(mses)
    pixels = 3 * num_frames * size * size
    return {
        "psnr": float(scores.mean()), "psnr_min": float(scores.min()), "psnr_first_frame": float(first.mean()),
        "mse": float(mses.mean()), "clips": clips, "num_frames": num_frames, "size": size,
        "latent_shape": list(shape), "compression_ratio": pixels / math.prod(shape),
        "encode_ms_per_clip": 1000 * enc_s / clips, "decode_ms_per_clip": 1000 * dec_s / clips,
        "chunk": chunk, "tile": tile, "split": "test", "seed": seed,
    }


def format_report(report: dict, model: str) -> str:
    rows = [("model", model), ("clips (held-out, split=test)", report["clips"]),
            ("clip", f"{report['num_frames']} frames x {report['size']}x{report['size']}"),
            ("latent shape (C, f, h, w)", "x".join(map(str, report["latent_shape"]))),
            ("compression ratio (pixels*3 / latent elements)", f"{report['compression_ratio']:.2f}"),
            ("PSNR, mean over clips (dB)", f"{report['psnr']:.2f}"), ("PSNR, worst clip (dB)", f"{report['psnr_min']:.2f}"),
            ("PSNR, frame 0 (dB)", f"{report['psnr_first_frame']:.2f}"), ("MSE ([0, 1] scale)", f"{report['mse']:.3e}"),
            ("encode / decode ms per clip", f"{report['encode_ms_per_clip']:.1f} / {report['decode_ms_per_clip']:.1f}")]
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- CLI


def add_commands(sub) -> None:
    p = sub.add_parser("train-vae", help="train the causal video VAE on Moving Digits",
                       description="Train dfm's causal 3D-conv VAE. Settings: the dataclass defaults "
                                   "(dfm/training/vae_trainer.py VAETrainConfig), then --config, then key=value overrides "
                                   "(e.g. train.max_steps=500 model.latent_channels=8). Writes OUTPUT/metrics.jsonl, "
                                   "checkpoints, OUTPUT/model (save_pretrained, with the latent mean/std) and "
                                   "OUTPUT/eval.json.")
    p.add_argument("--config", metavar="YAML", help="a recipe such as configs/vae_digits.yaml")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue from the latest checkpoint under train.output_dir, or from PATH")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=cmd_train_vae)

    p = sub.add_parser("eval-vae", help="reconstruction PSNR and compression ratio of a VAE on held-out clips",
                       description="Encode and decode held-out Moving Digits clips (split=test) and report PSNR and "
                                   "the compression ratio as a table; --output writes it as JSON too.")
    p.add_argument("--model", required=True, metavar="FOLDER", help="a VAE folder (save_pretrained or diffusers "
                   "AutoencoderKLWan) or 'identity'")
    p.add_argument("--clips", type=int, default=64, help="held-out clips (default 64)")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default: what the model was trained on)")
    p.add_argument("--size", type=int, default=None, help="frame size (default: what the model was trained on)")
    p.add_argument("--num-digits", type=int, default=None, help="digits per clip (default: as trained, else 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out clips")
    p.add_argument("--chunk", type=int, default=None, help="latent frames per temporal chunk (default: whole clip)")
    p.add_argument("--tile", type=int, default=None, help="spatial tile size in pixels (default: no tiling)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels (default tile/4)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--output", metavar="JSON", default=None, help="where to write the JSON report")
    p.set_defaults(func=cmd_eval_vae)


def cmd_train_vae(args) -> int:
    config = args.config
    if args.resume not in (None, "latest"):
        resume_candidates(args.resume)  # not found / no checkpoint there: one line saying so
    if config is None:
        config = run_config(args.resume) if args.resume not in (None, "latest") else None
        if config is None:
            raise VAEError("dfm train-vae needs --config YAML (or --resume PATH to a run with its config.yaml)")
    cfg = load_config(VAETrainConfig, config, args.overrides)
    if args.dry_run:
        check_vae_config(cfg)
        sys.stdout.write(config_yaml(cfg))
        return 0
    result = train_vae(cfg, resume=args.resume)
    if result.get("signal"):
        print(f"dfm train-vae: stopped by {signal.Signals(result['signal']).name} at step {result['step']}; "
              f"checkpoint {result['checkpoint']} (--resume continues)", file=sys.stderr)
        return 128 + result["signal"]
    print(f"dfm: done at step {result['step']}; model {result['model']}", file=sys.stderr)
    if "eval" in result:
        print(format_report(result["eval"], result["model"]))
    return 0


def cmd_eval_vae(args) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    vae = load_vae(args.model)
    trained = {}
    if args.model != "identity" and (Path(args.model) / "config.json").is_file():
        trained = _read_json(Path(args.model) / "config.json").get("trained_on", {}) or {}
    frames = args.frames or trained.get("num_frames")
    size = args.size or trained.get("size")
    if not frames or not size:
        raise VAEError(f"{args.model} does not record the clip it was trained on; pass --frames N --size S")
    report = evaluate_vae(vae, int(frames), int(size), clips=args.clips, batch_size=args.batch_size, seed=args.seed,
                          num_digits=args.num_digits or trained.get("num_digits", 1),
                          colors=trained.get("colors"), bounce=bool(trained.get("bounce", False)),
                          chunk=args.chunk, tile=args.tile, overlap=args.overlap)
    print(format_report(report, args.model))
    if args.output:  # never into the model folder unasked (a shipped folder stays as committed)
        _write_json(Path(args.output), {"model": args.model, **report})
        print(f"dfm: wrote {args.output}", file=sys.stderr)
    return 0
