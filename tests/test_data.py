"""Runtime dataset (lib/data.py) and the digits demo set (data/make_digits.py)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib.config import DataConfig
from lib.data import (
    TASK_ALIASES,
    VTAB_GROUPS,
    VTAB_TASKS,
    DataError,
    ImageListDataset,
    build_dataset,
    build_transform,
    canonical_task,
    read_list_file,
    resolve_task_dir,
    task_num_classes,
)

OFFICIAL_ORDER = [
    ("cifar", 100), ("caltech101", 102), ("dtd", 47), ("oxford_flowers102", 102), ("oxford_iiit_pet", 37),
    ("svhn", 10), ("sun397", 397), ("patch_camelyon", 2), ("eurosat", 10), ("resisc45", 45),
    ("diabetic_retinopathy", 5), ("clevr_count", 8), ("clevr_dist", 6), ("dmlab", 6), ("kitti", 4),
    ("dsprites_loc", 16), ("dsprites_ori", 16), ("smallnorb_azi", 18), ("smallnorb_ele", 9),
]


SMALL_SIZES = {"train800": 8, "val200": 2}


@pytest.fixture
def tree(tmp_path: Path, make_vtab_task) -> Path:
    """A small cifar task (8/2/10 + 4 test images of 4x4 pixels); returns the VTAB root."""
    make_vtab_task(tmp_path, "cifar", SMALL_SIZES, test_size=4)
    return tmp_path


# ---------------------------------------------------------------------------------------------------
# Task table and names


def test_task_table_matches_the_paper():
    assert list(VTAB_TASKS.items()) == OFFICIAL_ORDER
    assert {k: len(v) for k, v in VTAB_GROUPS.items()} == {"Natural": 7, "Specialized": 4, "Structured": 8}
    assert [t for group in VTAB_GROUPS.values() for t in group] == list(VTAB_TASKS)
    assert TASK_ALIASES["cifar100"] == "cifar" and TASK_ALIASES["oxford_pet"] == "oxford_iiit_pet"
    assert canonical_task("cifar100") == "cifar"
    assert canonical_task("Oxford-Pet") == "oxford_iiit_pet"
    assert canonical_task("my_task") == "my_task"
    assert task_num_classes("cifar100") == 100 and task_num_classes("sun397") == 397
    assert task_num_classes("my_task") is None


@pytest.mark.parametrize("folder,asked", [("cifar", "cifar100"), ("cifar100", "cifar"), ("cifar", "cifar"),
                                          ("oxford_pet", "oxford_iiit_pet"), ("oxford_iiit_pet", "oxford_pet")])
def test_both_spellings_resolve(tmp_path, folder, asked):
    (tmp_path / folder).mkdir()
    assert resolve_task_dir(tmp_path, asked) == tmp_path / folder


def test_missing_task_folder_names_paths_and_layout(tmp_path):
    with pytest.raises(DataError) as err:
        resolve_task_dir(tmp_path, "cifar100")
    msg = str(err.value)
    assert str(tmp_path / "cifar100") in msg and str(tmp_path / "cifar") in msg
    assert "train800val200" in msg and "images/" in msg


# ---------------------------------------------------------------------------------------------------
# Loading


def test_small_tree_loads(tree):
    ds = ImageListDataset(tree, "cifar100", "train800val200", transform=build_transform(224))
    assert len(ds) == 10 and ds.num_classes == 100 and ds.skipped == 0
    assert ds.task_dir == (tree / "cifar").absolute()
    assert all(os.path.isabs(p) and os.path.exists(p) for p, _ in ds.samples)
    image, label = ds[3]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 224, 224) and image.dtype == torch.float32
    assert label == 3 and isinstance(label, int)
    assert ds.targets == [i % 10 for i in range(8)] + [0, 1]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 224, 224) and batch[1].tolist() == [0, 1, 2, 3]


def test_images_are_converted_to_rgb(tmp_path):
    task_dir = tmp_path / "custom"
    (task_dir / "images").mkdir(parents=True)
    Image.fromarray(np.full((5, 6), 77, np.uint8), mode="L").save(task_dir / "images" / "g.png")
    Image.fromarray(np.zeros((5, 6, 4), np.uint8), mode="RGBA").save(task_dir / "images" / "a.png")
    (task_dir / "all.txt").write_text("images/g.png 1\nimages/a.png 0\n")
    ds = ImageListDataset(tmp_path, "custom", "all")
    grey, label = ds[0]
    assert grey.mode == "RGB" and grey.size == (6, 5) and grey.getpixel((0, 0)) == (77, 77, 77) and label == 1
    assert ds[1][0].mode == "RGB"


def test_custom_task_num_classes(tmp_path, make_vtab_task):
    make_vtab_task(tmp_path, "mine", SMALL_SIZES, num_classes=3)
    assert ImageListDataset(tmp_path, "mine", "train800").num_classes == 3  # max label + 1
    assert ImageListDataset(tmp_path, "mine", "train800", num_classes=7).num_classes == 7  # explicit wins
    (tmp_path / "mine" / "classes.txt").write_text("a\nb\nc\nd\n\n")
    ds = ImageListDataset(tmp_path, "mine", "val200")
    assert ds.num_classes == 4 and ds.classes == ["a", "b", "c", "d"]
    assert task_num_classes("mine", tmp_path) == 4


def test_read_list_file(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("images/a b.jpg 3\n\n  \nimages/c.jpg\t12\n")
    assert read_list_file(path) == [("images/a b.jpg", 3), ("images/c.jpg", 12)]


# ---------------------------------------------------------------------------------------------------
# Transforms


def test_official_transform_normalises_known_pixel():
    image = Image.fromarray(np.tile(np.array([255, 0, 128], np.uint8), (10, 13, 1)))
    out = build_transform(224)(image)
    assert out.shape == (3, 224, 224)
    expected = torch.tensor([(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225])
    assert torch.allclose(out[:, 100, 50], expected, atol=1e-5)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    inception = build_transform(32, normalization="inception")(image)
    assert inception.shape == (3, 32, 32)
    assert torch.allclose(inception[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-5)


def test_resize_is_bicubic_to_a_square():
    image = Image.fromarray(np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3))
    out = build_transform(16)(image)
    ref = np.asarray(image.resize((16, 16), Image.BICUBIC), dtype=np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), (ref - mean) / std, atol=1e-5)


def test_augment_only_when_training():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    official = build_transform(224)(image)
    assert torch.equal(build_transform(224, augment="rand-m9-mstd0.5", is_train=False)(image), official)
    train_tf = build_transform(224, augment="rand-m9-mstd0.5", is_train=True)
    assert "RandAugment" in repr(train_tf) and "RandomResizedCrop" in repr(train_tf)
    assert train_tf(image).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="normalization"):
        build_transform(224, normalization="bogus")


def test_build_dataset_from_config(tree):
    cfg = DataConfig(root=str(tree), task="cifar100", normalization="inception", num_classes=None, augment="",
                     skip_bad_images=False)
    ds = build_dataset(cfg, "test", img_size=32, is_train=False)
    assert len(ds) == 4 and ds.num_classes == 100
    image, _ = ds[0]
    assert image.shape == (3, 32, 32) and image.min() >= -1 and image.max() <= 1
    ds = build_dataset(DataConfig(root=str(tree), task="cifar", num_classes=12), "val200", img_size=8, is_train=True)
    assert ds.num_classes == 12 and len(ds) == 2


# ---------------------------------------------------------------------------------------------------
# Errors


def test_missing_list_file(tree):
    with pytest.raises(DataError) as err:
        ImageListDataset(tree, "cifar", "train1000")
    msg = str(err.value)
    assert str(tree / "cifar" / "train1000.txt") in msg and "train800val200" in msg


def test_malformed_line_names_file_and_line(tree):
    path = tree / "cifar" / "val200.txt"
    path.write_text(path.read_text() + "\nimages/val200/x.png seven\n")
    with pytest.raises(DataError, match=rf"{path}:4: malformed line 'images/val200/x.png seven'"):
        ImageListDataset(tree, "cifar", "val200")
    path.write_text("images/val200/000000.png\n")
    with pytest.raises(DataError, match=rf"{path}:1: malformed"):
        read_list_file(path)


def test_label_out_of_range(tree):
    path = tree / "cifar" / "train800.txt"
    lines = path.read_text().splitlines()
    lines[5] = "images/train800/000005.png 100"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        ImageListDataset(tree, "cifar", "train800")
    msg = str(err.value)
    assert f"{path}:6" in msg and "label 100" in msg and "100 classes" in msg
    with pytest.raises(DataError, match="label 100 outside"):
        ImageListDataset(tree, "cifar", "train800", num_classes=50)
    path.write_text("images/train800/000000.png -1\n")
    with pytest.raises(DataError, match=rf"{path}:1: label -1"):
        ImageListDataset(tree, "cifar", "train800")


def test_missing_images_named_with_count(tree):
    for i in (1, 4):
        os.remove(tree / "cifar" / "images" / "train800" / f"00000{i}.png")
    with pytest.raises(DataError) as err:
        ImageListDataset(tree, "cifar", "train800val200")
    msg = str(err.value)
    assert msg.startswith("2 image file(s)") and "000001.png" in msg and "000004.png" in msg
    assert "train800val200.txt:2" in msg


def test_corrupt_image_raises_at_load_naming_file(tree):
    bad = tree / "cifar" / "images" / "test" / "000002.png"
    bad.write_bytes(b"not a png at all")
    ds = ImageListDataset(tree, "cifar", "test", transform=build_transform(8))
    ds[1]
    with pytest.raises(DataError, match=str(bad)):
        ds[2]


def test_empty_split(tree):
    path = tree / "cifar" / "test.txt"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=rf"empty: {path}"):
        ImageListDataset(tree, "cifar", "test")


def test_skip_bad_images_skips_and_counts(tree, caplog):
    images = tree / "cifar" / "images" / "train800"
    (images / "000002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    truncated = (images / "000003.png").read_bytes()
    (images / "000003.png").write_bytes(truncated[: len(truncated) // 2])
    os.remove(images / "000006.png")
    with caplog.at_level(logging.WARNING, logger="lib.data"):
        ds = ImageListDataset(tree, "cifar", "train800", transform=build_transform(8), skip_bad_images=True)
    assert ds.skipped == 3 and len(ds) == 5
    assert [Path(p).name for p, _ in ds.samples] == ["000000.png", "000001.png", "000004.png", "000005.png",
                                                      "000007.png"]
    assert "skipped 3" in caplog.text and "000006.png (missing)" in caplog.text
    assert all(ds[i][0].shape == (3, 8, 8) for i in range(len(ds)))
    for name in ("000000.png", "000001.png", "000004.png", "000005.png", "000007.png"):
        (images / name).write_bytes(b"")
    with pytest.raises(DataError, match="empty after skipping"):
        ImageListDataset(tree, "cifar", "train800", skip_bad_images=True)


# ---------------------------------------------------------------------------------------------------
# Demo dataset


def test_make_digits(tmp_path):
    from data.make_digits import write_digits

    task_dir = write_digits(tmp_path, "digits")
    assert task_dir == tmp_path / "digits"
    counts = {split: len(read_list_file(task_dir / f"{split}.txt"))
              for split in ("train800", "val200", "train800val200", "test")}
    assert counts == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 797}
    train = read_list_file(task_dir / "train800.txt")
    val = read_list_file(task_dir / "val200.txt")
    test = read_list_file(task_dir / "test.txt")
    assert read_list_file(task_dir / "train800val200.txt") == train + val
    assert len({p for p, _ in train + val + test}) == 1797
    assert {label for _, label in train} == set(range(10))
    with Image.open(task_dir / test[0][0]) as img:
        assert img.mode == "RGB" and img.size == (32, 32)
        assert np.array_equal(np.asarray(img)[::4, ::4], np.asarray(img)[1::4, 1::4])  # nearest upscaling

    ds = ImageListDataset(tmp_path, "digits", "train800val200", transform=build_transform(32))
    assert ds.num_classes == 10 and len(ds) == 1000 and ds[0][0].shape == (3, 32, 32)

    stamp = os.stat(task_dir / "images" / "test" / "000000.png").st_mtime_ns
    assert write_digits(tmp_path, "digits") == task_dir  # complete: nothing rewritten
    assert os.stat(task_dir / "images" / "test" / "000000.png").st_mtime_ns == stamp
    os.remove(task_dir / "images" / "val200" / "000010.png")
    write_digits(tmp_path, "digits")  # incomplete: rebuilt, same deterministic split
    assert read_list_file(task_dir / "val200.txt") == val
    assert (task_dir / "images" / "val200" / "000010.png").is_file()
