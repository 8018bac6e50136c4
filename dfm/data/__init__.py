"""Datasets: Moving Digits (built in, from scikit-learn's digits) and folders of real videos.

    from dfm.data import MovingDigits, VideoFolder, LatentDataset, BucketBatchSampler, collate
    data = MovingDigits(num_frames=16, size=32)          # item["video"]: [3, 16, 32, 32] in [-1, 1]
    loader = DataLoader(data, batch_size=8, collate_fn=collate)

Items are dicts with at least "video" ([3, F, H, W] float in [-1, 1]) and "caption" (str).
"""

from __future__ import annotations

import torch

from .buckets import BucketBatchSampler
from .digits import COLORS, DIRECTIONS, MovingDigits, caption_for, parse_caption
from .folders import VideoFolder
from .latents import LatentDataset


def collate(items: list) -> dict:
    """Batch a list of item dicts: tensors of one shape are stacked ([B, ...]); anything else becomes a list.

    Unlike torch's default_collate it keeps None (an uncoloured digit), strings and ragged lists as plain lists.
    """
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


__all__ = [
    "BucketBatchSampler",
    "COLORS",
    "DIRECTIONS",
    "LatentDataset",
    "MovingDigits",
    "VideoFolder",
    "caption_for",
    "collate",
    "parse_caption",
]
