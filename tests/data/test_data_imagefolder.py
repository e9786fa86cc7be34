"""Image folders: discovery, deterministic splits, transforms, unreadable files, rank sharding."""

from __future__ import annotations

import logging
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from data_helpers import CLASSES, make_imagenet, write_class_folder
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from proxyless_ray.config import DataConfig
from proxyless_ray.data import build_splits
from proxyless_ray.data.imagefolder import (
    carve,
    find_classes,
    imagefolder_splits,
    list_images,
    read_bytes,
    resolve_layout,
)
from proxyless_ray.data.sharding import shard_batches
from proxyless_ray.data.transforms import (
    GRAY_MEAN,
    GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    crop_resize,
    decode,
    rrc_box,
)

RES = 32


@pytest.fixture(scope="module")
def inet(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("inet"))


def cfg(path, **kw) -> DataConfig:
    return DataConfig(name="imagefolder", path=str(path), **{"heldout_size": 10, **kw})


def test_classes_labels_and_ignored_files(inet):
    classes = find_classes(str(inet / "train"))
    assert classes == sorted(CLASSES)
    paths, labels, ignored = list_images(str(inet / "train"), classes)
    assert len(paths) == 3 * 20 + 2 and ignored == 1  # two bad images are still image files; notes.txt is not
    assert all(f"/{classes[lab]}/" in p for p, lab in zip(paths, labels))
    assert resolve_layout(str(inet)).kind == "imagenet"


def test_carve_is_deterministic_and_disjoint():
    a = carve(100, 20, seed=3, test_size=0)
    b = carve(100, 20, seed=3, test_size=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    train, held, test = a
    assert (len(train), len(held), len(test)) == (70, 20, 10)
    assert sorted(torch.cat(a).tolist()) == list(range(100))
    assert not torch.equal(carve(100, 20, seed=4)[1], held)
    with pytest.raises(ValueError, match="leave no training images"):
        carve(10, 10, seed=0)


def test_splits_are_disjoint_and_val_is_test(inet):
    s = imagefolder_splits(cfg(inet), RES, 3)
    assert (len(s.train), len(s.heldout), len(s.test)) == (52, 10, 15)
    assert not set(s.train.paths) & set(s.heldout.paths)
    assert all("/val/" in p for p in s.test.paths)
    assert s.num_classes == 3 and s.stats["layout"] == "imagenet" and s.stats["images"]["test"] == 15
    again = imagefolder_splits(cfg(inet), RES, 3)
    assert again.heldout.paths == s.heldout.paths
    assert imagefolder_splits(cfg(inet, seed=1), RES, 3).heldout.paths != s.heldout.paths
    assert not s.heldout.augment and not s.test.augment and s.train.augment


@pytest.mark.parametrize("in_chs", [3, 1])
def test_eval_transform_matches_torchvision_pil(inet, in_chs):
    s = imagefolder_splits(cfg(inet), RES, in_chs)
    x, y = s.test.get_batch(torch.arange(len(s.test)), train=False)
    assert x.shape == (15, in_chs, RES, RES) and x.dtype == torch.float32
    assert y.tolist() == s.test.labels
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chs == 3 else (GRAY_MEAN, GRAY_STD)
    ref_tf = T.Compose([T.Resize(int(RES / 0.875)), T.CenterCrop(RES), T.ToTensor(), T.Normalize(mean, std)])
    ref = torch.stack([ref_tf(Image.open(p).convert("RGB" if in_chs == 3 else "L")) for p in s.test.paths])
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    diff = ((x - ref) * std_t).abs()  # in pixel units of [0, 1]
    # RGB: the uint8 resampler rounds a few pixels differently; gray: libjpeg's luma vs PIL's RGB -> L rounding
    assert diff.mean() < 2e-3 and diff.max() <= (1.01 if in_chs == 3 else 5.01) / 255


def test_random_resized_crop_matches_torchvision_pil(inet):
    s = imagefolder_splits(cfg(inet), RES, 3)
    g = torch.Generator().manual_seed(0)
    for path in s.test.paths[:6]:
        img = decode(read_bytes(path), 3)
        box = rrc_box(img.shape[1], img.shape[2], torch.rand(23, generator=g, dtype=torch.float64).tolist())
        pil = Image.open(path).convert("RGB")
        ref = TF.pil_to_tensor(TF.resized_crop(pil, *box, [RES, RES], antialias=True))
        assert (crop_resize(img, box, RES).int() - ref.int()).abs().max() <= 1
        assert torch.equal(crop_resize(img, box, RES, flip=True), crop_resize(img, box, RES).flip(-1))


def test_grayscale_files_expand_to_rgb(tmp_path):
    write_class_folder(tmp_path / "train", 4, rgb=False)
    write_class_folder(tmp_path / "val", 2, rgb=False)
    s = imagefolder_splits(cfg(tmp_path, heldout_size=2), RES, 3)
    x, _ = s.test.get_batch(torch.arange(len(s.test)), train=False)
    pix = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert torch.allclose(pix[:, 0], pix[:, 1], atol=1e-5) and torch.allclose(pix[:, 1], pix[:, 2], atol=1e-5)


def test_train_augmentation_is_seeded_and_thread_independent(inet):
    s = imagefolder_splits(cfg(inet), RES, 3)
    idx = torch.arange(24)
    a, ya = s.train.get_batch(idx, True, torch.Generator().manual_seed(5))
    b, _ = s.train.get_batch(idx, True, torch.Generator().manual_seed(5))
    c, _ = s.train.get_batch(idx, True, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    threaded = imagefolder_splits(cfg(inet, loader_workers=2), RES, 3)
    t, yt = threaded.train.get_batch(idx, True, torch.Generator().manual_seed(5))
    assert torch.equal(a, t) and torch.equal(ya, yt)
    e, _ = s.train.get_batch(idx, False)
    assert not torch.equal(a, e)  # train=True really augments


def test_rrc_box_stays_inside_the_image():
    g = torch.Generator().manual_seed(0)
    for h, w in [(40, 40), (10, 200), (300, 7), (1, 1)]:
        for u in torch.rand(200, 23, generator=g, dtype=torch.float64).tolist():
            top, left, ch, cw = rrc_box(h, w, u)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0


def test_unreadable_images_are_skipped_counted_and_logged(inet, caplog):
    s = imagefolder_splits(cfg(inet, heldout_size=0, test_size=0), RES, 3)
    bad = [i for i, p in enumerate(s.train.paths) if "zz_" in p]
    assert len(bad) == 2
    with caplog.at_level(logging.WARNING):
        x, y = s.train.get_batch(torch.tensor(bad + [0]), train=False)
    assert x.shape == (3, 3, RES, RES) and torch.isfinite(x).all()  # batches keep their shape
    assert s.stats["skipped"] == 2 and s.stats["skipped_at_read"] == 2
    assert sorted(s.stats["skipped_files"]) == ["train/bag/zz_corrupt.jpg", "train/bag/zz_empty.png"]
    assert "zz_corrupt.jpg" in caplog.text and "zz_empty.png" in caplog.text
    s.train.get_batch(torch.tensor(bad), train=False)
    assert s.stats["skipped"] == 2  # counted once per file, not per read


def test_single_folder_carves_a_test_split(tmp_path, caplog):
    write_class_folder(tmp_path, 10)
    with caplog.at_level(logging.WARNING):
        s = imagefolder_splits(cfg(tmp_path, heldout_size=5), RES, 1)
    assert s.stats["layout"] == "single" and "carved" in s.stats["test_split"] and "carved" in caplog.text
    assert (len(s.train), len(s.heldout), len(s.test)) == (22, 5, 3)
    assert not set(s.test.paths) & (set(s.train.paths) | set(s.heldout.paths))
    assert len(imagefolder_splits(cfg(tmp_path, heldout_size=5, test_size=7), RES, 1).test) == 7


def test_folder_without_classes_is_a_clear_error(tmp_path):
    (tmp_path / "img.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match=f"{tmp_path}.*no class subfolders"):
        imagefolder_splits(cfg(tmp_path), RES, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        imagefolder_splits(cfg(tmp_path / "nope"), RES, 3)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        imagefolder_splits(cfg(tmp_path), RES, 3)


def test_rank_shards_are_disjoint(inet):
    s = imagefolder_splits(cfg(inet, batch_size=8), RES, 3)
    seen = []
    for rank in range(2):
        for b, idx in enumerate(shard_batches(len(s.train), 8, rank, 2, epoch=1, seed=0)):
            _, y = s.train.get_batch(idx, True, torch.Generator().manual_seed(b))
            good = [k for k, i in enumerate(idx.tolist()) if "zz_" not in s.train.paths[i]]  # bad ones are replaced
            assert [y[k].item() for k in good] == [s.train.labels[idx[k]] for k in good]
            seen.append({s.train.paths[i] for i in idx.tolist()})
    assert len(seen) == 2 * (52 // 16)
    assert len(set().union(*seen)) == sum(len(x) for x in seen)


def test_build_splits_and_pickling(inet):
    space = SimpleNamespace(resolution=RES, in_chs=3, num_classes=3)
    s = build_splits(cfg(inet), space)
    clone = pickle.loads(pickle.dumps(s.train))  # what crossing the Ray boundary does
    idx = torch.arange(8)
    assert torch.equal(clone.get_batch(idx, False)[0], s.train.get_batch(idx, False)[0])
    with pytest.raises(ValueError, match="3 classes"):
        build_splits(cfg(inet), SimpleNamespace(resolution=RES, in_chs=3, num_classes=10))
    assert np.isfinite(s.heldout.get_batch(torch.arange(10), False)[0].numpy()).all()
