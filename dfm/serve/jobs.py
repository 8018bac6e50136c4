"""What `dfm serve` does with a request: the form's fields, the models it can load, one queue of generations run
one after the other by one worker thread, and the files each writes (never over an existing one).

A request is a dict of strings from the page, keyed by `Field.name`; `parse_request` turns it into typed values
(None: the model's default) and checks everything `dfm generate` checks before sampling, so bad input is one line on
the page and never a queued job. The worker then runs `Pipeline.generate`, writes the video and contact sheet with
`dfm generate`'s own `write_outputs`, and a JSON of the settings (with the equivalent `dfm generate` command) beside
them.

A new form field is one `Field` here (the page draws it, `parse_request` types it, `command_line` spells it):
a `Pipeline.generate` keyword goes in `arg`; one that acts on the pipeline instead (a LoRA file and scale through
`Pipeline.load_lora`) has `arg=None` and is applied in `Worker._run` before `generate` (and always removed after
it: the pipeline is cached across jobs). An image (kind "image") comes as a data URL the page read from a file; it
is decoded at submit, saved beside the video as STEM_image.png and passed to `generate(image=...)`, so the recorded
`dfm generate --image PATH` makes the same video.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import re
import shlex
import sys
import threading
import time
import traceback
import uuid
from itertools import count
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from dfm.diffusion.samplers import sampler_names
from dfm.errors import UserError, first_line
from dfm.io import write_text_atomic
from dfm.pipeline.commands import check_output, model_path, write_outputs
from dfm.pipeline.folders import DEFAULT_MODEL, load_pipeline
from dfm.pipeline.lora import check_lora_files, load_lora_file
from dfm.pipeline.wan_family import check_inputs
from dfm.pipeline.pipeline import SEED_LIMIT, Pipeline, PipelineError, check_seed

REPO_MODELS = Path(__file__).resolve().parents[2] / "models"  # the shipped model folders


class ServeError(UserError):
    """A bad request: the one line the page shows."""


@dataclass(frozen=True)
class Field:
    """One input of the form. kind: text | textarea | int | float | sampler | seed | model | image."""

    name: str  # the request key and the input's id
    label: str
    kind: str
    flag: str | None  # `dfm generate`'s flag (None: the positional prompt)
    arg: str | None  # Pipeline.generate's keyword (None: not passed to generate)
    default: str | None = None  # the key of Pipeline.defaults that fills the input
    hint: str = ""


FIELDS = (
    Field("model", "Model", "model", "--model", None, hint="a shipped model, or the path of a model folder"),
    Field("prompt", "Prompt", "textarea", None, "prompts"),
    Field("negative", "Negative prompt", "text", "--negative", "negative_prompt", "negative_prompt",
          "empty: the model's default"),
    Field("sampler", "Sampler", "sampler", "--sampler", "sampler", "sampler"),
    Field("steps", "Steps", "int", "--steps", "steps", "steps"),
    Field("guidance", "Guidance", "float", "--guidance", "guidance_scale", "guidance_scale", "1 = off"),
    Field("seed", "Seed", "seed", "--seed", "seed", hint=f"an integer in [0, {SEED_LIMIT - 1}]"),
    Field("frames", "Frames", "int", "--frames", "num_frames", "num_frames"),
    Field("height", "Height", "int", "--height", "height", "height"),
    Field("width", "Width", "int", "--width", "width", "width"),
    Field("lora", "LoRA file", "text", "--lora", None, hint="a .safetensors file on the server; empty: none"),
    Field("lora_scale", "LoRA scale", "float", None, None, hint="empty: 1"),  # spelled in --lora PATH:SCALE
    Field("image", "Image (first frame)", "image", "--image", "image", hint="PNG or JPEG"),
    Field("last_image", "Last image", "image", "--last-image", "last_image", hint="PNG or JPEG"),
)
IMAGES = ("image", "last_image")


def shipped_models() -> list[str]:
    """The model folders in the repository's models/ (as `models/NAME`, DEFAULT_MODEL's form), the default first."""
    found = sorted(f"models/{p.parent.name}" for p in REPO_MODELS.glob("*/model_index.json"))
    return sorted(found, key=lambda m: m != DEFAULT_MODEL)


def _number(field: Field, text: str):
    try:
        return int(text) if field.kind == "int" else float(text)
    except ValueError:
        kind = "a whole number" if field.kind == "int" else "a number"
        raise ServeError(f"{field.label} must be {kind}, got {text!r}") from None


def parse_request(data: dict) -> dict:
    """The page's fields (strings; "" = the model's default) -> typed values by Field.name, the seed drawn when
    `seed_random` is set. Raises a one-line ServeError."""
    if not isinstance(data, dict):
        raise ServeError("the request must be a JSON object of the form's fields")
    values = {}
    for f in FIELDS:
        raw = data.get(f.name, "")
        text = raw.strip() if isinstance(raw, str) else raw
        if f.kind in ("int", "float"):
            values[f.name] = None if text in ("", None) else _number(f, str(text))
        elif f.kind == "seed":
            if data.get("seed_random") or text in ("", None):
                values[f.name] = int.from_bytes(os.urandom(4), "little")
            else:
                values[f.name] = check_seed(_number(Field("seed", "Seed", "int", None, None), str(text)), "Seed")
        elif f.kind == "image":
            values[f.name] = None if text in ("", None) else decode_image(f, text)
        else:
            values[f.name] = None if text == "" else text
    if not values["prompt"]:
        raise ServeError("Prompt is empty: write what the video should show")
    values["model"] = values["model"] or DEFAULT_MODEL
    if values["lora"] is None and values["lora_scale"] is not None:
        raise ServeError("LoRA scale is set but LoRA file is empty: give the LoRA file, or clear the scale")
    if values["lora"] is not None:
        values["lora"] = str(Path(values["lora"]).expanduser().resolve())  # the recorded command runs anywhere
        values["lora_scale"] = 1.0 if values["lora_scale"] is None else values["lora_scale"]
        if not math.isfinite(values["lora_scale"]):
            raise ServeError(f"LoRA scale must be a finite number, got {values['lora_scale']}")
    return values


def decode_image(field: Field, text: str):
    """A data URL (`data:image/png;base64,...`, what the page's FileReader gives) -> an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    head, sep, payload = str(text).partition(",")
    if not (sep and head.startswith("data:") and head.endswith(";base64")):
        raise ServeError(f"{field.label}: expected an uploaded file (a base64 data URL); choose a PNG or JPEG file")
    try:
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as im:
            return im.convert("RGB")
    except (binascii.Error, OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        why = first_line(e, type(e).__name__)
        raise ServeError(f"{field.label}: cannot read the uploaded file as an image ({why}); choose a PNG or JPEG "
                         f"file") from None


def check_images(pipe: Pipeline, image, last_image) -> None:
    """The pipeline's own check of its image inputs (its conditioner's: Wan family, dfm's conditioned models)."""
    if pipe.conditioner is None:
        check_inputs(None, False, image, last_image, None)  # a text-to-video model: its one-line refusal
    else:
        pipe.conditioner.check(image, last_image, None)


def image_inputs(pipe: Pipeline) -> dict:
    """Which image inputs the pipeline takes: {"image": "needed" | "optional" | None, "last_image": ...}."""

    def takes(image, last) -> bool:
        try:
            check_images(pipe, image, last)
            return True
        except UserError:
            return False

    first, both = takes(1, None), takes(1, 1)  # (any value stands for an image: only None-ness is checked)
    return {"image": None if not (first or both) else "optional" if takes(None, None) else "needed",
            "last_image": None if not both else "optional" if first else "needed"}

def generate_kwargs(values: dict) -> dict:
    return {f.arg: values[f.name] for f in FIELDS if f.arg is not None}


class Models:
    """Loaded pipelines by model name, the last `keep` used (loading is serialised by a lock)."""

    def __init__(self, device="cpu", dtype=torch.float32, keep: int = 2):
        self.device, self.dtype, self.keep = device, dtype, keep
        self._loaded: OrderedDict[str, Pipeline] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str) -> Pipeline:
        with self._lock:
            if name not in self._loaded:
                try:
                    self._loaded[name] = load_pipeline(model_path(name), device=self.device, dtype=self.dtype)
                except (UserError, OSError) as e:
                    raise ServeError(f"Model {name}: {first_line(e)}") from None
                while len(self._loaded) > self.keep:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(name)
            return self._loaded[name]

    def describe(self, name: str) -> dict:
        """What the form shows for a model: its defaults, its samplers, the frame counts and size step it takes."""
        pipe = self.get(name)
        d = pipe.defaults

        def fits(f, h, w) -> bool:
            try:
                pipe.latent_shape(f, h, w)
                return True
            except UserError:
                return False

        frames = [f for f in range(1, 4 * d["num_frames"] + 1) if fits(f, d["height"], d["width"])]
        size_step = next((m for m in range(1, 257) if fits(d["num_frames"], m, m)), 1)
        return {"model": name, "arch": pipe.arch, "paradigm": pipe.paradigm, "samplers": sampler_names(pipe.paradigm),
                "defaults": {f.name: d[f.default] for f in FIELDS if f.default}, "frames": frames[:12],
                "frame_step": frames[1] - frames[0] if len(frames) > 1 else 1, "size_step": size_step,
                **image_inputs(pipe)}


def check(pipe: Pipeline, values: dict) -> None:
    """Everything `Pipeline.generate` checks before sampling (one-line PipelineError / SamplingError / LoRAError),
    the LoRA file read and matched against the model."""
    kw = generate_kwargs(values)
    prompts, negative, seed = kw.pop("prompts"), kw.pop("negative_prompt"), kw.pop("seed")
    image, last_image = kw.pop("image"), kw.pop("last_image")
    check_seed(seed, "Seed")
    pipe.check_settings([prompts], negative, **kw)
    check_images(pipe, image, last_image)
    if values["lora"] is not None:
        check_lora_files([values["lora"]])
        load_lora_file(pipe.transformer, values["lora"])  # read only: the keys and widths fit this model


def command_line(values: dict, settings: dict, device: str, dtype: str, out: Path) -> str:
    """The `dfm generate` command that makes the same video: every setting spelled out (none left to defaults)."""
    resolved = {"negative": settings["negative_prompt"], "sampler": settings["sampler"], "steps": settings["steps"],
                "guidance": settings["guidance_scale"], "frames": settings["num_frames"], "height": settings["height"],
                "width": settings["width"], "model": values["model"], "seed": values["seed"],
                "lora": f"{values['lora']}:{values['lora_scale']:g}" if values.get("lora") else None}
    words = ["dfm", "generate", values["prompt"]]
    for f in FIELDS:
        value = resolved.get(f.name, values.get(f.name))
        if f.flag and value is not None:
            words += [f.flag, f"{value:g}" if isinstance(value, float) else str(value)]
    extra = {"--grid": settings["grid"], "--shift": settings["shift"],
             "--guidance-rescale": settings["guidance_rescale"] or None,
             "--guidance-interval": ",".join(f"{v:g}" for v in settings["guidance_interval"])
             if settings["guidance_interval"] else None,
             "--device": None if device == "cpu" else device, "--dtype": None if dtype == "fp32" else dtype}
    for flag, value in extra.items():
        if value is not None:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(words + ["--out", str(out)])


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "video"


def reserve(folder: Path, base: str) -> Path:
    """A new name folder/STEM (STEM = base, base_2, ...) whose .mp4, .png, _image.png, _last_image.png and .json
    are all free (a stem ends in _sSEED or _sSEED_N, so no other stem is STEM_image); the .json is
    created exclusively, so two writers never get the same name and no existing file is ever replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1, 100000):
        stem = folder / (base if n == 1 else f"{base}_{n}")
        if any(stem.with_suffix(s).exists() for s in (".mp4", ".png")) or \
                any(image_path(stem, k).exists() for k in IMAGES):
            continue
        try:
            os.close(os.open(stem.with_suffix(".json"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            continue
        return stem
    raise ServeError(f"{folder} holds 99999 videos named {base}*: choose another --out-dir")


def image_path(stem: Path, key: str) -> Path:
    return stem.with_name(f"{stem.name}_{key}.png")


@dataclass
class Job:
    id: str
    values: dict
    state: str = "queued"  # queued | running | done | error
    step: int = 0
    steps: int = 0
    phase: str = ""
    error: str | None = None
    result: dict | None = None
    order: int = 0  # its place in the queue


class Worker:
    """One queue, one thread: jobs run one after the other in the order they came."""

    def __init__(self, models: Models, out_dir: Path, device: str = "cpu", dtype: str = "fp32", keep_jobs=500,
                 auto_threads: bool = True):
        self.models, self.out_dir, self.device, self.dtype = models, Path(out_dir), device, dtype
        self.auto_threads = auto_threads  # as `dfm generate` without --threads: one thread for small generations
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.keep_jobs, self.threads = keep_jobs, torch.get_num_threads()
        self._cv, self._order = threading.Condition(), count()
        self._thread = threading.Thread(target=self._loop, name="dfm-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, data: dict) -> Job:
        """Check a request fully (model loaded, settings resolved) and queue it, or raise a one-line ServeError."""
        try:
            values = parse_request(data)
            check(self.models.get(values["model"]), values)
            check_output(self.out_dir / "video.mp4", "--out-dir")
        except UserError as e:
            raise ServeError(first_line(e)) from None
        job = Job(uuid.uuid4().hex[:12], values, order=next(self._order))
        with self._cv:
            self.jobs[job.id] = job
            while len(self.jobs) > self.keep_jobs:  # forget the oldest finished ones
                old = next((k for k, j in self.jobs.items() if j.state in ("done", "error")), None)
                if old is None:
                    break
                del self.jobs[old]
            self._cv.notify()
        return job

    def status(self, job_id: str) -> dict | None:
        with self._cv:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            ahead = sum(1 for j in self.jobs.values() if j.state == "running" or
                        (j.state == "queued" and j.order < job.order))
            return {"id": job.id, "state": job.state, "ahead": ahead if job.state == "queued" else 0,
                    "step": job.step, "steps": job.steps, "phase": job.phase, "error": job.error,
                    "result": job.result}

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (job := next((j for j in self.jobs.values() if j.state == "queued"), None)):
                    self._cv.wait()
                job.state = "running"
            try:
                result = self._run(job)
                job.result, job.state = result, "done"
            except UserError as e:
                job.error, job.state = first_line(e), "error"
            except Exception as e:  # a bug: the page gets one line, the log the traceback, the server goes on
                traceback.print_exc(file=sys.stderr)
                job.error, job.state = f"internal error ({type(e).__name__}: {first_line(e, '')}); see the server " \
                                       f"log", "error"

    def _run(self, job: Job) -> dict:
        values, started = job.values, time.time()
        job.phase = "loading the model"
        pipe = self.models.get(values["model"])
        kw = generate_kwargs(values)
        prompt, seed = kw.pop("prompts"), kw.pop("seed")
        if self.device == "cpu" and self.auto_threads:
            settings = pipe.settings(kw["num_frames"], kw["height"], kw["width"], kw["steps"], kw["sampler"],
                                     kw["guidance_scale"])
            torch.set_num_threads(1 if pipe.cpu_threads(settings) else self.threads)
        job.phase = "sampling"

        def on_step(info: dict) -> None:
            job.step, job.steps = info["i"] + 1, info["steps"]

        # pipeline-level fields: the LoRA is on the cached pipeline for this job only
        adapter = pipe.load_lora(values["lora"], values["lora_scale"]) if values["lora"] else None
        try:
            out = pipe.generate(prompt, seed=seed, progress=False, callback=on_step, **kw)
        finally:
            if adapter is not None:
                pipe.unload_lora(adapter)
        job.phase = "writing the files"
        negative = out.settings["negative_prompt"]  # one per prompt: ours alone
        settings = {**out.settings, "negative_prompt": negative[0] if isinstance(negative, list) else negative}
        stem = reserve(self.out_dir, f"{slug(prompt)}_s{seed}")
        images = {}
        for key in IMAGES:  # the images given, beside the video: the command reads them back
            if values[key] is not None:
                images[key] = image_path(stem, key)
                with open(images[key], "xb") as f:  # reserve() found the name free; never replace a file
                    values[key].save(f, format="PNG")
                values[key] = str(images[key].resolve())  # the job keeps the path, not the picture
        (video,), sheet = write_outputs(out, stem.with_suffix(".mp4"))
        command = command_line(values, settings, self.device, self.dtype, Path("outputs") / f"{stem.name}.mp4")
        lora = {"lora": values["lora"], "lora_scale": values["lora_scale"]} if values["lora"] else {}
        record = {"prompt": prompt, "model": values["model"], "seed": seed, **settings, **lora,
                  **{k: p.name for k, p in images.items()}, "fps": out.fps,
                  "nfe": out.nfe, "seconds": round(out.seconds, 3), "video": video.name, "sheet": sheet.name,
                  "command": command, "started": started, "finished": time.time()}
        write_text_atomic(stem.with_suffix(".json"), json.dumps(record, indent=2) + "\n")  # over its reservation
        return {**record, "json": stem.with_suffix(".json").name}
