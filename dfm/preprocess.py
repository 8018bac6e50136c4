"""`dfm preprocess`: encode a dataset once into VAE latents and text embeddings on disk, so training reads latents.

    dfm preprocess --data configs/wan_flow_digits.yaml length=2048 --vae identity --text-encoder none \\
        --out latents/digits
    dfm preprocess --data dataset=folder root=videos/ size=256 num_frames=17 --vae models/vae_digits \\
        --text-encoder models/Wan2.1-T2V-1.3B-Diffusers --out latents/videos
    python -c "from dfm.data import LatentDataset; print(LatentDataset('latents/digits')[0].keys())"

--data takes a training recipe (its data section and train.seed are used) and/or data keys (`size=32`, the same as
`data.size=32`; `train.seed=1` works too), so the latents match what `dfm train` would read from the videos.
The folder layout is defined in dfm/data/latents.py. What happens:

- Items are taken in dataset order in shards of `--shard-size` (256): shard k holds items [256k, 256k + 256).
  Videos are encoded in batches of one shape (`--batch-size`), captions through the text encoder's cache.
- Each shard is written to a temporary file and renamed into place, its record (samples, captions, failures) in
  the safetensors header, so a shard file is either complete or absent. A re-run skips complete shards (it
  checks their header) and rewrites missing or unreadable ones; index.json is rewritten after every shard.
- preprocess.json records the settings (data config, VAE and text encoder identity, shard size); a re-run with
  other settings into the same folder is refused rather than mixing latents of two models.
- A corrupt or unreadable input video never stops the run: VideoFolder leaves out files whose header it cannot
  read (warned at start), and a file that fails to decode here is warned about, recorded in its shard and
  skipped (not replaced by another clip). The summary counts both.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from dfm.config import load_config, to_dict
from dfm.data.latents import FORMAT, INDEX, SHARD, _reason, tensor_key
from dfm.errors import UserError
from dfm.io import atomic_path, save_safetensors
from dfm.text import load_text_encoder
from dfm.training.config import TrainConfig
from dfm.training.data import build_dataset
from dfm.vae import load_vae

SETTINGS = "preprocess.json"
_RECORD_KEY = "dfm"  # the safetensors metadata entry holding a shard's JSON record


class PreprocessError(UserError, ValueError):
    """Settings that conflict with an existing output folder, or data that cannot be encoded."""


# ---------------------------------------------------------------------------------------------- identities


def describe_vae(vae, spec: Optional[str] = None) -> dict:
    """What made the latents: the --vae argument, the class, the factors and the folder's config.json if any."""
    if spec is not None and Path(spec).is_dir():
        spec = str(Path(spec).resolve())
    out = {"spec": None if spec is None else str(spec), "class": type(vae).__name__,
           "channels": int(vae.channels), "temporal_factor": int(getattr(vae, "temporal_factor", 1)),
           "spatial_factor": int(getattr(vae, "spatial_factor", 1))}
    if spec is not None and (Path(spec) / "config.json").is_file():
        try:
            out["config"] = json.loads((Path(spec) / "config.json").read_text())
        except ValueError:
            pass
    return out


def _plain(data):
    """JSON round trip: tuples become lists, so stored and fresh settings compare equal."""
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def _check_settings(out: Path, settings: dict) -> None:
    """Write OUT/preprocess.json, or refuse when the one there records other settings."""
    path = out / SETTINGS
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except ValueError:
            stored = None
        if stored is not None and stored != _plain(settings):
            fresh = _plain(settings)
            differ = []
            for key in sorted(set(stored) | set(fresh)):
                old, new = stored.get(key), fresh.get(key)
                if old != new and isinstance(old, dict) and isinstance(new, dict):
                    differ += [f"{key}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
                elif old != new:
                    differ.append(key)
            raise PreprocessError(f"{out} holds latents made with other settings (differing: {', '.join(differ)}); "
                                  f"pass a new --out, or delete {out} to start again")
        if stored is not None:
            return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_plain(settings), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- shards


def _source(dataset, index: int) -> Optional[str]:
    clips = getattr(dataset, "clips", None)  # VideoFolder
    return str(clips[index].path) if clips is not None else None


def _load(dataset, index: int) -> dict:
    """Item `index`. A dataset with `load(i)` (VideoFolder) is read through it: it raises on a broken file where
    `dataset[i]` would substitute another clip, and preprocessing must skip, not duplicate."""
    load = getattr(dataset, "load", None)
    return load(index) if callable(load) else dataset[index]


def _complete_shard(path: Path, lo: int, hi: int) -> Optional[dict]:
    """The record of a complete shard for items [lo, hi), or None (absent, unreadable or another range)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            record = json.loads((handle.metadata() or {})[_RECORD_KEY])
            keys = set(handle.keys())
        if record.get("range") != [lo, hi] or any(tensor_key(int(i), "latents") not in keys for i in record["samples"]):
            raise ValueError(f"holds items {record.get('range')}, expected [{lo}, {hi})")
        return record
    except Exception as e:
        warnings.warn(f"dfm preprocess: rewriting {path} ({_reason(e)})", stacklevel=2)
        return None


def _text_rows(text_encoder, captions: list[str], batch_size: int) -> list:
    """(emb [l, D], mask [l], pooled | None) per caption; FrozenTextEncoder.rows keeps the cache's compact rows."""
    rows = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        if hasattr(text_encoder, "rows"):
            rows += text_encoder.rows(chunk)
        else:  # any encoder with the plain interface: full rows
            emb, mask = text_encoder.encode(chunk)
            rows += [(e, m, None) for e, m in zip(emb, mask)]
    return rows


@torch.no_grad()
def _encode_shard(dataset, vae, text_encoder, lo: int, hi: int, batch_size: int, device) -> tuple[dict, dict]:
    """Tensors and record of the shard holding items [lo, hi)."""
    loaded, failed = [], []
    for i in range(lo, hi):
        try:
            item = _load(dataset, i)
        except Exception as e:  # a corrupt or unreadable video: warn, record, skip
            reason = _reason(e)
            warnings.warn(f"dfm preprocess: skipping item {i} ({_source(dataset, i)}): {reason}", stacklevel=2)
            failed.append({"id": i, "source": _source(dataset, i), "reason": reason})
            continue
        loaded.append((i, item))

    tensors, samples = {}, {}
    by_shape: dict = {}  # video shape -> item positions, so each VAE batch holds one shape
    for position, (_, item) in enumerate(loaded):
        by_shape.setdefault(tuple(item["video"].shape), []).append(position)
    for shape, positions in by_shape.items():
        vae.latent_shape(*shape[1:])  # raises a UserError naming the valid frame counts and sizes
        for start in range(0, len(positions), batch_size):
            chunk = positions[start : start + batch_size]
            video = torch.stack([loaded[p][1]["video"] for p in chunk]).to(device)  # [b, 3, F, H, W]
            latents = vae.encode(video).float().cpu()  # [b, C, f, h, w]
            for p, z in zip(chunk, latents):
                i = loaded[p][0]
                tensors[tensor_key(i, "latents")] = z.clone()  # its own storage (safetensors refuses shared)
                samples[str(i)] = {"caption": loaded[p][1]["caption"], "latent_shape": list(z.shape),
                                   "video_shape": list(shape), "source": loaded[p][1].get("path")}
    if text_encoder is not None and loaded:
        rows = _text_rows(text_encoder, [item["caption"] for _, item in loaded], batch_size)
        for (i, _), (emb, mask, pooled) in zip(loaded, rows):  # copies: a repeated caption shares its cached row
            tensors[tensor_key(i, "context")] = emb.float().cpu().clone()  # [l, D]
            tensors[tensor_key(i, "context_mask")] = mask.bool().cpu().clone()  # [l]
            if pooled is not None:
                tensors[tensor_key(i, "pooled")] = pooled.float().cpu().clone()  # [P]
            samples[str(i)]["context_tokens"] = int(mask.sum())
    record = {"format": FORMAT, "range": [lo, hi], "samples": samples, "failed": failed}
    return tensors, record


def _write_index(out: Path, settings: dict, records: dict, skipped: list, context_length: Optional[int]) -> None:
    samples, failed = {}, []
    for name, record in sorted(records.items()):
        for sample_id, sample in record["samples"].items():
            samples[sample_id] = {"shard": name, **sample}
        failed += record["failed"]
    index = {"format": FORMAT, "settings": _plain(settings), "context_length": context_length,
             "shards": sorted(records), "num_samples": len(samples), "samples": samples, "failed": failed,
             "skipped": [{"source": str(path), "reason": reason} for path, reason in skipped]}
    with atomic_path(out / INDEX) as tmp:
        tmp.write_text(json.dumps(index, indent=1) + "\n")


def preprocess(dataset, vae, text_encoder, out, *, settings: Optional[dict] = None, vae_spec: Optional[str] = None,
               shard_size: int = 256, batch_size: int = 8, device="cpu", verbose: bool = True) -> dict:
    """Encode `dataset` (items with "video" [3, F, H, W] in [-1, 1] and "caption") into OUT (see the module docstring).

    vae: the dfm VAE interface (`latent_shape`, `encode`); text_encoder: a FrozenTextEncoder (load_text_encoder)
    or None for captions only; settings: extra identity to record (the CLI passes the data config); vae_spec:
    the --vae argument it was loaded from (recorded with its config.json).
    Returns a summary: {"out", "shards", "written", "reused", "samples", "failed", "skipped", "seconds"}.
    """
    if shard_size < 1 or batch_size < 1:
        raise PreprocessError(f"--shard-size and --batch-size must be >= 1, got {shard_size} and {batch_size}")
    start_time = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    if n == 0:
        raise PreprocessError("the dataset has no items; check --data")
    context_length = None
    if text_encoder is not None:
        context_length = int(getattr(text_encoder, "pad_to", None) or text_encoder.max_length)
    settings = {**(settings or {}), "vae": describe_vae(vae, vae_spec),
                "text_encoder": text_encoder.describe() if text_encoder is not None else None,
                "context_length": context_length, "shard_size": int(shard_size), "num_items": n}
    shapes = set(getattr(dataset, "bucket_keys", []) or [])  # (F, H, W) per item; else the first item's
    if not shapes:
        shapes = {tuple(dataset[0]["video"].shape[1:])}
    for shape in sorted(shapes):  # fail before any work, and before preprocess.json records these settings
        vae.latent_shape(*shape)
    _check_settings(out, settings)
    if hasattr(vae, "to"):
        vae.to(device)

    skipped = list(getattr(dataset, "skipped", []))  # files left out when the dataset was built
    records, written, reused, index_time = {}, 0, 0, 0.0
    num_shards = math.ceil(n / shard_size)
    for k in range(num_shards):
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        path = out / SHARD.format(k)
        record = _complete_shard(path, lo, hi)
        if record is not None:
            reused += 1
        else:
            tick = time.time()
            tensors, record = _encode_shard(dataset, vae, text_encoder, lo, hi, batch_size, device)
            with atomic_path(path) as tmp:  # complete or absent: temp file, then rename
                save_safetensors(tensors, str(tmp), metadata={_RECORD_KEY: json.dumps(record)})
            written += 1
            if verbose:
                print(f"dfm preprocess: {path.name} ({k + 1}/{num_shards}): {len(record['samples'])} samples, "
                      f"{len(record['failed'])} failed, {time.time() - tick:.1f} s", file=sys.stderr)
        records[path.name] = record
        # the index lists what is complete: after the first new shard, then every 30 s of work, and at the end
        if k == num_shards - 1 or (written and time.time() - index_time > 30):
            _write_index(out, settings, records, skipped, context_length)
            index_time = time.time()
    failed = sum(len(r["failed"]) for r in records.values())
    return {"out": str(out), "shards": num_shards, "written": written, "reused": reused,
            "samples": sum(len(r["samples"]) for r in records.values()), "failed": failed,
            "skipped": len(skipped), "seconds": time.time() - start_time}


# ---------------------------------------------------------------------------------------------- command line


def data_config(items: list[str]):
    """A TrainConfig from --data: at most one YAML recipe, then KEY=VALUE items (bare keys are data.KEY)."""
    sections = {f for f in TrainConfig.__dataclass_fields__}
    recipe, overrides = None, []
    for item in items:
        if "=" in item:
            key, value = item.split("=", 1)
            overrides.append(item if key.split(".")[0] in sections else f"data.{key}={value}")
        elif recipe is None:
            recipe = item
        else:
            raise PreprocessError(f"--data takes one recipe and KEY=VALUE items, got a second file {item!r}")
    return load_config(TrainConfig, recipe, overrides)


def data_settings(cfg) -> dict:
    """The data config as recorded in preprocess.json (loader-only keys left out: they do not change the latents)."""
    return {k: v for k, v in to_dict(cfg.data).items() if k not in ("shuffle", "num_workers")}


def add_commands(sub) -> None:
    p = sub.add_parser(
        "preprocess", help="encode a dataset once into latents and text embeddings (safetensors shards)",
        description="Encode a dataset into VAE latents and text embeddings on disk (safetensors shards of "
                    "--shard-size samples and index.json), so training reads latents instead of videos. Re-running "
                    "with the same --out resumes: complete shards are kept. Unreadable videos are warned about, "
                    "skipped and counted. Read the result with dfm.data.LatentDataset(OUT).")
    p.add_argument("--data", nargs="+", required=True, metavar="CONFIG_OR_KEY",
                   help="a recipe YAML (its data section and train.seed) and/or data keys such as dataset=digits "
                        "length=1024 num_frames=9 size=32, or dataset=folder root=DIR")
    p.add_argument("--vae", default="identity", metavar="PATH",
                   help="'identity' (pixel space, default), a folder saved by a dfm VAE, or a diffusers "
                        "AutoencoderKLWan folder")
    p.add_argument("--text-encoder", required=True, metavar="PATH",
                   help="a text encoder folder (dfm small encoder, T5, UMT5/Wan, CLIP; a diffusers pipeline folder "
                        "works) or 'none' to store captions only")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="the tokenizer folder if not next to the encoder")
    p.add_argument("--max-length", type=int, default=None, help="tokens per caption (default: the encoder's own)")
    p.add_argument("--text-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="precision the text encoder runs in (embeddings are stored as float32); bfloat16 halves "
                        "the memory of a large T5 on a GPU, CPUs without bf16 units are much slower with it")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; re-running resumes)")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard file (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per VAE call and captions per text call")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: automatic: the cores the machine's "
                   "load leaves free)")
    p.set_defaults(func=cmd_preprocess)


def _check_out(out: Path) -> None:
    """--out must be a folder (or creatable as one) that can be written: checked before any work."""
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PreprocessError(f"--out {out}: {parent} is a file, not a folder; choose a folder for the shards")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PreprocessError(f"--out {out}: cannot write in {parent} (read-only or no permission); choose another "
                              f"folder")


def cmd_preprocess(args) -> int:
    if args.threads < 0:
        raise PreprocessError(f"--threads must be >= 0 (0: automatic), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise PreprocessError(f"--device {device} is not a device; use cpu or cuda (cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise PreprocessError(f"--device {device} but CUDA is not available; use --device cpu (or leave it out)")
    _check_out(Path(args.out))
    cfg = data_config(args.data)
    dataset = build_dataset(cfg)  # first: a bad data config fails before any model is loaded
    vae = load_vae(args.vae)
    text_encoder = None
    if args.text_encoder.lower() != "none":
        text_encoder = load_text_encoder(args.text_encoder, tokenizer=args.tokenizer, max_length=args.max_length,
                                         device=device, dtype=getattr(torch, args.text_dtype))
    summary = preprocess(dataset, vae, text_encoder, args.out, shard_size=args.shard_size,
                         batch_size=args.batch_size, device=device,
                         settings={"data": data_settings(cfg), "seed": cfg.train.seed}, vae_spec=args.vae)
    print(f"dfm preprocess: {summary['samples']} samples in {summary['shards']} shards under {summary['out']} "
          f"({summary['written']} written, {summary['reused']} already complete); {summary['failed']} unreadable "
          f"videos skipped while encoding, {summary['skipped']} left out when scanning; {summary['seconds']:.1f} s",
          file=sys.stderr)
    if summary["samples"] == 0:
        raise PreprocessError(f"no sample could be encoded (all {summary['failed']} failed); check the videos")
    return 0
