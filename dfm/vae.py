"""Video autoencoders: the pixel-space identity, dfm's own causal 3D-convolutional VAE, and the Wan 2.1 VAE.

Every autoencoder here is an `nn.Module` with one interface (what the trainer and the pipeline code against):

    vae = load_vae("identity" | FOLDER)      # FOLDER: written by save_pretrained, or a diffusers AutoencoderKLWan
    vae.channels, vae.temporal_factor, vae.spatial_factor
    vae.latent_shape(frames, height, width) -> (C, f, h, w)     # VAEError (a UserError) if not representable
    vae.encode(video [B, 3, F, H, W] in [-1, 1]) -> normalised latents [B, C, f, h, w]
    vae.decode(latents [B, C, f, h, w]) -> video [B, 3, F, H, W] in [-1, 1]
    vae.save_pretrained(folder)

`encode` / `decode` also take `chunk=` (latent frames per temporal chunk) and `tile=`, `overlap=` (spatial tiles,
in pixels) to bound memory on long or large videos.

The causal VAE (`CausalVAE`) follows the design of the Wan-VAE (Wan team 2025, "Wan: Open and Advanced
Large-Scale Video Generative Models", sec. 3.1) and MAGVIT-v2's causal 3D CNN (Yu et al. 2023, sec. 3.1):

- Every convolution is causal in time: it pads (kernel_t - 1) zero frames before the first frame and none after,
  so latent frame j depends on pixel frames <= k*j only.
- The first frame is encoded alone: with temporal factor k, F = 1 + k*n frames give f = 1 + n latent frames
  (frame 0 -> latent 0, frames k(j-1)+1 .. kj -> latent j), so an image is a 1-frame video.
- Long videos are processed in temporal chunks with a causal cache: each convolution keeps the frames of its
  input that its next window still needs (the "feature cache" of the Wan-VAE), so chunked encoding and decoding
  equal the whole-video result up to float rounding.
- No normalisation layers: residual blocks start as the identity (zero-initialised last conv; SkipInit, De &
  Smith 2020), so nothing mixes information across time or space except the convolutions. Large frames can
  therefore be cut into overlapping spatial tiles whose outputs are blended linearly; tiles differ from the whole
  only within the receptive field of a tile edge (replicate padding keeps that difference small). Why no norms:
  on 16x16 Moving Digits frames (250 Adam steps at 1e-3, batch 16, MSE, this architecture as an autoencoder)
  the Wan-VAE's per-position RMS norm collapsed to the mean frame (13.9 dB PSNR, constant decoder output),
  per-frame GroupNorm reached 17.7 dB but ties each tile's output to its own statistics; no norm: 19.1 dB.
- A KL-regularised Gaussian posterior (Kingma & Welling 2014): the encoder predicts mean and log-variance,
  training decodes a sample z = mean + exp(logvar / 2) * eps, `encode` returns the mean (deterministic). The
  log-variance is bounded above by 0 (a smooth -softplus), so the posterior is never wider than the prior: with an
  unbounded one, training diverged once the decoder started to use the latents.
- Latents are normalised per channel, (z - mean_c) / std_c, with mean_c and std_c measured on the training data
  at the end of training and stored with the weights (as the Wan-VAE's latents_mean / latents_std, and like the
  single scale factor of latent diffusion, Rombach et al. 2022 sec. 3.1 / appendix G).

Training on Moving Digits and evaluation (`dfm train-vae`, `dfm eval-vae`) live in dfm/training/vae_trainer.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dfm.errors import UserError, first_line
from dfm.io import atomic_path, save_safetensors

MODEL_TYPE = "causal_vae"  # the "type" in config.json of a CausalVAE folder


class VAEError(UserError, ValueError):
    """An autoencoder cannot be loaded or cannot represent an input; the message is one line naming the fix."""


def check_latent_shape(frames: int, height: int, width: int, channels: int, kt: int, ks: int,
                       who: str) -> tuple[int, int, int, int]:
    """(C, 1 + (F-1)/kt, H/ks, W/ks) for a causal autoencoder with temporal factor kt and spatial factor ks."""
    if frames < 1 or (frames - 1) % kt:
        valid = ", ".join(str(1 + kt * n) for n in range(4))
        raise VAEError(f"{who} encodes 1 + {kt}*n frames ({valid}, ...), got {frames}; change the frame count")
    if height < ks or width < ks or height % ks or width % ks:
        raise VAEError(f"{who} needs height and width divisible by {ks} (e.g. {4 * ks}), got {height}x{width}; "
                       f"resize or crop the video")
    return (channels, 1 + (frames - 1) // kt, height // ks, width // ks)


def _check_video(video: torch.Tensor, who: str) -> None:
    if video.ndim != 5 or video.shape[1] != 3:
        raise VAEError(f"{who}.encode expects a video [B, 3, F, H, W] in [-1, 1], got shape {tuple(video.shape)}")


def _check_latents(latents: torch.Tensor, channels: int, who: str) -> None:
    if latents.ndim != 5 or latents.shape[1] != channels:
        raise VAEError(f"{who}.decode expects latents [B, {channels}, f, h, w], got shape {tuple(latents.shape)}")


# ---------------------------------------------------------------------------------------------- identity


class IdentityVAE(nn.Module):
    """Pixel space: the latents are the video itself (3 channels, no compression)."""

    channels, temporal_factor, spatial_factor = 3, 1, 1

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return check_latent_shape(frames, height, width, 3, 1, 1, "the identity autoencoder")

    def encode(self, video: torch.Tensor, **_tiling) -> torch.Tensor:
        return video

    def decode(self, latents: torch.Tensor, **_tiling) -> torch.Tensor:
        return latents

    def save_pretrained(self, folder) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / "config.json", {"type": "identity"})
        return folder


# ------------------------------------------------------------------------------------------ building blocks

# Streaming state: {module: what it carries to the next chunk}; a fresh dict starts a video.
Cache = dict


class CausalConv3d(nn.Module):
    """Conv3d that pads (kernel_t - 1) zero frames in the past and none in the future; in space it pads k // 2
    pixels by repeating the edge (replicate: a tile's edge then looks like its surroundings, see `blend_tiles`).

    With a `cache` dict it streams: the input of each call is appended to the frames the previous call left
    unconsumed, every complete window is convolved, and the frames the next window still needs are kept. So
    any split of a video along time gives the frames of the whole-video result. With stride s in time, window j
    ends at input frame s*j: output 0 sees frame 0 alone (the first frame is encoded alone).
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(0, kernel // 2, kernel // 2),
                              padding_mode="replicate")

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        kt, st = self.conv.kernel_size[0], self.conv.stride[0]
        if kt == 1 and st == 1:
            return self.conv(x)
        past = cache.get(self) if cache is not None else None
        if past is None:  # the start of the video: the causal zero padding
            past = x.new_zeros(*x.shape[:2], kt - 1, *x.shape[3:])
        q = torch.cat([past, x], dim=2)  # [B, C, P + T, H, W]
        n = max(0, (q.shape[2] - kt) // st + 1)  # complete windows
        if cache is not None:
            cache[self] = q[:, :, n * st:].clone()  # window n starts here (a copy: q itself is freed)
        if n == 0:
            k, s = self.conv.kernel_size[1], self.conv.stride[1]
            h, w = ((d + 2 * (k // 2) - k) // s + 1 for d in x.shape[3:])
            return x.new_zeros(x.shape[0], self.conv.out_channels, 0, h, w)
        return self.conv(q[:, :, : (n - 1) * st + kt])  # [B, C', n, H', W']


class ResBlock(nn.Module):
    """x + conv(SiLU(conv(SiLU(x)))), the second conv zero-initialised so that the block starts as the identity
    (SkipInit, De & Smith 2020; Goyal et al. 2017 sec. 5.1): no normalisation layer is needed (see the module docstring)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.conv2 = CausalConv3d(cin, cout), CausalConv3d(cout, cout)
        self.skip = CausalConv3d(cin, cout, kernel=1) if cin != cout else None
        nn.init.zeros_(self.conv2.conv.weight)
        nn.init.zeros_(self.conv2.conv.bias)

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        h = self.conv2(F.silu(self.conv1(F.silu(x), cache)), cache)
        return (x if self.skip is None else self.skip(x)) + h


class Downsample(nn.Module):
    """A strided causal conv: /2 in space, and /2 in time (window j ends at frame 2j) if `time`."""

    def __init__(self, cin: int, cout: int, time: bool):
        super().__init__()
        self.conv = CausalConv3d(cin, cout, stride=(2 if time else 1, 2, 2))

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        return self.conv(x, cache)


class Upsample(nn.Module):
    """Nearest x2 in space (and in time if `time`), then a causal conv. In time, latent frame 0 becomes one frame
    and latent j >= 1 two frames (2j - 1, 2j): the inverse of `Downsample`'s grouping, 1 + n -> 1 + 2n frames."""

    def __init__(self, cin: int, cout: int, time: bool):
        super().__init__()
        self.time = time
        self.conv = CausalConv3d(cin, cout)

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        if self.time:
            x = x.repeat_interleave(2, dim=2)  # [B, C, 2f, H, W]
            if not (cache is not None and cache.get(self)):  # this chunk holds frame 0: it stays single
                x = x[:, :, 1:]
            if cache is not None:
                cache[self] = True
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")  # [B, C, F, 2H, 2W]
        return self.conv(x, cache)


class Head(nn.Module):
    """SiLU -> causal conv: the last layer of the encoder and of the decoder."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = CausalConv3d(cin, cout)

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        return self.conv(F.silu(x), cache)


class Stack(nn.ModuleList):
    """Layers applied in order, each with the shared streaming cache."""

    def forward(self, x: torch.Tensor, cache: Optional[Cache] = None) -> torch.Tensor:
        for layer in self:
            x = layer(x, cache)
        return x


# ------------------------------------------------------------------------------------------------ the VAE


@dataclass
class CausalVAEConfig:
    spatial_factor: int = 4  # 4 or 8 (2 or 3 levels of /2)
    temporal_factor: int = 2  # 1, 2 or 4; F = 1 + temporal_factor * n frames
    latent_channels: int = 4
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # widths of the levels: log2(spatial) + 1
    num_res_blocks: int = 1  # per level

    def check(self) -> None:
        levels = int(math.log2(self.spatial_factor)) if self.spatial_factor > 0 else -1
        if self.spatial_factor not in (2, 4, 8, 16):
            raise VAEError(f"model.spatial_factor must be 4 or 8 (or 2, 16), got {self.spatial_factor}")
        if self.temporal_factor not in (1, 2, 4, 8) or self.temporal_factor > self.spatial_factor:
            raise VAEError(f"model.temporal_factor must be 1, 2 or 4 (at most spatial_factor), got "
                           f"{self.temporal_factor}")
        if len(self.channel_mult) != levels + 1:
            raise VAEError(f"model.channel_mult needs log2(spatial_factor) + 1 = {levels + 1} entries for "
                           f"spatial_factor={self.spatial_factor}, got {list(self.channel_mult)}")
        for key in ("latent_channels", "base_channels", "num_res_blocks"):
            if getattr(self, key) < 1:
                raise VAEError(f"model.{key} must be >= 1, got {getattr(self, key)}")


class CausalVAE(nn.Module):
    """dfm's causal 3D-convolutional KL-VAE (see the module docstring for the design and sources).

    Encoder: conv_in, then per level i: `num_res_blocks` ResBlocks at width base*mult[i] and a Downsample to
    width base*mult[i+1] (in time too on the last log2(temporal_factor) levels), a middle ResBlock, a Head to
    2*C channels (mean, log-variance). The decoder mirrors it with Upsamples.
    """

    def __init__(self, config: CausalVAEConfig):
        super().__init__()
        config.check()
        self.config = c = config
        self.channels, self.temporal_factor, self.spatial_factor = c.latent_channels, c.temporal_factor, c.spatial_factor
        levels = int(math.log2(c.spatial_factor))
        time_levels = int(math.log2(c.temporal_factor))
        widths = [c.base_channels * m for m in c.channel_mult]  # [levels + 1]
        in_time = [i >= levels - time_levels for i in range(levels)]  # the deepest levels also go down in time

        enc = [CausalConv3d(3, widths[0])]
        for i in range(levels):
            enc += [ResBlock(widths[i], widths[i]) for _ in range(c.num_res_blocks)]
            enc.append(Downsample(widths[i], widths[i + 1], in_time[i]))
        enc += [ResBlock(widths[-1], widths[-1]), Head(widths[-1], 2 * c.latent_channels)]
        self.encoder = Stack(enc)

        dec = [CausalConv3d(c.latent_channels, widths[-1]), ResBlock(widths[-1], widths[-1])]
        for i in reversed(range(levels)):
            dec.append(Upsample(widths[i + 1], widths[i], in_time[i]))
            dec += [ResBlock(widths[i], widths[i]) for _ in range(c.num_res_blocks)]
        dec.append(Head(widths[0], 3))
        self.decoder = Stack(dec)

        # per-channel latent statistics, measured on the training data (fit_latent_stats); saved with the weights
        self.register_buffer("latents_mean", torch.zeros(c.latent_channels))
        self.register_buffer("latents_std", torch.ones(c.latent_channels))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return check_latent_shape(frames, height, width, self.channels, self.temporal_factor, self.spatial_factor,
                                  f"this VAE ({self.temporal_factor}x{self.spatial_factor}x{self.spatial_factor})")

    # ---- normalisation: z_normalised = (z - mean_c) / std_c

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        return self.latents_mean.to(z).view(shape), self.latents_std.to(z).view(shape)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return latents * std + mean

    # ---- raw encoder / decoder (unnormalised latents), streamed in chunks and tiles

    def chunk_sizes(self, frames: int, chunk: Optional[int], latent: bool) -> list[int]:
        """Temporal chunks of `chunk` latent frames: latent chunks, or their pixel frames (the first chunk
        holds frame 0 alone plus (chunk - 1) groups of k frames, later chunks chunk*k frames)."""
        if chunk is None or chunk <= 0:
            return [frames]
        k = 1 if latent else self.temporal_factor
        first, rest = 1 + k * (chunk - 1), k * chunk
        sizes = [min(first, frames)]
        while sum(sizes) < frames:
            sizes.append(min(rest, frames - sum(sizes)))
        return sizes

    def _streamed(self, stack: Stack, x: torch.Tensor, chunk: Optional[int], latent: bool) -> torch.Tensor:
        """`stack` (the encoder or the decoder) over x in temporal chunks, through one streaming cache."""
        cache: Cache = {}
        pieces = x.split(self.chunk_sizes(x.shape[2], chunk, latent), dim=2)
        return torch.cat([stack(p, cache) for p in pieces], dim=2)

    def moments(self, video: torch.Tensor, *, chunk: Optional[int] = None, tile: Optional[int] = None,
                overlap: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian posterior q(z | video): (mean, logvar), each [B, C, f, h, w], unnormalised."""
        _check_video(video, "CausalVAE")
        self.latent_shape(*video.shape[2:])
        out = blend_tiles(lambda x: self._streamed(self.encoder, x, chunk, latent=False), video, tile, overlap,
                          self.spatial_factor, down=True)  # [B, 2C, f, h, w]
        mean, raw = out.chunk(2, dim=1)
        logvar = -F.softplus(-raw).clamp(max=30.0)  # log sigma^2 <= 0: the posterior is never wider than the prior
        return mean, logvar

    def decode_raw(self, z: torch.Tensor, *, chunk: Optional[int] = None, tile: Optional[int] = None,
                   overlap: Optional[int] = None) -> torch.Tensor:
        """Unnormalised latents [B, C, f, h, w] -> video [B, 3, 1 + k(f-1), s*h, s*w], not clamped."""
        _check_latents(z, self.channels, "CausalVAE")
        return blend_tiles(lambda x: self._streamed(self.decoder, x, chunk, latent=True), z, tile, overlap,
                           self.spatial_factor, down=False)

    # ---- the interface

    def encode(self, video: torch.Tensor, *, chunk: Optional[int] = None, tile: Optional[int] = None,
               overlap: Optional[int] = None) -> torch.Tensor:
        """video [B, 3, F, H, W] in [-1, 1] -> normalised posterior means [B, C, 1 + (F-1)/k, H/s, W/s]."""
        mean, _ = self.moments(video, chunk=chunk, tile=tile, overlap=overlap)
        return self.normalize(mean)

    def decode(self, latents: torch.Tensor, *, chunk: Optional[int] = None, tile: Optional[int] = None,
               overlap: Optional[int] = None) -> torch.Tensor:
        """normalised latents [B, C, f, h, w] -> video [B, 3, 1 + k(f-1), s*h, s*w] in [-1, 1]."""
        _check_latents(latents, self.channels, "CausalVAE")
        return self.decode_raw(self.denormalize(latents), chunk=chunk, tile=tile, overlap=overlap).clamp(-1, 1)

    def forward(self, video: torch.Tensor, generator: Optional[torch.Generator] = None):
        """Training pass: (reconstruction [B, 3, F, H, W] (unclamped), mean, logvar) with z ~ q(z | video)."""
        mean, logvar = self.moments(video)
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device="cpu").to(mean.device)
        z = mean + torch.exp(0.5 * logvar) * eps  # reparameterisation (Kingma & Welling 2014, eq. 10)
        return self.decode_raw(z), mean, logvar

    # ---- files

    def save_pretrained(self, folder, extra: Optional[dict] = None) -> Path:
        """folder/config.json ({"type": "causal_vae", the config, `extra`}) + folder/model.safetensors (weights
        and the latent mean/std). Each file is written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "model.safetensors") as tmp:
            save_safetensors({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        _write_json(folder / "config.json", {"type": MODEL_TYPE, **dataclasses.asdict(self.config), **(extra or {})})
        return folder

    @classmethod
    def from_pretrained(cls, folder, config: Optional[dict] = None) -> "CausalVAE":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        config = _read_json(folder / "config.json") if config is None else config
        keys = {f.name for f in dataclasses.fields(CausalVAEConfig)}
        try:
            model = cls(CausalVAEConfig(**{k: v for k, v in config.items() if k in keys}))
        except (TypeError, VAEError) as e:
            raise VAEError(f"{folder / 'config.json'} is not a valid causal VAE config ({e}); re-save the model")
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise VAEError(f"the VAE weights file {weights} is missing; {_pickled(folder) or 'copy it or retrain'}")
        try:
            model.load_state_dict(load_file(str(weights)))
        except (OSError, SafetensorError, RuntimeError, ValueError) as e:
            reason = first_line(e)[:160]
            raise VAEError(f"the VAE weights file {weights} is corrupt or does not match config.json ({reason}); "
                           f"re-save or retrain the model") from None
        return model.eval()


@torch.no_grad()
def fit_latent_stats(vae: CausalVAE, videos, max_batches: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Measure the per-channel mean and std of the posterior means over `videos` (an iterable of [B, 3, F, H, W]),
    store them in vae.latents_mean / latents_std, and return them."""
    count, total, squares = 0, 0.0, 0.0
    for i, video in enumerate(videos):
        if max_batches is not None and i >= max_batches:
            break
        mean, _ = vae.moments(video)
        z = mean.double().transpose(0, 1).reshape(vae.channels, -1)  # [C, N]
        count, total, squares = count + z.shape[1], total + z.sum(1), squares + z.pow(2).sum(1)
    if count == 0:
        raise VAEError("fit_latent_stats got no videos; pass at least one batch")
    mu = total / count
    std = (squares / count - mu ** 2).clamp_min(0).sqrt().clamp_min(1e-6)
    vae.latents_mean.copy_(mu.float())
    vae.latents_std.copy_(std.float())
    return vae.latents_mean.clone(), vae.latents_std.clone()


# ------------------------------------------------------------------------------------------ spatial tiles


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Starts of tiles of length `tile` every `stride` covering [0, size); the last one ends at `size`."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, stride)) + [size - tile]


def _ramp_window(start: int, length: int, size: int, ramp: int, like: torch.Tensor) -> torch.Tensor:
    """1-D blend weights of a tile: rising over `ramp` samples on a side that meets another tile, else 1."""
    w = torch.ones(length, dtype=like.dtype, device=like.device)
    if ramp > 0:
        rise = torch.arange(1, ramp + 1, dtype=like.dtype, device=like.device) / (ramp + 1)
        if start > 0:
            w[:ramp] = rise
        if start + length < size:
            w[-ramp:] = rise.flip(0)
    return w


def blend_tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: Optional[int],
                overlap: Optional[int], factor: int, down: bool) -> torch.Tensor:
    """Apply `fn` to overlapping spatial tiles of x [B, C, T, H, W] and blend the outputs linearly.

    `tile` and `overlap` are in pixels (rounded down to multiples of `factor`; overlap defaults to tile / 4).
    fn maps input pixels to output pixels at 1/factor (`down`, encoding) or x factor (decoding). Where tiles
    overlap, each output is a weighted mean with weights ramping linearly across the overlap, so the seams are
    smooth; the result differs from fn(x) only near tile edges, within the receptive field of the layers.
    """
    if tile is None or tile <= 0:
        return fn(x)
    s = factor
    tile_px = max(s, tile // s * s)
    overlap_px = (tile_px // 4 if overlap is None else overlap) // s * s
    overlap_px = min(overlap_px, tile_px - s)
    # sizes in x's own units (pixels when encoding, latent cells when decoding)
    t_in, o_in = (tile_px, overlap_px) if down else (tile_px // s, overlap_px // s)
    H, W = x.shape[-2:]
    if H <= t_in and W <= t_in:
        return fn(x)
    scale_out = (lambda n: n // s) if down else (lambda n: n * s)
    ys, xs = tile_starts(H, t_in, t_in - o_in), tile_starts(W, t_in, t_in - o_in)
    out = weights = None
    for y0 in ys:
        for x0 in xs:
            y = fn(x[..., y0 : y0 + t_in, x0 : x0 + t_in])  # [B, C', T', h, w]
            if out is None:
                out = y.new_zeros(*y.shape[:3], scale_out(H), scale_out(W))
                weights = y.new_zeros(scale_out(H), scale_out(W))
            h, w = y.shape[-2:]
            oy, ox, ramp = scale_out(y0), scale_out(x0), scale_out(o_in)
            wy = _ramp_window(oy, h, out.shape[-2], min(ramp, h // 2), y)
            wx = _ramp_window(ox, w, out.shape[-1], min(ramp, w // 2), y)
            w2 = wy[:, None] * wx[None, :]  # [h, w]
            out[..., oy : oy + h, ox : ox + w] += y * w2
            weights[oy : oy + h, ox : ox + w] += w2
    return out / weights


# ------------------------------------------------------------------------------------------- Wan 2.1 VAE


class WanVAE(nn.Module):
    """A diffusers AutoencoderKLWan (the Wan 2.1 VAE: 4x8x8, 16 channels) behind dfm's interface.

    Normalisation as diffusers' WanPipeline: encode returns (mode - latents_mean) / latents_std, decode takes
    z * latents_std + latents_mean (the lists in the folder's config.json). diffusers streams the frames itself
    (frame 0, then 4 at a time; one latent frame at a time when decoding), so `chunk` is accepted and ignored;
    `tile` (pixels) turns on diffusers' spatial tiling.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        c = model.config
        self.channels = int(c.z_dim)
        self.temporal_factor = 2 ** sum(bool(t) for t in c.temperal_downsample)
        self.spatial_factor = 2 ** (len(c.dim_mult) - 1) * int(c.patch_size or 1)
        self.register_buffer("latents_mean", torch.tensor(c.latents_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("latents_std", torch.tensor(c.latents_std, dtype=torch.float32), persistent=False)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return check_latent_shape(frames, height, width, self.channels, self.temporal_factor, self.spatial_factor,
                                  "the Wan VAE")

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents_mean.to(z).view(1, -1, 1, 1, 1), self.latents_std.to(z).view(1, -1, 1, 1, 1)

    def _tiling(self, tile: Optional[int], overlap: Optional[int]) -> None:
        if tile:
            stride = tile - (tile // 4 if overlap is None else overlap)
            self.model.enable_tiling(tile, tile, stride, stride)
        else:
            self.model.use_tiling = False

    def encode(self, video: torch.Tensor, *, chunk: Optional[int] = None, tile: Optional[int] = None,
               overlap: Optional[int] = None) -> torch.Tensor:
        _check_video(video, "WanVAE")
        self.latent_shape(*video.shape[2:])
        self._tiling(tile, overlap)
        z = self.model.encode(video.to(self.model.dtype)).latent_dist.mode()  # the posterior mean
        mean, std = self._stats(z)
        return (z - mean) / std

    def decode(self, latents: torch.Tensor, *, chunk: Optional[int] = None, tile: Optional[int] = None,
               overlap: Optional[int] = None) -> torch.Tensor:
        _check_latents(latents, self.channels, "WanVAE")
        self._tiling(tile, overlap)
        mean, std = self._stats(latents)
        return self.model.decode((latents * std + mean).to(self.model.dtype)).sample.clamp(-1, 1)

    def save_pretrained(self, folder) -> Path:
        """diffusers' own layout (config.json with "_class_name": "AutoencoderKLWan" + safetensors weights)."""
        self.model.save_pretrained(str(folder))
        return Path(folder)


def load_wan_vae(folder, dtype: torch.dtype = torch.float32) -> WanVAE:
    folder = Path(folder)
    try:
        from diffusers import AutoencoderKLWan
    except ImportError:
        raise VAEError(f"{folder} holds a diffusers AutoencoderKLWan: pip install diffusers to load it") from None
    weights = [folder / "diffusion_pytorch_model.safetensors"]  # what diffusers reads with use_safetensors=True
    if not weights[0].is_file():
        raise VAEError(f"the Wan VAE weights file {weights[0]} is missing; {_pickled(folder) or 'copy vae/ again'}")
    try:  # use_safetensors: never fall back to unpickling a diffusion_pytorch_model.bin beside it
        model = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                                 use_safetensors=True)
    except Exception as e:  # diffusers raises OSError, ValueError, SafetensorError, RuntimeError, ...
        raise VAEError(f"cannot load the Wan VAE weights {weights[0]} ({type(e).__name__}: {first_line(e)[:160]}); "
                       f"the file is corrupt or does not match {folder / 'config.json'}") from None
    return WanVAE(model)


# ----------------------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise VAEError(f"{path} is missing; pass 'identity' or a folder written by save_pretrained "
                       f"(or a diffusers AutoencoderKLWan folder)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VAEError(f"{path} is not valid JSON ({type(e).__name__}); re-save the model") from None
    if not isinstance(data, dict):
        raise VAEError(f"{path} must hold a JSON object; re-save the model")
    return data


def _pickled(folder: Path) -> str:  # what to say of pickled weights in `folder` (dfm never loads them); "" if none
    found = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    return (f"{found[0]} is pickled and dfm loads only safetensors (unpickling can run code): convert it where you "
            f"trust it, safetensors.torch.save_file(torch.load(FILE, weights_only=True), OUT)") if found else ""


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def load_vae(path_or_name) -> nn.Module:
    """"identity" (pixel space), a folder written by save_pretrained ({"type": "identity" | "causal_vae"}), or a
    diffusers AutoencoderKLWan folder ("_class_name": "AutoencoderKLWan"; a Wan pipeline folder's vae/ is found).
    Returned in eval mode, float32, on the CPU."""
    if isinstance(path_or_name, str) and path_or_name == "identity":
        return IdentityVAE()
    folder = Path(path_or_name)
    if not folder.is_dir():
        raise VAEError(f"VAE folder {folder} not found; pass 'identity' or a folder written by save_pretrained "
                       f"(e.g. models/vae_digits) or a diffusers AutoencoderKLWan folder")
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"  # a diffusers pipeline folder
    config = _read_json(folder / "config.json")
    if config.get("_class_name") == "AutoencoderKLWan":
        return load_wan_vae(folder)
    kind = config.get("type")
    if kind == "identity":
        return IdentityVAE()
    if kind == MODEL_TYPE:
        return CausalVAE.from_pretrained(folder, config)
    raise VAEError(f"{folder / 'config.json'} describes no known autoencoder (type {kind!r}, _class_name "
                   f"{config.get('_class_name')!r}); expected type 'causal_vae' or 'identity', or AutoencoderKLWan")
