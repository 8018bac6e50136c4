"""Video backbones on one layer library (`layers`, `rope`): DiT for EDM, WAN (Wan 2.1) for flow matching."""

from .dit import DIT_CONFIGS, DiT, DiTConfig, HourglassDiT
from .wan import WAN_CONFIGS, CheckpointError, WanConfig, WanModel

__all__ = ["DIT_CONFIGS", "DiT", "DiTConfig", "HourglassDiT", "WAN_CONFIGS", "CheckpointError", "WanConfig", "WanModel"]
