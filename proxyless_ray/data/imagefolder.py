"""Image folders: class discovery, deterministic train / held-out / test carving, images decoded on demand.

Two layouts are read:

- ImageNet: ``DIR/train/<class>/*.JPEG`` and ``DIR/val/<class>/*.JPEG``; val is the test split.
- One folder of class subfolders, ``DIR/<class>/*`` (or ``DIR/train`` without a ``val``): the test split is carved
  from it too (``data.test_size`` images, default 10%), deterministically, and the log and ``Splits.stats`` say so.

The held-out split for architecture steps is always carved from train (``data.heldout_size`` images, seeded by
``data.seed``). Labels are the indices of the sorted class folder names, as in torchvision's ``ImageFolder``.
Decoding and transforms are :mod:`proxyless_ray.data.transforms`, shared with the Parquet reader.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from proxyless_ray.data import Splits
from proxyless_ray.data.transforms import IMG_EXTENSIONS, EncodedSource, new_stats

log = logging.getLogger(__name__)

TEST_DIRS = ("val", "test")


@dataclass(frozen=True)
class Layout:
    """Where the splits of an image folder live."""

    root: str
    train_dir: str
    test_dir: str | None  # None: carve the test split from train_dir
    kind: str  # "imagenet" (train/ + val/), "train_only" (train/ without val/) or "single" (DIR/<class>/)


def find_classes(folder: str) -> list[str]:
    """Sorted names of the class subfolders of ``folder`` (hidden folders ignored).

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: ``folder`` has no class subfolders.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder!r} does not exist")
    with os.scandir(folder) as it:
        classes = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {folder!r} has no class subfolders; expected {folder}/<class>/<image> "
                         f"(ImageNet layout: {folder}/train/<class>/ and {folder}/val/<class>/)")
    return classes


def list_images(folder: str, classes: list[str], require_all: bool = True) -> tuple[list[str], list[int], int]:
    """Image files under ``folder/<class>/`` (recursively, sorted), their labels and the number of other files.

    Args:
        folder: Folder holding the class subfolders.
        classes: Class names; a file's label is its class's position in this list.
        require_all: Raise if a class has no image (a training class the network could never learn).

    Returns:
        ``(paths, labels, ignored)``; ``ignored`` counts files without an image extension.
    """
    paths: list[str] = []
    labels: list[int] = []
    ignored = 0
    empty = []
    for label, name in enumerate(classes):
        cdir = os.path.join(folder, name)
        before = len(paths)
        if os.path.isdir(cdir):
            for dirpath, dirnames, filenames in os.walk(cdir, followlinks=True):
                dirnames.sort()
                for f in sorted(filenames):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        paths.append(os.path.join(dirpath, f))
                        labels.append(label)
                    else:
                        ignored += 1
        if len(paths) == before:
            empty.append(name)
    if not paths:
        raise ValueError(f"image folder {folder!r} holds no image files (extensions {list(IMG_EXTENSIONS)}) in its "
                         f"{len(classes)} class subfolder(s)")
    if empty and require_all:
        raise ValueError(f"image folder {folder!r}: class folder(s) {empty[:10]} hold no image files")
    return paths, labels, ignored


def resolve_layout(root: str) -> Layout:
    """Tell the ImageNet layout (``train/`` + ``val/``) from a single folder of class subfolders."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        return Layout(root, root, None, "single")
    for name in TEST_DIRS:
        test_dir = os.path.join(root, name)
        if os.path.isdir(test_dir):
            return Layout(root, train_dir, test_dir, "imagenet")
    return Layout(root, train_dir, None, "train_only")


def carve(n: int, heldout_size: int, seed: int, test_size: int | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Deterministic disjoint index sets ``(train, heldout, test)`` of ``range(n)``.

    Args:
        n: Number of images.
        heldout_size: Images for the held-out split.
        seed: Seed of the permutation.
        test_size: Images for a carved test split: None carves none, 0 carves 10%.

    Raises:
        ValueError: nothing would be left for training.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    n_test = 0 if test_size is None else (int(test_size) or max(1, n // 10))
    test = perm[:n_test] if test_size is not None else None
    held = perm[n_test:n_test + heldout_size]
    train = perm[n_test + heldout_size:]
    if len(train) == 0:
        raise ValueError(f"data.heldout_size {heldout_size} and a test split of {n_test} leave no training images "
                         f"out of {n}; lower data.heldout_size / data.test_size")
    return train, held, test


def subset(idx: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """A seeded random ``size`` of ``idx`` (all of it when ``size`` is 0): class-sorted folders stay balanced."""
    if not size or size >= len(idx):
        return idx
    return idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(int(seed) + 1))[:size]]


class FileSource(EncodedSource):
    """Images read from files on demand.

    Args:
        paths: Image file paths.
        labels: Class index per path.
        root: Prefix stripped from paths in reports.
        **kwargs: :class:`~proxyless_ray.data.transforms.EncodedSource` arguments (resolution, in_chs, ...).
    """

    def __init__(self, paths: list[str], labels: list[int], root: str = "", **kwargs):
        super().__init__(len(paths), **kwargs)
        self.paths, self.labels, self.root = paths, labels, root

    def _load(self, indices: list[int]) -> list[tuple[torch.Tensor | None, int, str]]:
        return [(read_bytes(self.paths[i]), self.labels[i], os.path.relpath(self.paths[i], self.root or "/"))
                for i in indices]


def read_bytes(path: str) -> torch.Tensor | None:
    """A file's bytes as a 1-D uint8 tensor (read straight into the tensor's buffer); None if unreadable."""
    try:
        with open(path, "rb") as fh:
            buf = bytearray(os.fstat(fh.fileno()).st_size)
            got = fh.readinto(buf)
    except OSError:
        return None
    if got == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(buf, dtype=torch.uint8)[:got]


def imagefolder_splits(data_cfg, resolution: int, in_chs: int) -> Splits:
    """Train / held-out / test splits of an image folder (layouts in the module docstring).

    Args:
        data_cfg: :class:`~proxyless_ray.config.DataConfig` (path, heldout_size, test_size, subsets, seed, ...).
        resolution: Image side the network expects.
        in_chs: 1 (grayscale) or 3 (RGB).

    Returns:
        The splits; ``stats`` holds the layout, image counts, the test split's origin and unreadable images.
    """
    if not data_cfg.path:
        raise ValueError("data.path must name the image folder for data.name: imagefolder")
    layout = resolve_layout(data_cfg.path)
    classes = find_classes(layout.train_dir)
    paths, labels, ignored = list_images(layout.train_dir, classes)
    test_size = None if layout.test_dir else data_cfg.test_size
    train, held, test = carve(len(paths), data_cfg.heldout_size, data_cfg.seed, test_size)
    if layout.test_dir:
        test_classes = find_classes(layout.test_dir)
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise ValueError(f"test folder {layout.test_dir!r} has class(es) {unknown[:10]} that "
                             f"{layout.train_dir!r} lacks; both must use the same class folder names")
        test_paths, test_labels, ignored_test = list_images(layout.test_dir, classes, require_all=False)
        ignored += ignored_test
        test = subset(torch.arange(len(test_paths)), data_cfg.test_subset, data_cfg.seed)
        test_split = f"{layout.test_dir} ({len(test)} images)"
    else:
        test_paths, test_labels = paths, labels
        test = subset(test, data_cfg.test_subset, data_cfg.seed)
        test_split = (f"carved from {layout.train_dir}: {len(test)} images (data.test_size, seed {data_cfg.seed}), "
                      f"since there is no {'/'.join(TEST_DIRS)} folder")
        log.warning("image folder %s has no %s folder: test split %s", layout.root, "/".join(TEST_DIRS), test_split)
    train = subset(train, data_cfg.train_subset, data_cfg.seed)
    stats = new_stats(layout=layout.kind, source=layout.root, classes=classes, test_split=test_split,
                      images={"train": len(train), "heldout": len(held), "test": len(test)}, ignored_files=ignored,
                      skipped_at_prepare=0)
    common = dict(resolution=resolution, in_chs=in_chs, workers=data_cfg.loader_workers, stats=stats)

    def source(idx: torch.Tensor, p: list[str], lab: list[int], augment: bool) -> FileSource:
        return FileSource([p[i] for i in idx.tolist()], [lab[i] for i in idx.tolist()], layout.root,
                          augment=augment, **common)

    return Splits(
        train=source(train, paths, labels, data_cfg.augment),
        heldout=source(held, paths, labels, False),
        test=source(test, test_paths, test_labels, False),
        num_classes=len(classes), in_chs=in_chs, resolution=resolution, name="imagefolder", stats=stats,
    )
