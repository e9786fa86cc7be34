"""Parquet image shards (written by ``proxyless-ray prepare-data``): manifest, checks and a lazy row-group reader.

A data set is a folder, local or any pyarrow filesystem URI (``file://``, ``s3://``, ``gs://``: cluster nodes do not
share a disk), holding ``manifest.json`` and shards ``<split>-NNNNN.parquet`` with columns ``image`` (encoded bytes),
``label``, ``class`` and ``key`` (the source path). The manifest lists per split the shards with their row counts,
sizes and sha256, plus the classes, the images skipped as unreadable while preparing, and a total checksum.

Why not Ray Data: on small CPU boxes its per-task overhead dominates and its map tasks can starve when Train
workers hold every CPU. This reader is plain pyarrow in the worker process: an index becomes (shard, row group),
each row group a batch touches is read once (small row groups keep random access cheap) and kept in a per-worker
LRU cache of ``data.cache_mb``, so a split that fits is read from storage once. Rows are decoded and augmented
by the same code as image folders (:mod:`proxyless_ray.data.transforms`). The held-out split is carved from train
exactly as for image folders; val is the test split, or a test split is carved when the source had none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from proxyless_ray.data import DamagedShard, Splits
from proxyless_ray.data.imagefolder import carve, subset
from proxyless_ray.data.transforms import EncodedSource, new_stats

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "proxyless-ray-images"
VERSION = 1
COLUMNS = ("image", "label", "class", "key")
TEST_SPLIT = "val"
MAX_OPEN_FILES = 64  # shard readers kept open per split (ImageNet has ~1300 shards; ulimit -n is often 1024)


def open_location(location: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local path or a URI (``file://``, ``s3://``, ``gs://``, ...)."""
    if "://" in location:
        try:
            return pafs.FileSystem.from_uri(location)
        except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"cannot open data location {location!r}: {err}") from None
    return pafs.LocalFileSystem(use_mmap=True), os.path.abspath(os.path.expanduser(location))


def join(root: str, name: str) -> str:
    """``root/name`` for pyarrow paths (always '/', also for object stores)."""
    return f"{root.rstrip('/')}/{name}"


def shard_lines(manifest: dict) -> list[str]:
    """One ``split file rows sha256`` line per shard, in manifest order: what the total checksum hashes."""
    return [f"{split} {s['file']} {s['rows']} {s['sha256']}"
            for split, info in sorted(manifest["splits"].items()) for s in info["shards"]]


def total_checksum(manifest: dict) -> str:
    """sha256 over :func:`shard_lines`: changes with any shard's content, name, row count or split."""
    return hashlib.sha256("\n".join(shard_lines(manifest)).encode()).hexdigest()


def read_manifest(fs: pafs.FileSystem, root: str, location: str = "") -> dict:
    """Load and check the manifest of a shard folder.

    Raises:
        FileNotFoundError: no manifest (not a prepared folder, or a conversion that never finished).
        ValueError: not a manifest this version reads, or its checksum does not match its shard list.
    """
    where = location or root
    path = join(root, MANIFEST)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{where!r} holds no {MANIFEST}; create the shards with "
                                f"'proxyless-ray prepare-data --imagefolder DIR --out {where}'")
    with fs.open_input_stream(path) as fh:
        try:
            manifest = json.loads(fh.read().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{where}/{MANIFEST} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{where}/{MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{where}/{MANIFEST} has version {manifest.get('version')}; this reader reads {VERSION}")
    if "train" not in manifest.get("splits", {}):
        raise ValueError(f"{where}/{MANIFEST} lists no train split")
    if manifest.get("checksum") != total_checksum(manifest):
        raise ValueError(f"{where}/{MANIFEST}: checksum does not match its shard list (edited or damaged)")
    return manifest


def file_sha256(fs: pafs.FileSystem, path: str, chunk: int = 8 << 20) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with fs.open_input_stream(path) as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_shards(fs: pafs.FileSystem, root: str, manifest: dict, verify_checksum: bool = False,
                 location: str = "") -> None:
    """Check that every shard exists with the manifest's size (and, if asked, its sha256).

    Raises:
        FileNotFoundError: shards are missing (all are named, up to 10).
        ValueError: a shard's size or checksum differs from the manifest.
    """
    where = location or root
    entries = [s for info in manifest["splits"].values() for s in info["shards"]]
    infos = fs.get_file_info([join(root, s["file"]) for s in entries])
    missing = [s["file"] for s, i in zip(entries, infos) if i.type == pafs.FileType.NotFound]
    if missing:
        raise FileNotFoundError(f"{where!r} lacks {len(missing)} of the {len(entries)} shards its {MANIFEST} lists: "
                                f"{missing[:10]}; copy them again or rerun prepare-data")
    for s, info in zip(entries, infos):
        if info.size != s["bytes"]:
            raise ValueError(f"shard {where}/{s['file']} has {info.size} bytes but {MANIFEST} says {s['bytes']} "
                             f"(truncated or replaced); copy it again or rerun prepare-data")
        if verify_checksum and file_sha256(fs, join(root, s["file"])) != s["sha256"]:
            raise ValueError(f"shard {where}/{s['file']} does not match its sha256 in {MANIFEST}")


class ShardSet:
    """One split's shards, read lazily by row group through a byte-budgeted LRU cache.

    Args:
        location: Folder or URI of the shards.
        shards: The split's shard entries from the manifest (file, rows, ...).
        cache_mb: Encoded bytes to keep in memory.
    """

    def __init__(self, location: str, shards: list[dict], cache_mb: float = 1024.0):
        self.location, self.shards = location, shards
        self.cache_bytes = int(cache_mb * 2 ** 20)
        self.starts = np.cumsum([0] + [int(s["rows"]) for s in shards])
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._fs: pafs.FileSystem | None = None
        self._root = ""
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()  # at most MAX_OPEN_FILES open
        self._rg_starts: dict[int, np.ndarray] = {}  # first row of each row group, per shard
        self._cache: OrderedDict[tuple[int, int], tuple] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:  # open files, cache and lock stay behind; the receiver reopens lazily
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def _open(self, s: int) -> tuple[pq.ParquetFile, np.ndarray]:
        """The shard's reader and the first row of each of its row groups (row counts checked on first open)."""
        if s in self._files:
            self._files.move_to_end(s)
            return self._files[s], self._rg_starts[s]
        if self._fs is None:
            self._fs, self._root = open_location(self.location)
        entry = self.shards[s]
        pf = pq.ParquetFile(self._fs.open_input_file(join(self._root, entry["file"])))
        if pf.metadata.num_rows != entry["rows"]:
            raise ValueError(f"shard {self.location}/{entry['file']} has {pf.metadata.num_rows} rows but "
                             f"{MANIFEST} says {entry['rows']}; rerun prepare-data")
        if s not in self._rg_starts:
            rg_rows = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            self._rg_starts[s] = np.cumsum([0] + rg_rows)
        self._files[s] = pf
        if len(self._files) > MAX_OPEN_FILES:
            _, old = self._files.popitem(last=False)
            old.close()
        return pf, self._rg_starts[s]

    def _row_group(self, s: int, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """``(bytes, offsets, labels, keys)`` of a row group, from the cache or storage."""
        hit = self._cache.get((s, g))
        if hit is not None:
            self._cache.move_to_end((s, g))
            return hit
        pf, _ = self._open(s)
        try:
            table = pf.read_row_group(g, columns=["image", "label", "key"])
        except (OSError, pa.ArrowException) as err:  # a damaged page header or page: the shard changed on disk
            reason = " ".join(str(err).split())
            raise DamagedShard(f"shard {self.location}/{self.shards[s]['file']} row group {g} cannot be read "
                               f"({reason}); the file is damaged: copy it again or rerun prepare-data (set "
                               f"data.verify_checksum: true to check every shard before training)") from None
        images = table.column("image").combine_chunks()
        bufs = images.buffers()
        offsets = np.frombuffer(bufs[1], dtype=np.int32)[images.offset:images.offset + len(images) + 1]
        data = np.empty(0, np.uint8)
        if bufs[2] is not None:  # copied once: writable, and independent of pyarrow's buffer
            data = np.frombuffer(bufs[2], dtype=np.uint8)[offsets[0]:offsets[-1]].copy()
        entry = (data, (offsets - offsets[0]).astype(np.int64), table.column("label").to_numpy().astype(np.int64),
                 table.column("key").to_pylist())
        self._cache[(s, g)] = entry
        self._cached += data.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old[0].nbytes
        return entry

    def read(self, rows: list[int]) -> list[tuple[torch.Tensor | None, int, str]]:
        """``(encoded bytes, label, key)`` of each row (global row numbers of the split)."""
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        out: list = [None] * len(rows)
        with self._lock:  # one reader at a time; decoding (the costly part) runs in parallel outside
            order = sorted(range(len(rows)), key=lambda k: rows[k])  # each row group is fetched once per batch
            for k in order:
                s = int(shard_of[k])
                local = rows[k] - int(self.starts[s])
                _, rg_starts = self._open(s)
                g = int(np.searchsorted(rg_starts, local, side="right") - 1)
                data, offsets, labels, keys = self._row_group(s, g)
                r = local - int(rg_starts[g])
                blob = torch.from_numpy(data[offsets[r]:offsets[r + 1]])
                out[k] = (blob, int(labels[r]), f"{self.shards[s]['file']}:{keys[r]}")
        return out


class ParquetSource(EncodedSource):
    """Rows of a :class:`ShardSet`, decoded and transformed on demand.

    Args:
        shards: The split's shard set (shared by the splits carved from it).
        rows: Row numbers of this split within ``shards``.
        **kwargs: :class:`~proxyless_ray.data.transforms.EncodedSource` arguments (resolution, in_chs, ...).
    """

    def __init__(self, shards: ShardSet, rows: torch.Tensor, **kwargs):
        super().__init__(len(rows), **kwargs)
        self.shards, self.rows = shards, rows.numpy().astype(np.int64)  # compact: ImageNet has 1.28M rows

    def _load(self, indices: list[int]) -> list[tuple[torch.Tensor | None, int, str]]:
        return self.shards.read(self.rows[indices].tolist())


def parquet_splits(data_cfg, resolution: int, in_chs: int) -> Splits:
    """Train / held-out / test splits of a prepared shard folder.

    Args:
        data_cfg: :class:`~proxyless_ray.config.DataConfig`: ``path`` is the shard folder or URI; also
            heldout_size, test_size, subsets, seed, cache_mb, verify_checksum, loader_workers.
        resolution: Image side the network expects.
        in_chs: 1 (grayscale) or 3 (RGB).

    Returns:
        The splits; ``stats`` holds image counts, the test split's origin and unreadable images (skipped while
        preparing, from the manifest, plus those found while reading).
    """
    if not data_cfg.path:
        raise ValueError("data.path must name the shard folder (or URI) for data.name: parquet")
    location = data_cfg.path
    fs, root = open_location(location)
    manifest = read_manifest(fs, root, location)
    check_shards(fs, root, manifest, data_cfg.verify_checksum, location)
    splits = manifest["splits"]
    train_set = ShardSet(location, splits["train"]["shards"], data_cfg.cache_mb)
    has_test = TEST_SPLIT in splits
    train, held, test = carve(len(train_set), data_cfg.heldout_size, data_cfg.seed,
                              None if has_test else data_cfg.test_size)
    if has_test:
        test_set = ShardSet(location, splits[TEST_SPLIT]["shards"], data_cfg.cache_mb)
        test = subset(torch.arange(len(test_set)), data_cfg.test_subset, data_cfg.seed)
        test_split = f"{location} split {TEST_SPLIT!r} ({len(test)} images)"
    else:
        test_set = train_set
        test = subset(test, data_cfg.test_subset, data_cfg.seed)
        test_split = (f"carved from {location} split 'train': {len(test)} images (data.test_size, seed "
                      f"{data_cfg.seed}), since the source folder had no val split")
        log.warning("shards at %s have no %r split: test split %s", location, TEST_SPLIT, test_split)
    train = subset(train, data_cfg.train_subset, data_cfg.seed)
    skipped = manifest.get("skipped", {}).get("count", 0)
    if skipped:
        log.warning("%d unreadable image(s) were skipped when %s was prepared (listed in its %s)", skipped,
                    location, MANIFEST)
    stats = new_stats(layout="parquet", source=location, classes=manifest["classes"], test_split=test_split,
                      images={"train": len(train), "heldout": len(held), "test": len(test)},
                      skipped_at_prepare=skipped, checksum=manifest["checksum"])
    common = dict(resolution=resolution, in_chs=in_chs, workers=data_cfg.loader_workers, stats=stats)
    return Splits(
        train=ParquetSource(train_set, train, augment=data_cfg.augment, **common),
        heldout=ParquetSource(train_set, held, augment=False, **common),
        test=ParquetSource(test_set, test, augment=False, **common),
        num_classes=len(manifest["classes"]), in_chs=in_chs, resolution=resolution, name="parquet", stats=stats,
    )
