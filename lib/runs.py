"""The run folder: one run per folder (a lock naming its holder), writable before any work, and a resume
that never mixes recipes (every result-changing config difference is refused or recorded)."""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

__all__ = ["RunFolderError", "RunLock", "check_writable", "config_changes", "NEUTRAL_KEYS"]

# Keys that cannot change a run's results: they may differ freely between a run and its resumption.
# (How a step executes is neutral like the device: compilation, and checkpointing, which recomputes the same
# values; TF32 is not: it rounds every fp32 product to a 10-bit mantissa, like a change of train.precision.)
NEUTRAL_KEYS = ("experiment", "output_dir", "config_path", "data.root", "data.num_workers", "train.eval_batch_size",
                "train.device", "train.compile", "train.grad_checkpointing", "train.slurm_mem", "report", "log",
                "model.allow_partial")


# flock's answers when another process holds the lock; any other error means no working flock here
_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


class RunFolderError(RuntimeError):
    """The run folder cannot be used: not writable, or held by another run."""


def check_writable(path: Path) -> None:
    """Create ``path`` (and parents) and prove a file can be written there; a clear error otherwise.

    A real write, not ``os.access``: that says yes to root on read-only file systems.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"cannot write the run folder {path}: {e.strerror or e} "
                             f"(choose another output_dir= or fix the permissions)") from None


class RunLock:
    """An exclusive ``flock`` on ``<run>/.lock`` holding who runs there (host, PID, start time).

    The kernel drops the lock when its process dies, so a lock file left by a killed run is taken over
    (``previous`` then describes that dead holder); a live holder makes ``acquire`` fail naming it.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        self.file: TextIO | None = None
        self.previous: dict[str, Any] | None = None
        self.created = False

    def acquire(self) -> RunLock:
        self.created = not self.path.exists()
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in _HELD:
                f.close()
                if self.created:
                    self.path.unlink(missing_ok=True)
                raise RunFolderError(f"cannot lock {self.path}: the file system does not support flock "
                                     f"({e.strerror or e}); put output_dir= on a file system that does "
                                     f"(a local disk, or NFS with locking enabled)") from None
            holder = _read_holder(f)
            f.close()
            raise RunFolderError(f"{self.path.parent} is in use by another run ({_describe(holder)}); "
                                 f"wait for it to finish or use another output_dir=") from None
        self.previous = _read_holder(f)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "started": datetime.datetime.now().isoformat(timespec="seconds")}))
        f.flush()
        self.file = f
        return self

    def release(self, remove: bool = False) -> None:
        """Unlock; ``remove`` also deletes the lock file (a refused start leaves the folder as it was)."""
        if self.file is None:
            return
        if remove and self.created:
            self.path.unlink(missing_ok=True)
        else:
            self.file.seek(0)
            self.file.truncate()
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        self.file = None

    def note(self) -> str | None:
        """A line about a dead run's lock this one took over, if any."""
        if not self.previous:
            return None
        return f"took over the lock left by a run that is no longer alive ({_describe(self.previous)})"


def _read_holder(f: TextIO) -> dict[str, Any] | None:
    f.seek(0)
    try:
        return json.loads(f.read() or "null")
    except json.JSONDecodeError:
        return None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder unknown"
    return f"host {holder.get('host')}, PID {holder.get('pid')}, started {holder.get('started')}"


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(before: Mapping, after: Mapping, defaults: Mapping | None = None) -> list[tuple[str, Any, Any]]:
    """``(key, before, after)`` for every result-changing key that differs (``NEUTRAL_KEYS`` excepted).

    A key missing from ``before`` (a run made before the key existed) counts as its value in ``defaults``:
    a key is only ever added with a default that keeps the earlier behaviour.
    """
    old, new, known = _flatten(before), _flatten(after), _flatten(defaults or {})
    neutral = tuple(NEUTRAL_KEYS)
    changes = []
    for key in sorted(set(old) | set(new)):
        if key in neutral or key.startswith(tuple(f"{n}." for n in neutral)):
            continue
        was = old.get(key, known.get(key, "<unset>"))
        if was != new.get(key, "<unset>"):
            changes.append((key, was, new.get(key, "<unset>")))
    return changes
