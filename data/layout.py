"""The VTAB-1k folder layout shared by the loader, the builder and the verifier (stdlib only).

``<root>/<task>/{train800,val200,train800val200,test}.txt`` plus ``images/``; each list line is
``<path relative to the task folder> <integer label>``.
"""
from __future__ import annotations

from pathlib import Path

from data.vtab_splits import LIST_SPLITS, TASK_ALIASES, canonical_task

__all__ = ["EXPECTED_LAYOUT", "parse_list_line", "format_list_line", "task_dir_candidates", "list_file"]

EXPECTED_LAYOUT = "<root>/<task>/{" + ",".join(LIST_SPLITS) + "}.txt + <root>/<task>/images/"


def parse_list_line(line: str) -> tuple[str, int]:
    """``"images/x.jpg 3"`` -> ``("images/x.jpg", 3)``; the label is the last field so paths may hold spaces."""
    parts = line.strip().rsplit(None, 1)
    if len(parts) != 2:
        raise ValueError("expected '<relative path> <integer label>'")
    path, label_text = parts
    try:
        label = int(label_text)
    except ValueError:
        raise ValueError(f"label {label_text!r} is not an integer") from None
    return path, label


def format_list_line(path: str, label: int) -> str:
    """One list-file line (no newline)."""
    return f"{path} {int(label)}"


def list_file(task_dir: str | Path, split: str) -> Path:
    """Path of a split's list file."""
    return Path(task_dir) / f"{split}.txt"


def task_dir_candidates(root: str | Path, task: str) -> list[Path]:
    """Folders a task may live in: the name as given, its canonical name, then every alias of it."""
    canon = canonical_task(task)
    names = [str(task), canon] + [alias for alias, target in TASK_ALIASES.items() if target == canon]
    seen: list[Path] = []
    for name in names:
        path = Path(root) / name
        if path not in seen:
            seen.append(path)
    return seen
