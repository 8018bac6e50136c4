"""Text encoders behind one interface: `encode(prompts: list[str]) -> (embeddings [B, L, D], mask [B, L])`.

This module holds the interface and the small built-in encoder for training from scratch on small data (a word
tokenizer built from the training captions plus a few transformer layers, trained with the diffusion model).
Pretrained Hugging Face encoders (T5, UMT5, CLIP) implement the same interface.

Every encoded prompt starts with a <bos> token, so the empty prompt (the unconditional branch of classifier-free
guidance) is one real token and attention over it never sees an all-masked row.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

SPECIALS = ("<pad>", "<bos>", "<unk>")
PAD, BOS, UNK = 0, 1, 2


class TextEncoder(Protocol):
    dim: int
    max_length: int

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


def words(text: str) -> list[str]:
    """Lower-case word and punctuation tokens."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


class WordTokenizer:
    """A closed vocabulary of the words in the training captions; anything else is <unk>."""

    def __init__(self, vocab: list[str]):
        if list(vocab[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def from_captions(cls, captions: Iterable[str]) -> "WordTokenizer":
        seen = sorted({w for c in captions for w in words(c)})
        return cls(list(SPECIALS) + seen)

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, L] and mask [B, L] (bool), L = the longest prompt (<= max_length, truncated beyond)."""
        seqs = [[BOS] + [self.index.get(w, UNK) for w in words(p)] for p in prompts]
        seqs = [s[:max_length] for s in seqs]
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), PAD, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        return ids, ids != PAD


@dataclass
class SmallTextConfig:
    dim: int = 128
    layers: int = 2
    heads: int = 4
    max_length: int = 32


class SmallTextEncoder(nn.Module):
    """Word embeddings + learned positions + a pre-norm transformer encoder; trained with the diffusion model."""

    def __init__(self, tokenizer: WordTokenizer, config: SmallTextConfig = SmallTextConfig()):
        super().__init__()
        self.tokenizer, self.config = tokenizer, config
        self.dim, self.max_length = config.dim, config.max_length
        self.embed = nn.Embedding(len(tokenizer), config.dim, padding_idx=PAD)
        self.pos = nn.Parameter(torch.randn(config.max_length, config.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(config.dim, config.heads, 4 * config.dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos[: ids.shape[1]]  # [B, L, D]
        h = self.encoder(h, src_key_padding_mask=~mask)  # [B, L, D]
        return self.norm(h) * mask[..., None]  # padded positions are exactly 0

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids, mask = self.tokenizer(list(prompts), self.max_length)
        dev = self.pos.device
        ids, mask = ids.to(dev), mask.to(dev)
        return self(ids, mask), mask

    # --- persistence: safetensors weights + JSON vocabulary and config ---
    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, path / "model.safetensors")
        (path / "config.json").write_text(json.dumps({"type": "small", **asdict(self.config),
                                                      "vocab": self.tokenizer.vocab}))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "SmallTextEncoder":
        path = Path(path)
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path} holds no small text encoder (config.json + model.safetensors); "
                                    f"train one with `dfm train` or pass the right folder")
        meta = json.loads((path / "config.json").read_text())
        meta.pop("type", None)
        vocab = meta.pop("vocab")
        enc = cls(WordTokenizer(vocab), SmallTextConfig(**meta))
        enc.load_state_dict(load_file(path / "model.safetensors"))
        return enc
