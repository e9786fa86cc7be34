"""``proxyless-ray prepare-data``: convert an image folder into Parquet shards and a manifest
(:func:`proxyless_ray.data.prepare.prepare`)."""

from __future__ import annotations

import argparse
import os

from proxyless_ray.data.parquet import MANIFEST
from proxyless_ray.data.prepare import prepare


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``prepare-data``."""
    p = subparsers.add_parser(
        "prepare-data", help="convert an ImageNet-layout image folder into Parquet shards + manifest",
        description="Convert DIR/train/<class>/*, DIR/val/<class>/* (or DIR/<class>/*) into Parquet shards that "
                    "data.name: parquet reads from a local folder or a pyarrow URI (s3://, gs://).")
    p.add_argument("--imagefolder", required=True, metavar="DIR", help="source image folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder or pyarrow URI (must not exist)")
    p.add_argument("--shard-rows", type=int, default=1024, help="images per shard file (default 1024)")
    p.add_argument("--row-group-rows", type=int, default=32,
                   help="images per Parquet row group, the unit of random reads (default 32)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="threads reading and verifying images")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-split shuffle across shards")
    p.add_argument("--no-verify", action="store_true", help="skip the decode check (empty files are still skipped)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    manifest = prepare(args.imagefolder, args.out, shard_rows=args.shard_rows, row_group_rows=args.row_group_rows,
                       workers=args.workers, seed=args.seed, verify=not args.no_verify, overwrite=args.overwrite,
                       progress=not args.quiet)
    counts = ", ".join(f"{info['count']} {split}" for split, info in manifest["splits"].items())
    shards = sum(len(info["shards"]) for info in manifest["splits"].values())
    print(f"wrote {counts} images ({len(manifest['classes'])} classes) in {shards} shards to {args.out}")
    if manifest["skipped"]["count"]:
        print(f"skipped {manifest['skipped']['count']} unreadable image(s); listed in {args.out}/{MANIFEST}")
    return 0
