"""Check VTAB-1k task folders (built here or unzipped from elsewhere) and write a checksum manifest.

    python -m data.verify_vtab data/vtab-1k [--tasks cifar dtd ...] [--manifest out.json] [--deep]

Every problem found is printed on its own line (with ``file:line`` where one applies) instead of
stopping at the first, and the exit code is 1 if there was any. Warnings (e.g. a test split whose size
differs from VTAB's, identical images in train and test) are printed but do not fail the check.
A folder written by ``data.build_vtab`` also holds ``source.json`` (TFDS version, dataset version, slices);
the manifest copies it under ``source`` (``null`` for folders from elsewhere).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from data.layout import EXPECTED_LAYOUT, parse_list_line, task_dir_candidates
from data.vtab_splits import EXPECTED_SPLIT_SIZES, EXPECTED_TEST_SIZES, LIST_SPLITS, VTAB_TASKS, canonical_task

__all__ = ["SplitStats", "Report", "verify_task", "verify_root", "write_manifest", "main"]

MANIFEST_FORMAT = "pyra-vtab-manifest/1"
SOURCE_FILE = "source.json"  # written by data.build_vtab
Entry = tuple[int, str, int]  # (line number, relative path, label)


@dataclass
class SplitStats:
    """What the manifest records for one list file."""

    count: int
    label_histogram: dict[int, int]
    list_sha256: str
    images_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "label_histogram": {str(k): v for k, v in sorted(self.label_histogram.items())},
                "list_sha256": self.list_sha256, "images_sha256": self.images_sha256}


@dataclass
class Report:
    """Outcome of checking one task folder; ``ok`` when no problem was found."""

    task: str
    task_dir: str
    num_classes: int | None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    splits: dict[str, SplitStats] = field(default_factory=dict)
    source: dict[str, Any] | None = None  # source.json of a folder built by data.build_vtab

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"task_dir": self.task_dir, "num_classes": self.num_classes, "ok": self.ok,
                "problems": list(self.problems), "warnings": list(self.warnings),
                "source": self.source,
                "splits": {name: stats.to_dict() for name, stats in self.splits.items()}}


@dataclass
class _Image:
    sha256: str | None   # None when the file is missing or unreadable as bytes
    error: str | None    # None when PIL could read it


def _inspect_image(path: str, deep: bool) -> _Image:
    """Hash the file and let PIL verify it (and fully decode it when ``deep``)."""
    if not os.path.isfile(path):
        return _Image(None, "missing")
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return _Image(None, f"cannot read: {err}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        if deep:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
    except Exception as err:  # any decoder failure makes the image unusable
        return _Image(digest, f"{type(err).__name__}: {err}")
    return _Image(digest, None)


def _read_entries(path: Path, report: Report) -> tuple[list[Entry], str] | None:
    """Parse a list file, recording every malformed line; None if the file is absent or undecodable."""
    if not path.is_file():
        report.problems.append(f"missing list file: {path}")
        return None
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")   # a BOM (files saved on Windows) is not part of the first path
    except UnicodeDecodeError as err:
        report.problems.append(f"{path}: not UTF-8 text ({err})")
        return None
    entries: list[Entry] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rel, label = parse_list_line(line)
        except ValueError as err:
            report.problems.append(f"{path}:{lineno}: malformed line {line!r}: {err}")
            continue
        entries.append((lineno, rel, label))
    return entries, hashlib.sha256(raw).hexdigest()


def _read_source(task_dir: Path, report: Report) -> dict[str, Any] | None:
    """The builder's ``source.json`` (versions and slices), if the folder has one; unreadable is a warning."""
    path = task_dir / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        source = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        report.warnings.append(f"{path}: unreadable ({err}); not copied into the manifest")
        return None
    if not isinstance(source, dict):
        report.warnings.append(f"{path}: not a JSON object; not copied into the manifest")
        return None
    return source


def _num_classes(task_dir: Path, name: str) -> int | None:
    canon = canonical_task(name)
    if canon in VTAB_TASKS:
        return VTAB_TASKS[canon]
    classes = task_dir / "classes.txt"
    if classes.is_file():
        return sum(1 for line in classes.read_text(encoding="utf-8").splitlines() if line.strip())
    return None


def _check_union(task_dir: Path, lists: dict[str, list[Entry]], key_of: dict[str, str], report: Report) -> None:
    """train800val200 must hold exactly the (image, label) pairs of train800 plus val200.

    Images are compared by content hash, so a zip whose train800val200 points at copies still passes.
    """
    union: dict[tuple[str, int], list[str]] = defaultdict(list)
    for split in ("train800", "val200"):
        for lineno, rel, label in lists[split]:
            union[(key_of[rel], label)].append(f"{task_dir / (split + '.txt')}:{lineno}: '{rel} {label}'")
    tv_path = task_dir / "train800val200.txt"
    for lineno, rel, label in lists["train800val200"]:
        sources = union.get((key_of[rel], label))
        if sources:
            sources.pop()
        else:
            report.problems.append(f"{tv_path}:{lineno}: '{rel} {label}' is not in train800.txt or val200.txt "
                                   "(train800val200 must equal train800 + val200)")
    for sources in union.values():
        for where in sources:
            report.problems.append(f"{where} is missing from {tv_path} (train800val200 must equal train800 + val200)")


def verify_task(task_dir: str | Path, task: str | None = None, deep: bool = False,
                workers: int | None = None, expected_sizes: dict[str, int] | None = None) -> Report:
    """Check one VTAB-1k task folder: list files, split sizes, labels, images, duplicates, union.

    ``task`` defaults to the folder name (either spelling); an unknown task has its labels checked
    against ``classes.txt`` if present, else only for being >= 0.
    """
    task_dir = Path(task_dir)
    name = task or task_dir.name
    report = Report(canonical_task(name), str(task_dir), _num_classes(task_dir, name))
    if not task_dir.is_dir():
        report.problems.append(f"task folder not found: {task_dir} (expected layout: {EXPECTED_LAYOUT})")
        return report
    if report.num_classes is None:
        report.warnings.append(f"{task_dir}: unknown task {name!r} and no classes.txt; labels only checked >= 0")
    expected = dict(EXPECTED_SPLIT_SIZES if expected_sizes is None else expected_sizes)
    report.source = _read_source(task_dir, report)

    lists: dict[str, list[Entry]] = {}
    list_sha: dict[str, str] = {}
    for split in LIST_SPLITS:
        parsed = _read_entries(task_dir / f"{split}.txt", report)
        if parsed is not None:
            lists[split], list_sha[split] = parsed

    images = _inspect_all(task_dir, lists, deep, workers)
    for split, entries in lists.items():
        _check_split(task_dir, split, entries, expected.get(split), report, images)

    key_of = {rel: (images[rel].sha256 or f"path:{rel}") for rel in images}
    if all(s in lists for s in ("train800", "val200", "train800val200")):
        _check_union(task_dir, lists, key_of, report)
    _check_overlaps(task_dir, lists, key_of, report)

    for split, entries in lists.items():
        hashed = sorted(f"{rel} {images[rel].sha256}" for _, rel, _ in entries if images[rel].sha256)
        report.splits[split] = SplitStats(
            count=len(entries), label_histogram=dict(Counter(label for _, _, label in entries)),
            list_sha256=list_sha[split], images_sha256=hashlib.sha256("\n".join(hashed).encode()).hexdigest())
    return report


def _inspect_all(task_dir: Path, lists: dict[str, list[Entry]], deep: bool,
                 workers: int | None) -> dict[str, _Image]:
    rels = sorted({rel for entries in lists.values() for _, rel, _ in entries})
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda rel: _inspect_image(os.path.join(task_dir, rel), deep), rels)
        return dict(zip(rels, results))


def _check_split(task_dir: Path, split: str, entries: list[Entry], expected: int | None, report: Report,
                 images: dict[str, _Image]) -> None:
    path = task_dir / f"{split}.txt"
    if expected is not None and len(entries) != expected:
        report.problems.append(f"{path}: {len(entries)} entries, expected {expected}")
    if not entries:
        report.problems.append(f"{path}: split is empty")
    known_test = EXPECTED_TEST_SIZES.get(report.task)
    if split == "test" and entries and known_test is not None and len(entries) != known_test:
        report.warnings.append(f"{path}: {len(entries)} test entries; VTAB's {report.task} test split has {known_test}")
    first_line: dict[str, int] = {}
    for lineno, rel, label in entries:
        if label < 0 or (report.num_classes is not None and label >= report.num_classes):
            bound = report.num_classes if report.num_classes is not None else "?"
            report.problems.append(f"{path}:{lineno}: label {label} outside [0, {bound}) "
                                   f"for {report.task} ({bound} classes)")
        if rel in first_line:
            report.problems.append(f"{path}:{lineno}: duplicate entry {rel} (first at line {first_line[rel]})")
        else:
            first_line[rel] = lineno
        info = images[rel]
        if info.error == "missing":
            report.problems.append(f"{path}:{lineno}: missing image {task_dir / rel}")
        elif info.error is not None:
            report.problems.append(f"{path}:{lineno}: unreadable image {task_dir / rel}: {info.error}")


def _check_overlaps(task_dir: Path, lists: dict[str, list[Entry]], key_of: dict[str, str], report: Report) -> None:
    """The same file in two disjoint splits is a problem; identical content in train and test is a warning."""
    def paths(split: str) -> dict[str, int]:
        return {rel: lineno for lineno, rel, _ in reversed(lists.get(split, []))}

    train_splits = ["train800val200"] if "train800val200" in lists else ["train800", "val200"]
    for a, b in [("train800", "val200")] + [(t, "test") for t in train_splits]:
        shared = paths(a).keys() & paths(b).keys()
        for rel in sorted(shared):
            report.problems.append(f"{task_dir / (b + '.txt')}:{paths(b)[rel]}: {rel} is also listed in "
                                   f"{task_dir / (a + '.txt')}:{paths(a)[rel]} (splits must not share images)")
    train = {key_of[rel] for _, rel, _ in lists.get("train800val200", []) if not key_of[rel].startswith("path:")}
    test = {key_of[rel] for _, rel, _ in lists.get("test", []) if not key_of[rel].startswith("path:")}
    if train & test:
        report.warnings.append(f"{task_dir}: {len(train & test)} image(s) in train800val200 have byte-identical "
                               "copies in test")


def verify_root(root: str | Path, tasks: Sequence[str] | None = None, deep: bool = False,
                workers: int | None = None) -> list[Report]:
    """Verify ``tasks`` (default: all 19, either spelling) under ``root``, or ``root`` itself if it is a task."""
    root = Path(root)
    if not tasks and any((root / f"{split}.txt").is_file() for split in LIST_SPLITS):
        return [verify_task(root, deep=deep, workers=workers)]
    reports = []
    for task in tasks or list(VTAB_TASKS):
        candidates = task_dir_candidates(root, task)
        found = next((p for p in candidates if p.is_dir()), None)
        if found is None:
            report = Report(canonical_task(task), str(candidates[0]), VTAB_TASKS.get(canonical_task(task)))
            report.problems.append(f"task folder not found; tried {', '.join(map(str, candidates))} "
                                   f"(expected layout: {EXPECTED_LAYOUT})")
            reports.append(report)
            continue
        reports.append(verify_task(found, task=task, deep=deep, workers=workers))
    return reports


def write_manifest(reports: Sequence[Report], path: str | Path, root: str | Path | None = None) -> Path:
    """JSON manifest: per task and split the count, label histogram, list sha256 and image checksum."""
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": MANIFEST_FORMAT, "root": None if root is None else str(root),
               "tasks": {report.task: report.to_dict() for report in reports}}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints one line per problem and returns 1 if there was any."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="VTAB-1k root (holding task folders) or a single task folder")
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks to check (default: all 19)")
    parser.add_argument("--manifest", default=None, help="write a JSON manifest here")
    parser.add_argument("--deep", action="store_true", help="fully decode every image (slower, catches truncation)")
    parser.add_argument("--workers", type=int, default=None, help="threads for image checks")
    args = parser.parse_args(argv)

    reports = verify_root(args.root, args.tasks, deep=args.deep, workers=args.workers)
    for report in reports:
        sizes = ", ".join(f"{split} {stats.count}" for split, stats in report.splits.items())
        status = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        print(f"[verify_vtab] {report.task}: {status} ({sizes or 'no list files read'})")
        if report.source:
            print(f"  source: TFDS {report.source.get('tfds_version')}, {report.source.get('tfds_name')} "
                  f"{report.source.get('dataset_version')}")
        for problem in report.problems:
            print(f"  PROBLEM {problem}")
        for warning in report.warnings:
            print(f"  warning {warning}")
    if args.manifest:
        print(f"[verify_vtab] manifest written to {write_manifest(reports, args.manifest, args.root)}")
    bad = [r.task for r in reports if not r.ok]
    total = sum(len(r.problems) for r in reports)
    print(f"[verify_vtab] {len(reports) - len(bad)}/{len(reports)} task(s) ok; {total} problem(s)"
          + (f" in {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
