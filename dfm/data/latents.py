"""LatentDataset: a dataset encoded once by `dfm preprocess` (VAE latents and text embeddings on disk), so training
reads latents instead of decoding and encoding videos every step.

    from dfm.data import LatentDataset, collate
    data = LatentDataset("latents/digits")
    item = data[0]   # {"latents": [C, f, h, w], "context": [L, D], "context_mask": [L] bool, "caption": str, "id": int}
    data.bucket_keys # one latent shape per item (for BucketBatchSampler / the trainer's shape buckets)
    data.vae, data.text_encoder   # what made the latents and embeddings (dicts recorded by dfm preprocess)

The folder (written by dfm/preprocess.py; the names below are the one definition of the format):

    index.json                  {"format", "settings": {data, vae, text_encoder, shard_size, ...},
                                 "context_length": L or null, "samples": {id: {"shard", "caption", "latent_shape",
                                 "context_tokens", "source"}}, "failed": [...], "skipped": [...]}
    shard_00000.safetensors     per sample: "<id>.latents" [C, f, h, w] float32, and with a text encoder
                                "<id>.context" [l, D] float32, "<id>.context_mask" [l] bool, "<id>.pooled" [P]
                                (CLIP only); its header metadata holds the shard's own record (samples, failures)

A context row is stored as the encoder's cache holds it (`FrozenTextEncoder.rows`): only the l real tokens when
the encoder's padding is zeros (UMT5 as Wan, the small encoder), else all L positions; items are zero-padded back
to L = `context_length`, so every item has the same [L, D] and the batch equals what the encoder returns.
Without a text encoder (`--text-encoder none`) items have no context, only the caption.

Shards are opened lazily (memory-mapped by safetensors) and only the tensors of the requested item are read.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from dfm.errors import UserError, first_line

FORMAT = "dfm-latents-1"
INDEX = "index.json"
SHARD = "shard_{:05d}.safetensors"


class LatentDataError(UserError, ValueError):
    """A latent folder that is missing, incomplete or corrupt; the message names the file and the fix."""


def _reason(error: BaseException) -> str:
    """"TypeName: first line of the message", for one-line errors."""
    text = first_line(error, empty="")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def tensor_key(sample_id: int, name: str) -> str:
    """The safetensors key of one tensor of one sample: "<id>.<name>" (latents, context, context_mask, pooled)."""
    return f"{sample_id}.{name}"


def read_index(folder) -> dict:
    """index.json of a latent folder, checked for the fields LatentDataset needs."""
    folder = Path(folder)
    path = folder / INDEX
    fix = f"run `dfm preprocess ... --out {folder}` (it resumes and rewrites the index)"
    if not folder.is_dir():
        raise LatentDataError(f"latent folder {folder} not found; {fix}")
    if not path.is_file():
        raise LatentDataError(f"{folder} has no {INDEX}; {fix}")
    try:
        index = json.loads(path.read_text())
        if index.get("format") != FORMAT or not isinstance(index["samples"], dict):
            raise ValueError(f"format {index.get('format')!r}, expected {FORMAT!r}")
        for sample_id, record in index["samples"].items():
            lacking = [key for key in ("shard", "latent_shape", "caption") if key not in record]
            if lacking:
                raise KeyError(f"sample {sample_id} has no {lacking[0]}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LatentDataError(f"{path} is corrupt ({_reason(e)}); "
                              f"{fix}") from None
    return index


class LatentDataset(Dataset):
    """Items of a folder written by `dfm preprocess` (see the module docstring for the layout).

    folder: the --out folder of dfm preprocess.
    max_open: shards kept open at once (least recently used are closed).
    Item: {"latents": [C, f, h, w] float32, "context": [L, D] float32, "context_mask": [L] bool, "pooled": [P]
    (CLIP encoders only), "caption": str, "id": int (the index of the sample in the source dataset)}.
    """

    def __init__(self, folder, max_open: int = 8):
        self.folder = Path(folder)
        index = read_index(self.folder)
        self.settings = index.get("settings", {})
        self.vae, self.text_encoder = self.settings.get("vae"), self.settings.get("text_encoder")
        self.context_length: Optional[int] = index.get("context_length")
        self.ids = sorted(int(i) for i in index["samples"])
        self.records = [index["samples"][str(i)] for i in self.ids]
        self.captions = [r["caption"] for r in self.records]
        self.bucket_keys = [tuple(r["latent_shape"]) for r in self.records]  # [C, f, h, w] per item
        missing = sorted({r["shard"] for r in self.records if not (self.folder / r["shard"]).is_file()})
        if missing:
            raise LatentDataError(f"{self.folder} lacks {len(missing)} shard file(s) listed in {INDEX} (e.g. "
                                  f"{missing[0]}); re-run `dfm preprocess ... --out {self.folder}` to write them")
        self.max_open = int(max_open)
        self._open: OrderedDict = OrderedDict()  # shard name -> safe_open handle

    def __len__(self) -> int:
        return len(self.records)

    def __getstate__(self):  # DataLoader workers open their own handles
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def _shard(self, name: str):
        from safetensors import safe_open

        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        handle = safe_open(str(self.folder / name), framework="pt", device="cpu")
        self._open[name] = handle
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return handle

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} items")
        record, sample_id = self.records[index], self.ids[index]
        try:
            shard = self._shard(record["shard"])
            names = set(shard.keys())
            tensors = {name: shard.get_tensor(tensor_key(sample_id, name))
                       for name in ("latents", "context", "context_mask", "pooled")
                       if tensor_key(sample_id, name) in names}
            if "latents" not in tensors:
                raise KeyError(f"no tensor {tensor_key(sample_id, 'latents')}")
        except Exception as e:  # unreadable header or data, a missing tensor
            raise LatentDataError(f"shard {self.folder / record['shard']} is corrupt or incomplete ({_reason(e)}); "
                                  f"delete it and re-run `dfm preprocess ... --out {self.folder}` to rewrite it") from None
        item = {"latents": tensors["latents"], "caption": record["caption"], "id": sample_id}
        if "context" in tensors:
            context, mask = tensors["context"], tensors["context_mask"]  # [l, D], [l]
            length = self.context_length or context.shape[0]
            item["context"] = torch.cat([context, context.new_zeros(length - context.shape[0], context.shape[1])])
            item["context_mask"] = torch.cat([mask, mask.new_zeros(length - mask.shape[0])])  # [L]
        if "pooled" in tensors:
            item["pooled"] = tensors["pooled"]
        return item
