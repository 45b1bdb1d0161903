"""Run outputs: a human-readable ``train.log`` (and console) and ``log.txt`` with one JSON line per
evaluated epoch, flushed and synced as written so a killed run keeps every finished line."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .checkpointing import atomic_write, is_disk_full, reporting_full_disk

__all__ = ["setup_logger", "JsonLog", "TensorBoardLog"]


def setup_logger(log_file: Path | None, main_process: bool = True) -> logging.Logger:
    """The ``pyra`` logger: console + ``train.log`` on the main process, silent elsewhere."""
    logger = logging.getLogger("pyra")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    if main_process:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            file = _RunLogHandler(log_file)
            file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            logger.addHandler(file)
    return logger


class _RunLogHandler(logging.FileHandler):
    """``train.log``: a full disk stops the run with one line naming the file (logging's default prints a
    traceback per record and goes on without the log)."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if is_disk_full(error):
            with reporting_full_disk(self.baseFilename):
                raise error
        super().handleError(record)


class JsonLog:
    """``log.txt``: one JSON object per line, the official keys plus this project's."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: dict[str, Any]) -> None:
        with reporting_full_disk(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_to(self, next_epoch: int) -> None:
        """Keep only epochs before ``next_epoch`` (a resumed run rewrites what came after its checkpoint)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["epoch"] < next_epoch:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by the kill
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept)))


class TensorBoardLog:
    """An optional second log (``log.tensorboard: true``): per-epoch scalars under ``<run>/tensorboard``.

    Needs the ``tensorboard`` package (``pip install tensorboard``), which the project does not require.
    """

    SCALARS = ("train_loss", "train_lr", "test_loss", "test_acc1", "test_acc5", "best_acc1")

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("log.tensorboard=true needs the optional tensorboard package: "
                              "pip install tensorboard (or set log.tensorboard=false)") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def append(self, record: dict[str, Any]) -> None:
        for key in self.SCALARS:
            if record.get(key) is not None:
                self.writer.add_scalar(key, record[key], global_step=record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
