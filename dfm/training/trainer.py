"""The trainer: one `train(config)` for every backbone x paradigm pair (DiT/EDM, WAN/flow, and the crossings).

    dfm train --config configs/wan_flow_digits.yaml train.max_steps=200 train.output_dir=runs/wan
    torchrun --nproc_per_node 2 -m dfm train --config configs/dit_edm_digits.yaml train.parallel=fsdp
    dfm train --config configs/wan_flow_digits.yaml --resume              # continue from the latest checkpoint

What is trained is a `dfm.model.DiffusionModule`: the backbone (`model.arch`: wan | dit) and the built-in text
encoder, with the loss of one paradigm (`diffusion.paradigm`: flow | edm). Video goes through the autoencoder
(`autoencoder.name`: identity, i.e. pixel space, or a VAE folder) first. The data order and the per-sample noise
make N ranks reproduce one process and `--resume` the uninterrupted run (dfm.training.data). Validation videos are
sampled by `dfm.pipeline.Pipeline.generate` as the `sampling` section says: the same path as `dfm generate` on the
exported model folder.

Output directory: config.yaml (the resolved config), metrics.jsonl (one JSON object per logged step), tb/
(TensorBoard, if installed), samples/step_XXXXXXXX/ (validation mp4s and contact_sheet.png), checkpoints/step_*/
(model, EMA, optimizer, RNG and data position, the step's loss and weight health, config.yaml, text.json; the last
`keep_checkpoints` of this run kept). One run per folder, and a resumed run writes where it was read from
(dfm/training/runs.py); nothing is written there before every setup check has passed. SIGINT / SIGTERM finish the
step, save a checkpoint and stop (`run()` returns {"signal": ...}; `dfm train` exits with 130 / 143).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dfm import distributed as D
from dfm.checkpoint import (CheckpointError, checkpoint_health, list_checkpoints, load_checkpoint,
                            load_newest_intact, resume_candidates, save_checkpoint)
from dfm.config import ConfigError, config_yaml
from dfm.errors import UserError, first_line
from dfm.model import (DiffusionModule, build_autoencoder, build_backbone, build_text_encoder, sampling_defaults,
                       sampling_recipe, set_activation_checkpointing)
from dfm.pipeline import lora as lora_runs
from dfm.pipeline.conditioned import attach as attach_conditioner
from dfm.pipeline.folders import load_pipeline
from dfm.pipeline.pipeline import SEED_LIMIT, Pipeline, PipelineError, count_tokens
from dfm.text import SmallTextEncoder, pad_context
from dfm.conditioning import in_channels
from dfm.training import init_from
from dfm.training.conditioning import (check_training_conditioning, image_encoder, loss_inputs,
                                       text_to_video_validation, validation_frames)
from dfm.training.config import TrainConfig, TrainingError, check_config, config_changes
from dfm.training.data import (GlobalOrder, StepBatches, build_dataset, check_latent_dataset, check_stored_text,
                               collate_batch, keep_captions, vocabulary_captions)
from dfm.training.logging import Logger
from dfm.training.optim import EMA, build_optimizer, lr_at
from dfm.training.runs import StopSignals, check_fresh, check_outside_models, move_aside, run_dir_of, supersede
from dfm.io import write_text_atomic
from dfm.models.context_parallel import ContextParallel, context_parallel_group, enable_context_parallel
from dfm.video import write_contact_sheet, write_video


@dataclass
class Resume:
    step: int
    path: Path
    ckpt: dict
    vocab: list[str]
    state: dict  # the trainer's state.json entries (data position, batch size, seed, run id, ...)
    out: Path  # the run folder it continues in: where the checkpoint was read from


def _vocab(path: Path) -> list[str]:
    try:
        meta = json.loads((path / "text.json").read_text())
        return meta["vocab"] if meta.get("type", "small") == "small" else []  # a frozen encoder has none to keep
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"checkpoint {path} has no readable text.json (the text vocabulary); resume from an "
                              f"earlier step_* folder or start afresh") from None


def resume_at(path: Path, out: Path, ckpt: dict | None = None) -> Resume:
    ckpt = ckpt if ckpt is not None else load_checkpoint(path)
    return Resume(int(ckpt["step"]), path, ckpt, _vocab(path), dict(ckpt["state"]), out)


def find_resume(cfg: TrainConfig, resume: str | None, log) -> Resume | None:
    """The checkpoint to continue from: None (fresh start), "latest" (under output_dir; none -> fresh), or a path
    (a step_* folder: that one; a run directory or its checkpoints/ folder: its newest). Of a run's checkpoints the
    newest intact one is taken, saying which were skipped and why. The run continues in the folder it was read
    from (PATH's run directory), whatever output_dir its config.yaml recorded."""
    if resume is None:
        return None
    out = Path(cfg.train.output_dir)
    if resume == "latest":
        candidates, explicit = list_checkpoints(out / "checkpoints")[::-1], False
        if not candidates:
            log(f"--resume: no checkpoint under {out}/checkpoints; starting from step 0")
            return None
    else:
        candidates, explicit = resume_candidates(resume)
        run = run_dir_of(candidates[0])
        if run is None:
            log(f"{candidates[0]} is not inside a run's checkpoints/ folder: the resumed run writes to "
                f"train.output_dir={out}")
        else:
            if run.resolve() != out.resolve():
                log(f"the run continues in {run}, where it was read from (its config says train.output_dir={out})")
            out = run
    ckpt = load_newest_intact(candidates, explicit, log, check=_vocab)
    found = resume_at(ckpt["path"], out, ckpt)
    changed = config_changes(found.path / "config.yaml", cfg, ignore=("train.output_dir", "train.overwrite"))
    if changed:  # often meant (max_steps, lr), sometimes not (a recipe file passed with --config): say which
        log(f"resuming from {found.path} with settings that differ from its config.yaml: {', '.join(changed)} (the "
            f"new values are used; `dfm train --resume RUN` without --config keeps the run's)")
    health = found.state.get("health")
    if isinstance(health, dict) and health.get("good") is False:
        log(f"{found.path.name} is not a good checkpoint ({health.get('why')}): expect the run to diverge again")
    return found


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """train.precision: bf16 autocast when asked or on CUDA ("auto"), fp32 otherwise."""
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else torch.float32


def autocast(device: torch.device, precision: str):
    dtype = compute_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def validation_seed(seed: int, index: int) -> int:
    """The noise seed of validation prompt `index`: a hash of (train.seed, index), in the pipeline's seed range
    [0, 2^32) (torch's CPU generator reads those bits of a seed, so the videos are those of the full hash)."""
    return D.derive_seed(seed, index, 2) % SEED_LIMIT


class ModuleText:
    """The trained small encoder as the pipeline's text encoder, run through the (maybe DDP/FSDP-wrapped) module:
    .encode(prompts) -> (context [B, L, D] fp32, mask [B, L]), under the run's autocast."""

    def __init__(self, model, text: SmallTextEncoder, device: torch.device, precision: str):
        self.model, self.tokenizer, self.device, self.precision = model, text.tokenizer, device, precision
        self.dim, self.max_length = text.dim, text.max_length

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(list(prompts), self.max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with autocast(self.device, self.precision):
            return self.model("encode", ids, mask).float(), mask  # [B, L, D], [B, L]

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer([prompt], 1 << 30)[0][0])  # <bos> + words, before truncation


class Trainer:
    """State of one run; `train(config)` is `Trainer(config).run()`."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None, info: D.DistInfo | None = None):
        self.cfg = cfg
        self.info = info if info is not None else D.init_distributed(cfg.train.device)
        check_config(cfg, self.info.world_size)
        check_training_conditioning(cfg)
        t = cfg.train
        # context parallelism: ranks [k*N, (k+1)*N) share each sample's tokens; data parallel over the k groups
        self.cp = ContextParallel(context_parallel_group(t.context_parallel)[1], t.context_parallel_mode) \
            if t.context_parallel > 1 else None
        self.dp_rank, self.dp_size = self.info.rank // t.context_parallel, self.info.world_size // t.context_parallel
        check_outside_models(t.output_dir, "train.output_dir")
        self.resume, self._held = self._open_run(resume)
        if self.resume:
            t.output_dir = str(self.resume.out)
        t.overwrite = False  # an action on the folder, not a setting to keep in config.yaml
        self.out = Path(t.output_dir)
        self.start_step = self.resume.step if self.resume else 0

        self.dataset = build_dataset(cfg)
        self.latents = cfg.data.dataset == "latents"  # items hold VAE latents (and maybe text embeddings)
        self.autoencoder = build_autoencoder(cfg.autoencoder, (cfg.data.num_frames, cfg.data.size, cfg.data.size))
        self.autoencoder.to(self.info.device)
        if self.latents:
            check_latent_dataset(cfg, self.dataset, self.autoencoder)
        init = cfg.model.init_from  # the weights to start from (a LoRA's frozen base)
        base = lora_runs.load_base(init, load_pipeline, cfg.model.expert) if init else None
        vocab = self.resume.vocab if self.resume else \
            init_from.run_vocab(cfg, base, lambda: vocabulary_captions(cfg, self.dataset))  # grown by word
        torch.manual_seed(D.derive_seed(t.seed, 0xC0DE))  # identical initial weights on every rank
        stored = self.dataset.text_encoder if self.latents else None  # embeddings of a given length on disk
        text = build_text_encoder(cfg.text, vocab, stored.get("max_length") if stored else None)
        # a frozen encoder (Hugging Face) runs outside the trained module: not in its weights, not under DDP/FSDP
        self.frozen_text = None if isinstance(text, SmallTextEncoder) else text.to(self.info.device)
        if self.latents:
            check_stored_text(cfg, self.dataset, self.frozen_text)
        if self.frozen_text is None:
            text.requires_grad_(cfg.text.trainable)
        self.images = image_encoder(cfg, self.info.device)  # CLIP of a Wan 2.1 I2V layout, frozen; else None
        channels = self.autoencoder.channels
        net = build_backbone(cfg.model, channels, text.dim,
                             in_channels(cfg.conditioning, channels, getattr(self.autoencoder, "temporal_factor", 1)))
        module = DiffusionModule(net, text if self.frozen_text is None else None, cfg.diffusion, cfg.text.null,
                                 cfg.conditioning)
        new_words = init_from.init_weights(module, base, lora_runs.init_module) if base is not None else []
        init_from.restrict_to_expert(module, cfg)  # model.expert: that expert's flow times only
        if cfg.lora.rank:  # base frozen, only the adapters (module.lora) train
            lora_runs.attach_training_lora(module, cfg.lora, compute_dtype(self.info.device, t.precision))
        if self.resume:
            try:
                lora_runs.load_run_weights(module, self.resume.ckpt["model"], D.load_full_state_dict)
            except ValueError as e:
                raise CheckpointError(f"{self.resume.path}: {e}; resume with the config it was trained with "
                                      f"({self.resume.path / 'config.yaml'})") from None
        if t.activation_checkpointing:
            set_activation_checkpointing(net)
        if self.cp is not None:
            enable_context_parallel(net, self.cp)
        module.to(self.info.device)
        blocks = [*getattr(net, "blocks", []), *([text] if self.frozen_text is None else [])] \
            if t.parallel == "fsdp" else []
        self.model = D.wrap_model(module, self.info, t.parallel, blocks)
        self.module = module  # the unwrapped DiffusionModule (FSDP2 shards it in place)
        if t.compile:
            net.compile_blocks() if hasattr(net, "compile_blocks") else net.compile()
        self.optimizer = build_optimizer(module, cfg.optim)
        self.ema = EMA(module, cfg.optim.ema_decay, cfg.optim.ema_warmup)
        if self.resume:
            ck = self.resume.ckpt
            if ck["optimizer"] is None or ck["ema"] is None:
                raise CheckpointError(f"checkpoint {self.resume.path} lacks the optimizer or EMA state needed to "
                                      f"resume; start afresh from its weights instead")
            try:
                D.load_optimizer_state(self.optimizer, ck["optimizer"])
                self.ema.load(ck["ema"])
            except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
                raise CheckpointError(f"{self.resume.path}: its optimizer or EMA state does not fit this model "
                                      f"({type(e).__name__}: {first_line(e)[:160]}); resume with the config it was "
                                      f"trained with ({self.resume.path / 'config.yaml'})") from None
            self.resume.ckpt = None  # free the CPU copies
        # RNG: per rank, and a function of the step, so a resumed run draws what the uninterrupted one would
        D.seed_process(D.derive_seed(t.seed, self.start_step), self.info.rank)
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.last_checkpoint = self.resume.path if self.resume else None
        self.pipeline, self.val_frames = self.validation_pipeline(), None
        if t.validate_every:  # a prompt the text encoder cannot read, or a bad sampler: now, not at the first validation
            try:
                self.pipeline.check_settings(self.val_prompts())
            except PipelineError as e:
                raise ConfigError(f"train.val_prompts / sampling: {e}") from None
            # a conditioned run's image-to-video validation: the given frames, read now
            self.val_frames = validation_frames(cfg, self.dataset, self.autoencoder, len(self.val_prompts()))
        # every check has passed: only now is the run folder written (the old run moved aside, later steps too)
        self.run_id = self.resume.state.get("run") if self.resume else D.broadcast_object(uuid.uuid4().hex[:16])
        if self.info.is_main:
            if self._held:
                self._notice_early(f"train.overwrite=true: the run that was in {self.out} moved to "
                                   f"{move_aside(self.out, self._held)}")
            if self.resume:
                later, dest = supersede(self.out / "checkpoints", self.start_step)
                if later:
                    self._notice_early(f"resuming from step {self.start_step}: the later checkpoints ({', '.join(later)}) "
                                       f"moved to {dest}; this run replaces them")
            if new_words and not self.resume:
                self._notice_early(f"model.init_from: the text encoder learns {len(new_words)} new words "
                                   f"({' '.join(new_words[:12])}{' ...' if len(new_words) > 12 else ''})")
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out / "config.yaml", config_yaml(cfg))
        self.log = Logger(self.out, self.info.is_main, t.tensorboard, self.start_step if self.resume else None)
        D.barrier()

    def _open_run(self, resume: str | None) -> tuple[Resume | None, list[str]]:
        """(the checkpoint to resume or None, the entries of an old run to move aside): rank 0 decides (it reads
        the folder and picks the newest intact checkpoint), every rank follows, and its error is every rank's."""
        t, found, decided = self.cfg.train, None, None
        if self.info.is_main:
            try:
                found = find_resume(self.cfg, resume, self._notice_early)
                held = [] if resume is not None else check_fresh(Path(t.output_dir), t.overwrite,
                                                                 f"dfm train --resume {t.output_dir}")
                decided = (str(found.path), str(found.out)) if found else None, held, None
            except UserError as e:
                decided = None, [], e
        if self.info.distributed:
            decided = D.broadcast_object(decided)
        where, held, error = decided
        if error is not None:
            raise error
        if where is not None and found is None:  # another rank: the checkpoint rank 0 chose
            found = resume_at(Path(where[0]), Path(where[1]))
        return found, held

    def _notice_early(self, msg):
        if self.info.is_main:
            print(f"dfm: {msg}", file=sys.stderr, flush=True)

    # -------------------------------------------------------------------------------------------- the loop

    def loader(self) -> DataLoader:
        t = self.cfg.train
        sampler = StepBatches(self.start_step, t.max_steps, t.batch_size, t.grad_accum, self.dp_rank, self.dp_size)
        return DataLoader(GlobalOrder(self.dataset, t.seed, self.cfg.data.shuffle, t.batch_size), batch_sampler=sampler,
                          collate_fn=collate_batch, num_workers=self.cfg.data.num_workers,
                          pin_memory=self.info.device.type == "cuda")

    def conditioning(self, batch: dict):
        """(text [b, L] token ids or [b, L, D] embeddings, mask [b, L], keep [b]) of a micro-batch; keep = False
        where the caption is dropped for classifier-free guidance (replaced by the empty prompt or zeros)."""
        keep = keep_captions(self.cfg.train.seed, batch["sample"], self.cfg.text.dropout)
        captions, dev, empty = batch["caption"], self.info.device, self.cfg.text.null == "empty"
        if empty:
            captions = [c if k else "" for c, k in zip(captions, keep)]
        if self.frozen_text is None:  # the trained small encoder runs inside the module
            text = self.module.text
            ids, mask = text.tokenizer(captions, text.max_length)
            return ids.to(dev), mask.to(dev), torch.tensor(keep, device=dev)
        if "context" in batch:  # embeddings stored by `dfm preprocess`; dropped rows become the empty prompt's
            context, mask = batch["context"], batch["context_mask"]
            if empty and not all(keep):
                null, null_mask = pad_context(*self.frozen_text.encode([""]), context.shape[1])
                drop = ~torch.tensor(keep)
                context, mask = context.clone(), mask.clone()
                context[drop], mask[drop] = null[0].to(context.dtype), null_mask[0]
        else:
            context, mask = self.frozen_text.encode(captions)  # [b, L, D], [b, L] (cached per prompt)
        mask = mask.to(dev) if self.cfg.text.mask else None  # text.mask=false: Wan's zero padding, attended
        return context.to(dev), mask, torch.tensor(keep, device=dev)

    def train_step(self, step: int, micro_batches: list[dict]) -> tuple[float, float, float]:
        """One optimizer update from this rank's micro-batches: (global mean loss, grad norm, lr)."""
        cfg, dev = self.cfg, self.info.device
        lr = lr_at(step, cfg.optim, cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        # DDP / FSDP average over all ranks: sum/B overall (a CP rank's gradient is N times its share: see
        # dfm.models.context_parallel, so the mean over its N ranks is the sample's gradient)
        scale = self.dp_size / cfg.train.batch_size
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for a, batch in enumerate(micro_batches):
            if "latents" in batch:  # encoded once by `dfm preprocess`
                x0 = batch["latents"].to(dev, non_blocking=True)
            else:
                with torch.no_grad():
                    x0 = self.autoencoder.encode(batch["video"].to(dev, non_blocking=True))
            ids, mask, keep = self.conditioning(batch)
            gens = D.sample_generators(cfg.train.seed, batch["sample"].tolist(), 0)
            image = loss_inputs(cfg, batch, x0, self.autoencoder, self.images)  # image conditioning
            with D.gradient_sync(self.model, a == len(micro_batches) - 1):
                with autocast(dev, cfg.train.precision):
                    per_sample = self.model("loss", x0, ids, mask, keep, gens, **image)  # [b]
                (per_sample.float().sum() * scale).backward()
            loss_sum += per_sample.detach().double().sum()
        loss = float(D.all_reduce_sum(loss_sum)) / cfg.train.batch_size / cfg.train.context_parallel  # N ranks a sample
        if not math.isfinite(loss):
            self.stop(f"loss is {loss} at step {step + 1}")
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        grad_norm = float(grad_norm.full_tensor() if D._is_dtensor(grad_norm) else grad_norm)
        if not math.isfinite(grad_norm):
            self.stop(f"the gradient norm is {grad_norm} at step {step + 1} (loss {loss:.4g})")
        self.optimizer.step()
        self.ema.update(step)
        return loss, grad_norm, lr

    def stop(self, what: str) -> None:
        """Raise TrainingError naming the last checkpoint that is really good (finite, sane weights and loss)."""
        o = self.cfg.optim
        good, newer = self.good_checkpoint()
        last = f"the last good checkpoint is {good}" if good else "no good checkpoint was written"
        if newer:
            last += f" ({newer[0].name} is not one: {newer[1]})"
        how = f" (dfm train --resume {good} optim.lr={o.lr / 10:g})" if good else ""
        raise TrainingError(f"{what}: training stopped; {last}. Try a lower optim.lr (now {o.lr:g}) or "
                            f"optim.grad_clip (now {o.grad_clip:g}){how}, or check the data")

    def run(self) -> dict:
        t = self.cfg.train
        if self.start_step >= t.max_steps:
            self.log.notice(f"already at step {self.start_step} >= train.max_steps={t.max_steps}; nothing to do")
            return {"step": self.start_step}
        if self.resume:
            self.log.notice(f"resuming from {self.resume.path} (step {self.start_step})")
            saved = self.resume.state
            if saved.get("batch_size", t.batch_size) != t.batch_size or saved.get("seed", t.seed) != t.seed:
                self.log.notice(f"the checkpoint was trained with train.batch_size={saved.get('batch_size')} and "
                                f"train.seed={saved.get('seed')}; with other values the data order from here on "
                                f"differs from that run's")
        if self.info.is_main and t.progress:
            self.log.bar = tqdm(total=t.max_steps, initial=self.start_step, desc="train", dynamic_ncols=True,
                                file=sys.stderr)
        with StopSignals(self.info.device) as signals:
            result = self._loop(signals)
        self.log.close()
        return result

    def _loop(self, signals: StopSignals) -> dict:
        t = self.cfg.train
        step, window, window_start = self.start_step, [], time.perf_counter()
        began = window_start
        micro: list[dict] = []
        last_loss = float("nan")
        for batch in self.loader():
            micro.append(batch)
            if len(micro) < t.grad_accum:
                continue
            loss, grad_norm, lr = self.train_step(step, micro)
            micro, step, last_loss = [], step + 1, loss
            window.append(loss)
            if self.log.bar is not None:
                self.log.bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                rate = len(window) / elapsed
                record = {"step": step, "loss": sum(window) / len(window), "lr": lr, "grad_norm": grad_norm,
                          "steps_per_s": rate, "samples_per_s": rate * t.batch_size,
                          "samples_seen": step * t.batch_size, "time": time.time()}
                self.log.metrics(record)
                if self.log.bar is not None:
                    self.log.bar.set_postfix(loss=f"{record['loss']:.4f}", steps_s=f"{rate:.2f}",
                                             samples_s=f"{rate * t.batch_size:.1f}")
                window, window_start = [], time.perf_counter()
            out_of_time = t.max_minutes > 0 and step % t.log_every == 0 and \
                bool(D.broadcast_object(time.perf_counter() - began > 60 * t.max_minutes))  # every rank stops alike
            stop = signals.agreed()  # a signal any rank got: every rank stops after this step
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.max_steps or out_of_time or stop:
                if stop:
                    self.log.notice(f"{signals.name(stop)}: saving a checkpoint at step {step}, then stopping")
                self.checkpoint(step, lr, loss)
            if stop:
                return {"step": step, "loss": last_loss, "checkpoint": str(self.last_checkpoint), "signal": stop}
            if t.validate_every and (step % t.validate_every == 0 or step == t.max_steps or out_of_time):
                self.validate(step)
            if out_of_time:
                self.log.notice(f"train.max_minutes={t.max_minutes:g} reached at step {step}; stopped with a "
                                f"checkpoint (--resume continues)")
                break
        return {"step": step, "loss": last_loss, "checkpoint": str(self.last_checkpoint)}

    # ------------------------------------------------------------------------------------ checkpoints

    def checkpoint(self, step: int, lr: float, loss: float | None = None) -> None:
        """Gather the full state (collective), write it atomically on rank 0, wait for it on every rank. state.json
        records the step's loss and whether the weights are finite and sane (`checkpoint_health`)."""
        t = self.cfg.train
        model_sd = D.full_state_dict(self.model)
        if self.cfg.lora.rank:  # a LoRA checkpoint holds the adapters only (the base is model.init_from)
            model_sd = {k: v for k, v in model_sd.items() if k.startswith("lora.")}
        ema_sd = {**model_sd, **self.ema.full_state_dict()}  # a complete EMA model (frozen parts as they are)
        opt_sd = D.full_optimizer_state(self.optimizer)
        path = None
        if self.info.is_main:
            text = self.module.text
            text_meta = {"type": "frozen", "encoder": self.frozen_text.describe()} if self.frozen_text is not None else \
                {"type": "small", **dataclasses.asdict(text.config), "vocab": text.tokenizer.vocab}
            extra = {"config.yaml": config_yaml(self.cfg), "text.json": json.dumps(text_meta)}
            health = checkpoint_health(model_sd, loss)
            state = {"step": step, "data_position": step * t.batch_size, "batch_size": t.batch_size,
                     "world_size": self.info.world_size, "seed": t.seed, "lr": lr,
                     "lr_schedule": self.cfg.optim.schedule, "ema_updates": step, "run": self.run_id,
                     "loss": health["loss"], "health": health}
            if self.cp is not None:  # what ran: the degree and the self-attention forwards of each kind so far
                state["context_parallel"] = {"degree": self.cp.degree, "attention_calls": dict(self.cp.calls)}
            path = save_checkpoint(self.out / "checkpoints", step, model_sd, ema=ema_sd, optimizer=opt_sd,
                                   state=state, extra_files=extra, keep=t.keep_checkpoints)
            if not health["good"]:
                self.log.notice(f"step {step}: {path.name} is not a good checkpoint ({health['why']})")
        self.last_checkpoint = Path(D.broadcast_object(str(path) if path else None))
        D.barrier()

    def good_checkpoint(self) -> tuple[Path | None, tuple[Path, str] | None]:
        """(this run's newest good checkpoint, (the newest one after it that is not good, why) or None)."""
        newer = None
        for path in reversed(list_checkpoints(self.out / "checkpoints")):
            try:
                ckpt = load_checkpoint(path)
            except CheckpointError as e:
                newer = newer or (path, f"unreadable: {getattr(e, 'why', first_line(e))}")
                continue
            if ckpt["state"].get("run") != self.run_id:
                continue
            health = ckpt["state"].get("health")  # a checkpoint of an older dfm: judged by its weights
            health = health if isinstance(health, dict) and "good" in health else checkpoint_health(ckpt["model"])
            if health["good"]:
                return path, newer
            newer = newer or (path, health.get("why", "?"))
        return None, newer

    # ------------------------------------------------------------------------------------- validation

    def val_prompts(self) -> list[str]:
        """train.val_prompts, else the captions of the first 4 training items, cut to the words the text encoder
        reads (as training reads them); a given prompt that is too long is an error at start-up instead."""
        prompts = list(self.cfg.train.val_prompts)
        if prompts:
            return prompts
        if self.cfg.data.dataset == "folder":
            captions = [c.caption for c in self.dataset.clips[:4]]
        else:
            captions = [self.dataset[i]["caption"] for i in range(min(4, len(self.dataset)))]
        return [self._fit(c) for c in captions]

    def i2v_prompts(self) -> list[str]:
        """The prompts of the image-to-video validation videos: the captions of the training items their frames
        come from (cut as val_prompts cuts them), or with train.val_images the validation prompts."""
        captions = self.val_frames[2]
        return self.val_prompts() if captions is None else [self._fit(c) for c in captions]

    def _fit(self, caption: str) -> str:
        text, cut = self.pipeline.text, caption.split()
        while len(cut) > 1 and (count_tokens(text, " ".join(cut)) or 0) > text.max_length:
            cut.pop()
        return " ".join(cut)

    def validation_pipeline(self) -> Pipeline:
        """The model as a Pipeline, as `dfm export` would write it: the `sampling` section's grid, sampler and
        guidance, the data's clip size. Under FSDP2 it runs the wrapped module (every rank samples)."""
        cfg, dev = self.cfg, self.info.device
        model = self.model if cfg.train.parallel == "fsdp" else self.module  # FSDP2 hooks need the wrapper
        text = self.frozen_text if self.frozen_text is not None else \
            ModuleText(model, self.module.text, dev, cfg.train.precision)
        defaults = sampling_defaults(cfg, cfg.data.num_frames, cfg.data.size, cfg.data.fps)
        pipe = Pipeline(model, text, self.autoencoder, arch=cfg.model.arch, paradigm=cfg.diffusion.paradigm,
                        diffusion=sampling_recipe(cfg), defaults=defaults, null=cfg.text.null, use_mask=cfg.text.mask,
                        device=dev, dtype=compute_dtype(dev, cfg.train.precision))
        attach_conditioner(pipe, cfg.conditioning)  # concat: text-to-video as the unconditioned samples (mask 0, y 0)
        return pipe

    @torch.no_grad()
    def validation_videos(self, prompts: list[str], steps: int | None = None, frames=None) -> torch.Tensor:
        """Videos [P, 3, F, H, W] in [-1, 1] for `prompts`, with fixed noise per prompt index (seeded by
        (train.seed, index), so every validation shows the same noise) — collective under FSDP2. frames:
        (first frames, last frames or None) for image-to-video."""
        seeds = [validation_seed(self.cfg.train.seed, i) for i in range(len(prompts))]
        image, last = frames if frames is not None else (None, None)
        return self.pipeline.generate(prompts, seeds=seeds, steps=steps, progress=False, image=image,
                                      last_image=last).videos

    def validate(self, step: int) -> None:
        """samples/step_N/: 00.mp4 ... and contact_sheet.png (text-to-video); a conditioned run also i2v_00.mp4 ...
        and i2v_contact_sheet.png (each row the given frame, then the video), from the same noise."""
        t = self.cfg.train
        prompts, made = self.val_prompts(), {}
        # FSDP2 needs every rank in each forward; with replicated weights rank 0 samples alone
        if t.parallel == "fsdp" or self.info.is_main or self.cp is not None:  # (a CP forward needs its group too)
            self.model.eval()
            with self.ema.swapped():
                if text_to_video_validation(self.cfg):
                    made[""] = self.validation_videos(prompts)
                if self.val_frames is not None:
                    made["i2v_"] = self.validation_videos(self.i2v_prompts(), frames=self.val_frames[:2])
            self.model.train()
        if self.info.is_main:
            folder = self.out / "samples" / f"step_{step:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for prefix, videos in made.items():
                for i, v in enumerate(videos):
                    write_video(folder / f"{prefix}{i:02d}.mp4", v, fps=self.pipeline.defaults["fps"], pad_odd=True)
                if prefix:  # each row: the given first frame, then the video
                    videos = torch.cat([torch.stack(self.val_frames[0])[:, :, None].to(videos), videos], dim=2)
                labels = self.i2v_prompts() if prefix else prompts
                write_contact_sheet(folder / f"{prefix}contact_sheet.png", videos, labels=labels)
                (folder / f"{prefix}prompts.txt").write_text("".join(p + "\n" for p in labels))
            self.log.notice(f"step {step}: validation samples in {folder}")
        D.barrier()


def train(config: TrainConfig, resume: str | None = None) -> dict:
    """Train as configured; `resume` is None, "latest" or a checkpoint path. Returns {'step', 'loss', 'checkpoint'}.

    Under torchrun every process calls this. A process group that is not yet set up is created here and destroyed
    at the end; one the caller created is used and left alone."""
    info = D.init_distributed(config.train.device)
    if config.train.threads > 0:
        torch.set_num_threads(config.train.threads)
    try:
        return Trainer(config, resume, info).run()
    finally:
        D.teardown(info)
