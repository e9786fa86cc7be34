"""Decode + augment for file-backed splits: ImageFolder and Parquet shards share this one code path.

:class:`EncodedSource` turns a batch of indices into normalised NCHW float tensors from encoded image bytes. Its
subclasses only say how an index becomes ``(bytes, label, key)``. The transforms are the usual ImageNet ones
(train: RandomResizedCrop(resolution, scale=(0.08, 1)) + horizontal flip; eval: Resize(resolution / 0.875) +
CenterCrop(resolution)), done on uint8 tensors:

- JPEGs go through libjpeg-turbo in ``torchvision.io.decode_jpeg`` (one call per batch); PNG/GIF/WebP through
  ``decode_image``; anything else (BMP, TIFF, ...) through PIL. Grayscale is decoded straight to one channel.
- A crop is a view, and one antialiased uint8 ``interpolate`` per image resizes it; normalisation runs once per
  batch. This is what makes the reader faster than ImageFolder + PIL + ``transforms`` v1 (``benchmarks/bench_data.py``,
  ``docs/benchmarks.md``). Outputs match torchvision's PIL pipeline to within a grey level or so (tested).
- The random numbers of a batch are drawn up front from the batch's generator, so results do not depend on the
  number of decoding threads nor on which images turned out unreadable.

Unreadable images (corrupt, empty, vanished) never stop a run: each is logged, counted in the split's stats and
replaced by the next readable image of the split, so batches keep their shape (DDP ranks stay in step).
torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they remain the fastest CPU path here.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)  # channel averages of the ImageNet statistics
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
EVAL_CROP = 0.875  # eval resizes the short side to resolution / 0.875, then centre-crops
RRC_TRIES = 10
N_UNIFORMS = 2 * RRC_TRIES + 3  # per image: (scale, ratio) per try, crop top/left, flip
MAX_LISTED = 100  # unreadable files named in stats; the count is always exact
_JPEG_MAGIC = b"\xff\xd8\xff"


class CorruptImage(ValueError):
    """Encoded bytes that no decoder can read."""


def _is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and bytes(data[:3].tolist()) == _JPEG_MAGIC


def decode(data: torch.Tensor, in_chs: int) -> torch.Tensor:
    """Decode encoded bytes to a uint8 ``(in_chs, H, W)`` tensor.

    Args:
        data: 1-D uint8 tensor of the encoded file.
        in_chs: 1 (grayscale, PIL mode 'L' weights) or 3 (RGB; grayscale files are expanded, alpha dropped).

    Returns:
        The decoded image.

    Raises:
        CorruptImage: no decoder could read the bytes.
    """
    if data.numel() == 0:
        raise CorruptImage("empty file")
    mode = ImageReadMode.GRAY if in_chs == 1 else ImageReadMode.RGB
    try:
        img = decode_jpeg(data, mode=mode) if _is_jpeg(data) else decode_image(data, mode=mode)
        if img.dtype == torch.uint8 and img.dim() == 3 and img.shape[0] == in_chs and img.numel():
            return img
    except RuntimeError:
        pass  # a format torchvision cannot read (BMP, TIFF, ...) or damaged bytes: PIL decides which
    return decode_pil(data, in_chs)


def decode_pil(data: torch.Tensor, in_chs: int) -> torch.Tensor:
    """PIL fallback of :func:`decode`; raises :class:`CorruptImage` when PIL cannot read the bytes either."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            arr = np.asarray(im.convert("L" if in_chs == 1 else "RGB"))
    except Exception as err:  # untrusted bytes: any failure (OSError, SyntaxError, DecompressionBombError) = corrupt
        raise CorruptImage(f"{type(err).__name__}: {err}") from None
    if arr.size == 0:
        raise CorruptImage("image has no pixels")
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def decode_many(blobs: list[torch.Tensor | None], in_chs: int) -> list[torch.Tensor | str]:
    """Decode a batch: JPEGs in one ``decode_jpeg`` call; each entry is an image or the reason it failed."""
    out: list[torch.Tensor | str] = ["unreadable or empty file"] * len(blobs)
    jpegs = [k for k, b in enumerate(blobs) if b is not None and _is_jpeg(b)]
    if jpegs:
        mode = ImageReadMode.GRAY if in_chs == 1 else ImageReadMode.RGB
        try:
            for k, img in zip(jpegs, decode_jpeg([blobs[k] for k in jpegs], mode=mode)):
                out[k] = img
        except RuntimeError:
            jpegs = []  # one bad JPEG fails the whole call: decode one by one below
    done = set(jpegs)
    for k, b in enumerate(blobs):
        if k in done or b is None:
            continue
        try:
            out[k] = decode(b, in_chs)
        except CorruptImage as err:
            out[k] = str(err)
    return out


def draw_uniforms(n: int, generator: torch.Generator | None) -> list[list[float]]:
    """All random numbers a batch of ``n`` training images needs, drawn at once."""
    return torch.rand(n, N_UNIFORMS, generator=generator, dtype=torch.float64).tolist()


def rrc_box(h: int, w: int, u: list[float], scale: tuple[float, float] = RRC_SCALE,
            ratio: tuple[float, float] = RRC_RATIO) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` driven by pre-drawn uniforms: ``(top, left, height, width)``."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(RRC_TRIES):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[2 * t + 1])
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = min(int(u[-3] * (h - ch + 1)), h - ch)
            left = min(int(u[-2] * (w - cw + 1)), w - cw)
            return top, left, ch, cw
    in_ratio = w / h  # fallback: centre crop at the nearest allowed aspect ratio
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def eval_resize_crop(img: torch.Tensor, resolution: int) -> torch.Tensor:
    """torchvision's Resize(int(resolution / 0.875)) + CenterCrop(resolution) on a uint8 CHW image."""
    h, w = img.shape[-2:]
    short = int(resolution / EVAL_CROP)
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    if (nh, nw) != (h, w):
        img = F.interpolate(img.unsqueeze(0), size=(nh, nw), mode="bilinear", antialias=True,
                            align_corners=False).squeeze(0)
    top, left = int(round((nh - resolution) / 2.0)), int(round((nw - resolution) / 2.0))
    return img[:, top:top + resolution, left:left + resolution]


def crop_resize(img: torch.Tensor, box: tuple[int, int, int, int], resolution: int, flip: bool = False
                ) -> torch.Tensor:
    """Crop ``box`` out of a uint8 CHW image and resize it (bilinear, antialiased) to ``resolution`` squared."""
    top, left, h, w = box
    crop = img[:, top:top + h, left:left + w]
    if (h, w) != (resolution, resolution):
        crop = F.interpolate(crop.unsqueeze(0), size=(resolution, resolution), mode="bilinear", antialias=True,
                             align_corners=False).squeeze(0)
    return crop.flip(-1) if flip else crop


def normalise(batch: torch.Tensor, in_chs: int) -> torch.Tensor:
    """uint8 NCHW -> float32 normalised with the ImageNet statistics (one channel: their average)."""
    mean, std = (GRAY_MEAN, GRAY_STD) if in_chs == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    m = torch.tensor(mean).mul_(255.0).view(1, -1, 1, 1)
    s = torch.tensor(std).mul_(255.0).view(1, -1, 1, 1)
    return batch.float().sub_(m).div_(s)


def new_stats(**info) -> dict:
    """The stats dict of a split family; :class:`EncodedSource` adds read-time skips to it as they happen."""
    return {**info, "skipped": info.get("skipped_at_prepare", 0), "skipped_at_read": 0, "skipped_files": []}


class EncodedSource:
    """A split of encoded images; subclasses implement :meth:`_load`.

    Args:
        n: Number of images in the split.
        resolution: Output height == width.
        in_chs: 1 or 3.
        augment: Use the training transforms when ``get_batch(..., train=True)``.
        workers: Decoding threads per batch (0: decode in the calling thread).
        stats: Shared stats dict (see :func:`new_stats`); unreadable images are counted into it.
    """

    def __init__(self, n: int, resolution: int, in_chs: int, augment: bool = True, workers: int = 0,
                 stats: dict | None = None):
        if in_chs not in (1, 3):
            raise ValueError(f"in_chs must be 1 (grayscale) or 3 (RGB), got {in_chs}")
        self.n, self.resolution, self.in_chs, self.augment = n, resolution, in_chs, augment
        self.workers = max(0, int(workers))
        self.stats = stats if stats is not None else new_stats()
        self.bad: set[int] = set()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:  # picklable for Ray: threads and locks are rebuilt on the other side
        state = self.__dict__.copy()
        state["_lock"], state["_pool"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _load(self, indices: list[int]) -> list[tuple[torch.Tensor | None, int, str]]:
        """``(encoded bytes as uint8 tensor or None if unreadable, label, key)`` for each index of this split."""
        raise NotImplementedError

    def get_batch(self, indices: torch.Tensor, train: bool, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode and transform the images at ``indices``.

        Args:
            indices: 1-D tensor of indices into this split.
            train: Training transforms (random crop + flip) when the source augments; eval transforms otherwise.
            generator: Seeds the augmentation of this batch.

        Returns:
            ``(x, y)``: float32 ``(N, in_chs, resolution, resolution)`` normalised images and int64 labels.
        """
        idx = [int(i) for i in indices.tolist()]
        if not idx:
            return torch.empty(0, self.in_chs, self.resolution, self.resolution), torch.empty(0, dtype=torch.long)
        u = draw_uniforms(len(idx), generator) if train and self.augment else None
        chunks = self._chunks(len(idx))
        if len(chunks) == 1:
            parts = [self._transform(idx, u)]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
            parts = list(self._pool.map(lambda c: self._transform(idx[c], u[c] if u else None), chunks))
        x = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        y = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        return normalise(x, self.in_chs), y

    def _chunks(self, n: int) -> list[slice]:
        k = min(self.workers, n // 8)  # below ~8 images per thread, the thread hop costs more than it saves
        if k <= 1:
            return [slice(0, n)]
        bounds = np.linspace(0, n, k + 1).round().astype(int)
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def _transform(self, idx: list[int], u: list[list[float]] | None) -> tuple[torch.Tensor, torch.Tensor]:
        items = self._load([self._readable(i) for i in idx])
        imgs = decode_many([b for b, _, _ in items], self.in_chs)
        labels = [lab for _, lab, _ in items]
        out = torch.empty(len(idx), self.in_chs, self.resolution, self.resolution, dtype=torch.uint8)
        for k, img in enumerate(imgs):
            if isinstance(img, str):
                img, labels[k] = self._substitute(idx[k], items[k][2], img)
            if u is None:
                out[k] = eval_resize_crop(img, self.resolution)
            else:
                box = rrc_box(img.shape[-2], img.shape[-1], u[k])
                out[k] = crop_resize(img, box, self.resolution, flip=u[k][-1] < 0.5)
        return out, torch.tensor(labels, dtype=torch.long)

    def _readable(self, i: int) -> int:
        """``i`` or, if ``i`` is known to be unreadable, the next index that is not known to be."""
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} is out of range for a split of {self.n} images")
        for step in range(self.n):
            j = (i + step) % self.n
            if j not in self.bad:
                return j
        raise ValueError(f"none of the {self.n} images of this split can be decoded; see the log for reasons")

    def _substitute(self, i: int, key: str, reason: str) -> tuple[torch.Tensor, int]:
        """Record ``i`` as unreadable and decode the next readable image of the split in its place."""
        self._record(i, key, reason)
        while True:
            j = self._readable(i)
            data, label, key = self._load([j])[0]
            img = decode_many([data], self.in_chs)[0]
            if not isinstance(img, str):
                return img, label
            self._record(j, key, img)

    def _record(self, i: int, key: str, reason: str) -> None:
        with self._lock:
            if i in self.bad:
                return
            self.bad.add(i)
            s = self.stats
            s["skipped"] += 1
            s["skipped_at_read"] += 1
            if len(s["skipped_files"]) < MAX_LISTED:
                s["skipped_files"].append(key)
            count = s["skipped_at_read"]
        if count <= 10 or math.log10(count).is_integer():
            log.warning("skipping unreadable image %s (%s); %d skipped while reading so far, see Splits.stats",
                        key, reason, count)
