"""VTAB-1k split strings, label derivations and the folder writer (data/vtab_splits.py, data/build_vtab.py).

TensorFlow Datasets is replaced by a small fake module, so the TFDS-reading path runs without TF.
"""
from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from data import build_vtab, verify_vtab
from data.build_vtab import build_task, write_task
from data.verify_vtab import verify_task
from data.vtab_splits import (
    EXPECTED_TEST_SIZES,
    TASK_SPECS,
    VTAB_TASKS,
    bin_by_thresholds,
    clevr_count_label,
    clevr_distance_label,
    dsprites_label,
    kitti_distance_label,
    resolve_split,
    split_to_tfds,
    to_rgb_uint8,
)
from lib.data import ImageListDataset, read_list_file

# ---------------------------------------------------------------------------------------------------
# Split strings


@pytest.mark.parametrize("spec,n,expected", [
    ("train[:800]", 3060, ("train", 0, 800)),
    ("train[90%:+200]", 1000, ("train", 900, 1000)),       # clamped to the split
    ("train[90%:+200]", 3060, ("train", 2754, 2954)),      # caltech101
    ("train[90%:+200]", 73257, ("train", 65931, 66131)),   # svhn: 65931.3 floors
    ("train[80%:+200]", 3680, ("train", 2944, 3144)),      # oxford_iiit_pet
    ("train[45000:45200]", 50000, ("train", 45000, 45200)),
    ("train[60%:+200]", 27000, ("train", 16200, 16400)),
    ("train[80%:]", 27000, ("train", 21600, 27000)),
    ("test[50%:]", 24300, ("test", 12150, 24300)),
    ("validation[:200]", 120, ("validation", 0, 120)),
    ("test", 6084, ("test", 0, 6084)),
    ("train[-10:]", 100, ("train", 90, 100)),
    ("train[:-10%]", 100, ("train", 0, 90)),
    ("train[50:20]", 100, ("train", 50, 50)),
    ("train[2000:+5]", 100, ("train", 100, 100)),
])
def test_resolve_split(spec, n, expected):
    assert resolve_split(spec, n) == expected


def test_split_string_errors_and_tfds_form():
    assert split_to_tfds("train[90%:+200]", 3060) == "train[2754:2954]"
    assert split_to_tfds("validation", 15000) == "validation[0:15000]"
    for bad in ("train[:800", "train[a:b]", "train[1:2]+test", ""):
        with pytest.raises(ValueError):
            resolve_split(bad, 100)


# TFDS split sizes of the dataset versions VTAB used.
TFDS_SIZES = {
    "cifar": {"train": 50000, "test": 10000}, "caltech101": {"train": 3060, "test": 6084},
    "dtd": {"train": 1880, "validation": 1880, "test": 1880},
    "oxford_flowers102": {"train": 1020, "validation": 1020, "test": 6149},
    "oxford_iiit_pet": {"train": 3680, "test": 3669}, "svhn": {"train": 73257, "test": 26032},
    "sun397": {"train": 76128, "validation": 10875, "test": 21750},
    "patch_camelyon": {"train": 262144, "validation": 32768, "test": 32768}, "eurosat": {"train": 27000},
    "resisc45": {"train": 31500}, "diabetic_retinopathy": {"train": 35126, "validation": 10906, "test": 42670},
    "clevr_count": {"train": 70000, "validation": 15000}, "clevr_dist": {"train": 70000, "validation": 15000},
    "dmlab": {"train": 65550, "validation": 22628, "test": 22735},
    "kitti": {"train": 6347, "validation": 423, "test": 711},
    "dsprites_loc": {"train": 737280}, "dsprites_ori": {"train": 737280},
    "smallnorb_azi": {"train": 24300, "test": 24300}, "smallnorb_ele": {"train": 24300, "test": 24300},
}


def test_every_task_spec_gives_vtab_split_sizes():
    assert list(TASK_SPECS) == list(VTAB_TASKS)
    for name, spec in TASK_SPECS.items():
        sizes = TFDS_SIZES[name]
        ranges = {}
        for split, text in spec.splits.items():
            base, start, stop = resolve_split(text, sizes[resolve_split(text, 0)[0]])
            ranges[split] = (base, start, stop)
        assert ranges["train800"][2] - ranges["train800"][1] == 800, name
        assert ranges["val200"][2] - ranges["val200"][1] == 200, name
        assert ranges["test"][2] - ranges["test"][1] == EXPECTED_TEST_SIZES[name], name
        for a, b in (("train800", "val200"), ("train800", "test"), ("val200", "test")):
            (base_a, start_a, stop_a), (base_b, start_b, stop_b) = ranges[a], ranges[b]
            assert base_a != base_b or stop_a <= start_b or stop_b <= start_a, f"{name}: {a} overlaps {b}"
    assert TASK_SPECS["cifar"].splits == {"train800": "train[:800]", "val200": "train[45000:45200]", "test": "test"}
    assert TASK_SPECS["smallnorb_ele"].splits == {"train800": "train[:800]", "val200": "test[:200]",
                                                  "test": "test[50%:]"}
    assert TASK_SPECS["sun397"].tfds_name == "sun397/tfds" and TASK_SPECS["eurosat"].tfds_name == "eurosat/rgb"
    assert TASK_SPECS["diabetic_retinopathy"].tfds_name == "diabetic_retinopathy_detection/btgraham-300"
    assert {n for n, s in TASK_SPECS.items() if s.manual} == {"resisc45", "diabetic_retinopathy"}


# ---------------------------------------------------------------------------------------------------
# Label derivations


def test_bin_by_thresholds_is_strictly_above():
    thrs = [0.0, 8.0, 8.5]
    assert bin_by_thresholds(0.5, thrs) == 0
    assert bin_by_thresholds(8.0, thrs) == 0          # equal to a threshold stays below it
    assert bin_by_thresholds(8.0001, thrs) == 1
    assert bin_by_thresholds(50.0, thrs) == 2
    with pytest.raises(ValueError):
        bin_by_thresholds(0.0, thrs)


def _clevr(depths):
    n = len(depths)
    return {"objects": {"size": np.zeros(n, np.int64),
                        "pixel_coords": np.array([[10.0, 20.0, d] for d in depths], np.float32).reshape(n, 3)}}


def test_clevr_count():
    assert clevr_count_label(_clevr([9.0] * 3)) == 0
    assert clevr_count_label(_clevr([9.0] * 7)) == 4
    assert clevr_count_label(_clevr([9.0] * 10)) == 7


@pytest.mark.parametrize("depths,label", [
    ([12.0, 7.9, 9.0], 0), ([8.0], 0), ([8.25, 30.0], 1), ([8.5], 1), ([8.75], 2), ([9.0], 2),
    ([9.25], 3), ([9.75, 11.0], 4), ([10.0], 4), ([10.5], 5), ([99.0], 5), ([100.0], 5),
])
def test_clevr_distance(depths, label):
    assert clevr_distance_label(_clevr(depths)) == label


def test_clevr_distance_out_of_range():
    with pytest.raises(ValueError):
        clevr_distance_label(_clevr([0.0, 9.0]))
    assert clevr_distance_label(_clevr([150.0])) == 6  # what VTAB computes; TaskSpec.example rejects it
    with pytest.raises(ValueError, match=r"outside \[0, 6\)"):
        TASK_SPECS["clevr_dist"].example({**_clevr([150.0]), "image": np.zeros((2, 2, 3), np.uint8)})


def _kitti(objects):
    types_ = np.array([t for t, _ in objects], np.int64)
    location = np.array([[1.0, 1.5, z] for _, z in objects], np.float32).reshape(len(objects), 3)
    return {"objects": {"type": types_, "location": location}}


CAR, VAN, TRUCK, PEDESTRIAN, CYCLIST, TRAM = 0, 1, 2, 3, 5, 6


@pytest.mark.parametrize("objects,label", [
    ([], 3),                                      # no vehicle
    ([(PEDESTRIAN, 5.0), (CYCLIST, 3.0), (TRAM, 4.0)], 3),  # only non-vehicles
    ([(CAR, 8.0)], 0), ([(CAR, 2.0), (VAN, 30.0)], 0),
    ([(VAN, 8.01)], 1), ([(TRUCK, 20.0)], 1),
    ([(PEDESTRIAN, 1.0), (CAR, 20.5)], 2), ([(CAR, 999.0)], 2),
    ([(TRUCK, 40.0), (CAR, 15.0), (VAN, 25.0)], 1),
    ([(CAR, 999.5)], 3),
])
def test_kitti_closest_vehicle_distance(objects, label):
    assert kitti_distance_label(_kitti(objects)) == label


@pytest.mark.parametrize("index,label", [(0, 0), (1, 0), (2, 1), (3, 1), (16, 8), (30, 15), (31, 15)])
def test_dsprites_x_position(index, label):
    assert dsprites_label({"label_x_position": np.int64(index)}, "x_position") == label


@pytest.mark.parametrize("index,label", [(0, 0), (2, 0), (3, 1), (5, 2), (20, 8), (37, 14), (38, 15), (39, 15)])
def test_dsprites_orientation(index, label):
    assert dsprites_label({"label_orientation": np.int64(index)}, "orientation") == label


def test_dsprites_values_map_like_labels():
    for index in range(32):
        value = {"value_x_position": np.float32(index / 31)}
        assert dsprites_label(value, "x_position") == index // 2
    for index in range(40):
        value = {"value_orientation": np.float32(index * 2 * math.pi / 39)}
        assert dsprites_label(value, "orientation") == math.floor(index / 2.5)
    with pytest.raises(ValueError):
        dsprites_label({"label_scale": 1}, "scale")


def test_smallnorb_and_plain_labels():
    record = {"image": np.zeros((3, 3, 1), np.uint8), "label_azimuth": np.int64(17), "label_elevation": np.int64(8),
              "label": np.int64(5)}
    assert TASK_SPECS["smallnorb_azi"].label(record) == 17
    assert TASK_SPECS["smallnorb_ele"].label(record) == 8
    assert TASK_SPECS["dmlab"].label(record) == 5
    assert TASK_SPECS["cifar"].label(record) == 5


def test_image_derivations():
    grey = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    rgb = to_rgb_uint8(grey)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8 and (rgb == grey).all()
    sprite = {"image": np.array([[[0], [1]]], np.uint8), "label_x_position": 3, "label_orientation": 0}
    image, label = TASK_SPECS["dsprites_loc"].example(sprite)
    assert image.tolist() == [[[0, 0, 0], [255, 255, 255]]] and label == 1
    norb = {"image": np.full((4, 4, 1), 9, np.uint8), "label_azimuth": 3}
    assert TASK_SPECS["smallnorb_azi"].image(norb).shape == (4, 4, 3)
    assert to_rgb_uint8(np.full((2, 2), 0.5) * 255).max() == 128
    with pytest.raises(ValueError):
        to_rgb_uint8(np.full((2, 2, 3), 300.0))
    with pytest.raises(ValueError):
        to_rgb_uint8(np.zeros((2, 2, 2), np.uint8))


# ---------------------------------------------------------------------------------------------------
# Writer


def _examples(count, shape=(5, 7, 3), num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return ((rng.integers(0, 256, size=shape, dtype=np.uint8), i % num_classes) for i in range(count))


def test_write_task_layout_and_lists(tmp_path):
    task_dir = tmp_path / "mytask"
    grey = [(np.full((6, 4), 10 * i, np.uint8), i) for i in range(2)]
    lists = write_task(task_dir, {"train800": _examples(3), "val200": iter(grey), "test": _examples(4, seed=1)},
                       image_format="png", num_classes=10,
                       expected_sizes={"train800": 3, "val200": 2, "train800val200": 5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mytask"]  # no .partial left behind
    assert sorted(p.name for p in task_dir.iterdir()) == ["images", "test.txt", "train800.txt",
                                                           "train800val200.txt", "val200.txt"]
    assert (task_dir / "train800.txt").read_text() == (
        "images/train800/000000.png 0\nimages/train800/000001.png 1\nimages/train800/000002.png 2\n")
    assert (task_dir / "val200.txt").read_text() == "images/val200/000000.png 0\nimages/val200/000001.png 1\n"
    assert (task_dir / "train800val200.txt").read_text() == (
        (task_dir / "train800.txt").read_text() + (task_dir / "val200.txt").read_text())
    assert read_list_file(task_dir / "test.txt") == [(f"images/test/{i:06d}.png", i) for i in range(4)]
    assert lists["train800val200"] == lists["train800"] + lists["val200"]
    first = next(_examples(1))[0]
    assert np.array_equal(np.asarray(Image.open(task_dir / "images/train800/000000.png")), first)  # lossless, native
    back = np.asarray(Image.open(task_dir / "images/val200/000001.png"))
    assert back.shape == (6, 4, 3) and (back == 10).all()  # grey tiled to RGB


def test_write_task_checks(tmp_path):
    with pytest.raises(ValueError, match="expected 800"):
        write_task(tmp_path / "a", {"train800": _examples(3), "val200": _examples(2), "test": _examples(1)})
    assert not list(tmp_path.iterdir())  # neither the task folder nor its .partial stays
    with pytest.raises(ValueError, match=r"train800 example 5: label 5 outside \[0, 5\)"):
        write_task(tmp_path / "b", {"train800": _examples(12), "val200": _examples(2)}, num_classes=5)
    with pytest.raises(ValueError, match="train800 and val200"):
        write_task(tmp_path / "c", {"train800": _examples(1)})
    small = {"train800": 1, "val200": 1, "train800val200": 2}
    write_task(tmp_path / "d", {"train800": _examples(1), "val200": _examples(1)}, expected_sizes=small)
    with pytest.raises(FileExistsError):
        write_task(tmp_path / "d", {"train800": _examples(1), "val200": _examples(1)}, expected_sizes=small)
    write_task(tmp_path / "d", {"train800": _examples(1), "val200": _examples(1), "test": _examples(2)},
               expected_sizes=small, overwrite=True)
    assert len(read_list_file(tmp_path / "d" / "test.txt")) == 2


# ---------------------------------------------------------------------------------------------------
# TFDS path with a fake tensorflow_datasets


class FakeBuilder:
    """Enough of tfds.core.DatasetBuilder: split sizes, prepare, and slicing by absolute split strings."""

    def __init__(self, name, data_dir, sizes, make_record, prepare_error=None):
        self.name, self.data_dir = name, data_dir
        self.info = SimpleNamespace(splits={k: SimpleNamespace(num_examples=v) for k, v in sizes.items()},
                                    version="9.8.7")
        self.make_record, self.prepare_error = make_record, prepare_error
        self.requested, self.prepared_with = [], None

    def download_and_prepare(self, download_config=None):
        self.prepared_with = download_config
        if self.prepare_error:
            raise self.prepare_error

    def as_dataset(self, split, shuffle_files, read_config=None):
        assert shuffle_files is False
        assert read_config is not None and read_config.interleave_cycle_length == 1  # TFDS's on-disk order
        match = re.fullmatch(r"(\w+)\[(\d+):(\d+)\]", split)
        assert match, f"builder got a relative split string {split!r}"
        self.requested.append(split)
        base, start, stop = match.group(1), int(match.group(2)), int(match.group(3))
        assert stop <= self.info.splits[base].num_examples
        return (self.make_record(base, i) for i in range(start, stop))


@pytest.fixture
def fake_tfds(monkeypatch):
    module = types.ModuleType("tensorflow_datasets")
    module.builders = []
    module.config = {"sizes": {}, "record": None, "error": None}

    def builder(name, data_dir=None):
        cfg = module.config
        b = FakeBuilder(name, data_dir, cfg["sizes"], cfg["record"], cfg["error"])
        module.builders.append(b)
        return b

    module.builder = builder
    module.__version__ = "0.0.fake"
    module.ReadConfig = lambda **kwargs: SimpleNamespace(**kwargs)
    module.as_numpy = lambda ds: iter(ds)
    module.download = SimpleNamespace(DownloadConfig=lambda manual_dir=None: SimpleNamespace(manual_dir=manual_dir))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)
    monkeypatch.setitem(sys.modules, "importlib_resources", types.ModuleType("importlib_resources"))
    return module


def test_build_task_from_fake_tfds(tmp_path, fake_tfds):
    fake_tfds.config.update(sizes={"train": 3060, "test": 5}, record=lambda base, i: {
        "image": np.full((3, 2, 3), i % 256, np.uint8), "label": np.int64(i % 102)})
    task_dir = build_task("caltech101", tmp_path, tfds_dir="/tfds", manual_dir="/manual")
    builder = fake_tfds.builders[0]
    assert builder.name == "caltech101:3.*.*" and builder.data_dir == "/tfds"
    assert builder.prepared_with.manual_dir == "/manual"
    assert builder.requested == ["train[0:800]", "train[2754:2954]", "test[0:5]"]
    assert task_dir == tmp_path / "caltech101"
    val = read_list_file(task_dir / "val200.txt")
    assert val[0] == ("images/val200/000000.jpg", 2754 % 102) and len(val) == 200
    assert len(read_list_file(task_dir / "train800val200.txt")) == 1000
    with Image.open(task_dir / "images/test/000004.jpg") as img:
        assert img.size == (2, 3) and img.format == "JPEG"
    report = verify_task(task_dir)
    assert report.ok, report.problems
    assert any("VTAB's caltech101 test split has 6084" in w for w in report.warnings)
    assert len(ImageListDataset(tmp_path, "caltech101", "train800val200")) == 1000


def test_build_kitti_labels_from_fake_tfds(tmp_path, fake_tfds):
    depths = [5.0, 15.0, 500.0, None]

    def record(base, i):
        z = depths[i % 4]
        objects = [(PEDESTRIAN, 1.0)] + ([] if z is None else [(CAR, z)])
        return {"image": np.zeros((2, 2, 3), np.uint8), **_kitti(objects)}

    fake_tfds.config.update(sizes={"train": 6347, "validation": 423, "test": 9}, record=record)
    assert build_vtab.main(["--tasks", "kitti", "--out", str(tmp_path), "--latest-versions"]) == 0
    assert fake_tfds.builders[0].name == "kitti"
    assert fake_tfds.builders[0].requested == ["train[0:800]", "validation[0:200]", "test[0:9]"]
    assert [label for _, label in read_list_file(tmp_path / "kitti" / "test.txt")] == [0, 1, 2, 3] * 2 + [0]
    assert build_vtab.main(["--tasks", "kitti", "--out", str(tmp_path)]) == 1  # exists, no --overwrite


def test_manual_download_failure_explains(tmp_path, fake_tfds, capsys):
    fake_tfds.config.update(error=AssertionError("Manual directory /m does not exist or is empty"))
    with pytest.raises(RuntimeError, match="NWPU-RESISC45"):
        build_task("resisc45", tmp_path)
    assert build_vtab.main(["--tasks", "diabetic_retinopathy", "--out", str(tmp_path)]) == 1
    assert "Kaggle" in capsys.readouterr().err
    assert not list(Path(tmp_path).iterdir())


def test_missing_tfds_names_requirements(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match="data/requirements-vtab.txt"):
        build_task("cifar100", tmp_path)
    assert build_vtab.main(["--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.count("data/requirements-vtab.txt") == 1  # said once, not per task
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        build_vtab.main(["--tasks", "imagenet"])
    with pytest.raises(ValueError, match="unknown VTAB task"):
        build_task("imagenet", tmp_path)


def test_split_sizes_fail_fast_before_any_image(tmp_path, fake_tfds):
    fake_tfds.config.update(sizes={"train": 3060}, record=lambda base, i: {  # no "test" split
        "image": np.zeros((2, 2, 3), np.uint8), "label": np.int64(0)})
    with pytest.raises(ValueError, match=r"caltech101: caltech101 9\.8\.7 has no split 'test'.*nothing was written"):
        build_task("caltech101", tmp_path)
    fake_tfds.config.update(sizes={"train": 1000, "test": 5})  # train[90%:+200] of 1000 gives 100 examples
    with pytest.raises(ValueError, match=r"val200 = train\[90%:\+200\] of 1000 gives 100, expected 200"):
        build_task("caltech101", tmp_path)
    fake_tfds.config.update(sizes={"train": 3060, "test": 0})
    with pytest.raises(ValueError, match=r"test = test is empty"):
        build_task("caltech101", tmp_path)
    fake_tfds.config.update(sizes={})  # --no-download on a dataset TFDS has not prepared
    with pytest.raises(ValueError, match=r"no split sizes for caltech101 9\.8\.7: not prepared"):
        build_task("caltech101", tmp_path, download=False)
    assert all(b.requested == [] for b in fake_tfds.builders)  # nothing was read
    assert not list(tmp_path.iterdir())                          # nor written


def test_source_json_records_versions_and_slices_and_reaches_the_manifest(tmp_path, fake_tfds):
    fake_tfds.config.update(sizes={"train": 3680, "test": 7}, record=lambda base, i: {
        "image": np.full((2, 2, 3), i % 256, np.uint8), "label": np.int64(i % 37)})
    task_dir = build_task("oxford_pet", tmp_path, image_format="png")
    assert fake_tfds.builders[0].name == "oxford_iiit_pet:4.0.0"
    source = json.loads((task_dir / "source.json").read_text())
    assert source == {
        "format": "pyra-vtab-source/1", "task": "oxford_iiit_pet", "tfds_version": "0.0.fake",
        "tfds_name": "oxford_iiit_pet", "version_requested": "4.0.0", "vtab_version": "3.*.*",
        "dataset_version": "9.8.7", "tfds_split_sizes": {"train": 3680, "test": 7},
        "splits": {"train800": {"vtab": "train[:800]", "tfds": "train[0:800]", "count": 800},
                   "val200": {"vtab": "train[80%:+200]", "tfds": "train[2944:3144]", "count": 200},
                   "test": {"vtab": "test", "tfds": "test[0:7]", "count": 7}},
        "read_order": "on-disk order: shuffle_files=False, tfds.ReadConfig(interleave_cycle_length=1)",
        "image_format": "png"}
    manifest = tmp_path / "manifest.json"
    assert verify_vtab.main([str(tmp_path), "--tasks", "oxford_iiit_pet", "--manifest", str(manifest)]) == 0
    assert json.loads(manifest.read_text())["tasks"]["oxford_iiit_pet"]["source"] == source
    (task_dir / "source.json").write_text("{not json")
    report = verify_task(task_dir)
    assert report.ok and report.source is None and any("source.json: unreadable" in w for w in report.warnings)


def test_version_table_matches_the_pinned_tfds():
    # VTAB pinned kitti:3.1.0 exactly; TFDS 4.9.10 no longer has oxford_iiit_pet 3.x, 4.0.0 has the same splits.
    assert TASK_SPECS["kitti"].tfds_version == "3.1.0" and TASK_SPECS["kitti"].vtab_pattern == "3.1.0"
    assert TASK_SPECS["oxford_iiit_pet"].tfds_version == "4.0.0"
    assert TASK_SPECS["oxford_iiit_pet"].vtab_pattern == "3.*.*"
    assert TASK_SPECS["cifar"].vtab_pattern == TASK_SPECS["cifar"].tfds_version == "3.*.*"


def test_missing_importlib_resources_is_named_not_blamed_on_manual_download(tmp_path, fake_tfds, monkeypatch,
                                                                           capsys):
    monkeypatch.setitem(sys.modules, "importlib_resources", None)
    assert build_vtab.main(["--tasks", "resisc45", "dtd", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("importlib_resources") == 1 and "NWPU" not in err and not fake_tfds.builders
    monkeypatch.setitem(sys.modules, "importlib_resources", types.ModuleType("importlib_resources"))
    fake_tfds.config.update(error=ModuleNotFoundError("No module named 'cv2'"))
    with pytest.raises(RuntimeError, match=r"No module named 'cv2'; pip install -r data/requirements-vtab.txt") as err:
        build_task("resisc45", tmp_path)
    assert "NWPU" not in str(err.value)


def test_manual_download_message_names_the_folder_used(tmp_path, fake_tfds):
    fake_tfds.config.update(error=AssertionError("Manual directory does not exist or is empty"))
    with pytest.raises(RuntimeError, match=r"NWPU-RESISC45/<class name>/.*Manual dir used: /m/manual$"):
        build_task("resisc45", tmp_path, manual_dir="/m/manual")
    with pytest.raises(RuntimeError, match=r"trainLabels\.csv.*retinopathy_solution\.csv.*Manual dir used: "
                                           r"/tfds/downloads/manual$"):
        build_task("diabetic_retinopathy", tmp_path, tfds_dir="/tfds")
