"""Data path throughput: the Parquet reader vs torchvision ImageFolder + PIL on the same JPEGs, one core.

Writes Fashion-MNIST images, upscaled to 64-96 px RGB JPEGs, into a temporary ImageNet-layout folder, converts it
with ``prepare-data`` and times decode + train transforms (RandomResizedCrop + flip + normalise) over the same
index order, batch by batch, under ``torch.set_num_threads(1)``:

- ``parquet``: :class:`proxyless_ray.data.parquet.ParquetSource` (row groups cached after the first pass).
- ``imagefolder_pil``: ``torchvision.datasets.ImageFolder`` (PIL loader) + ``transforms`` v1, batched by a
  ``DataLoader`` with ``num_workers=0``.

Each pipeline runs one untimed warm-up pass, then ``--repeats`` timed passes, alternating; the median is reported.
Target: ratio >= 1.5. Prints one JSON object.

    python benchmarks/bench_data.py [--images 2000] [--resolution 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from proxyless_ray.data.fashion_mnist import CLASSES, FILES, read_idx, resolve_dir
from proxyless_ray.data.parquet import ParquetSource, ShardSet, open_location, read_manifest
from proxyless_ray.data.prepare import prepare
from proxyless_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD

TARGET = 1.5


def write_images(root: str, n: int, seed: int = 0) -> int:
    """``n`` Fashion-MNIST training images as RGB JPEGs of 64-96 px under ``root/train/<class>/``; total bytes."""
    folder = resolve_dir(None)
    x = read_idx(os.path.join(folder, FILES["train_images"]))[:n]
    y = read_idx(os.path.join(folder, FILES["train_labels"]))[:n]
    rng = np.random.default_rng(seed)
    total = 0
    for k, (img, label) in enumerate(zip(x, y)):
        w, h = (int(v) for v in rng.integers(64, 97, size=2))
        gray = Image.fromarray(img).resize((w, h), Image.BILINEAR)
        rgb = Image.merge("RGB", (gray, gray.point(lambda v: v // 2 + 64), gray.point(lambda v: 255 - v)))
        cdir = os.path.join(root, "train", CLASSES[label].replace("/", "-"))
        os.makedirs(cdir, exist_ok=True)
        path = os.path.join(cdir, f"{k:05d}.JPEG")
        rgb.save(path, format="JPEG", quality=90)
        total += os.path.getsize(path)
    return total


def time_parquet(source: ParquetSource, batches: list[torch.Tensor], train: bool) -> float:
    t0 = time.perf_counter()
    for i, idx in enumerate(batches):
        source.get_batch(idx, train, torch.Generator().manual_seed(i))
    return time.perf_counter() - t0


def time_imagefolder(loader: DataLoader) -> float:
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    res, bs = args.resolution, args.batch_size
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        jpeg_bytes = write_images(os.path.join(tmp, "images"), args.images)
        t0 = time.perf_counter()
        prepare(os.path.join(tmp, "images"), os.path.join(tmp, "shards"), workers=1, progress=False)
        prepare_s = time.perf_counter() - t0
        fs, root = open_location(os.path.join(tmp, "shards"))
        shards = ShardSet(os.path.join(tmp, "shards"), read_manifest(fs, root)["splits"]["train"]["shards"])
        n = len(shards)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        batches = list(perm.split(bs))
        results: dict[str, list[float]] = {}
        for mode in ("train", "eval"):
            train = mode == "train"
            source = ParquetSource(shards, torch.arange(n), resolution=res, in_chs=3, augment=True)
            tf = ([T.RandomResizedCrop(res), T.RandomHorizontalFlip()] if train
                  else [T.Resize(int(res / 0.875)), T.CenterCrop(res)])
            dataset = torchvision.datasets.ImageFolder(
                os.path.join(tmp, "images", "train"),
                transform=T.Compose([*tf, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
            loader = DataLoader(dataset, batch_size=bs, sampler=perm.tolist(), num_workers=0)
            time_parquet(source, batches, train)  # warm-up: fills the row-group cache and the page cache
            time_imagefolder(loader)
            for _ in range(args.repeats):
                results.setdefault(f"parquet_{mode}", []).append(n / time_parquet(source, batches, train))
                results.setdefault(f"imagefolder_pil_{mode}", []).append(n / time_imagefolder(loader))
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["parquet_train"] / med["imagefolder_pil_train"]
    print(json.dumps({
        "benchmark": "data_decode_augment",
        "images": n, "image_px": [64, 96], "mean_jpeg_bytes": round(jpeg_bytes / n), "resolution": res,
        "batch_size": bs, "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
        "parquet_train_img_s": round(med["parquet_train"], 1),
        "imagefolder_pil_train_img_s": round(med["imagefolder_pil_train"], 1),
        "ratio_train": round(ratio, 3),
        "parquet_eval_img_s": round(med["parquet_eval"], 1),
        "imagefolder_pil_eval_img_s": round(med["imagefolder_pil_eval"], 1),
        "ratio_eval": round(med["parquet_eval"] / med["imagefolder_pil_eval"], 3),
        "target_ratio": TARGET, "meets_target": ratio >= TARGET,
        "prepare_data_s": round(prepare_s, 2),
        "all_img_s": {k: [round(v, 1) for v in vs] for k, vs in results.items()},
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "pillow": Image.__version__},
    }))


if __name__ == "__main__":
    main()
