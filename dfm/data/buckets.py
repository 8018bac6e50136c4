"""Bucketing: batches whose items share one shape (frames, height, width), sharded across DDP ranks.

Videos differ in aspect ratio and length. Instead of cropping everything to one shape, each item gets a bucket
key (e.g. `(F, H, W)`, see `VideoFolder.bucket_keys`) and a batch only mixes items with the same key.

    sampler = BucketBatchSampler(dataset.bucket_keys, batch_size=4, seed=0, rank=rank, world_size=world)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)   # a new, still deterministic, order each epoch
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def nearest_bucket(height: int, width: int, sizes: Sequence[Sequence[int]]) -> tuple:
    """The (H, W) in `sizes` whose aspect ratio is closest to height/width (compared in log space)."""
    if not sizes:
        raise ValueError("nearest_bucket needs at least one (H, W) size")
    ratio = math.log(height / width)
    return tuple(min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - ratio)))


class BucketBatchSampler(Sampler):
    """Yield lists of dataset indices; every list holds indices of one bucket key.

    keys: one hashable bucket key per dataset item (or a dataset with a `bucket_keys` attribute).
    shuffle: shuffle within buckets and the order of batches, from a generator seeded by (seed, epoch).
    drop_last: drop each bucket's last incomplete batch (otherwise it is yielded smaller).
    rank, world_size: this process takes batches rank, rank + world_size, ...; the batch list is padded by
        repeating its first batches so every rank gets the same number (DDP needs equal step counts).
    """

    def __init__(
        self,
        keys,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        keys = getattr(keys, "bucket_keys", keys)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.keys = list(keys)
        self.batch_size, self.shuffle, self.drop_last = int(batch_size), bool(shuffle), bool(drop_last)
        self.seed, self.rank, self.world_size, self.epoch = int(seed), int(rank), int(world_size), 0
        self.groups: dict = {}  # key -> indices, keys in order of first appearance (deterministic)
        for index, key in enumerate(self.keys):
            self.groups.setdefault(key, []).append(index)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order `__iter__` yields (same on every rank, so shards never overlap)."""
        self.epoch = int(epoch)

    def batches(self) -> list:
        """All batches of this epoch, for all ranks, after padding to a multiple of world_size."""
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for indices in self.groups.values():
            order = np.asarray(indices)
            if self.shuffle:
                order = order[rng.permutation(len(order))]
            for begin in range(0, len(order), self.batch_size):
                batch = order[begin : begin + self.batch_size].tolist()
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if batches and len(batches) % self.world_size:
            pad = self.world_size - len(batches) % self.world_size
            batches += [batches[i % len(batches)] for i in range(pad)]
        return batches

    def __iter__(self) -> Iterator[list]:
        yield from self.batches()[self.rank :: self.world_size]

    def __len__(self) -> int:
        full = sum(len(g) // self.batch_size for g in self.groups.values())
        partial = 0 if self.drop_last else sum(1 for g in self.groups.values() if len(g) % self.batch_size)
        return math.ceil((full + partial) / self.world_size)

