"""Runtime VTAB-1k dataset: list-file loading, task lookup and the official transforms.

The transform is the official code's: a bicubic resize of the whole image to a square, then ToTensor
and Normalize (ImageNet mean/std by default), the same for training and testing; no augmentation.

Every data problem (missing folder or list file, malformed line, bad label, missing or corrupt image,
empty split) raises :class:`DataError` naming the file, so a broken dataset fails before training
starts instead of mid-epoch.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torchvision import transforms

from data.layout import EXPECTED_LAYOUT, parse_list_line, task_dir_candidates
from data.vtab_splits import LIST_SPLITS, TASK_ALIASES, VTAB_GROUPS, VTAB_TASKS, canonical_task

if TYPE_CHECKING:
    from lib.config import DataConfig

__all__ = [
    "VTAB_TASKS", "VTAB_GROUPS", "TASK_ALIASES", "DataError", "canonical_task", "resolve_task_dir",
    "task_num_classes", "read_list_file", "ImageListDataset", "check_class_counts", "build_transform", "build_dataset",
    "IMAGENET_MEAN", "IMAGENET_STD", "INCEPTION_MEAN", "INCEPTION_STD", "NORMALIZATIONS",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
# data.normalization -> (mean, std) of Normalize
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": (INCEPTION_MEAN, INCEPTION_STD)}
_MAX_NAMED = 5  # how many offending files an error message lists before summarising


class DataError(ValueError):
    """A dataset on disk does not match the expected VTAB-1k layout or content."""


def resolve_task_dir(root: PathLike, task: str) -> Path:
    """Folder of ``task`` under ``root``, accepting either spelling (``cifar``/``cifar100``, ...)."""
    candidates = task_dir_candidates(root, task)
    for path in candidates:
        if path.is_dir():
            return path
    tried = ", ".join(str(p) for p in candidates)
    hint = "" if Path(root).is_dir() else f" (the root {root} itself does not exist)"
    raise DataError(f"task folder for {task!r} not found{hint}; tried: {tried}. Expected layout: {EXPECTED_LAYOUT}")


def task_num_classes(task: str, root: PathLike | None = None) -> int | None:
    """Class count of a VTAB task; for a custom task the line count of ``<task>/classes.txt``, else None."""
    canon = canonical_task(task)
    if canon in VTAB_TASKS:
        return VTAB_TASKS[canon]
    if root is not None:
        classes = _read_classes(root, task)
        if classes is not None:
            return len(classes)
    return None


def _read_classes(root: PathLike, task: str) -> list[str] | None:
    for path in task_dir_candidates(root, task):
        names = path / "classes.txt"
        if names.is_file():
            return [line.strip() for line in _read_text(names).splitlines() if line.strip()]
    return None


def _read_list(path: PathLike) -> list[tuple[int, str, int]]:
    """(line number, relative path, label) for every non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"list file not found: {path}. Expected layout: {EXPECTED_LAYOUT}")
    entries: list[tuple[int, str, int]] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rel, label = parse_list_line(line)
        except ValueError as err:
            raise DataError(f"{path}:{lineno}: malformed line {line.rstrip()[:80]!r}: {err}") from None
        entries.append((lineno, rel, label))
    return entries


def _read_text(path: Path) -> str:
    """A list file's text: UTF-8, a leading BOM (files saved on Windows) dropped rather than read as a path."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None


def _outside(task_dir: Path, real_task_dir: str, rel: str) -> str | None:
    """Why list entry ``rel`` does not name a file inside the task folder (None when it does).

    Every path must stay in the task folder: an absolute path, ``..`` or a symlink pointing out could
    otherwise put another split's (e.g. a test) image into training.
    """
    if os.path.isabs(rel):
        return "is an absolute path"
    if os.path.normpath(rel).split(os.sep)[0] == os.pardir:
        return "goes up out of the task folder (..)"
    real = os.path.realpath(os.path.join(task_dir, rel))
    if os.path.commonpath([real, real_task_dir]) != real_task_dir:
        return f"is a symlink (or passes one) pointing outside the task folder, to {real}"
    return None


def read_list_file(path: PathLike) -> list[tuple[str, int]]:
    """``<relative path> <int label>`` per line; blank lines ignored; a bad line raises with file:line."""
    return [(rel, label) for _, rel, label in _read_list(path)]


def _check_image(path: str) -> str | None:
    """None when PIL can verify and decode the file, else the reason."""
    if not os.path.isfile(path):
        return "missing"
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:  # verify() leaves the image unusable and skips decoding
            img.load()
    except Exception as err:  # any decoder failure means the file is unusable
        return f"{type(err).__name__}: {err}"
    return None


def _summarise(items: list[str]) -> str:
    shown = "; ".join(items[:_MAX_NAMED])
    more = f"; ... and {len(items) - _MAX_NAMED} more" if len(items) > _MAX_NAMED else ""
    return shown + more


def check_class_counts(train_set: ImageListDataset, eval_set: ImageListDataset) -> None:
    """Train and evaluation splits must agree on the class count when it is read from their labels.

    A label beyond the evaluation split's classes (a typo such as 99 in a 10-class task) would otherwise
    silently make a larger head; ``classes.txt`` or ``data.num_classes`` settle the count explicitly.
    """
    if train_set.num_classes == eval_set.num_classes:
        return
    big = max((train_set, eval_set), key=lambda d: d.num_classes)
    small = eval_set if big is train_set else train_set
    lineno, label = big.max_label_at
    raise DataError(f"{big.list_path}:{lineno}: label {label} means {big.num_classes} classes (from "
                    f"{big.num_classes_from}), but {small.list_path} has {small.num_classes} (from "
                    f"{small.num_classes_from}); fix the label, or set the count with classes.txt in the task "
                    f"folder or data.num_classes=N")


class ImageListDataset(torch.utils.data.Dataset):
    """Images of one split of a VTAB-1k task folder; ``__getitem__`` returns ``(image, label)``.

    ``num_classes`` comes from the argument, else the VTAB table (or ``classes.txt``), else max label + 1.
    With ``skip_bad_images`` every image is decoded once here and entries whose file is missing or
    unreadable are dropped (``.skipped`` counts them, a warning is logged); otherwise missing files fail
    here and corrupt ones when loaded.
    """

    def __init__(self, root: PathLike, task: str, split: str, transform: Callable | None = None,
                 num_classes: int | None = None, skip_bad_images: bool = False) -> None:
        self.root = Path(root)
        self.task = task
        self.split = split
        self.transform = transform
        self.task_dir = resolve_task_dir(root, task).absolute()
        self.list_path = self.task_dir / f"{split}.txt"
        if not self.list_path.is_file():
            present = sorted(p.name for p in self.task_dir.glob("*.txt"))
            raise DataError(
                f"list file for split {split!r} not found: {self.list_path} (present: {present or 'none'}; "
                f"VTAB-1k splits: {', '.join(LIST_SPLITS)}). Expected layout: {EXPECTED_LAYOUT}")
        entries = _read_list(self.list_path)
        if not entries:
            raise DataError(f"split {split!r} is empty: {self.list_path} has no '<path> <label>' lines")

        self.classes = _read_classes(root, task)
        # Where the class count comes from: data.num_classes, the VTAB table / classes.txt, or the labels.
        self.num_classes_from = "data.num_classes"
        if num_classes is None:
            num_classes, self.num_classes_from = task_num_classes(task, root), "the task's class table"
        lineno, _, top = max(entries, key=lambda e: e[2])
        self.max_label_at = (lineno, top)
        if num_classes is None:
            num_classes, self.num_classes_from = top + 1, "its labels"
        self.num_classes = int(num_classes)
        for lineno, _, label in entries:
            if not 0 <= label < self.num_classes:
                raise DataError(f"{self.list_path}:{lineno}: label {label} outside [0, {self.num_classes}) "
                                f"for task {task!r} with {self.num_classes} classes")

        real_task_dir = os.path.realpath(self.task_dir)
        for lineno, rel, _ in entries:
            why = _outside(self.task_dir, real_task_dir, rel)
            if why is not None:
                raise DataError(f"{self.list_path}:{lineno}: {rel[:120]!r} {why}; every path must be relative to the "
                                f"task folder {self.task_dir} and stay inside it")
        samples = [(lineno, os.path.join(self.task_dir, rel), label) for lineno, rel, label in entries]
        self.skipped = 0
        if skip_bad_images:
            samples = self._drop_bad_images(samples)
        else:
            missing = [f"{self.list_path}:{lineno}: {p}" for lineno, p, _ in samples if not os.path.exists(p)]
            if missing:
                raise DataError(f"{len(missing)} image file(s) listed in {self.list_path} do not exist: "
                                f"{_summarise(missing)}")
        self.samples: list[tuple[str, int]] = [(p, label) for _, p, label in samples]
        self.targets: list[int] = [label for _, label in self.samples]

    def _drop_bad_images(self, samples: list[tuple[int, str, int]]) -> list[tuple[int, str, int]]:
        """Decode every listed image once; drop entries whose file is missing or unreadable and log how many."""
        paths = sorted({p for _, p, _ in samples})
        with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
            reasons = dict(zip(paths, pool.map(_check_image, paths)))
        bad = {p: why for p, why in reasons.items() if why is not None}
        if not bad:
            return samples
        kept = [s for s in samples if s[1] not in bad]
        self.skipped = len(samples) - len(kept)  # list entries dropped
        logger.warning("%s: skipped %d unusable image(s) of %d listed (%s)", self.list_path, self.skipped,
                       len(samples), _summarise([f"{p} ({why})" for p, why in sorted(bad.items())]))
        if not kept:
            raise DataError(f"split {self.split!r} is empty after skipping bad images: {self.list_path}")
        return kept

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        """The RGB PIL image of sample ``index``; a file PIL cannot read raises DataError naming it."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except Exception as err:  # report any decoder failure with the file name
            raise DataError(f"cannot read image {path} (listed in {self.list_path}): {err}") from err

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[index][1]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(task={self.task!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes}, dir={str(self.task_dir)!r})")


def build_transform(img_size: int = 224, normalization: str = "imagenet", augment: str = "",
                    is_train: bool = False) -> Callable:
    """The official VTAB transform (bicubic resize to a square, ToTensor, Normalize), same for train and test.

    ``augment`` (a timm auto-augment string such as ``"rand-m9-mstd0.5"``) only applies when training and
    swaps in timm's training pipeline; the paper trains without augmentation.
    """
    key = (normalization or "imagenet").lower()
    if key not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {sorted(NORMALIZATIONS)}")
    mean, std = NORMALIZATIONS[key]
    if augment and is_train:
        from timm.data import create_transform

        return create_transform(img_size, is_training=True, auto_augment=augment, interpolation="bicubic",
                                mean=mean, std=std)
    return transforms.Compose([
        transforms.Resize((img_size, img_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def build_dataset(data: DataConfig, split: str, img_size: int, is_train: bool) -> ImageListDataset:
    """Dataset for ``split`` of the config's ``data`` section (root, task, normalization, num_classes,
    augment, skip_bad_images); the defaults are the config's own (``lib.config.DataConfig``)."""
    if not data.root or not data.task:
        raise DataError(f"data config needs 'root' and 'task' (got root={data.root!r}, task={data.task!r})")
    transform = build_transform(img_size, data.normalization, data.augment or "", is_train)
    return ImageListDataset(data.root, data.task, split, transform=transform, num_classes=data.num_classes,
                            skip_bad_images=data.skip_bad_images)
