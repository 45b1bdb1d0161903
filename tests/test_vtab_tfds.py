"""VTAB-1k built through the real TensorFlow Datasets builders (data/build_vtab.py against TFDS itself).

Skipped unless TensorFlow Datasets is installed (``pip install -r data/requirements-vtab.txt``; .ci/run does
this in a separate virtual environment). Nothing is downloaded: ``tfds.testing.mock_data`` replaces
``download_and_prepare`` and the reading, while everything else is the real TFDS: ``tfds.builder`` resolves
the table's name and version pattern, ``DatasetInfo`` is restored from ``dataset_info.json`` files
(``MockPolicy.USE_FILES``), and the requested slice is resolved by TFDS's own split API.

- tests/data/vtab_tfds/<dataset>/[<config>/]<version>/dataset_info.json hold the split sizes TFDS publishes
  for exactly the dataset versions the table asks for (a pattern resolving to another version finds no file
  and fails). Each split is one shard there; the real shard layout is not published.
- The mock generates, for every example index the slice asks for, a record with every feature of the
  builder's real ``FeaturesDict`` (names, dtypes, nesting). Values are a hash of (dataset, feature, split,
  index), constrained where random values are impossible in reality: CLEVR scenes hold 3..10 objects,
  all object fields of a scene have the same length, depths are positive; KITTI scenes 0..5 objects;
  dSprites pixels are 0/1 and its ``value_*`` match its ``label_*``. Images are tiny (1x2 RGB, 1x4 grey,
  1x24 binary) and encode the split and the index, so each written file says which record it came from.
- Checks per task: the slices asked for, split sizes, the label range, every label against a re-derivation
  written here from VTAB's definitions (not data/vtab_splits.py), the on-disk order, and ``verify_vtab``'s
  verdict (``--deep``, no problem, no warning), plus the versions recorded in the manifest.
- The full build (VTAB's real split sizes: about 400,000 images, written as PNG so the check can read the
  index back exactly) runs once per session, split over one worker process per CPU (at most 4), into
  /dev/shm when it has room.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")
tf = pytest.importorskip("tensorflow")

from data import build_vtab, verify_vtab  # noqa: E402
from data.vtab_splits import TASK_SPECS, VTAB_TASKS  # noqa: E402

METADATA = Path(__file__).parent / "data" / "vtab_tfds"
REQUIREMENTS = Path(__file__).resolve().parents[1] / "data" / "requirements-vtab.txt"

# ---------------------------------------------------------------------------------------------------
# What each task must be, written out by hand from VTAB (task_adaptation) and TFDS's published split sizes:
# TFDS dataset and version, class count, and the absolute (split, start, stop) of train800 / val200 / test.

EXPECTED = {
    "cifar": ("cifar100", "3.0.2", 100, [("train", 0, 800), ("train", 45000, 45200), ("test", 0, 10000)]),
    "caltech101": ("caltech101", "3.0.2", 102, [("train", 0, 800), ("train", 2754, 2954), ("test", 0, 6084)]),
    "dtd": ("dtd", "3.0.1", 47, [("train", 0, 800), ("validation", 0, 200), ("test", 0, 1880)]),
    "oxford_flowers102": ("oxford_flowers102", "2.1.1", 102,
                          [("train", 0, 800), ("validation", 0, 200), ("test", 0, 6149)]),
    "oxford_iiit_pet": ("oxford_iiit_pet", "4.0.0", 37, [("train", 0, 800), ("train", 2944, 3144), ("test", 0, 3669)]),
    "svhn": ("svhn_cropped", "3.1.0", 10, [("train", 0, 800), ("train", 65931, 66131), ("test", 0, 26032)]),
    "sun397": ("sun397/tfds", "4.0.0", 397, [("train", 0, 800), ("validation", 0, 200), ("test", 0, 21750)]),
    "patch_camelyon": ("patch_camelyon", "2.0.0", 2, [("train", 0, 800), ("validation", 0, 200), ("test", 0, 32768)]),
    "eurosat": ("eurosat/rgb", "2.0.0", 10, [("train", 0, 800), ("train", 16200, 16400), ("train", 21600, 27000)]),
    "resisc45": ("resisc45", "3.0.0", 45, [("train", 0, 800), ("train", 18900, 19100), ("train", 25200, 31500)]),
    "diabetic_retinopathy": ("diabetic_retinopathy_detection/btgraham-300", "3.0.0", 5,
                             [("train", 0, 800), ("validation", 0, 200), ("test", 0, 42670)]),
    "clevr_count": ("clevr", "3.1.0", 8, [("train", 0, 800), ("train", 63000, 63200), ("validation", 0, 15000)]),
    "clevr_dist": ("clevr", "3.1.0", 6, [("train", 0, 800), ("train", 63000, 63200), ("validation", 0, 15000)]),
    "dmlab": ("dmlab", "2.0.1", 6, [("train", 0, 800), ("validation", 0, 200), ("test", 0, 22735)]),
    "kitti": ("kitti", "3.1.0", 4, [("train", 0, 800), ("validation", 0, 200), ("test", 0, 711)]),
    "dsprites_loc": ("dsprites", "2.0.0", 16,
                     [("train", 0, 800), ("train", 589824, 590024), ("train", 663552, 737280)]),
    "dsprites_ori": ("dsprites", "2.0.0", 16,
                     [("train", 0, 800), ("train", 589824, 590024), ("train", 663552, 737280)]),
    "smallnorb_azi": ("smallnorb", "2.0.0", 18, [("train", 0, 800), ("test", 0, 200), ("test", 12150, 24300)]),
    "smallnorb_ele": ("smallnorb", "2.0.0", 9, [("train", 0, 800), ("test", 0, 200), ("test", 12150, 24300)]),
}
VTAB_SPLITS = ("train800", "val200", "test")
SPLIT_CODES = {"train": 1, "validation": 2, "test": 3}


# VTAB's label definitions (task_adaptation/data/{clevr,kitti,dsprites,smallnorb}.py), written out again.
def vtab_label(task, record):
    if task == "clevr_count":
        return len(record["objects"]["size"]) - 3
    if task == "clevr_dist":
        dist = min(float(z) for z in record["objects"]["pixel_coords"][:, 2])
        return max(i for i, t in enumerate([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0]) if t - dist < 0)
    if task == "kitti":
        zs = [float(loc[2]) for typ, loc in zip(record["objects"]["type"], record["objects"]["location"]) if typ < 3]
        dist = min(zs + [1000.0])
        return max(i for i, t in enumerate([-100.0, 8.0, 20.0, 999.0]) if t - dist < 0)
    if task == "dsprites_loc":
        return int(math.floor(int(record["label_x_position"]) / (32 / 16)))
    if task == "dsprites_ori":
        return int(math.floor(int(record["label_orientation"]) / (40 / 16)))
    if task == "smallnorb_azi":
        return int(record["label_azimuth"])
    if task == "smallnorb_ele":
        return int(record["label_elevation"])
    return int(record["label"])


def _vtab_bin(dist, thresholds):
    """``tf.reduce_max(tf.where((thrs - dist) < 0))`` per row, in float32 as TensorFlow computes it."""
    thrs = np.asarray(thresholds, np.float32)
    below = (thrs[None, :] - dist.astype(np.float32)[:, None]) < 0
    return np.max(np.where(below, np.arange(len(thrs)), -1), axis=1)


def vtab_labels(task, flat, lengths):
    """The same definitions, vectorised over a batch of mock records (``make_records`` output)."""
    if task == "clevr_count":
        return lengths["objects"] - 3
    if task in ("clevr_dist", "kitti"):
        width = flat["objects|size" if task == "clevr_dist" else "objects|type"].shape[1]
        present = np.arange(width)[None, :] < lengths["objects"][:, None]
        if task == "clevr_dist":
            depth = flat["objects|pixel_coords"][..., 2]
            return _vtab_bin(np.where(present, depth, np.inf).min(axis=1), [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])
        vehicle = present & (flat["objects|type"] < 3)
        z = np.where(vehicle, flat["objects|location"][..., 2], np.float32(1000.0))
        return _vtab_bin(np.minimum(z.min(axis=1, initial=np.float32(1000.0)), 1000.0), [-100.0, 8.0, 20.0, 999.0])
    if task == "dsprites_loc":
        return np.floor(flat["label_x_position"] / (32 / 16)).astype(np.int64)
    if task == "dsprites_ori":
        return np.floor(flat["label_orientation"] / (40 / 16)).astype(np.int64)
    key = {"smallnorb_azi": "label_azimuth", "smallnorb_ele": "label_elevation"}.get(task, "label")
    return flat[key]


# ---------------------------------------------------------------------------------------------------
# Mock records: every feature of the builder's FeaturesDict, a deterministic function of the index.

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _hash(*keys):
    """splitmix64 over the keys (uint64 arrays, broadcast): a stateless, order-free random source."""
    x = np.zeros(np.broadcast(*keys).shape, np.uint64)
    with np.errstate(over="ignore"):
        for key in keys:
            x = x ^ np.asarray(key, np.uint64)
            x = x + _GOLDEN
            x = (x ^ (x >> np.uint64(30))) * _M1
            x = (x ^ (x >> np.uint64(27))) * _M2
            x = x ^ (x >> np.uint64(31))
    return x


def _uniform(h):
    """[0, 1) with 24 bits, exactly representable in float32."""
    return (h >> np.uint64(40)).astype(np.float64) / float(1 << 24)


def _image_kind(dataset):
    return {"dsprites": "binary", "smallnorb": "grey"}.get(dataset.split("/")[0], "rgb")


def _index_image(kind, split_code, index):
    """Tiny images that encode (split, index): RGB 1x2, grey 1x4, binary (0/1) 1x24."""
    n = len(index)
    byts = np.stack([(index >> 16) & 255, (index >> 8) & 255, index & 255], axis=1).astype(np.uint8)
    if kind == "rgb":
        second = np.tile(np.array([split_code, 0, 255], np.uint8), (n, 1))
        return np.stack([byts, second], axis=1)[:, None, :, :]
    if kind == "grey":
        return np.concatenate([byts, np.full((n, 1), split_code, np.uint8)], axis=1)[:, None, :, None]
    code_bits = [np.full(n, (split_code >> 1) & 1), np.full(n, split_code & 1), np.zeros(n, np.int64),
                 np.zeros(n, np.int64)]
    bits = [(index >> b) & 1 for b in range(19, -1, -1)] + code_bits
    return np.stack(bits, axis=1).astype(np.uint8)[:, None, :, None]


def decode_index_image(kind, pixels):
    """(split code, index) back from a written image (RGB array as PIL reads it)."""
    if kind == "rgb":
        (b2, b1, b0), (code, _, _) = pixels[0, 0], pixels[0, 1]
        return int(code), (int(b2) << 16) | (int(b1) << 8) | int(b0)
    grey = pixels[0, :, 0].astype(np.int64)
    assert (pixels == grey[None, :, None]).all(), "grey image must be written as three equal channels"
    if kind == "grey":
        return int(grey[3]), (int(grey[0]) << 16) | (int(grey[1]) << 8) | int(grey[2])
    assert set(np.unique(grey)) <= {0, 255}, "dSprites pixels must be written as 0 or 255"
    bits = grey // 255
    return int(bits[20] * 2 + bits[21]), int("".join(map(str, bits[:20])), 2)


SEP = "|"  # joins feature paths; TFDS names may hold "/" (caltech101's "image/file_name")


def _walk(feature, path=""):
    """Leaves of a TFDS feature tree: (path, feature, tensor info, sequence group or None)."""
    if isinstance(feature, tfds.features.FeaturesDict):
        for key, sub in feature.items():
            yield from _walk(sub, f"{path}{SEP}{key}" if path else key)
    elif isinstance(feature, tfds.features.Sequence):
        for leaf_path, leaf, info, _ in _walk(feature.feature, path):
            yield leaf_path, leaf, info, path
    else:
        yield path, feature, feature.get_tensor_info(), None


_SEQ_LENGTHS = {("clevr", "objects"): (3, 10), ("kitti", "objects"): (0, 5)}


def make_records(dataset, features, split, index):
    """Records (batched numpy, sequences padded) for the examples ``index`` of ``split``.

    Returns ``(flat, lengths)``: ``flat`` maps feature paths (``objects|location``) to arrays with a leading
    batch axis; ``lengths`` maps each sequence group to the per-record lengths.
    """
    name = dataset.split("/")[0]
    index = np.asarray(index, np.int64)
    code = SPLIT_CODES.get(split, 4)

    def h(tag, *extra):
        return _hash(zlib.crc32(f"{dataset}/{tag}".encode()), code, index.astype(np.uint64), *extra)

    leaves = list(_walk(features))
    lengths = {}
    for group in {g for *_, g in leaves if g}:
        low, high = _SEQ_LENGTHS.get((name, group), (1, 3))
        lengths[group] = (low + h(f"{group}/len") % np.uint64(high - low + 1)).astype(np.int64)
    flat = {}
    for path, feature, info, group in leaves:
        width = int(lengths[group].max()) if group and len(index) else 1
        inner = tuple(info.shape)  # a sequence's leaves carry their per-element shape
        if isinstance(feature, tfds.features.Image):
            if path == "image":
                flat[path] = _index_image(_image_kind(dataset), code, index)
            else:  # second views, masks: tiny
                flat[path] = np.zeros((len(index), 1, 1, info.shape[-1]), np.uint8)
            continue
        shape = ((width,) if group else ()) + tuple(1 if s is None else s for s in inner)
        cells = int(np.prod(shape, dtype=np.int64))
        extra = np.arange(cells, dtype=np.uint64).reshape((1,) + shape)
        hh = h(path, 0)[(...,) + (None,) * len(shape)]
        values = _hash(hh, extra)
        dtype = np.dtype(info.np_dtype) if hasattr(info, "np_dtype") else np.dtype(info.dtype.as_numpy_dtype)
        if isinstance(feature, tfds.features.ClassLabel):
            flat[path] = (values % np.uint64(feature.num_classes)).astype(np.int64)
        elif dtype.kind in "OSU":
            names = np.array([f"{path}-{i}".encode() for i in index], dtype=object)
            flat[path] = np.broadcast_to(names.reshape((-1,) + (1,) * len(shape)), (len(index),) + shape).copy()
        elif dtype.kind == "f":
            flat[path] = _uniform(values).astype(dtype)
        elif dtype.kind in "iu":
            flat[path] = (values % np.uint64(256)).astype(dtype)
        else:
            raise AssertionError(f"{dataset}: no mock for feature {path} ({dtype})")

    if name == "clevr":  # depth of each object in front of the camera: 6..12 units, all six VTAB bins
        coords = flat["objects|pixel_coords"].astype(np.float64)
        coords[..., 2] = 6.0 + 6.0 * _uniform(_hash(h("depth", 0)[:, None], np.arange(coords.shape[1])))
        flat["objects|pixel_coords"] = coords.astype(np.float32)
    if name == "kitti":  # object distance z: 0..40 m
        loc = flat["objects|location"].astype(np.float64)
        loc[..., 2] = 40.0 * _uniform(_hash(h("z", 0)[:, None], np.arange(loc.shape[1])))
        flat["objects|location"] = loc.astype(np.float32)
    if name == "dsprites":  # values are the latent grid points of the labels
        flat["value_x_position"] = (flat["label_x_position"] / 31.0).astype(np.float32)
        flat["value_y_position"] = (flat["label_y_position"] / 31.0).astype(np.float32)
        flat["value_orientation"] = (flat["label_orientation"] * 2 * np.pi / 39.0).astype(np.float32)
        flat["value_scale"] = (0.5 + flat["label_scale"] / 10.0).astype(np.float32)
        flat["value_shape"] = (flat["label_shape"] + 1).astype(np.float32)
    return flat, lengths


def record_at(flat, lengths, row):
    """One record as the builder sees it (nested dicts, sequences cut to their length)."""
    record = {}
    for path, values in flat.items():
        node = record
        *parents, leaf = path.split(SEP)
        for key in parents:
            node = node.setdefault(key, {})
        group = next((g for g in lengths if path.startswith(g + SEP)), None)
        node[leaf] = values[row][: lengths[group][row]] if group else values[row]
    return record


class MockReads:
    """``FileReaderBuilder._as_dataset`` for ``tfds.testing.mock_data``: exactly the requested slice."""

    def __init__(self):
        self.requests = []

    def as_dataset_fn(self):
        """A plain function, as mock_data patches it in as a method."""
        def _as_dataset(builder, split, decoders=None, read_config=None, shuffle_files=False):
            return self.read(builder, split, decoders, read_config, shuffle_files)
        return _as_dataset

    def read(self, builder, split, decoders, read_config, shuffle_files):
        dataset = builder.name + (f"/{builder.builder_config.name}" if builder.builder_config else "")
        self.requests.append((dataset, str(builder.info.version), str(split), shuffle_files,
                              getattr(read_config, "interleave_cycle_length", None)))
        assert decoders is None
        instructions = builder.info.splits[split].file_instructions  # TFDS's own slice resolution
        base = re.match(r"\w+", str(split)).group(0)
        assert len(instructions) == 1 and instructions[0].examples_in_shard == builder.info.splits[base].num_examples
        start = instructions[0].skip
        index = np.arange(start, start + instructions[0].take, dtype=np.int64)
        flat, lengths = make_records(dataset, builder.info.features, base, index)
        # Nested like the FeaturesDict. Sequences travel padded with their lengths and are cut back to each
        # example's own length in a map (faster here than ragged slicing).
        columns = {tuple(path.split(SEP)): tf.constant(values) for path, values in flat.items()}
        columns.update({("__len__", group): tf.constant(n) for group, n in lengths.items()})

        def nest(row):
            record = {}
            for path, value in row.items():
                if path[0] == "__len__":
                    continue
                if path[0] in lengths:
                    value = value[: row[("__len__", path[0])]]
                node = record
                for key in path[:-1]:
                    node = node.setdefault(key, {})
                node[path[-1]] = value
            return record

        if not lengths:
            return tf.data.Dataset.from_tensor_slices(nest(columns))
        return tf.data.Dataset.from_tensor_slices(columns).map(nest)


# ---------------------------------------------------------------------------------------------------
# One build of all 19 tasks, shared by the checks below.


REPO = Path(__file__).resolve().parents[1]
_WORKER = f"""
import sys
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
import test_vtab_tfds
test_vtab_tfds.build_group(sys.argv[1], sys.argv[2], sys.argv[3:])
"""


def build_group(out, log, tasks):
    """Build and verify some tasks (in a worker process); write exit codes, reads and manifest to ``log``."""
    reads = MockReads()
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(METADATA),
                                as_dataset_fn=reads.as_dataset_fn()):
        code = build_vtab.main(["--out", out, "--format", "png", "--tfds-dir", f"{out}/tfds-unused", "--tasks", *tasks])
    manifest = f"{log}.manifest.json"
    verdict = verify_vtab.main([out, "--tasks", *tasks, "--deep", "--manifest", manifest])
    Path(log).write_text(json.dumps({"code": code, "verdict": verdict, "reads": reads.requests,
                                     "manifest": json.loads(Path(manifest).read_text())}))


def _groups(count):
    """Tasks split into ``count`` groups of about equal example counts."""
    sizes = {task: sum(stop - start for _, start, stop in EXPECTED[task][3]) for task in EXPECTED}
    groups, loads = [[] for _ in range(count)], [0] * count
    for task in sorted(sizes, key=sizes.get, reverse=True):
        i = loads.index(min(loads))
        groups[i].append(task)
        loads[i] += sizes[task]
    return [group for group in groups if group]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """All 19 tasks built and verified once: ~400,000 tiny images, so in memory (/dev/shm) where there is
    room, by one worker process per CPU (at most 4), each building and verifying an equal share of them."""
    logs = tmp_path_factory.mktemp("vtab-logs")
    shm = Path("/dev/shm")
    in_memory = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 * 2**30
    out = Path(tempfile.mkdtemp(prefix="pyra-vtab-tfds-", dir=shm)) if in_memory else tmp_path_factory.mktemp("vtab")
    try:
        groups = _groups(min(4, os.cpu_count() or 1))
        procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(out), str(logs / f"group{i}.json"), *group],
                                  cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
                 for i, group in enumerate(groups)]
        for proc in procs:
            assert proc.wait(timeout=3600) == 0
        results = [json.loads((logs / f"group{i}.json").read_text()) for i in range(len(groups))]
        yield {"out": out, "code": max(r["code"] for r in results), "verdict": max(r["verdict"] for r in results),
               "reads": [tuple(read) for r in results for read in r["reads"]],
               "manifest": {"tasks": {t: e for r in results for t, e in r["manifest"]["tasks"].items()}}}
    finally:
        if in_memory:
            shutil.rmtree(out, ignore_errors=True)


def test_all_tasks_build_and_verify(built):
    assert built["code"] == 0
    assert built["verdict"] == 0
    assert sorted(p.name for p in built["out"].iterdir() if p.is_dir()) == sorted(VTAB_TASKS)
    assert not list(built["out"].glob("*.partial"))
    for task, entry in built["manifest"]["tasks"].items():
        assert entry["ok"] and entry["problems"] == [] and entry["warnings"] == [], task


@pytest.mark.parametrize("task", list(VTAB_TASKS))
def test_task_against_real_tfds(built, task):
    dataset, version, num_classes, ranges = EXPECTED[task]
    task_dir = built["out"] / task
    # The slices read: the table's, resolved by TFDS against its split sizes, in TFDS's on-disk order.
    spec = TASK_SPECS[task]
    reads = [r for r in built["reads"] if r[0] == dataset]
    tfds_slices = [f"{base}[{start}:{stop}]" for base, start, stop in ranges]
    assert [(r[2], r[3], r[4]) for r in reads] == [
        (s, False, 1) for s in (tfds_slices * 2 if dataset in ("clevr", "dsprites", "smallnorb") else tfds_slices)]
    assert {r[1] for r in reads} == {version}

    features = tfds.builder(f"{spec.tfds_name}:{version}", data_dir=str(METADATA)).info.features
    kind = _image_kind(dataset)
    lists = {}
    for split, (base, start, stop) in zip(VTAB_SPLITS, ranges):
        lines = (task_dir / f"{split}.txt").read_text().splitlines()
        assert len(lines) == stop - start, (split, len(lines))
        index = np.arange(start, stop)
        flat, lengths = make_records(dataset, features, base, index)
        labels = []
        # Images decoded: all of train800 / val200, and every 37th of test plus its ends (verify_vtab --deep
        # above has decoded every file already).
        decode = set(range(len(lines))) if split != "test" else (
            set(range(0, len(lines), 37)) | set(range(20)) | set(range(len(lines) - 20, len(lines))))
        for row, line in enumerate(lines):
            rel, label = line.rsplit(" ", 1)
            assert rel == f"images/{split}/{row:06d}.png"
            labels.append(int(label))
            if row in decode:
                with Image.open(task_dir / rel) as img:
                    pixels = np.asarray(img.convert("RGB"))
                # The file holds exactly record `start + row` of `base`: the slice, in order, nothing shuffled.
                assert decode_index_image(kind, pixels) == (SPLIT_CODES[base], start + row), (split, row)
                record = record_at(flat, lengths, row)
                assert int(label) == vtab_label(task, record), (split, row, record)
        # Every label, re-derived from its record (rows are records start.., as the images above show).
        expected = vtab_labels(task, flat, lengths)
        wrong = np.flatnonzero(np.asarray(labels) != expected)
        assert wrong.size == 0, (split, wrong[:5], [labels[r] for r in wrong[:5]], expected[wrong[:5]])
        assert 0 <= min(labels) and max(labels) < num_classes
        lists[split] = lines
    assert (task_dir / "train800val200.txt").read_text().splitlines() == lists["train800"] + lists["val200"]
    # Every class VTAB defines occurs in the test split of the mock (the derivations reach all bins).
    if task in ("clevr_count", "clevr_dist", "kitti", "dsprites_loc", "dsprites_ori"):
        assert {int(line.rsplit(" ", 1)[1]) for line in lists["test"]} == set(range(num_classes))

    entry = built["manifest"]["tasks"][task]
    assert {s: entry["splits"][s]["count"] for s in entry["splits"]} == {
        "train800": 800, "val200": 200, "train800val200": 1000, "test": ranges[2][2] - ranges[2][1]}
    source = entry["source"]
    assert source["tfds_version"] == tfds.__version__
    assert source["dataset_version"] == version and source["tfds_name"] == spec.tfds_name
    assert source["splits"] == {s: {"vtab": spec.splits[s], "tfds": t, "count": r[2] - r[1]}
                                for s, t, r in zip(VTAB_SPLITS, tfds_slices, ranges)}
    assert source["read_order"] == build_vtab.READ_ORDER and source["image_format"] == "png"


def test_every_metadata_file_is_used_and_matches_its_builder():
    """Each dataset_info.json belongs to a real builder at that version (TFDS refuses a mismatch)."""
    files = sorted(METADATA.rglob("dataset_info.json"))
    wanted = {(EXPECTED[t][0], EXPECTED[t][1]) for t in EXPECTED}
    assert {("/".join(f.relative_to(METADATA).parts[:-2]), f.parent.name) for f in files} == wanted
    for dataset, version in sorted(wanted):
        with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(METADATA)):
            builder = tfds.builder(f"{dataset}:{version}")
        assert str(builder.info.version) == version and builder.info.splits.total_num_examples > 0


def test_vtab_patterns_against_the_pinned_tfds():
    """The table's patterns resolve in this TFDS; VTAB's own oxford_iiit_pet pattern no longer does."""
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE):  # no file, no network
        for task, spec in TASK_SPECS.items():
            assert str(tfds.builder(f"{spec.tfds_name}:{spec.tfds_version}").version) == EXPECTED[task][1], task
        with pytest.raises(Exception, match="4.0.0"):
            tfds.builder(f"oxford_iiit_pet:{TASK_SPECS['oxford_iiit_pet'].vtab_pattern}")
        assert str(tfds.builder("kitti:3.*.*").version) == "3.3.0"  # why the table pins VTAB's 3.1.0


def test_wrong_split_size_fails_before_reading_or_writing(tmp_path):
    metadata = tmp_path / "metadata"
    shutil.copytree(METADATA / "kitti", metadata / "kitti")
    info_path = metadata / "kitti" / "3.1.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    for split in info["splits"]:
        if split["name"] == "validation":
            split["shardLengths"] = ["150"]
    info_path.write_text(json.dumps(info))
    reads = MockReads()
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(metadata),
                                as_dataset_fn=reads.as_dataset_fn()):
        with pytest.raises(ValueError, match=r"val200 = validation\[:200\] of 150 gives 150, expected 200"):
            build_vtab.build_task("kitti", tmp_path / "out")
    assert reads.requests == [] and not (tmp_path / "out").exists()


def test_installed_extras_are_the_pinned_ones():
    """This environment holds exactly what data/requirements-vtab.txt pins (CI installs it fresh)."""
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[name] = version
    assert {"tensorflow-cpu", "tensorflow-datasets", "importlib_resources", "h5py"} <= set(pins)
    for name, version in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "tensorflow-cpu":  # tensorflow==<same version> instead, where tensorflow-cpu has no wheel
                installed = importlib.metadata.version("tensorflow")
            else:
                raise
        assert installed == version, name
    build_vtab._import_tfds()  # TFDS and importlib_resources importable
    # download_and_prepare finds the builder's checksums through code_path, which needs importlib_resources.
    assert tfds.builder_cls("kitti").code_path.name == "kitti_dataset_builder.py"
    import cv2  # noqa: F401  (sun397, kitti, diabetic_retinopathy_detection/btgraham-300)
    import h5py  # noqa: F401  (patch_camelyon, dsprites)
    import scipy.io  # noqa: F401  (svhn_cropped, oxford_flowers102)
