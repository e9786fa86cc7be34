"""Parquet shards: prepare-data round trip, manifest checks, URIs, unreadable images, rank sharding."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from data_helpers import CLASSES, make_imagenet, write_class_folder

from proxyless_ray.cli import main
from proxyless_ray.config import DataConfig
from proxyless_ray.data.imagefolder import imagefolder_splits
from proxyless_ray.data.parquet import MANIFEST, parquet_splits, total_checksum
from proxyless_ray.data.prepare import prepare
from proxyless_ray.data.sharding import shard_batches

RES = 32


@pytest.fixture(scope="module")
def inet(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("inet"))


@pytest.fixture(scope="module")
def shards(inet, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "shards"
    rc = main(["prepare-data", "--imagefolder", str(inet), "--out", str(out), "--shard-rows", "16",
               "--row-group-rows", "4", "--quiet"])
    assert rc == 0
    return out


def cfg(path, **kw) -> DataConfig:
    return DataConfig(name="parquet", path=str(path), **{"heldout_size": 10, **kw})


def manifest_of(folder) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def test_manifest_counts_classes_checksums(shards):
    m = manifest_of(shards)
    assert m["classes"] == sorted(CLASSES) and m["layout"] == "imagenet"
    assert m["splits"]["train"]["count"] == 60 and m["splits"]["val"]["count"] == 15
    assert [s["rows"] for s in m["splits"]["train"]["shards"]] == [16, 16, 16, 12]
    assert m["skipped"]["count"] == 2
    assert sorted(f["key"] for f in m["skipped"]["files"]) == ["train/bag/zz_corrupt.jpg", "train/bag/zz_empty.png"]
    assert m["checksum"] == total_checksum(m) and len(m["checksum"]) == 64
    for info in m["splits"].values():
        for s in info["shards"]:
            data = (shards / s["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
    assert sorted(os.listdir(shards.parent)) == ["shards"]  # the staging folder is gone


def test_rows_hold_bytes_labels_and_class_names(shards, inet):
    table = pq.read_table(shards / "train-00000.parquet")
    assert table.column_names == ["image", "label", "class", "key"]
    assert pq.ParquetFile(shards / "train-00000.parquet").metadata.num_row_groups == 4
    classes = manifest_of(shards)["classes"]
    for row in table.to_pylist():
        assert row["class"] == classes[row["label"]] == row["key"].split("/")[1]
        assert row["image"] == (inet / row["key"]).read_bytes()


@pytest.mark.parametrize("in_chs", [3, 1])
def test_parquet_and_imagefolder_give_the_same_images(shards, inet, in_chs):
    pq_splits = parquet_splits(cfg(shards), RES, in_chs)
    folder = imagefolder_splits(cfg(inet), RES, in_chs)
    x, y = pq_splits.test.get_batch(torch.arange(15), train=False)
    assert x.shape == (15, in_chs, RES, RES) and pq_splits.num_classes == 3
    keys = [k.split(":", 1)[1] for _, _, k in pq_splits.test._load(list(range(15)))]
    order = [folder.test.paths.index(str(inet / k)) for k in keys]
    fx, fy = folder.test.get_batch(torch.tensor(order), train=False)
    assert torch.equal(x, fx) and torch.equal(y, fy)


def test_splits_are_deterministic_disjoint_and_augmented(shards):
    s = parquet_splits(cfg(shards), RES, 3)
    assert (len(s.train), len(s.heldout), len(s.test)) == (50, 10, 15)
    assert not set(s.train.rows) & set(s.heldout.rows)
    assert parquet_splits(cfg(shards), RES, 3).heldout.rows.tolist() == s.heldout.rows.tolist()
    assert s.stats["skipped"] == 2 and s.stats["skipped_at_prepare"] == 2
    idx = torch.arange(20)
    a, _ = s.train.get_batch(idx, True, torch.Generator().manual_seed(1))
    b, _ = s.train.get_batch(idx, True, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, s.train.get_batch(idx, False)[0])


def test_file_uri_threads_small_cache_and_pickling(shards):
    base = parquet_splits(cfg(shards), RES, 3)
    uri = parquet_splits(cfg(f"file://{shards}", loader_workers=2, cache_mb=0.001), RES, 3)
    idx = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    x, y = uri.train.get_batch(idx, True, g)
    bx, by = base.train.get_batch(idx, True, torch.Generator().manual_seed(3))
    assert torch.equal(x, bx) and torch.equal(y, by)
    assert len(uri.train.shards._cache) == 1  # the byte budget evicts all but the newest row group
    clone = pickle.loads(pickle.dumps(uri.train))  # crossing the Ray boundary: reopens the shards lazily
    assert torch.equal(clone.get_batch(idx, False)[0], base.train.get_batch(idx, False)[0])


def test_rank_shards_are_disjoint(shards):
    s = parquet_splits(cfg(shards), RES, 3)
    rows = [s.train.rows[idx.numpy()].tolist()
            for rank in range(2) for idx in shard_batches(len(s.train), 8, rank, 2, epoch=0, seed=0)]
    flat = [r for batch in rows for r in batch]
    assert len(rows) == 2 * (50 // 16) and len(set(flat)) == len(flat)
    keys = [k for batch in rows for _, _, k in s.train.shards.read(batch)]
    assert len(set(keys)) == len(keys)


def test_missing_truncated_or_altered_shard_is_a_clear_error(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    (copy / "train-00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks 1 of the 5 shards.*train-00001\.parquet"):
        parquet_splits(cfg(copy), RES, 3)
    shutil.copy(shards / "train-00001.parquet", copy)
    data = bytearray((copy / "train-00002.parquet").read_bytes())
    data[100] ^= 0xFF  # same size, different content: only the checksum sees it
    (copy / "train-00002.parquet").write_bytes(bytes(data))
    parquet_splits(cfg(copy), RES, 3)
    with pytest.raises(ValueError, match="train-00002.parquet does not match its sha256"):
        parquet_splits(cfg(copy, verify_checksum=True), RES, 3)
    (copy / "train-00002.parquet").write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match="truncated"):
        parquet_splits(cfg(copy), RES, 3)
    (copy / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        parquet_splits(cfg(copy), RES, 3)


def test_damaged_row_group_is_named_when_read(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    path = copy / "train-00002.parquet"
    offset = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 10] = bytes(b ^ 0xFF for b in data[offset:offset + 10])  # the page header of row group 1
    path.write_bytes(bytes(data))
    s = parquet_splits(cfg(copy, heldout_size=0), RES, 3)  # unverified: the damage shows only when read
    with pytest.raises(ValueError, match=r"train-00002\.parquet row group 1 cannot be read .*verify_checksum"):
        s.train.get_batch(torch.arange(len(s.train)), train=False)


def test_unverified_corrupt_image_is_skipped_when_read(inet, tmp_path, capsys):
    manifest = prepare(str(inet), str(tmp_path / "raw"), shard_rows=100, verify=False, progress=False)
    assert manifest["skipped"]["count"] == 1  # the empty file; the corrupt JPEG went in
    s = parquet_splits(cfg(tmp_path / "raw", heldout_size=0), RES, 3)
    x, _ = s.train.get_batch(torch.arange(len(s.train)), train=False)
    assert torch.isfinite(x).all() and x.shape[0] == 61
    assert s.stats["skipped_at_read"] == 1 and s.stats["skipped"] == 2
    assert s.stats["skipped_files"][0].endswith("train/bag/zz_corrupt.jpg")


def test_single_folder_carves_test_split(tmp_path):
    write_class_folder(tmp_path / "src", 10)
    prepare(str(tmp_path / "src"), str(tmp_path / "out"), progress=False)
    assert manifest_of(tmp_path / "out")["layout"] == "single"
    s = parquet_splits(cfg(tmp_path / "out", heldout_size=5), RES, 3)
    assert (len(s.train), len(s.heldout), len(s.test)) == (22, 5, 3) and "carved" in s.stats["test_split"]
    assert not set(s.test.rows) & (set(s.train.rows) | set(s.heldout.rows))


def test_cli_errors_exit_2_and_write_nothing(tmp_path, capsys, inet, shards):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert main(["prepare-data", "--imagefolder", str(tmp_path / "empty"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no class subfolders" in err and str(tmp_path / "empty") in err
    assert sorted(os.listdir(tmp_path)) == ["empty"]
    assert main(["prepare-data", "--imagefolder", str(tmp_path / "nope"), "--out", str(out), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["prepare-data", "--imagefolder", str(inet), "--out", str(shards), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    assert main(["prepare-data", "--imagefolder", str(inet), "--out", str(tmp_path / "mine"), "--overwrite"]) == 2
    assert "not a prepare-data output" in capsys.readouterr().err and (tmp_path / "mine").is_dir()


def test_overwrite_replaces_a_previous_output(tmp_path, inet):
    out = tmp_path / "out"
    prepare(str(inet), str(out), shard_rows=100, progress=False)
    old = manifest_of(out)["checksum"]
    prepare(str(inet), str(out), shard_rows=7, overwrite=True, progress=False)
    m = manifest_of(out)
    assert m["checksum"] != old and len(m["splits"]["train"]["shards"]) == 9
    assert sorted(os.listdir(tmp_path)) == ["out"]
    files = [s["file"] for info in m["splits"].values() for s in info["shards"]]
    assert sorted(os.listdir(out)) == sorted([MANIFEST, *files])


def test_failed_conversion_leaves_nothing(tmp_path, capsys):
    write_class_folder(tmp_path / "src", 2)
    for p in (tmp_path / "src").rglob("*.*"):
        p.write_bytes(b"\xff\xd8\xff broken")  # every image corrupt: fails after the staging folder exists
    assert main(["prepare-data", "--imagefolder", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    assert "could be read" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["src"]
