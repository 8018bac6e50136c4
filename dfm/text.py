"""Text encoders behind one interface: `encode(prompts: list[str]) -> (embeddings [B, L, D], mask [B, L])`.

This module holds the interface and two kinds of encoders:
- the small built-in encoder for training from scratch on small data (a word tokenizer built from the training
  captions plus a few transformer layers, trained with the diffusion model): `SmallTextEncoder`;
- frozen encoders loaded from a local folder, with a per-prompt LRU embedding cache:

    enc = load_text_encoder("models/Wan2.1-T2V-1.3B-Diffusers")   # UMT5 (text_encoder/ + tokenizer/), Wan's rule
    enc = load_text_encoder("models/t5-small", max_length=120)     # T5EncoderModel
    enc = load_text_encoder("models/clip-vit-l/text_encoder")      # CLIPTextModel(WithProjection)
    enc = load_text_encoder("runs/x/text")                         # a SmallTextEncoder.save_pretrained folder
    emb, mask = enc.encode(["a red digit 3 moves up"])             # [B, L, D] float32, [B, L] bool
    pooled = enc.encode_pooled([...])                              # [B, P], CLIP only

  Hugging Face models are optional (transformers is a dev dependency) and never fetched from a hub.

The small encoder starts every prompt with a <bos> token, T5/UMT5 end it with </s> and CLIP wraps it in its start
and end tokens, so the empty prompt (the unconditional branch of classifier-free guidance) has real tokens and
attention over it never sees an all-masked row.
"""

from __future__ import annotations

import html
import json
import re
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Protocol

import torch
from safetensors.torch import load_file
from torch import nn

from dfm.errors import UserError, first_line
from dfm.io import save_safetensors

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

    def unknown(self, prompts: Iterable[str]) -> list[str]:
        """The distinct words of `prompts` outside the vocabulary (they read as <unk>), in order."""
        return list(dict.fromkeys(w for p in prompts for w in words(p) if w not in self.index))

    def summary(self, limit: int = 40) -> str:
        """The known words (all of them up to `limit`, else the first few and the count), for messages."""
        known = self.vocab[len(SPECIALS):]
        if len(known) <= limit:
            return f"{len(known)} words: {' '.join(known)}"
        return f"{len(known)} words, e.g. {' '.join(known[:limit - 10])} ..."

    def __call__(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, L] and mask [B, L] (bool), L = the longest prompt (<= max_length, truncated beyond)."""
        seqs = [[BOS] + [self.index.get(w, UNK) for w in words(p)] for p in prompts]
        seqs = [s[:max_length] for s in seqs]
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), PAD, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        return ids, ids != PAD


class UnknownWordsWarning(UserWarning):
    """A prompt holds words the small text encoder never saw in training (`SmallTextEncoder.warn_unknown`)."""


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
        self.warn_unknown(prompts)
        ids, mask = self.tokenizer(list(prompts), self.max_length)
        dev = self.pos.device
        ids, mask = ids.to(dev), mask.to(dev)
        return self(ids, mask), mask

    def warn_unknown(self, prompts: list[str]) -> None:
        """An UnknownWordsWarning naming the words of `prompts` this encoder has never seen (they become <unk>,
        so the video cannot follow them) and the words it knows; once per encoder for each set of unknown words."""
        unknown = self.tokenizer.unknown(prompts)
        warned = self.__dict__.setdefault("_warned_unknown", set())
        if not unknown or frozenset(unknown) in warned:
            return
        warned.add(frozenset(unknown))
        shown = ", ".join(repr(w) for w in unknown[:10])
        shown += f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        warnings.warn(UnknownWordsWarning(f"the text encoder does not know {shown} (read as <unk>: the video will "
                                          f"not follow {'it' if len(unknown) == 1 else 'them'}); it knows "
                                          f"{self.tokenizer.summary()}"), stacklevel=3)

    # --- persistence: safetensors weights + JSON vocabulary and config ---
    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                         path / "model.safetensors")
        (path / "config.json").write_text(json.dumps({"type": "small", **asdict(self.config),
                                                      "vocab": self.tokenizer.vocab}))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "SmallTextEncoder":
        path = Path(path)
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            pickled = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
            hint = f" ({pickled[0]} is pickled: dfm loads only safetensors)" if pickled else ""
            raise FileNotFoundError(f"{path} holds no small text encoder (config.json + model.safetensors){hint}; "
                                    f"train one with `dfm train` or pass the right folder")
        meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
        meta.pop("type", None)
        vocab = meta.pop("vocab")
        enc = cls(WordTokenizer(vocab), SmallTextConfig(**meta))
        enc.load_state_dict(load_file(path / "model.safetensors"))
        return enc


# ============================================================================================ frozen encoders
# What `load_text_encoder` returns: a frozen module in eval mode behind `encode(prompts) -> (embeddings, mask)`,
# with an LRU cache of per-prompt rows (prompts repeat: Moving Digits has a few hundred captions, CFG's negative
# prompt is the same every call).


class TextEncoderError(UserError, ValueError):
    """A text encoder folder that cannot be used (missing, no tokenizer, corrupt weights, unsupported model)."""


def _reason(error: BaseException) -> str:
    """"TypeName: first line of the message", for one-line errors."""
    text = first_line(error, empty="")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class FrozenTextEncoder(nn.Module):
    """Base of the frozen encoders: eval mode, no gradients, an LRU cache keyed by prompt.

    Subclasses set `dim` (D), `max_length`, `pad_to` (the L of every batch, or None for the longest prompt of
    the batch) and `zero_padding` (True: every row is cut to its real tokens and zero-padded back to L, so the
    output is exactly 0 past the real tokens and the cache holds only those; Wan's rule for UMT5, and what the
    small encoder gives anyway. False: rows are kept as the model returns them), and implement
    `_encode(prompts) -> (emb [B, L, D], mask [B, L] bool, pooled [B, P] or None)` for a batch of distinct
    prompts. Masks are right-padded (a prefix of True).

    cache_bytes bounds the memory the cache holds (0 disables it); `cache_info()` reports hits and misses.
    """

    dim: int
    max_length: int
    pad_to: Optional[int] = None
    zero_padding: bool = True

    def __init__(self, cache_bytes: int = 256 * 2**20):
        super().__init__()
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict = OrderedDict()  # prompt -> (emb [l, D], mask [l], pooled [P] | None)
        self._cache_used = 0
        self.hits = self.misses = 0

    def train(self, mode: bool = True):  # frozen: stays in eval mode whatever the caller asks
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):  # .to(device / dtype): cached rows belong to the old one
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """embeddings [B, L, D] float32 and mask [B, L] bool (True = a real token) for a list of prompts."""
        emb, mask, _ = self._batch(self.rows(prompts))
        return emb, mask

    def encode_pooled(self, prompts: list[str]) -> torch.Tensor:
        """One pooled vector per prompt [B, P] float32 (CLIP only: see `HFTextEncoder`)."""
        rows = self.rows(prompts)
        if rows[0][2] is None:
            raise TextEncoderError(f"{type(self).__name__} ({self.describe().get('type')}) has no pooled embedding; "
                                   f"use a CLIP text encoder for pooled embeddings")
        return torch.stack([pooled for _, _, pooled in rows])

    # ---- the cache

    @torch.no_grad()
    def rows(self, prompts) -> list:
        """One row (emb [l, D], mask [l] bool, pooled [P] | None) per prompt, from the cache or encoded (the misses
        in one batch). l = the real tokens when `zero_padding` (pad with zeros to `pad_to` to rebuild the batch
        row), else the full padded length. What `dfm preprocess` stores per sample. Cached rows are shared with
        the cache: copy before modifying."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        fresh = {}
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))  # distinct, in order
        if missing:
            emb, mask, pooled = self._encode(missing)  # [b, L, D], [b, L], [b, P] | None
            for i, prompt in enumerate(missing):
                length = int(mask[i].sum()) if self.zero_padding else mask.shape[1]  # [l]: the real tokens
                fresh[prompt] = (emb[i, :length].clone(), mask[i, :length].clone(),
                                 None if pooled is None else pooled[i].clone())
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        rows = []
        for prompt in prompts:
            if prompt in fresh:
                rows.append(fresh[prompt])
            else:
                self._cache.move_to_end(prompt)  # most recently used
                rows.append(self._cache[prompt])
        for prompt, row in fresh.items():
            self._remember(prompt, row)
        return rows

    def _remember(self, prompt: str, row: tuple) -> None:
        size = sum(t.numel() * t.element_size() for t in row if t is not None)
        if size > self.cache_bytes:
            return
        self._cache[prompt] = row
        self._cache_used += size
        while self._cache_used > self.cache_bytes:  # evict the least recently used
            _, old = self._cache.popitem(last=False)
            self._cache_used -= sum(t.numel() * t.element_size() for t in old if t is not None)

    def _batch(self, rows: list) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Stack rows, zero-padding each to L = pad_to (or the longest row)."""
        length = self.pad_to or max(r[0].shape[0] for r in rows)
        emb = rows[0][0].new_zeros(len(rows), length, rows[0][0].shape[1])  # [B, L, D]
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=emb.device)  # [B, L]
        for i, (e, m, _) in enumerate(rows):
            emb[i, : e.shape[0]], mask[i, : m.shape[0]] = e, m
        pooled = None if rows[0][2] is None else torch.stack([r[2] for r in rows])  # [B, P]
        return emb, mask, pooled

    def cache_info(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self._cache),
                "bytes": self._cache_used, "capacity_bytes": self.cache_bytes}

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cache_used = 0

    def describe(self) -> dict:
        """What this encoder is (recorded next to precomputed embeddings so they are never mixed up)."""
        return {"type": "unknown", "dim": self.dim, "max_length": self.max_length}


class FrozenSmallTextEncoder(FrozenTextEncoder):
    """A trained `SmallTextEncoder` used as a frozen encoder (rows padded to the longest prompt of a batch)."""

    def __init__(self, encoder: SmallTextEncoder, source: Optional[str] = None, cache_bytes: int = 256 * 2**20):
        super().__init__(cache_bytes)
        self.encoder = encoder.requires_grad_(False).eval()
        self.dim, self.max_length, self.source = encoder.dim, encoder.max_length, source
        self.pad_to, self.zero_padding = None, True  # SmallTextEncoder.forward zeroes padded positions

    def _encode(self, prompts):
        emb, mask = self.encoder.encode(prompts)  # [B, L, D], [B, L]
        return emb.float(), mask, None

    def count_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` before truncation to max_length (<bos> + words)."""
        return 1 + len(words(prompt))

    def describe(self) -> dict:
        return {"type": "small", "path": self.source, "dim": self.dim, "max_length": self.max_length,
                "vocab_size": len(self.encoder.tokenizer)}


def wan_prompt_clean(text: str) -> str:
    """Wan's prompt cleaning (Wan `modules/tokenizers.py`, diffusers `pipeline_wan.prompt_clean`): ftfy's
    fix_text when ftfy is installed, HTML entities unescaped twice, runs of whitespace made one space, stripped."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class HFTextEncoder(FrozenTextEncoder):
    """A Hugging Face text encoder and its tokenizer, with each family's padding and truncation rules.

    kind "t5" (T5EncoderModel): padded and truncated to max_length, attention mask passed, last hidden state
        as the model returns it (also at padded positions; the mask marks them).
    kind "umt5" (UMT5EncoderModel, Wan 2.1): Wan's rule (Wan `modules/t5.py` T5EncoderModel.__call__, diffusers
        `WanPipeline._get_t5_prompt_embeds`): prompts cleaned (`wan_prompt_clean`), tokenized to max_length 512
        with padding and truncation, encoded with the attention mask, each row trimmed to its real length and
        zero-padded back to max_length.
    kind "clip" (CLIPTextModel / CLIPTextModelWithProjection): padded and truncated to 77 (the position table),
        encoded without an attention mask (the causal mask already hides the padding from real tokens; this is
        how the Stable Diffusion pipelines call it), last hidden state. `encode_pooled` gives `pooler_output`
        (the final-norm state at the end token) for CLIPTextModel and the projected `text_embeds` for
        CLIPTextModelWithProjection.
    """

    def __init__(self, model: nn.Module, tokenizer, kind: str, max_length: int, source: Optional[str] = None,
                 tokenizer_source: Optional[str] = None, cache_bytes: int = 256 * 2**20):
        super().__init__(cache_bytes)
        if kind not in ("t5", "umt5", "clip"):
            raise ValueError(f"kind must be t5, umt5 or clip, got {kind!r}")
        self.model = model.requires_grad_(False).eval()
        self.tokenizer, self.kind, self.max_length = tokenizer, kind, int(max_length)
        self.source, self.tokenizer_source = source, tokenizer_source
        config = model.config
        self.dim = int(config.hidden_size if kind == "clip" else config.d_model)
        self.pad_to, self.zero_padding = self.max_length, kind == "umt5"
        self.pooled_dim = None
        if kind == "clip":
            self.pooled_dim = int(config.projection_dim if hasattr(model, "text_projection") else config.hidden_size)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, max_length] and attention mask [B, max_length] (the tokenizer's, with its special tokens)."""
        if self.kind == "umt5":
            prompts = [wan_prompt_clean(p) for p in prompts]
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask

    def count_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` before truncation to max_length (special tokens included)."""
        if self.kind == "umt5":
            prompt = wan_prompt_clean(prompt)
        return len(self.tokenizer(prompt, add_special_tokens=True).input_ids)

    def _encode(self, prompts):
        ids, attention = self.tokenize(prompts)  # [B, L], [B, L]
        device = next(self.model.parameters()).device
        ids, attention = ids.to(device), attention.to(device)
        mask = attention.bool()  # [B, L]
        if self.kind == "clip":
            use_mask = getattr(self.model.config, "use_attention_mask", False)
            out = self.model(input_ids=ids, attention_mask=attention if use_mask else None)
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output  # [B, P]
            return out.last_hidden_state.float(), mask, pooled.float()
        emb = self.model(input_ids=ids, attention_mask=attention).last_hidden_state.float()  # [B, L, D]
        return emb, mask, None  # umt5: `rows` trims to the real tokens and `_batch` zero-pads to max_length (Wan)

    def save_pretrained(self, path) -> None:
        """The model and its tokenizer in one Hugging Face folder (what `load_text_encoder` reads back)."""
        self.model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))

    def describe(self) -> dict:
        config = self.model.config
        return {"type": self.kind, "class": type(self.model).__name__, "path": self.source,
                "tokenizer": self.tokenizer_source, "dim": self.dim, "max_length": self.max_length,
                "vocab_size": int(config.vocab_size), "layers": int(getattr(config, "num_layers", 0)
                                                                     or getattr(config, "num_hidden_layers", 0))}


# ---------------------------------------------------------------------------------------------- loading

# config.json model_type -> (kind, transformers class name); CLIP picks the projection class from "architectures"
_HF_MODELS = {"t5": ("t5", "T5EncoderModel"), "umt5": ("umt5", "UMT5EncoderModel"),
              "clip_text_model": ("clip", "CLIPTextModel")}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")
_WAN_MAX_LENGTH = 512  # Wan 2.1's text_len
_LONG = 100_000  # tokenizers without a real limit report model_max_length ~1e30


def _read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise TextEncoderError(f"{folder} has no config.json; pass a folder written by SmallTextEncoder."
                               f"save_pretrained or a Hugging Face text encoder folder (config.json + weights)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise TextEncoderError(f"{config_path} is not valid JSON ({type(e).__name__}); restore the file") from None
    if not isinstance(config, dict):
        raise TextEncoderError(f"{config_path} must hold a JSON object; restore the file")
    return config


def _load_small(folder: Path, max_length: Optional[int], cache_bytes: int) -> FrozenSmallTextEncoder:
    try:
        encoder = SmallTextEncoder.from_pretrained(folder)
    except FileNotFoundError as e:
        raise TextEncoderError(str(e)) from None
    except Exception as e:  # unreadable safetensors, wrong tensor names or shapes, bad config fields
        raise TextEncoderError(f"the small text encoder in {folder} is corrupt ({_reason(e)}); save it again or "
                               f"use an earlier copy") from None
    if max_length is not None:
        if not 1 <= max_length <= encoder.max_length:
            raise TextEncoderError(f"max_length={max_length} but the small text encoder in {folder} has "
                                   f"{encoder.max_length} positions; pass max_length <= {encoder.max_length}")
        encoder.max_length = int(max_length)
    return FrozenSmallTextEncoder(encoder, str(folder), cache_bytes)


def _tokenizer_folder(folder: Path, tokenizer) -> Path:
    if tokenizer is not None:
        candidates = [Path(tokenizer).resolve()]
    else:  # in the model folder, or next to it as diffusers lays pipelines out (text_encoder/ + tokenizer/)
        candidates = [folder, folder.parent / "tokenizer"]
    for candidate in candidates:
        if candidate.is_dir() and any((candidate / name).is_file() for name in _TOKENIZER_FILES):
            return candidate
    where = " nor ".join(str(c) for c in candidates)
    raise TextEncoderError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {where}; pass the tokenizer "
                           f"folder (tokenizer=FOLDER, --tokenizer FOLDER)")


def _load_hf(folder: Path, config: dict, tokenizer, max_length, device, dtype, cache_bytes) -> HFTextEncoder:
    model_type = config.get("model_type")
    if model_type not in _HF_MODELS:
        raise TextEncoderError(f"{folder}/config.json has model_type {model_type!r}; supported text encoders: "
                               f"{', '.join(sorted(_HF_MODELS))} (a CLIP text folder is clip_text_model) or a small "
                               f"encoder folder")
    kind, class_name = _HF_MODELS[model_type]
    if kind == "clip" and "CLIPTextModelWithProjection" in (config.get("architectures") or []):
        class_name = "CLIPTextModelWithProjection"
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        hint = (f"{other[0]} is pickled and dfm loads only safetensors (unpickling can run code): convert it where "
                f"you trust it, e.g. model.save_pretrained(FOLDER, safe_serialization=True) in transformers"
                if other else "copy the model's weights (model.safetensors) into it")
        raise TextEncoderError(f"{folder} has no model.safetensors; {hint}")
    try:
        import transformers
    except ImportError:
        raise TextEncoderError("Hugging Face text encoders need the transformers package; "
                               "pip install 'dfm[dev]' (or transformers)") from None
    tokenizer_folder = _tokenizer_folder(folder, tokenizer)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
    except Exception as e:
        raise TextEncoderError(f"cannot load the tokenizer in {tokenizer_folder} ({_reason(e)}); pass the model's "
                               f"own tokenizer folder") from None
    vocab_size = int(config.get("vocab_size") or 0)
    if vocab_size and len(tok) > vocab_size:
        raise TextEncoderError(f"the tokenizer in {tokenizer_folder} has {len(tok)} tokens but the model in {folder} "
                               f"only {vocab_size} embeddings; pass the tokenizer that belongs to this model")
    model_class = getattr(transformers, class_name)
    try:
        model, info = model_class.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                  use_safetensors=True, output_loading_info=True)
    except Exception as e:  # truncated or garbled safetensors, shape mismatches, bad config values
        raise TextEncoderError(f"the weights in {folder} are unreadable ({_reason(e)}); download or save the "
                               f"model again") from None
    if info.get("missing_keys") or info.get("mismatched_keys"):
        missing = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
        raise TextEncoderError(f"the weights in {folder} lack {len(missing)} tensors of {class_name} (e.g. "
                               f"{missing[0]}); the folder holds another model or an incomplete copy: download it "
                               f"again")
    if max_length is None:
        if kind == "umt5":
            max_length = _WAN_MAX_LENGTH
        elif kind == "clip":
            max_length = int(model.config.max_position_embeddings)
        else:
            limit = int(getattr(tok, "model_max_length", _LONG) or _LONG)
            max_length = limit if limit < _LONG else 512
    if kind == "clip" and max_length > model.config.max_position_embeddings:
        raise TextEncoderError(f"max_length={max_length} exceeds this CLIP's {model.config.max_position_embeddings} "
                               f"positions; pass max_length <= {model.config.max_position_embeddings}")
    if max_length < 1:
        raise TextEncoderError(f"max_length must be >= 1, got {max_length}")
    return HFTextEncoder(model.to(device), tok, kind, max_length, str(folder), str(tokenizer_folder), cache_bytes)


def load_text_encoder(path, tokenizer=None, max_length: Optional[int] = None, *, device="cpu",
                      dtype: torch.dtype = torch.float32, cache_bytes: int = 256 * 2**20) -> FrozenTextEncoder:
    """A frozen text encoder from a local folder (never from a hub).

    path: a folder written by `SmallTextEncoder.save_pretrained`; a Hugging Face folder of a T5EncoderModel,
        UMT5EncoderModel (Wan 2.1's text_encoder/), CLIPTextModel or CLIPTextModelWithProjection (the class is
        chosen from config.json's model_type and architectures); or a diffusers pipeline folder (model_index.json
        with text_encoder/ and tokenizer/).
    tokenizer: the tokenizer folder when it is not in `path` (default: `path`, then `path/../tokenizer`).
    max_length: tokens per prompt (default: 512 for UMT5 as Wan, 77 for CLIP, the tokenizer's limit or 512 for
        T5, the trained length for a small encoder).
    device, dtype: where and in which precision the model runs (outputs are float32 either way).
    cache_bytes: memory for the per-prompt embedding cache.

    Raises TextEncoderError (a dfm.errors.UserError) naming the problem and the fix.
    """
    folder = Path(path).resolve()
    if not folder.is_dir():
        raise TextEncoderError(f"text encoder folder {path} not found; pass a folder written by SmallTextEncoder."
                               f"save_pretrained or a local Hugging Face text encoder folder")
    if (folder / "model_index.json").is_file() and (folder / "text_encoder").is_dir():  # a diffusers pipeline
        if tokenizer is None and (folder / "tokenizer").is_dir():
            tokenizer = folder / "tokenizer"
        folder = folder / "text_encoder"
    config = _read_config(folder)
    if config.get("type") == "small":
        encoder = _load_small(folder, max_length, cache_bytes)
        return encoder.to(device)
    return _load_hf(folder, config, tokenizer, max_length, device, dtype, cache_bytes)


# ------------------------------------------------------------------------------------- null conditioning


def pad_context(context: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad context [B, L, D] and mask [B, L] (False) to `length` tokens."""
    pad = length - context.shape[1]
    if pad <= 0:
        return context, mask
    return (torch.nn.functional.pad(context, (0, 0, 0, pad)),  # [B, length, D]
            torch.nn.functional.pad(mask, (0, pad), value=False))  # [B, length]


def guidance_branches(encode, prompts: list[str], negative: list[str] | None, null: str, use_mask: bool,
                      guidance_scale: float) -> tuple[dict, dict | None]:
    """The cond and uncond keyword dicts of classifier-free guidance (dfm.diffusion.guidance.CFGDenoiser).

    encode(prompts) -> (context [B, L, D] float, mask [B, L] bool). The uncond branch is the `negative` prompts
    if given, else the model's null conditioning, as in its training (dfm.model.DiffusionModule.loss): "empty" =
    the empty prompt's encoding (zero-padded past its tokens), "zeros" = zero context with the prompts' mask. Both
    branches are padded to one length. use_mask=False leaves the mask out (Wan attends to all tokens, the zero
    padding included). guidance_scale 1: the conditional branch alone (uncond None).
    """
    ctx, mask = encode(prompts)
    ctx = ctx.float()
    if guidance_scale == 1:
        return ({"context": ctx, "context_mask": mask} if use_mask else {"context": ctx}), None
    if negative is not None:
        n_ctx, n_mask = encode(negative)
        n_ctx = n_ctx.float()
    elif null == "zeros":
        n_ctx, n_mask = torch.zeros_like(ctx), mask
    else:
        n_ctx, n_mask = encode([""] * len(prompts))
        n_ctx = n_ctx.float()
    length = max(ctx.shape[1], n_ctx.shape[1])
    ctx, mask = pad_context(ctx, mask, length)
    n_ctx, n_mask = pad_context(n_ctx, n_mask.to(mask.device), length)
    if not use_mask:
        return {"context": ctx}, {"context": n_ctx}
    return {"context": ctx, "context_mask": mask}, {"context": n_ctx, "context_mask": n_mask}
