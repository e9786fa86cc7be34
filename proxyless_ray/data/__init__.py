"""Data: splits (train / held-out for arch steps / test) behind one small batch interface.

A :class:`BatchSource` turns a batch of indices into ``(images, labels)`` tensors (float, normalised, NCHW).
In-memory sources (Fashion-MNIST) index tensors directly; file-backed sources (ImageFolder, Parquet shards)
decode on demand. Sharding across ranks is :func:`proxyless_ray.data.sharding.shard_batches`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from proxyless_ray.choices import DATASETS, expected


class DamagedShard(ValueError):
    """A Parquet shard's bytes cannot be read back (changed on disk since prepare-data): named with its row group.

    Here rather than in :mod:`.parquet` so that a Ray worker can tell it from other failures without importing the
    readers (pyarrow, torchvision)."""


class BatchSource(Protocol):
    """A split that can produce batches by index."""

    def __len__(self) -> int: ...

    def get_batch(self, indices: torch.Tensor, train: bool, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class Splits:
    """The three splits plus what the network must match."""

    train: BatchSource
    heldout: BatchSource
    test: BatchSource
    num_classes: int
    in_chs: int
    resolution: int
    name: str
    stats: dict | None = None  # e.g. skipped corrupt images: {"skipped": 3, "files": [...]}
    warmup: BatchSource | None = None  # what warm-up epochs read when it differs from train (data.warmup_subset)


def iterate(source: BatchSource, batches: Sequence[torch.Tensor], train: bool, seed: int = 0
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` for each index batch; augmentation randomness is seeded per batch for reproducibility."""
    for i, idx in enumerate(batches):
        g = torch.Generator().manual_seed(int(seed) * 7919 + i) if train else None
        yield source.get_batch(idx, train, g)


def load_splits(data_cfg, resolution: int, in_chs: int) -> Splits:
    """Build the splits a data config names; file-backed data is decoded to ``in_chs x resolution x resolution``."""
    if data_cfg.name not in READERS:
        raise ValueError(f"data.name {data_cfg.name!r} is unknown; {expected(DATASETS)}")
    module, function = READERS[data_cfg.name]
    # deferred on purpose: a data set's reader (pyarrow, PIL) loads only when it is used; readers import Splits
    # from this module, so they cannot be imported at its top
    reader = getattr(importlib.import_module(module), function)
    return reader(data_cfg) if data_cfg.name == "fashion_mnist" else reader(data_cfg, resolution, in_chs)


# One reader per name of the registry (proxyless_ray.choices.DATASETS): module and function
READERS: dict[str, tuple[str, str]] = {
    "fashion_mnist": ("proxyless_ray.data.fashion_mnist", "fashion_mnist_splits"),
    "imagefolder": ("proxyless_ray.data.imagefolder", "imagefolder_splits"),
    "parquet": ("proxyless_ray.data.parquet", "parquet_splits"),
}


def build_splits(data_cfg, space) -> Splits:
    """Build the splits a data config names, checked against the search space's input shape."""
    splits = load_splits(data_cfg, space.resolution, space.in_chs)
    check_shapes(splits, space.resolution, space.in_chs, space.num_classes)
    return splits


_CACHED: dict[tuple, Splits] = {}


def cached_splits(data_cfg, space) -> Splits:
    """:func:`build_splits`, once per process for one data config and input shape.

    A process that runs sweep trial after sweep trial (Tune's actor reuse) reads and decodes its data once. Users
    only read the splits (batches are drawn by index with the caller's generator), so trials cannot leak state
    through them. Only the latest entry is kept: a process moving on to other data does not hold both.
    """
    key = (data_cfg, space.resolution, space.in_chs, space.num_classes)
    if key not in _CACHED:
        _CACHED.clear()
        _CACHED[key] = build_splits(data_cfg, space)
    return _CACHED[key]


def check_shapes(splits: Splits, resolution: int, in_chs: int, num_classes: int) -> None:
    """Refuse a network whose input shape or class count does not match the data."""
    if splits.resolution != resolution or splits.in_chs != in_chs:
        raise ValueError(
            f"data set {splits.name!r} gives {splits.in_chs}x{splits.resolution}x{splits.resolution} images but the "
            f"network expects {in_chs}x{resolution}x{resolution}; set space.resolution / space.in_chs to match"
        )
    if splits.num_classes != num_classes:
        raise ValueError(f"data set {splits.name!r} has {splits.num_classes} classes but the network has "
                         f"{num_classes} outputs; set space.num_classes: {splits.num_classes}")
