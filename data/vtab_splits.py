"""VTAB-1k task definitions: names, class counts, TFDS sources, split strings and label derivations.

Pure Python/numpy (no TensorFlow) so that the runtime loader, the builder, the verifier and the tests
share one table. Split strings and derivations follow Google's
``task_adaptation`` code; records are the dicts ``tfds.as_numpy`` yields.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "VTAB_TASKS", "VTAB_GROUPS", "TASK_ALIASES", "canonical_task", "TaskSpec", "TASK_SPECS",
    "LIST_SPLITS", "EXPECTED_SPLIT_SIZES", "EXPECTED_TEST_SIZES", "resolve_split", "split_to_tfds",
    "bin_by_thresholds", "clevr_count_label", "clevr_distance_label", "kitti_distance_label",
    "dsprites_label", "to_rgb_uint8",
]

# Canonical names are the folder names of the widely shared VTAB-1k zip (NOAH), in the official order.
VTAB_TASKS: dict[str, int] = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
    "svhn": 10, "sun397": 397,
    "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}

VTAB_GROUPS: dict[str, list[str]] = {
    "Natural": ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"],
    "Specialized": ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"],
    "Structured": ["clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                   "smallnorb_azi", "smallnorb_ele"],
}

# The paper's table names (cifar100, oxford_pet) and TFDS-style names map onto the folder names.
TASK_ALIASES: dict[str, str] = {
    "cifar100": "cifar",
    "oxford_pet": "oxford_iiit_pet",
    "oxford_pets": "oxford_iiit_pet",
    "svhn_cropped": "svhn",
    "oxford_flowers": "oxford_flowers102",
    "flowers102": "oxford_flowers102",
    "pcam": "patch_camelyon",
    "diabetic_retinopathy_detection": "diabetic_retinopathy",
    "retinopathy": "diabetic_retinopathy",
}

# Split files of a VTAB-1k task folder, in the order they are written and checked.
LIST_SPLITS: tuple[str, ...] = ("train800", "val200", "train800val200", "test")
EXPECTED_SPLIT_SIZES: dict[str, int] = {"train800": 800, "val200": 200, "train800val200": 1000}

# Test-set sizes the splits below give with the TFDS versions VTAB used; a mismatch is worth a warning,
# not an error (a newer TFDS version may differ).
EXPECTED_TEST_SIZES: dict[str, int] = {
    "cifar": 10000, "caltech101": 6084, "dtd": 1880, "oxford_flowers102": 6149, "oxford_iiit_pet": 3669,
    "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
    "diabetic_retinopathy": 42670, "clevr_count": 15000, "clevr_dist": 15000, "dmlab": 22735, "kitti": 711,
    "dsprites_loc": 73728, "dsprites_ori": 73728, "smallnorb_azi": 12150, "smallnorb_ele": 12150,
}


def canonical_task(task: str) -> str:
    """Map any accepted spelling (case-insensitive, '-' or '_') to the canonical folder name.

    Unknown names come back unchanged so custom tasks keep working.
    """
    key = str(task).strip()
    norm = key.lower().replace("-", "_")
    if norm in VTAB_TASKS:
        return norm
    return TASK_ALIASES.get(norm, key)


# ---------------------------------------------------------------------------------------------------
# Split strings: "name", "name[a:b]" with a/b as int, negative int, "N%" or (for b) "+N" = a + N.
_SPLIT_RE = re.compile(r"^\s*(?P<name>[A-Za-z_][\w]*)\s*(?:\[(?P<start>[^:\]]*):(?P<stop>[^\]]*)\])?\s*$")


def _bound(text: str, n: int, default: int) -> int:
    text = text.strip()
    if not text:
        return default
    if text.endswith("%"):
        # Floor, as task_adaptation computes counts with integer division (e.g. 90 * 3060 // 100).
        value = math.floor(float(text[:-1]) * n / 100)
    else:
        value = int(text)
    if value < 0:
        value += n
    return min(max(value, 0), n)


def resolve_split(spec: str, num_examples: int) -> tuple[str, int, int]:
    """Resolve a split string against a split of ``num_examples`` to ``(name, start, stop)``.

    ``train[90%:+200]`` on 1000 examples gives ``("train", 900, 1000)``: bounds are clamped to the
    split, percentages are floored, and ``+N`` counts from the resolved start.
    """
    match = _SPLIT_RE.match(spec)
    if match is None:
        raise ValueError(f"cannot parse split string {spec!r}; expected 'name' or 'name[start:stop]'")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    name, start_s, stop_s = match.group("name"), match.group("start"), match.group("stop")
    if start_s is None:
        return name, 0, num_examples
    start = _bound(start_s, num_examples, 0)
    stop_s = stop_s.strip()
    if stop_s.startswith("+"):
        stop = min(start + int(stop_s[1:]), num_examples)
    else:
        stop = _bound(stop_s, num_examples, num_examples)
    return name, start, max(start, stop)


def split_to_tfds(spec: str, num_examples: int) -> str:
    """Absolute TFDS split string for ``spec`` (so TFDS's own percent rounding never applies)."""
    name, start, stop = resolve_split(spec, num_examples)
    return f"{name}[{start}:{stop}]"


# ---------------------------------------------------------------------------------------------------
# Label derivations (task_adaptation/data/*.py rewritten in numpy).


def bin_by_thresholds(value: float, thresholds: Any) -> int:
    """Index of the largest threshold strictly below ``value`` (VTAB's ``max(where(thrs - v < 0))``)."""
    thrs = np.asarray(thresholds, dtype=np.float64)
    below = int(np.count_nonzero(thrs < value))
    if below == 0:
        raise ValueError(f"value {value} is not above the lowest threshold {thrs[0]}")
    return below - 1


CLEVR_DIST_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_DIST_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)
KITTI_VEHICLE_TYPES = (0, 1, 2)  # TFDS kitti object types: Car, Van, Truck (then Pedestrian, ...)


def _objects(record: Mapping[str, Any]) -> Mapping[str, Any]:
    try:
        return record["objects"]
    except KeyError:
        raise KeyError("record has no 'objects' field") from None


def clevr_count_label(record: Mapping[str, Any]) -> int:
    """CLEVR count_all: number of objects − 3 (scenes hold 3..10 objects -> 8 classes)."""
    return int(len(np.asarray(_objects(record)["size"]))) - 3


def clevr_distance_label(record: Mapping[str, Any]) -> int:
    """CLEVR closest_object_distance: min depth (pixel_coords[:, 2]) binned at [0, 8, 8.5, 9, 9.5, 10, 100]."""
    coords = np.asarray(_objects(record)["pixel_coords"], dtype=np.float64).reshape(-1, 3)
    if coords.shape[0] == 0:
        raise ValueError("CLEVR record has no objects")
    return bin_by_thresholds(float(coords[:, 2].min()), CLEVR_DIST_THRESHOLDS)


def kitti_distance_label(record: Mapping[str, Any]) -> int:
    """KITTI closest_vehicle_distance: z of the nearest Car/Van/Truck -> <8 m, <20 m, <999 m, no vehicle.

    A missing vehicle counts as 1000 m, which lands in the last of the 4 classes.
    """
    objects = _objects(record)
    types = np.asarray(objects["type"]).reshape(-1)
    location = np.asarray(objects["location"], dtype=np.float64).reshape(-1, 3)
    vehicle_z = location[np.isin(types, KITTI_VEHICLE_TYPES), 2]
    dist = float(np.concatenate([vehicle_z, [1000.0]]).min())
    return bin_by_thresholds(dist, KITTI_DIST_THRESHOLDS)


# dSprites latents: x position has 32 values in [0, 1], orientation 40 values in [0, 2π].
_DSPRITES_LATENTS = {"x_position": (32, 1.0), "orientation": (40, 2 * math.pi)}


def dsprites_label(record: Mapping[str, Any], attribute: str, num_classes: int = 16) -> int:
    """dSprites attribute binned into ``num_classes``: ``floor(label / (num_values / num_classes))``.

    Uses TFDS's integer ``label_<attribute>`` as VTAB does; a record with only ``value_<attribute>``
    is mapped back to that integer first (values are evenly spaced), so both give the same class.
    """
    if attribute not in _DSPRITES_LATENTS:
        raise ValueError(f"unknown dSprites attribute {attribute!r}; expected one of {sorted(_DSPRITES_LATENTS)}")
    num_values, max_value = _DSPRITES_LATENTS[attribute]
    if f"label_{attribute}" in record:
        index = int(np.asarray(record[f"label_{attribute}"]))
    else:
        value = float(np.asarray(record[f"value_{attribute}"]))
        index = int(round(value / max_value * (num_values - 1)))
    index = min(max(index, 0), num_values - 1)
    return int(math.floor(index / (num_values / num_classes)))


def to_rgb_uint8(image: Any, scale: float = 1.0) -> np.ndarray:
    """HxW, HxWx1 or HxWx3 array -> HxWx3 uint8; grey is tiled to 3 channels (dSprites uses scale=255)."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"expected an HxW, HxWx1 or HxWx3 image, got shape {arr.shape}")
    if scale != 1.0:
        arr = arr.astype(np.float64) * scale
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"image values outside [0, 255] (min {arr.min()}, max {arr.max()})")
        arr = np.rint(arr).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


# ---------------------------------------------------------------------------------------------------
# Per-task sources.


@dataclass(frozen=True)
class TaskSpec:
    """Where a VTAB-1k task comes from in TFDS and how a record becomes (image, label)."""

    name: str                                   # canonical folder name
    tfds_name: str                              # builder name, with config ("sun397/tfds")
    tfds_version: str                           # version pattern read by default (VTAB's where TFDS has it)
    splits: dict[str, str]                      # train800 / val200 / test -> split string
    label: Callable[[Mapping[str, Any]], int]
    image_scale: float = 1.0                    # dSprites stores {0, 1}
    manual: str | None = None                # what must be downloaded by hand, if anything
    vtab_version: str | None = None          # task_adaptation's pattern, when it differs from tfds_version

    @property
    def vtab_pattern(self) -> str:
        """The version pattern Google's task_adaptation code asks TFDS for."""
        return self.vtab_version or self.tfds_version

    @property
    def num_classes(self) -> int:
        return VTAB_TASKS[self.name]

    def image(self, record: Mapping[str, Any]) -> np.ndarray:
        """The record's image as HxWx3 uint8 at native resolution."""
        return to_rgb_uint8(record["image"], self.image_scale)

    def example(self, record: Mapping[str, Any]) -> tuple[np.ndarray, int]:
        """(image, label) with the label checked against the class count."""
        label = int(self.label(record))
        if not 0 <= label < self.num_classes:
            raise ValueError(f"{self.name}: derived label {label} outside [0, {self.num_classes})")
        return self.image(record), label


def _key(name: str) -> Callable[[Mapping[str, Any]], int]:
    def label(record: Mapping[str, Any]) -> int:
        return int(np.asarray(record[name]))
    label.__name__ = f"label_from_{name}"
    return label


def _splits(train: str, val: str, test: str) -> dict[str, str]:
    return {"train800": train, "val200": val, "test": test}


_STANDARD = _splits("train[:800]", "validation[:200]", "test")
_RESISC_MANUAL = (
    "resisc45 needs a manual download: get NWPU-RESISC45.rar (linked from the TFDS catalog page for resisc45) "
    "and extract it into the manual dir (--manual-dir, default <tfds-dir>/downloads/manual/) so that "
    "NWPU-RESISC45/<class name>/<class name>_NNN.jpg (45 folders, 31,500 images) sits there; TFDS downloads "
    "nothing else for it, so this works offline."
)
_RETINO_MANUAL = (
    "diabetic_retinopathy (diabetic_retinopathy_detection/btgraham-300) needs a manual download: accept the "
    "rules of the Kaggle competition 'Diabetic Retinopathy Detection', download train.zip.*, test.zip.*, "
    "sample.zip and trainLabels.csv.zip and unpack them into the manual dir (--manual-dir, default "
    "<tfds-dir>/downloads/manual/) so that it holds train/*.jpeg, test/*.jpeg, sample/*.jpeg and "
    "trainLabels.csv. TFDS still downloads the test labels (retinopathy_solution.csv, from "
    "storage.googleapis.com) itself, so this task needs the internet even with the manual files; "
    "btgraham-300 preprocessing needs OpenCV (in data/requirements-vtab.txt)."
)

TASK_SPECS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec("cifar", "cifar100", "3.*.*", _splits("train[:800]", "train[45000:45200]", "test"), _key("label")),
        TaskSpec("caltech101", "caltech101", "3.*.*", _splits("train[:800]", "train[90%:+200]", "test"),
                 _key("label")),
        TaskSpec("dtd", "dtd", "3.*.*", _STANDARD, _key("label")),
        TaskSpec("oxford_flowers102", "oxford_flowers102", "2.*.*", _STANDARD, _key("label")),
        # VTAB read oxford_iiit_pet:3.*.*, which TFDS 4.9.x no longer has; 4.0.0 (head boxes added, corrupt
        # images fixed) has the same split sizes (train 3680, test 3669).
        TaskSpec("oxford_iiit_pet", "oxford_iiit_pet", "4.0.0", _splits("train[:800]", "train[80%:+200]", "test"),
                 _key("label"), vtab_version="3.*.*"),
        TaskSpec("svhn", "svhn_cropped", "3.*.*", _splits("train[:800]", "train[90%:+200]", "test"), _key("label")),
        TaskSpec("sun397", "sun397/tfds", "4.*.*", _STANDARD, _key("label")),
        TaskSpec("patch_camelyon", "patch_camelyon", "2.*.*", _STANDARD, _key("label")),
        TaskSpec("eurosat", "eurosat/rgb", "2.*.*", _splits("train[:800]", "train[60%:+200]", "train[80%:]"),
                 _key("label")),
        TaskSpec("resisc45", "resisc45", "3.*.*", _splits("train[:800]", "train[60%:+200]", "train[80%:]"),
                 _key("label"), manual=_RESISC_MANUAL),
        TaskSpec("diabetic_retinopathy", "diabetic_retinopathy_detection/btgraham-300", "3.*.*", _STANDARD,
                 _key("label"), manual=_RETINO_MANUAL),
        TaskSpec("clevr_count", "clevr", "3.*.*", _splits("train[:800]", "train[90%:+200]", "validation"),
                 clevr_count_label),
        TaskSpec("clevr_dist", "clevr", "3.*.*", _splits("train[:800]", "train[90%:+200]", "validation"),
                 clevr_distance_label),
        TaskSpec("dmlab", "dmlab", "2.0.1", _STANDARD, _key("label")),
        TaskSpec("kitti", "kitti", "3.1.0", _STANDARD, kitti_distance_label),  # VTAB's exact pin
        TaskSpec("dsprites_loc", "dsprites", "2.*.*", _splits("train[:800]", "train[80%:+200]", "train[90%:]"),
                 lambda r: dsprites_label(r, "x_position"), image_scale=255.0),
        TaskSpec("dsprites_ori", "dsprites", "2.*.*", _splits("train[:800]", "train[80%:+200]", "train[90%:]"),
                 lambda r: dsprites_label(r, "orientation"), image_scale=255.0),
        TaskSpec("smallnorb_azi", "smallnorb", "2.*.*", _splits("train[:800]", "test[:200]", "test[50%:]"),
                 _key("label_azimuth")),
        TaskSpec("smallnorb_ele", "smallnorb", "2.*.*", _splits("train[:800]", "test[:200]", "test[50%:]"),
                 _key("label_elevation")),
    ]
}
