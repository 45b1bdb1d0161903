"""Build VTAB-1k folders from TensorFlow Datasets, with VTAB's splits and label derivations.

    python -m data.build_vtab --out data/vtab-1k [--tasks cifar dtd ...] [--tfds-dir DIR] [--manual-dir DIR]

TensorFlow Datasets is an optional extra (``pip install -r data/requirements-vtab.txt``) imported only
when a task is actually read; the writing half (:func:`write_task`) takes plain ``(ndarray, label)``
iterables so it is usable and testable without it. Split strings and labels live in data/vtab_splits.py.
A task folder is written under ``<task>.partial`` and renamed when complete, so an interrupted build
never leaves a folder that looks finished.

Every slice is read in TFDS's on-disk order: ``shuffle_files=False`` and
``tfds.ReadConfig(interleave_cycle_length=1)``, so the shards of a split are read one after another instead
of interleaved (TFDS's default interleaves 16 shards, which returns the same set of examples in an order that
depends on the shard layout). The split sizes are checked against TFDS's split info before any image is
written, and each task folder gets a ``source.json`` recording the TFDS version, the dataset version that was
read and the exact slices, which ``verify_vtab --manifest`` copies into the manifest.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from data.layout import format_list_line, list_file
from data.vtab_splits import (
    EXPECTED_SPLIT_SIZES,
    EXPECTED_TEST_SIZES,
    TASK_SPECS,
    VTAB_TASKS,
    TaskSpec,
    canonical_task,
    resolve_split,
    split_to_tfds,
    to_rgb_uint8,
)

__all__ = ["write_split", "write_list", "write_task", "plan_splits", "tfds_examples", "build_task", "main"]

Example = tuple[Any, int]
REQUIREMENTS = "data/requirements-vtab.txt"
SOURCE_FILE = "source.json"
SOURCE_FORMAT = "pyra-vtab-source/1"
READ_ORDER = "on-disk order: shuffle_files=False, tfds.ReadConfig(interleave_cycle_length=1)"
_FORMATS = {"jpg": {"format": "JPEG", "quality": 95}, "png": {"format": "PNG"}}


def _save_image(pixels: Any, path: Path, image_format: str) -> None:
    Image.fromarray(pixels, mode="RGB").save(path, **_FORMATS[image_format])


def write_split(task_dir: str | Path, split: str, examples: Iterable[Example], image_format: str = "jpg",
                num_classes: int | None = None, workers: int | None = None) -> list[tuple[str, int]]:
    """Save ``examples`` as ``images/<split>/NNNNNN.<ext>`` and return their ``(relative path, label)``.

    Images are written at native resolution; grey ones are tiled to RGB. JPEG uses quality 95. Encoding
    and writing run on ``workers`` threads (default: up to 4, one per CPU); names follow the input order.
    """
    if image_format not in _FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_FORMATS)}, got {image_format!r}")
    task_dir = Path(task_dir)
    (task_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    workers = workers or min(4, os.cpu_count() or 1)
    entries: list[tuple[str, int]] = []
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for index, (image, label) in enumerate(examples):
                label = int(label)
                if num_classes is not None and not 0 <= label < num_classes:
                    raise ValueError(f"{split} example {index}: label {label} outside [0, {num_classes})")
                rel = f"images/{split}/{index:06d}.{image_format}"
                pending.append(pool.submit(_save_image, to_rgb_uint8(image), task_dir / rel, image_format))
                entries.append((rel, label))
                while len(pending) > 8 * workers:  # bounded memory; surfaces a failed write early
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
    return entries


def write_list(task_dir: str | Path, split: str, entries: Sequence[tuple[str, int]]) -> Path:
    """Write ``<task_dir>/<split>.txt``, one ``<path> <label>`` line per entry."""
    path = list_file(task_dir, split)
    path.write_text("".join(format_list_line(rel, label) + "\n" for rel, label in entries), encoding="utf-8")
    return path


def write_task(task_dir: str | Path, splits: Mapping[str, Iterable[Example]], image_format: str = "jpg",
               num_classes: int | None = None, expected_sizes: Mapping[str, int] | None = None,
               overwrite: bool = False, source: Mapping[str, Any] | None = None,
               ) -> dict[str, list[tuple[str, int]]]:
    """Write a complete VTAB-1k task folder from per-split example iterables.

    ``splits`` holds ``train800``, ``val200`` and ``test`` (other names are written too);
    ``train800val200`` is always train800 followed by val200. Each split's size is checked against
    ``expected_sizes`` (default 800 / 200 / 1000). ``source`` (where the data came from) is saved as
    ``source.json`` next to the list files. Returns the list-file entries per split.
    """
    task_dir = Path(task_dir)
    missing = {"train800", "val200"} - set(splits)
    if missing:
        raise ValueError(f"splits must include train800 and val200 (missing: {sorted(missing)})")
    if "train800val200" in splits:
        raise ValueError("train800val200 is derived from train800 + val200; do not pass it")
    if task_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{task_dir} already exists; pass overwrite=True (--overwrite) to rebuild it")
        shutil.rmtree(task_dir)
    expected = dict(EXPECTED_SPLIT_SIZES if expected_sizes is None else expected_sizes)
    partial = task_dir.with_name(task_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)

    try:
        lists = _write_splits(partial, splits, image_format, num_classes, expected)
        if source is not None:
            (partial / SOURCE_FILE).write_text(json.dumps(dict(source), indent=2) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(task_dir)
    return lists


def _write_splits(partial: Path, splits: Mapping[str, Iterable[Example]], image_format: str,
                  num_classes: int | None, expected: Mapping[str, int]) -> dict[str, list[tuple[str, int]]]:
    name = partial.name[: -len(".partial")]
    lists: dict[str, list[tuple[str, int]]] = {}
    for split, examples in splits.items():
        lists[split] = write_split(partial, split, examples, image_format, num_classes)
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, entries in lists.items():
        if split in expected and len(entries) != expected[split]:
            raise ValueError(f"{name}: split {split} has {len(entries)} examples, expected {expected[split]}")
        if not entries:
            raise ValueError(f"{name}: split {split} is empty")
    order = ["train800", "val200", "train800val200"] + [s for s in lists if s not in EXPECTED_SPLIT_SIZES]
    for split in order:
        write_list(partial, split, lists[split])
    return {split: lists[split] for split in order}


# ---------------------------------------------------------------------------------------------------
# TensorFlow Datasets side.


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise RuntimeError(
            "building VTAB-1k needs TensorFlow Datasets, an optional extra: "
            f"pip install -r {REQUIREMENTS} (ideally in a separate virtual environment)") from err
    try:  # TFDS 4.9.10 imports it when preparing any dataset but does not declare it
        import importlib_resources  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "TensorFlow Datasets needs the package importlib_resources to prepare datasets (not installed); "
            f"pip install -r {REQUIREMENTS}") from err
    return tfds


def _builder(tfds: Any, spec: TaskSpec, tfds_dir: str | None, manual_dir: str | None,
             latest_versions: bool, download: bool) -> Any:
    name = spec.tfds_name if latest_versions else f"{spec.tfds_name}:{spec.tfds_version}"
    try:
        builder = tfds.builder(name, data_dir=tfds_dir)
    except Exception as err:  # TFDS raises various errors for unknown names / versions
        raise RuntimeError(f"{spec.name}: TFDS has no builder {name!r} ({err}); if only the version is "
                           "missing, retry with --latest-versions") from err
    if download:
        config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        try:
            builder.download_and_prepare(download_config=config)
        except ImportError as err:  # a missing optional module is not a missing manual download
            raise RuntimeError(f"{spec.name}: preparing {name} failed: {err}; "
                               f"pip install -r {REQUIREMENTS}") from err
        except Exception as err:  # network, checksum or manual-download failures
            hint = ""
            if spec.manual:
                hint = f" {spec.manual} Manual dir used: {_manual_dir(builder, tfds_dir, manual_dir)}"
            raise RuntimeError(f"{spec.name}: preparing {name} failed: {err}.{hint}") from err
    return builder


def _manual_dir(builder: Any, tfds_dir: str | None, manual_dir: str | None) -> str:
    """The folder TFDS looks in for manual downloads: --manual-dir, else <TFDS data dir>/downloads/manual."""
    if manual_dir:
        return str(manual_dir)
    root = tfds_dir or getattr(builder, "data_dir_root", None) or "~/tensorflow_datasets"
    return str(Path(str(root)).expanduser() / "downloads" / "manual")


def _split_sizes(builder: Any) -> dict[str, int]:
    return {str(name): int(info.num_examples) for name, info in builder.info.splits.items()}


def plan_splits(builder: Any, spec: TaskSpec) -> dict[str, tuple[str, int]]:
    """Absolute TFDS slice and example count of each VTAB-1k split, from TFDS's split info.

    Raises ``ValueError`` (before anything is read or written) when a split is missing or a slice does not
    give VTAB's 800 / 200 examples or an empty test split.
    """
    sizes = _split_sizes(builder)
    version = getattr(builder.info, "version", "?")
    if not sizes:
        raise ValueError(f"{spec.name}: TFDS has no split sizes for {spec.tfds_name} {version}: not prepared in "
                         "the TFDS data dir (run without --no-download to prepare it); nothing was written")
    plan: dict[str, tuple[str, int]] = {}
    for split, split_spec in spec.splits.items():
        base = resolve_split(split_spec, 0)[0]
        if base not in sizes:
            raise ValueError(f"{spec.name}: {spec.tfds_name} {version} has no split {base!r} (it has "
                             f"{sorted(sizes)}); nothing was written")
        _, start, stop = resolve_split(split_spec, sizes[base])
        plan[split] = (split_to_tfds(split_spec, sizes[base]), stop - start)
    wrong = [f"{split} = {split_spec} of {sizes[resolve_split(split_spec, 0)[0]]} gives {plan[split][1]}, "
             f"expected {EXPECTED_SPLIT_SIZES[split]}"
             for split, split_spec in spec.splits.items()
             if split in EXPECTED_SPLIT_SIZES and plan[split][1] != EXPECTED_SPLIT_SIZES[split]]
    if plan["test"][1] == 0:
        wrong.append(f"test = {spec.splits['test']} is empty")
    if wrong:
        raise ValueError(f"{spec.name}: wrong split sizes in {spec.tfds_name} {version} "
                         f"(TFDS split sizes {sizes}): {'; '.join(wrong)}; nothing was written")
    return plan


def _tensor_infos(tree: Any) -> Iterator[Any]:
    if isinstance(tree, Mapping):
        for value in tree.values():
            yield from _tensor_infos(value)
    else:
        yield tree


def _fixed_shapes(builder: Any) -> bool:
    """True when every feature has a fully known shape (dSprites' 64x64x1 images, ...): batches need no padding."""
    features = getattr(builder.info, "features", None)
    if features is None or not hasattr(features, "get_tensor_info"):
        return False
    try:
        return all(None not in tuple(info.shape) for info in _tensor_infos(features.get_tensor_info()))
    except (TypeError, AttributeError):
        return False


def _unbatch(batch: Any, size: int) -> Iterator[Any]:
    def pick(tree: Any, row: int) -> Any:
        return {key: pick(value, row) for key, value in tree.items()} if isinstance(tree, Mapping) else tree[row]
    for row in range(size):
        yield pick(batch, row)


READ_BATCH = 256


def tfds_examples(builder: Any, spec: TaskSpec, split: str) -> Iterator[Example]:
    """(image, label) of one VTAB-1k split of ``spec``, in TFDS's on-disk order.

    The slice is read with ``shuffle_files=False`` and ``tfds.ReadConfig(interleave_cycle_length=1)``: the
    shard files are read one after another, so the examples come in the order they are stored, the same on
    every machine (TFDS's default interleave would return the same examples in another order). Datasets
    whose features all have a fixed shape (cifar100, svhn, patch_camelyon, eurosat, resisc45, dmlab,
    dsprites, smallnorb) are read in batches of 256, which pads nothing and keeps the order; it only saves
    TensorFlow's per-example overhead.
    """
    tfds = _import_tfds()
    split_spec = spec.splits[split]
    base = resolve_split(split_spec, 0)[0]
    num_examples = builder.info.splits[base].num_examples
    read_config = tfds.ReadConfig(interleave_cycle_length=1)
    tfds_split = split_to_tfds(split_spec, num_examples)
    if _fixed_shapes(builder):
        dataset = builder.as_dataset(split=tfds_split, shuffle_files=False, read_config=read_config,
                                     batch_size=READ_BATCH)
        for batch in tfds.as_numpy(dataset):
            size = len(batch["image"])
            for record in _unbatch(batch, size):
                yield spec.example(record)
        return
    dataset = builder.as_dataset(split=tfds_split, shuffle_files=False, read_config=read_config)
    for record in tfds.as_numpy(dataset):
        yield spec.example(record)


def _source(tfds: Any, builder: Any, spec: TaskSpec, requested: str, plan: Mapping[str, tuple[str, int]],
            image_format: str) -> dict[str, Any]:
    """What ``source.json`` records: TFDS and dataset versions, the slices and the read order."""
    return {
        "format": SOURCE_FORMAT,
        "task": spec.name,
        "tfds_version": str(getattr(tfds, "__version__", "unknown")),
        "tfds_name": spec.tfds_name,
        "version_requested": requested,
        "vtab_version": spec.vtab_pattern,
        "dataset_version": str(getattr(builder.info, "version", "unknown")),
        "tfds_split_sizes": _split_sizes(builder),
        "splits": {split: {"vtab": spec.splits[split], "tfds": tfds_split, "count": count}
                   for split, (tfds_split, count) in plan.items()},
        "read_order": READ_ORDER,
        "image_format": image_format,
    }


def build_task(task: str, out: str | Path, tfds_dir: str | None = None, manual_dir: str | None = None,
               image_format: str = "jpg", overwrite: bool = False, latest_versions: bool = False,
               download: bool = True) -> Path:
    """Read one task from TFDS and write ``<out>/<canonical task>``; returns the task folder.

    The split sizes are checked (:func:`plan_splits`) before any image is written.
    """
    name = canonical_task(task)
    if name not in TASK_SPECS:
        raise ValueError(f"unknown VTAB task {task!r}; expected one of {list(VTAB_TASKS)}")
    spec = TASK_SPECS[name]
    task_dir = Path(out) / name
    if task_dir.exists() and not overwrite:
        raise FileExistsError(f"{task_dir} already exists; pass --overwrite to rebuild it")
    tfds = _import_tfds()
    builder = _builder(tfds, spec, tfds_dir, manual_dir, latest_versions, download)
    plan = plan_splits(builder, spec)
    known_test = EXPECTED_TEST_SIZES.get(name)
    if known_test is not None and plan["test"][1] != known_test:
        print(f"[build_vtab] {name}: warning: test split has {plan['test'][1]} examples, VTAB's has {known_test}",
              file=sys.stderr)
    splits = {split: tfds_examples(builder, spec, split) for split in ("train800", "val200", "test")}
    source = _source(tfds, builder, spec, "latest" if latest_versions else spec.tfds_version, plan, image_format)
    write_task(task_dir, splits, image_format, spec.num_classes, overwrite=overwrite, source=source)
    return task_dir


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; builds every requested task, reports failures, and returns 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(VTAB_TASKS),
                        help="tasks to build, either spelling (default: all 19)")
    parser.add_argument("--out", default="data/vtab-1k", help="output root (default: data/vtab-1k)")
    parser.add_argument("--tfds-dir", default=None, help="TFDS data_dir (default: TFDS's, ~/tensorflow_datasets)")
    parser.add_argument("--manual-dir", default=None,
                        help="folder holding manual downloads (resisc45, diabetic_retinopathy)")
    parser.add_argument("--format", choices=sorted(_FORMATS), default="jpg", dest="image_format",
                        help="image file format (default jpg, quality 95)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild task folders that already exist")
    parser.add_argument("--latest-versions", action="store_true",
                        help="use TFDS's newest dataset versions instead of the table's (VTAB's where TFDS has them)")
    parser.add_argument("--no-download", action="store_true", help="only read datasets TFDS already prepared")
    args = parser.parse_args(argv)

    unknown = [t for t in args.tasks if canonical_task(t) not in VTAB_TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {list(VTAB_TASKS)}")
    try:
        _import_tfds()
    except RuntimeError as err:
        print(f"[build_vtab] {err}", file=sys.stderr)
        return 1
    failures: dict[str, str] = {}
    for task in args.tasks:
        try:
            path = build_task(task, args.out, args.tfds_dir, args.manual_dir, args.image_format, args.overwrite,
                              args.latest_versions, download=not args.no_download)
        except Exception as err:  # one failed task (e.g. a missing manual download) must not stop the others
            failures[task] = str(err)
            print(f"[build_vtab] {task}: FAILED: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        print(f"[build_vtab] {task}: wrote {path}")
    if failures:
        print(f"[build_vtab] {len(failures)} task(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    print(f"[build_vtab] done; check with: python -m data.verify_vtab {args.out} --tasks {' '.join(args.tasks)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

