"""Small real image folders for the data tests, written from Fashion-MNIST (or noise when it is not installed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from proxyless_ray.data.fashion_mnist import DEFAULT_DIR, FILES, read_idx

CLASSES = ("bag", "coat", "trouser")  # Fashion-MNIST labels 8, 4, 1


def source_images(n: int) -> list[np.ndarray]:
    """``n`` grayscale 28x28 uint8 images per class of :data:`CLASSES`, in class order."""
    path = os.path.join(DEFAULT_DIR, FILES["test_images"])
    if os.path.isfile(path):
        x = read_idx(path)
        y = read_idx(os.path.join(DEFAULT_DIR, FILES["test_labels"]))
        return [x[y == label][:n] for label in (8, 4, 1)]
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for _ in CLASSES]


def write_class_folder(root: Path, per_class: int, offset: int = 0, size: int = 40, png_every: int = 4,
                       rgb: bool = True) -> list[Path]:
    """Write ``root/<class>/img_<k>.{jpg,png}``: JPEG mostly, PNG every ``png_every``-th; returns the paths."""
    paths = []
    for cls, imgs in zip(CLASSES, source_images(per_class + offset)):
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for k, arr in enumerate(imgs[offset:offset + per_class]):
            im = Image.fromarray(arr).resize((size + k % 3 * 4, size), Image.BILINEAR)
            if rgb:  # a tint so the three channels differ
                im = Image.merge("RGB", (im, im.point(lambda v: v // 2), im.point(lambda v: 255 - v)))
            ext = "png" if png_every and k % png_every == png_every - 1 else "jpg"
            p = folder / f"img_{k:03d}.{ext}"
            im.save(p, quality=90) if ext == "jpg" else im.save(p)
            paths.append(p)
    return paths


def add_bad_files(folder: Path) -> list[Path]:
    """A corrupt JPEG, a zero-byte PNG and a non-image file in the first class of ``folder``."""
    cdir = folder / CLASSES[0]
    corrupt = cdir / "zz_corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 10)
    empty = cdir / "zz_empty.png"
    empty.write_bytes(b"")
    (cdir / "notes.txt").write_text("not an image")
    return [corrupt, empty]


def make_imagenet(root: Path, per_class: int = 20, val_per_class: int = 5, bad: bool = True, rgb: bool = True
                  ) -> Path:
    """An ImageNet-layout folder ``root/train/<class>/`` + ``root/val/<class>/``; returns ``root``."""
    write_class_folder(root / "train", per_class, rgb=rgb)
    write_class_folder(root / "val", val_per_class, offset=per_class, rgb=rgb)
    if bad:
        add_bad_files(root / "train")
    return root
