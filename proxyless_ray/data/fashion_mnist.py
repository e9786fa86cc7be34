"""Fashion-MNIST from its gzip idx files (Debian's ``dataset-fashion-mnist`` by default), held in memory.

Augmentation (random 2-px shifts via pad-and-crop, horizontal flip) runs batched on tensors: per-image Python
transforms would cost more than the small supernet's step on 2 cores.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import torch

from proxyless_ray.data import Splits

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MEAN, STD = 0.2860, 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a numpy array; raises ValueError on a malformed header."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an idx header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {arr.size} values")
    return arr.reshape(dims)


def resolve_dir(path: str | None) -> str:
    """The folder holding the four idx files; raises FileNotFoundError naming what is missing."""
    folder = path or DEFAULT_DIR
    if not os.path.isdir(folder):
        hint = " (install Debian's dataset-fashion-mnist or pass --data DIR)" if path is None else ""
        raise FileNotFoundError(f"Fashion-MNIST folder {folder!r} does not exist{hint}")
    missing = [f for f in FILES.values() if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST folder {folder!r} lacks {missing}; expected the four idx .gz files")
    return folder


class TensorSource:
    """Images and labels in memory (uint8 NCHW), normalised and optionally augmented per batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float, pad: int = 2):
        self.images = images if images.dim() == 4 else images.unsqueeze(1)
        self.labels = labels.long()
        self.mean, self.std, self.pad = mean, std, pad

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: torch.Tensor, train: bool, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[indices].float().div_(255.0)
        if train and self.pad:
            x = random_shift_flip(x, self.pad, generator)
        return x.sub_(self.mean).div_(self.std), self.labels[indices]


def random_shift_flip(x: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
    """Batched random translation by up to ``pad`` pixels (zero fill) and horizontal flip."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def fashion_mnist_splits(data_cfg) -> Splits:
    """Train (minus a held-out part for arch steps), held-out and test splits of Fashion-MNIST."""
    folder = resolve_dir(data_cfg.path)
    xs = torch.from_numpy(read_idx(os.path.join(folder, FILES["train_images"])).copy())
    ys = torch.from_numpy(read_idx(os.path.join(folder, FILES["train_labels"])).astype(np.int64))
    xt = torch.from_numpy(read_idx(os.path.join(folder, FILES["test_images"])).copy())
    yt = torch.from_numpy(read_idx(os.path.join(folder, FILES["test_labels"])).astype(np.int64))
    if len(xs) == 0:
        raise ValueError(f"Fashion-MNIST folder {folder!r} holds no training images")
    perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(data_cfg.seed))
    held = perm[:data_cfg.heldout_size]
    train = perm[data_cfg.heldout_size:]
    warm = train[:data_cfg.warmup_subset] if data_cfg.warmup_subset else None
    if data_cfg.train_subset:
        train = train[:data_cfg.train_subset]
    if len(train) == 0:
        raise ValueError(f"data.heldout_size {data_cfg.heldout_size} leaves no training images out of {len(xs)}")
    if data_cfg.test_subset:
        xt, yt = xt[:data_cfg.test_subset], yt[:data_cfg.test_subset]
    pad = 2 if data_cfg.augment else 0
    return Splits(
        train=TensorSource(xs[train], ys[train], MEAN, STD, pad),
        heldout=TensorSource(xs[held], ys[held], MEAN, STD, 0),
        test=TensorSource(xt, yt, MEAN, STD, 0),
        num_classes=10, in_chs=1, resolution=28, name="fashion_mnist",
        warmup=None if warm is None else TensorSource(xs[warm], ys[warm], MEAN, STD, pad),
    )
