"""Run checkpoints that survive a kill at any moment: written to a temporary file, synced, then renamed.

They hold only what training changes (trainable parameters, optimizer, scheduler, scaler), where to
continue (``next_epoch``, ``next_step``) and every RNG state of every rank (``rng``: one entry per
process), so a resumed run repeats the uninterrupted one exactly. Everything is tensors and plain
containers, so they load with ``weights_only=True``.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import OWN_FORMAT, CheckpointError, read_checkpoint


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

__all__ = ["DiskFullError", "is_disk_full", "reporting_full_disk", "atomic_write", "save_run_checkpoint",
           "seed_everything",
           "load_run_checkpoint", "rng_state", "set_rng_state"]

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(RuntimeError):
    """No space left (or quota exceeded) while writing a run file; the message names it and what is intact."""


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` is a write refused for want of space (ENOSPC) or quota (EDQUOT)."""
    return isinstance(error, OSError) and error.errno in _DISK_FULL


def _free_space(path: Path) -> str:
    try:
        free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
    except (OSError, StopIteration):
        return "unknown"
    return f"{free / 2 ** 20:.1f} MiB" if free < 2 ** 30 else f"{free / 2 ** 30:.1f} GiB"


@contextlib.contextmanager
def reporting_full_disk(path: str | os.PathLike, replaced: bool = False) -> Iterator[None]:
    """Turn a write failing for want of space into one :class:`DiskFullError` naming ``path``.

    ``replaced``: the write replaces ``path`` atomically, so an existing file is untouched; otherwise
    (an append) the file may end in a cut line, which a resumed run drops.
    """
    path = Path(path)
    existed = path.exists()
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        kept = ("the previous file is intact" if replaced and existed else "nothing of it was written" if replaced
                else "its last line may be cut")
        why = "on device" if e.errno == errno.ENOSPC else f"({os.strerror(e.errno).lower()})"
        raise DiskFullError(f"cannot write {path}: no space left {why}, {_free_space(path)} free there; "
                            f"{kept}") from None


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then atomically replace ``path``: readers see the old file or the new one.

    Whatever fails (a kill, a full disk) leaves ``path`` as it was and no temporary file behind; a full
    disk is a :class:`DiskFullError` naming ``path``.
    """
    path = Path(path)
    with reporting_full_disk(path, replaced=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results follow the user's umask like any file
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every GPU), numpy and ``random``: a rank's stream is ``seed + rank``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG a training step of this process may draw from, as tensors / plain values.

    On a CUDA ``device`` its generator's state is kept (the only GPU this process draws on), so the
    state restores wherever that process's device is, whatever the number of visible GPUs.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore ``rng_state``'s result; the CUDA state goes to ``device`` (this process's GPU).

    Older checkpoints hold one CUDA state per GPU visible when they were saved: as many as are visible
    now are restored (never an IndexError for a run resumed with fewer GPUs).
    """
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, torch.Tensor):
        torch.cuda.set_rng_state(cuda, device if device is not None and device.type == "cuda" else "cuda")
    else:
        for index, one in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(one, index)


def save_run_checkpoint(path: str | os.PathLike, **payload: Any) -> None:
    """Save a run checkpoint (``model`` = trainable state dict, optimizer, ..., config) atomically."""
    buffer = io.BytesIO()   # serialised first, written by Python: a full disk is an OSError naming its errno
    torch.save({"format": OWN_FORMAT, **payload}, buffer)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getbuffer()))


def load_run_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run checkpoint written by ``save_run_checkpoint`` (never unpickles code).

    If ``last.pth`` is unreadable the error says whether the run's ``best.pth`` could be used instead.
    """
    path = Path(path)
    try:
        ckpt = read_checkpoint(str(path))
    except CheckpointError as e:
        best = path.with_name("best.pth")
        if path.name == "last.pth" and best.is_file():
            try:
                epoch = read_checkpoint(str(best)).get("next_epoch", 0) - 1
                hint = (f"; {best} is intact (end of epoch {epoch}): resume from it with --resume {best} "
                        f"(the epochs after it are trained again)")
            except CheckpointError:
                hint = f"; {best} is unreadable too: start over with --overwrite"
        else:
            hint = "; no best.pth to fall back on: start over with --overwrite"
        raise CheckpointError(f"cannot resume: {e}{hint}") from None
    missing = [k for k in ("model", "optimizer", "scheduler", "next_epoch", "rng") if k not in ckpt]
    if ckpt.get("format") != OWN_FORMAT or missing:
        raise CheckpointError(f"{path} is not a resumable PYRA run checkpoint "
                              f"(missing {missing or 'format tag'})")
    return ckpt
