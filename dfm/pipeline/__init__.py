"""Text-to-video generation: model folders, the pipeline, and `dfm generate / info / export`.

    pipe = load_pipeline("models/wan_flow_digits")            # a dfm model folder, or a diffusers Wan 2.1 folder
    out = pipe.generate(["the digit 3 moves up"], seed=0)     # out.videos [B, 3, F, H, W] in [-1, 1], out.nfe, ...

    dfm generate "the digit 3 moves up" --model models/wan_flow_digits --out digit3.mp4
    dfm export runs/wan/checkpoints/step_00010000 models/wan_flow_digits      # trainer checkpoint -> model folder
    dfm info models/wan_flow_digits

One generation (`Pipeline.generate`):

    1. text:    (context, mask) of the prompts, and of the negative prompts or the model's null conditioning
                (the empty prompt zero-padded, or zeros), padded to one length: the two CFG branches
    2. noise:   eps [B, C, f, h, w], sample b drawn from its own torch.Generator seeded by seeds[b], so a batch
                of 4 gives the same videos as 4 runs of 1; the same generators drive stochastic samplers
    3. sample:  `guided_sample`: CFGDenoiser (both branches in one batched forward) around the model's EDM denoiser
                D(x, sigma) (DiffusionModule.denoise: flow models through the exact x0 = x_s - s v), then any sampler
                of either space through the exact adapters of dfm.diffusion.paths: `edm:NAME` (samplers.SAMPLERS)
                integrates in sigma, `flow:NAME` (samplers.FLOW_SAMPLERS) in flow time s, a bare NAME in the
                model's own space first. The grid is the model's (by default flow: shifted s from 1; EDM:
                Karras) or `grid=` (dfm.diffusion.schedules), seen by the other space through sigma = s / (1 - s);
                an EDM-space sampler takes the first step from s ~ 1 in closed form (see guided_sample). Guidance
                rescale and a guidance interval apply inside CFGDenoiser
    4. decode:  the VAE (or the identity, in pixel space) -> videos in [-1, 1]

The trainer's validation videos are `Pipeline.generate` on the model being trained (dfm.training.trainer,
`Trainer.validation_pipeline`), with the settings `dfm export` writes into the folder: a model folder reproduces
its validation videos.

A dfm model folder:

    model_index.json   {"format": "dfm", "arch": "wan" | "dit", "paradigm": "flow" | "edm", "diffusion": {grid,
                        timestep_scale, sigma_data, sigma_min, sigma_max, rho, ...}, "text": {"null", "mask", "max_length"},
                        "defaults": {num_frames, height, width, fps, steps, sampler, guidance_scale, shift,
                        negative_prompt}, "source": {...}}
    transformer/       WAN: diffusers' layout (WanModel.save_pretrained); DiT: config.json (DiTConfig) and
                       model.safetensors
    text_encoder/      SmallTextEncoder.save_pretrained, or a frozen Hugging Face encoder with its tokenizer
    vae/               the VAE's save_pretrained ("identity": config.json only)
    config.yaml        the training config, for the record

A diffusers Wan 2.1 text-to-video folder (model_index.json with "_class_name": "WanPipeline") loads with Wan's
defaults: UniPC (order and variant from scheduler/scheduler_config.json) on diffusers' flow-sigma grid, shift
from the scheduler config's flow_shift (Wan's t2v default 5.0 where it has none; diffusers' Wan example uses 5.0
at 720p and 3.0 at 480p: --shift), guidance 5.0, Wan's negative prompt, 81 frames at 480x832, 16 fps, 50 steps.
Wan and diffusers feed the transformer integer timesteps (int(1000 s)) under UniPC / DPM-Solver schedulers while
the solver uses the exact s; such folders do the same. The text encoder attends to the real tokens and the
transformer to all 512 (zero-padded) tokens.

The rest of the Wan family (2.1 I2V and FLF2V, 2.2 A14B two experts, TI2V-5B) loads from its diffusers folders
through `wan_family.py`, which registers itself in folders.FAMILY_LOADERS; `Pipeline.generate(..., image=,
last_image=, guidance_scale_2=)` takes its inputs (see that module's docstring).

Prompts longer than the text encoder's max_length are an error (the message gives the token count and the limit),
not a silent truncation: a cut-off prompt changes what is asked for.

The package: `pipeline.py` (the runtime: Pipeline.generate and its result), `folders.py` (the whole folder format:
its constants, loading dfm model folders, Wan 2.1 folders and trainer checkpoints, `save_pipeline`, export, info)
and `commands.py` (`dfm generate / info / export`). Imports run commands -> folders -> pipeline.
"""

from dfm.pipeline.pipeline import DEFAULT_KEYS, Generation, Pipeline, PipelineError, count_tokens
from dfm.pipeline.folders import (
    DEFAULT_MODEL,
    FORMAT_VERSION,
    WAN_DEFAULTS,
    WAN_NEGATIVE_PROMPT,
    WAN_SCHEDULERS,
    WAN_TEXT_LENGTH,
    IntegerTimesteps,
    export_checkpoint,
    load_pipeline,
    pipeline_from_checkpoint,
    save_pipeline,
    wan_scheduler_settings,
)
from dfm.pipeline.info import describe
from dfm.pipeline import wan_family  # noqa: F401  registers the Wan I2V / FLF2V / 2.2 folder layouts
from dfm.pipeline import conditioned  # noqa: F401  registers image-to-video of dfm's own conditioned models
from dfm.pipeline.commands import add_commands  # dfm.cli registers generate / info / export through it

__all__ = [
    "DEFAULT_KEYS", "DEFAULT_MODEL", "FORMAT_VERSION", "WAN_DEFAULTS", "WAN_NEGATIVE_PROMPT", "WAN_SCHEDULERS",
    "WAN_TEXT_LENGTH", "Generation", "IntegerTimesteps", "Pipeline", "PipelineError", "add_commands", "count_tokens",
    "describe", "export_checkpoint", "load_pipeline", "pipeline_from_checkpoint", "save_pipeline",
    "wan_scheduler_settings",
]
