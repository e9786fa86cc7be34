"""Convert an image folder into Parquet shards and a manifest (the library behind ``proxyless-ray prepare-data``).

Reads the ImageNet layout (``DIR/train/<class>/``, ``DIR/val/<class>/``) or one folder of class subfolders, checks
that every image decodes (unreadable ones are skipped, counted and listed in the manifest: better now than hours
into a run), shuffles each split once (seeded) and writes ``<split>-NNNNN.parquet`` shards of encoded bytes, label,
class name and source path, uncompressed (JPEG already is), in small row groups for cheap random access. The
manifest (:mod:`proxyless_ray.data.parquet`) records counts, classes, per-shard sha256 and a total checksum.

A local output is assembled in a hidden sibling folder and renamed at the end, so a failed conversion leaves
nothing behind; for object stores (``s3://``, ``gs://``), which cannot rename folders, shards are written in place
and the manifest last: readers refuse a folder without one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from proxyless_ray.data.imagefolder import find_classes, list_images, read_bytes, resolve_layout
from proxyless_ray.data.parquet import FORMAT, MANIFEST, TEST_SPLIT, VERSION, join, open_location, total_checksum
from proxyless_ray.data.transforms import CorruptImage, decode

SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("class", pa.string()), ("key", pa.string())])
MAX_LISTED = 1000  # skipped files named in the manifest; the count is always exact


class ProgressBar:
    """``[#####.....] 512/2000 images 812 img/s`` on stderr: redrawn on a terminal, every 10% in logs."""

    def __init__(self, total: int, enabled: bool = True, width: int = 30):
        self.total, self.enabled, self.width, self.n = max(total, 1), enabled, width, 0
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()
        self.next_tenth = 0.1

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        now, frac = time.perf_counter(), self.n / self.total
        if self.n < self.total and (now - self.last < 0.2 if self.tty else frac < self.next_tenth):
            return
        self.next_tenth = (int(frac * 10) + 1) / 10
        self.last = now
        rate = self.n / max(now - self.t0, 1e-9)
        line = f"[{'#' * int(frac * self.width):.<{self.width}}] {self.n}/{self.total} images {rate:.0f} img/s"
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def prepare(imagefolder: str, out: str, shard_rows: int = 1024, row_group_rows: int = 32, workers: int = 2,
            seed: int = 0, verify: bool = True, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert an image folder into Parquet shards plus ``manifest.json``.

    Args:
        imagefolder: ImageNet-layout folder or a folder of class subfolders.
        out: Output folder (local path or pyarrow URI); must not exist unless ``overwrite``.
        shard_rows: Images per shard.
        row_group_rows: Images per row group.
        workers: Threads reading and decoding images.
        seed: Seed of the shuffle of each split.
        verify: Decode every image and skip those that fail.
        overwrite: Replace an existing output.
        progress: Progress bar on stderr.

    Returns:
        The manifest written.

    Raises:
        FileNotFoundError: the source folder does not exist.
        ValueError: no classes or images, bad sizes, or an existing output without ``overwrite``.
    """
    if shard_rows < 1 or row_group_rows < 1:
        raise ValueError(f"--shard-rows and --row-group-rows must be >= 1, got {shard_rows}, {row_group_rows}")
    layout = resolve_layout(imagefolder)
    classes = find_classes(layout.train_dir)
    sources = {"train": list_images(layout.train_dir, classes)}
    if layout.test_dir:
        unknown = sorted(set(find_classes(layout.test_dir)) - set(classes))
        if unknown:
            raise ValueError(f"{layout.test_dir!r} has class(es) {unknown[:10]} that {layout.train_dir!r} lacks")
        sources[TEST_SPLIT] = list_images(layout.test_dir, classes, require_all=False)
    fs, final = open_location(out)
    local = isinstance(fs, pafs.LocalFileSystem)
    if fs.get_file_info(final).type != pafs.FileType.NotFound:
        if not overwrite:
            raise ValueError(f"output {out!r} already exists; pass --overwrite to replace it")
        if fs.get_file_info(join(final, MANIFEST)).type == pafs.FileType.NotFound:
            raise ValueError(f"output {out!r} exists and holds no {MANIFEST}: not a prepare-data output, so "
                             f"--overwrite will not delete it")
        if not local:
            fs.delete_dir_contents(final)  # no rename on object stores: clear the old shards before writing anew
    parent, name = os.path.split(final.rstrip("/"))
    staging = join(parent, f".{name}.partial-{os.getpid()}") if local else final
    fs.create_dir(staging, recursive=True)
    bar = ProgressBar(sum(len(p) for p, _, _ in sources.values()), enabled=progress)
    skipped: list[dict] = []
    try:
        splits = {}
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for split, (paths, labels, _) in sources.items():
                splits[split] = _write_split(fs, staging, split, paths, labels, classes, layout.root, shard_rows,
                                             row_group_rows, seed, verify, pool, bar, skipped)
        manifest = {
            "format": FORMAT, "version": VERSION, "created": dt.datetime.now(dt.timezone.utc).isoformat(),
            "source": layout.root, "layout": layout.kind, "classes": classes, "splits": splits,
            "skipped": {"count": len(skipped), "files": skipped[:MAX_LISTED]},
            "ignored_files": sum(ignored for _, _, ignored in sources.values()),
            "shard_rows": shard_rows, "row_group_rows": row_group_rows, "seed": seed, "verified": verify,
        }
        manifest["checksum"] = total_checksum(manifest)
        with fs.open_output_stream(join(staging, MANIFEST)) as fh:  # last: its presence marks a finished folder
            fh.write(json.dumps(manifest, indent=1).encode())
        if local:
            _swap_in(fs, staging, final)
    except BaseException:
        if local and fs.get_file_info(staging).type != pafs.FileType.NotFound:
            fs.delete_dir(staging)
        raise
    finally:
        bar.close()
    return manifest


def _write_split(fs: pafs.FileSystem, folder: str, split: str, paths: list[str], labels: list[int],
                 classes: list[str], root: str, shard_rows: int, row_group_rows: int, seed: int, verify: bool,
                 pool: ThreadPoolExecutor, bar: ProgressBar, skipped: list[dict]) -> dict:
    """Write one split's shards; returns its manifest entry and appends unreadable files to ``skipped``."""
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
    shards: list[dict] = []
    rows: list[tuple[bytes, int, str]] = []

    def flush() -> None:
        if not rows:
            return
        table = pa.table({"image": pa.array([r[0] for r in rows], pa.binary()),
                          "label": pa.array([r[1] for r in rows], pa.int64()),
                          "class": pa.array([classes[r[1]] for r in rows], pa.string()),
                          "key": pa.array([r[2] for r in rows], pa.string())}, schema=SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=row_group_rows, compression="none")
        buf = sink.getvalue()
        file = f"{split}-{len(shards):05d}.parquet"
        with fs.open_output_stream(join(folder, file)) as fh:
            fh.write(buf)
        shards.append({"file": file, "rows": len(rows), "bytes": buf.size,
                       "sha256": hashlib.sha256(memoryview(buf)).hexdigest()})
        rows.clear()

    for start in range(0, len(order), shard_rows):
        chunk = order[start:start + shard_rows]
        for i, (data, reason) in zip(chunk, pool.map(lambda i: _read_checked(paths[i], verify), chunk)):
            key = os.path.relpath(paths[i], root)
            if data is None:
                skipped.append({"key": key, "reason": reason})
            else:
                rows.append((data, labels[i], key))
            if len(rows) == shard_rows:
                flush()
            bar.update()
    flush()
    count = sum(s["rows"] for s in shards)
    if split == "train" and count == 0:
        raise ValueError(f"none of the {len(paths)} training images under {root!r} could be read")
    return {"count": count, "shards": shards}


def _read_checked(path: str, verify: bool) -> tuple[bytes | None, str]:
    """A file's bytes, or None and why it is unusable (unreadable, empty or, if ``verify``, undecodable)."""
    data = read_bytes(path)
    if data is None:
        return None, "unreadable file"
    if data.numel() == 0:
        return None, "empty file"
    if verify:
        try:
            decode(data, 3)
        except CorruptImage as err:
            return None, str(err)
    return data.numpy().tobytes(), ""


def _swap_in(fs: pafs.FileSystem, staging: str, final: str) -> None:
    """Rename the finished staging folder to ``final``, replacing an old output only once the new one is whole."""
    if fs.get_file_info(final).type == pafs.FileType.NotFound:
        fs.move(staging, final)
        return
    old = f"{final.rstrip('/')}.old-{os.getpid()}"
    fs.move(final, old)
    fs.move(staging, final)
    fs.delete_dir(old) if fs.get_file_info(old).type == pafs.FileType.Directory else fs.delete_file(old)
