"""Video backbones on one layer library (`layers`, `rope`): DiT for EDM, WAN (Wan 2.1) for flow matching."""

from dfm.errors import CheckpointError  # what WanModel.from_pretrained raises; the same class as dfm.checkpoint's

from .dit import DIT_CONFIGS, DiT, DiTConfig, HourglassDiT
from .wan import WAN_CONFIGS, WanConfig, WanModel

__all__ = ["DIT_CONFIGS", "DiT", "DiTConfig", "HourglassDiT", "WAN_CONFIGS", "CheckpointError", "WanConfig", "WanModel"]
