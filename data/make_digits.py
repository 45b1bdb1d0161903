"""The CPU demo dataset: scikit-learn's 8x8 digits written as a VTAB-1k task folder.

    python -m data.make_digits [--root data/demo] [--task digits]

It ships with scikit-learn (no download), so the whole train/eval pipeline can be exercised offline:
1797 images, 10 classes, upscaled (nearest neighbour) to 32x32 RGB PNG and split with a fixed seed into
train800 / val200 / train800val200 / test (the remaining 797).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.build_vtab import write_task
from data.layout import list_file

__all__ = ["DIGITS_SIZES", "SEED", "IMAGE_SIZE", "digits_arrays", "write_digits", "main"]

SEED = 0
IMAGE_SIZE = 32
DIGITS_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000, "test": 797}


def digits_arrays(image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """All digits as ``N x S x S x 3`` uint8 (0..16 ink scaled to 0..255, nearest upscaling) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # N x 8 x 8
    factor = image_size // images.shape[1]
    if factor * images.shape[1] != image_size:
        raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    return np.repeat(images[..., None], 3, axis=3), digits.target.astype(np.int64)


def _complete(task_dir: Path) -> bool:
    """True when every list file has its expected line count and every listed image exists."""
    for split, size in DIGITS_SIZES.items():
        path = list_file(task_dir, split)
        if not path.is_file():
            return False
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(lines) != size or not all((task_dir / line.rsplit(None, 1)[0]).is_file() for line in lines):
            return False
    return True


def write_digits(root: str | Path = "data/demo", task: str = "digits") -> Path:
    """Write (or keep, if already complete) ``<root>/<task>`` in the VTAB-1k layout; returns the folder."""
    task_dir = Path(root) / task
    if _complete(task_dir):
        return task_dir
    images, labels = digits_arrays()
    order = np.random.default_rng(SEED).permutation(len(labels))
    parts = {"train800": order[:800], "val200": order[800:1000], "test": order[1000:]}
    splits = {name: ((images[i], int(labels[i])) for i in idx) for name, idx in parts.items()}
    write_task(task_dir, splits, image_format="png", num_classes=10,
               expected_sizes=DIGITS_SIZES, overwrite=True)
    (task_dir / "classes.txt").write_text("".join(f"{d}\n" for d in range(10)), encoding="utf-8")
    return task_dir


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data/demo", help="output root (default: data/demo)")
    parser.add_argument("--task", default="digits", help="task folder name (default: digits)")
    args = parser.parse_args(argv)
    task_dir = write_digits(args.root, args.task)
    counts = ", ".join(f"{split} {size}" for split, size in DIGITS_SIZES.items())
    print(f"[make_digits] {task_dir}: {counts}; 10 classes, {IMAGE_SIZE}x{IMAGE_SIZE} RGB PNG")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
