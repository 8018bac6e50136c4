"""The data order of training: the dataset a config names, and which sample each rank sees at each step.

Reproducibility (see `dfm.distributed`): the global batch of step k holds the global samples [k*B, (k+1)*B);
sample g is item perm_e[g mod N] of the dataset (e = g div N, perm_e a permutation fixed by (seed, e)); its noise,
time and conditioning dropout come from generators seeded by (seed, g). Rank r of W takes a contiguous B/W slice,
split into `grad_accum` micro-batches. So the data and noise of a step depend on neither the world size nor
interruptions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dfm.config import ConfigError
from dfm.data import DIRECTIONS, LatentDataset, MovingDigits, VideoFolder, caption_for
from dfm.data.buckets import BucketBatchSampler
from dfm.data.captions import all_paraphrases
from dfm.training.config import TrainConfig


def build_dataset(cfg: TrainConfig) -> Dataset:
    d = cfg.data
    if d.dataset == "digits":
        try:
            return MovingDigits(split="train", num_frames=d.num_frames, size=d.size, num_digits=d.num_digits,
                                colors=d.colors, bounce=d.bounce, length=d.length, seed=cfg.train.seed, ink=d.ink,
                                speed=d.speed, captions=d.captions)
        except ValueError as e:  # a bad data.* value (speed, ink, colours, ...): one line, not a traceback
            raise ConfigError(f"data: {e}") from None
    if d.dataset == "latents":
        if not d.root:
            raise ConfigError("data.dataset=latents needs data.root, a folder written by `dfm preprocess`")
        return LatentDataset(d.root)
    ds = VideoFolder(d.root, num_frames=d.frame_buckets or d.num_frames, size=d.buckets or (d.size, d.size),
                     stride=d.stride, fps=d.fps, seed=cfg.train.seed)
    if len(ds) == 0:
        raise ConfigError(f"data.root={d.root}: no usable videos (skipped: {len(ds.skipped)}); check the folder")
    return ds


def check_latent_dataset(cfg: TrainConfig, dataset, autoencoder) -> None:
    """A `dfm preprocess` folder must hold latents of this config's autoencoder (the one that decodes them: the same
    folder, or one with the same config.json) and of this config's clip size (data.num_frames, data.size)."""
    made_by = dataset.vae or {}
    made_by_spec = made_by.get("spec")
    same_folder = made_by_spec is not None and \
        Path(str(made_by_spec)).resolve() == Path(cfg.autoencoder.name).resolve()
    same_kind = made_by.get("class") == "IdentityVAE" and cfg.autoencoder.name == "identity"
    config_file = Path(cfg.autoencoder.name) / "config.json"
    same_config = "config" in made_by and config_file.is_file() and \
        json.loads(config_file.read_text()) == made_by["config"]
    unnamed = made_by_spec is None and all(  # made in Python without a spec: only the shape can be compared
        made_by.get(k, v) == v for k, v in (("channels", autoencoder.channels),
                                            ("spatial_factor", getattr(autoencoder, "spatial_factor", 1)),
                                            ("temporal_factor", getattr(autoencoder, "temporal_factor", 1))))
    if not (same_folder or same_kind or same_config or unnamed):
        raise ConfigError(f"data.root={cfg.data.root} holds latents of the VAE {made_by_spec!r}; set "
                          f"autoencoder.name={made_by_spec} (now {cfg.autoencoder.name!r})")
    d = cfg.data
    want = tuple(autoencoder.latent_shape(d.num_frames, d.size, d.size))
    stored = sorted(set(map(tuple, dataset.bucket_keys)))
    if want not in stored:
        raise ConfigError(f"data.root={cfg.data.root} holds latents of shape {stored[0]} (C, f, h, w), not {want} "
                          f"= data.num_frames={d.num_frames}, data.size={d.size}; set those to the clips it encoded")


def check_stored_text(cfg: TrainConfig, dataset, frozen_text) -> None:
    """Stored text embeddings must come from the text encoder the run samples with (same folder, same length)."""
    stored = dataset.text_encoder
    if stored is None or stored.get("type") == "small":  # no embeddings, or a small encoder's: captions are used
        return
    ours = frozen_text.describe() if frozen_text is not None else {}
    if not ours.get("path") or Path(str(stored.get("path"))).resolve() != Path(ours["path"]).resolve():
        raise ConfigError(f"data.root={cfg.data.root} stores embeddings of the text encoder {stored.get('path')!r}; "
                          f"set text.encoder to that folder (now {cfg.text.encoder!r})")


def vocabulary_captions(cfg: TrainConfig, dataset: Dataset) -> list[str]:
    """Captions that define the word vocabulary of the small text encoder."""
    if cfg.data.dataset == "digits":
        colors = [None] if not cfg.data.colors else list(cfg.data.colors)
        captions = [caption_for(digit, direction, color, bounce) for digit in range(10) for direction in DIRECTIONS
                    for color in colors for bounce in (False, True)]
        if cfg.data.captions == "paraphrase":  # the words of both template sets (held-out prompts read too)
            captions += [c for digit in range(10) for direction in DIRECTIONS for color in colors for heldout in
                         (False, True) for c in all_paraphrases(digit, direction, color, True, heldout)]
        return captions
    if cfg.data.dataset == "latents":
        return list(dataset.captions)
    return [clip.caption for clip in dataset.clips]


def keep_captions(seed: int, samples, dropout: float) -> list[bool]:
    """Conditioning dropout: sample g keeps its caption unless a uniform draw seeded by (seed, g) is < dropout."""
    return [bool(np.random.default_rng([seed, int(g), 1]).random() >= dropout) for g in samples]


class GlobalOrder(Dataset):
    """Global sample index g -> {"video", "caption", "sample": g}.

    One shape (every item alike): item perm_e[g mod N], e = g div N, where perm_e is a permutation of the N items
    fixed by (seed, e) (the identity without shuffle).
    Buckets (a dataset whose `bucket_keys` hold several shapes, e.g. VideoFolder with aspect or length buckets):
    global batch k = g div B is batch k mod n_e of epoch e = k div n_e, the epoch's full single-shape batches in the
    order `BucketBatchSampler(seed, epoch e)` gives; so every global batch (and each rank's slice of it) shares one
    shape, and the order is still a function of (seed, g) alone."""

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True, batch_size: int = 1):
        self.dataset, self.seed, self.shuffle, self.B = dataset, seed, shuffle, batch_size
        self.n = len(dataset)
        keys = getattr(dataset, "bucket_keys", None)
        self.bucketed = keys is not None and len(set(keys)) > 1
        self._epoch, self._perm, self._batches = -1, None, None
        if self.bucketed:
            self._sampler = BucketBatchSampler(keys, batch_size, shuffle=shuffle, drop_last=True, seed=seed)
            if len(self._sampler) == 0:
                raise ConfigError(f"no shape bucket holds train.batch_size={batch_size} videos (bucket sizes: "
                                  f"{sorted(len(g) for g in self._sampler.groups.values())}); lower the batch size "
                                  f"or use fewer buckets")

    def _set_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        self._epoch = epoch
        if hasattr(self.dataset, "set_epoch"):  # new random temporal crops each epoch
            self.dataset.set_epoch(epoch)
        if self.bucketed:
            self._sampler.set_epoch(epoch)
            self._batches = self._sampler.batches()
        elif self.shuffle:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def index(self, g: int) -> int:
        if self.bucketed:
            k, j = divmod(int(g), self.B)
            epoch, b = divmod(k, len(self._sampler))
            self._set_epoch(epoch)
            return self._batches[b][j]
        epoch, i = divmod(int(g), self.n)
        self._set_epoch(epoch)
        return int(self._perm[i]) if self.shuffle else i

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, g: int) -> dict:
        item = self.dataset[self.index(g)]
        out = {k: item[k] for k in ("video", "latents", "context", "context_mask") if k in item}
        return {**out, "caption": item["caption"], "sample": int(g)}


class StepBatches(Sampler):
    """The global sample indices of each micro-batch of this rank, steps start_step .. max_steps - 1."""

    def __init__(self, start_step: int, max_steps: int, batch_size: int, grad_accum: int, rank: int, world: int):
        self.start, self.stop, self.B, self.A, self.rank, self.W = start_step, max_steps, batch_size, grad_accum, rank, world
        self.m = batch_size // (world * grad_accum)

    def __iter__(self):
        for step in range(self.start, self.stop):
            first = step * self.B + self.rank * (self.B // self.W)  # this rank's contiguous slice
            for a in range(self.A):
                yield list(range(first + a * self.m, first + (a + 1) * self.m))

    def __len__(self) -> int:
        return (self.stop - self.start) * self.A


def collate_batch(items: list[dict]) -> dict:
    """Stack the tensors (video or latents, and stored text embeddings if any); captions as a list."""
    batch = {k: torch.stack([it[k] for it in items]) for k in ("video", "latents", "context", "context_mask")
             if k in items[0]}
    return {**batch, "caption": [it["caption"] for it in items], "sample": torch.tensor([it["sample"] for it in items])}
