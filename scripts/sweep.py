#!/usr/bin/env python
"""VTAB-1k's own protocol in one command: choose hyper-parameters on the validation split, then test once.

Usage::

    python scripts/sweep.py <config> <task>[,<task>...|all] [key=v1,v2,... ...] [dotted.key=value ...]
        [--seeds "0 1 2"] [--slurm [FILE] [--submit] [--sbatch=OPTION ...]] [--point I]

For every task and seed: every point of the grid (several ``key=v1,v2`` items: their cartesian product,
in that order) is trained on ``train800`` and evaluated on ``val200``; the point with the best
validation top-1 at the last epoch wins (ties: the first in grid order); the winner is retrained on
``train800val200`` and evaluated on ``test``. ``selected.json`` (the grid, every validation number, the
chosen values, the test result) goes to the task's run folder ``<output_dir>/<experiment>/<task>/seed<k>/``,
where scripts/collect_results.py reads it as the validation-selected accuracy (the winner's last-epoch
test top-1). Without a grid item the official sweep is used: ``optim.pyra_lr`` over
{1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3}.

Each point is one ``train.py --resume auto`` subprocess in its own experiment folder:
``<experiment>/sweep/val/<point>/`` (train800 -> val200) and ``<experiment>/sweep/test/<point>/`` (the
winner, train800val200 -> test). Finished points are never trained again and an interrupted one
resumes, so running the same command again continues an interrupted sweep; a finished point whose saved
config differs from what the command asks for is refused.

``--slurm`` writes one SLURM job array instead (default FILE: ``<experiment folder>/sweep/slurm/sweep.sbatch``),
one element per unfinished task x seed x grid point, each running this script with ``--seeds K --point I``:
it trains that point, and the element that finds every point of its task and seed finished does the
selection and the test run (under a lock, so only one does). Submitting the array again is safe.

Environment: ``SEEDS="0 1 2"`` (as ``--seeds``; default: the config's seed), ``PYTHON`` (interpreter for
train.py), ``GPU`` / ``CUDA_VISIBLE_DEVICES``, ``NPROC`` (K > 1: ``train.py --nproc-per-node K``, K processes per run).
"""
from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from data.vtab_splits import VTAB_GROUPS, canonical_task  # noqa: E402
from lib.config import ConfigError, config_to_dict, current_form  # noqa: E402
from lib.config import load_config as _load_config  # noqa: E402


def load_config(*args: Any) -> Any:
    """The sweep never builds a model: the checks that need torch (allowed enum values, the schedule, the
    PYRA variant) are left to each train.py it starts, which loads the config with everything."""
    return _load_config(*args, model_checks=False)

__all__ = ["DEFAULT_GRID", "split_values", "parse_items", "grid_points", "point_name", "Sweep", "main"]

DEFAULT_GRID = {"optim.pyra_lr": ["1e-5", "3e-5", "1e-4", "3e-4", "1e-3", "3e-3"]}   # the official sweep
VAL_SPLITS = ("train800", "val200")
TEST_SPLITS = ("train800val200", "test")
RESERVED = {"data.task": "give the task as the second argument",
            "seed": "give seeds with --seeds or SEEDS",
            "data.train_split": "the sweep sets it (train800, then train800val200)",
            "data.eval_split": "the sweep sets it (val200, then test)"}
SELECTION_RULE = ("highest validation top-1 at the last epoch (val200, trained on train800); ties: the first "
                  "point in grid order")
TASK_ORDER = [t for group in VTAB_GROUPS.values() for t in group]


class SweepError(Exception):
    """A usage or config problem, reported before anything trains (exit code 2)."""


def log(message: str) -> None:
    print(f"[sweep] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ grid
def split_values(raw: str) -> list[str]:
    """``1e-4,3e-4`` -> ['1e-4', '3e-4']; commas inside brackets or quotes stay (``[4,2],[8,4]`` is two values)."""
    values, depth, quote, current = [], 0, "", ""
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    values.append(current.strip())
    return values


def parse_items(items: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Command-line ``key=...`` items -> (grid: key -> values in order, plain overrides)."""
    grid: dict[str, list[str]] = {}
    overrides: list[str] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SweepError(f"{item!r}: expected key=v1,v2,... (a grid) or dotted.key=value (an override)")
        if key in RESERVED:
            raise SweepError(f"{item!r}: {RESERVED[key]}")
        values = split_values(raw)
        if len(values) > 1:
            if any(not v for v in values):
                raise SweepError(f"{item!r}: an empty value in the grid")
            if key in grid:
                raise SweepError(f"{item!r}: {key} is already a grid key")
            if len(set(values)) != len(values):
                raise SweepError(f"{item!r}: a value appears twice")
            grid[key] = values
        else:
            overrides.append(f"{key}={raw.strip()}")
    clash = sorted(set(grid) & {o.partition("=")[0] for o in overrides})
    if clash:
        raise SweepError(f"{', '.join(clash)}: both a grid and an override")
    return grid, overrides


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """The cartesian product in grid order (the first key varies slowest)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(values: dict[str, str]) -> str:
    """A folder name for a point: ``optim.pyra_lr=1e-4+optim.lr=1e-3`` (other characters become '_')."""
    return "+".join(re.sub(r"[^A-Za-z0-9._=-]", "_", f"{k}={v}") for k, v in values.items())


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _atomic_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ----------------------------------------------------------------------------------------------- sweep
class Sweep:
    """One config, tasks, seeds and grid: where every run goes, and how to run, select and record them."""

    def __init__(self, config: str, tasks: list[str], grid: dict[str, list[str]], overrides: list[str],
                 seeds: list[int] | None = None, python: str | None = None, nproc: int = 1) -> None:
        self.config = str(Path(config).resolve())
        self.tasks = tasks
        self.grid = grid or dict(DEFAULT_GRID)
        self.grid_given = bool(grid)
        self.overrides = overrides
        self.points = grid_points(self.grid)
        self.names = [point_name(p) for p in self.points]
        if len(set(self.names)) != len(self.names):
            raise SweepError(f"two grid points share a folder name: {self.names}")
        try:
            self.base = load_config(self.config, overrides)
            # Every point and both stages resolve (a typo in a grid key fails here, not after hours).
            for point in self.points:
                for splits in (VAL_SPLITS, TEST_SPLITS):
                    load_config(self.config, self._overrides(point, splits, self.base.seed, tasks[0], "x"))
        except ConfigError as e:
            raise SweepError(str(e)) from e
        self.seeds = seeds if seeds else [int(self.base.seed)]
        self.output_dir = Path(self.base.output_dir)
        if not self.output_dir.is_absolute():
            self.output_dir = ROOT / self.output_dir       # train.py runs from the repository root
        self.experiment = self.base.experiment
        self.python = python or os.environ.get("PYTHON") or sys.executable
        self.nproc = nproc
        self.child: subprocess.Popen | None = None
        self.stop: int | None = None

    # -------------------------------------------------------------------------------------- layout
    def _overrides(self, point: dict[str, str], splits: tuple[str, str], seed: int, task: str,
                   experiment: str) -> list[str]:
        return [*self.overrides, *(f"{k}={v}" for k, v in point.items()), f"data.train_split={splits[0]}",
                f"data.eval_split={splits[1]}", f"seed={seed}", f"experiment={experiment}", f"data.task={task}"]

    def experiment_of(self, stage: str, index: int) -> str:
        return f"{self.experiment}/sweep/{stage}/{self.names[index]}"

    def run_dir(self, stage: str, index: int, task: str, seed: int) -> Path:
        return self.output_dir / self.experiment_of(stage, index) / canonical_task(task) / f"seed{seed}"

    def selected_path(self, task: str, seed: int) -> Path:
        return self.output_dir / self.experiment / canonical_task(task) / f"seed{seed}" / "selected.json"

    def command(self, stage: str, index: int, task: str, seed: int) -> list[str]:
        splits = VAL_SPLITS if stage == "val" else TEST_SPLITS
        nproc = [] if self.nproc <= 1 else ["--nproc-per-node", str(self.nproc)]   # keeps the processes' exit code
        return [self.python, "train.py", *nproc, "--config", self.config, "--resume", "auto",
                *self._overrides(self.points[index], splits, seed, task, self.experiment_of(stage, index))]

    # ------------------------------------------------------------------------------------------ runs
    def finished(self, stage: str, index: int, task: str, seed: int) -> dict | None:
        """final.json of a finished run, after checking that its config is the one asked for.

        An unfinished run needs no check here: train.py --resume refuses a different recipe itself.
        """
        run = self.run_dir(stage, index, task, seed)
        final = _read_json(run / "final.json")
        if not (final and final.get("finished")):
            return None
        self._check_config(stage, index, task, seed, final)
        return final

    def _check_config(self, stage: str, index: int, task: str, seed: int, final: dict) -> None:
        saved = self.run_dir(stage, index, task, seed) / "config.yaml"
        if not saved.is_file():
            return
        splits = VAL_SPLITS if stage == "val" else TEST_SPLITS
        expected = _flat(config_to_dict(load_config(
            self.config, self._overrides(self.points[index], splits, seed, task, self.experiment_of(stage, index)))))
        # The config as given (final.json); config.yaml holds resolved values (ranks, per-layer r lists).
        try:
            got = _flat(current_form(final["config"]) if "config" in final else config_to_dict(load_config(saved)))
        except ConfigError as e:
            raise SweepError(f"{saved}: unreadable saved config ({e})") from e
        keys = {o.partition("=")[0] for o in self.overrides} | set(self.points[index]) | {
            "seed", "data.train_split", "data.eval_split", "train.epochs"}
        differ = sorted(k for k in keys if k in expected and expected[k] != got.get(k))
        if differ:
            detail = ", ".join(f"{k}: {got.get(k)!r} there, {expected[k]!r} asked" for k in differ)
            raise SweepError(f"{saved.parent} holds a run of another config ({detail}); delete that folder or "
                             "choose another experiment=")

    def train(self, stage: str, index: int, task: str, seed: int) -> dict | None:
        """Train one run unless finished; returns its final.json, or None when it did not finish."""
        final = self.finished(stage, index, task, seed)
        label = f"{canonical_task(task)} seed {seed} {stage} {self.names[index]}"
        if final is not None:
            log(f"{label}: finished earlier ({self.run_dir(stage, index, task, seed)})")
            return final
        if self.stop is not None:
            return None
        cmd = self.command(stage, index, task, seed)
        log(f"{label}: {shlex.join(cmd)}")
        start = time.time()
        self.child = subprocess.Popen(cmd, cwd=ROOT)
        try:
            code = self.child.wait()
        except KeyboardInterrupt:
            self.child.wait()
            raise
        finally:
            self.child = None
        final = _read_json(self.run_dir(stage, index, task, seed) / "final.json")
        if code != 0 or not final or not final.get("finished"):
            why = f"exit code {code}" if code != 0 else "stopped before the end (run again to resume)"
            log(f"{label}: NOT finished: {why}; see {self.run_dir(stage, index, task, seed) / 'train.log'}")
            return None
        log(f"{label}: done in {time.time() - start:.0f}s, last-epoch top-1 {final.get('last_acc1')}")
        return final

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)      # train.py checkpoints and exits

    # ------------------------------------------------------------------------------------- selection
    def is_selected(self, task: str, seed: int) -> bool:
        data = _read_json(self.selected_path(task, seed))
        return bool(data and data.get("finished") and data.get("grid") == self.grid
                    and data.get("overrides") == self.overrides)

    def select(self, task: str, seed: int) -> dict | None:
        """With every point finished: pick the winner, retrain it on train800val200, test, write
        selected.json. Only one process does it at a time (a lock next to selected.json); another one
        finding the lock taken leaves it (returns None)."""
        path = self.selected_path(task, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / ".sweep.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"{canonical_task(task)} seed {seed}: another process is selecting; leaving it")
                return None
            if self.is_selected(task, seed):
                return _read_json(path)
            vals = [self.finished("val", i, task, seed) for i in range(len(self.points))]
            if any(v is None for v in vals):
                return None
            rows = []
            best_index = None
            for i, final in enumerate(vals):
                acc = final.get("last_acc1")
                rows.append({"values": self.points[i], "name": self.names[i], "val_acc1": acc,
                             "val_best_acc1": final.get("best_acc1"), "epochs": final.get("epochs"),
                             "run": str(self.run_dir("val", i, task, seed))})
                if isinstance(acc, (int, float)) and (best_index is None or acc > rows[best_index]["val_acc1"]):
                    best_index = i
            if best_index is None:
                log(f"{canonical_task(task)} seed {seed}: no validation accuracy to choose from")
                return None
            record: dict[str, Any] = {
                "protocol": "VTAB-1k: grid trained on train800 and evaluated on val200; the winner retrained on "
                            "train800val200 and evaluated on test (its last-epoch top-1 is the result)",
                "config": self.config, "experiment": self.experiment, "task": canonical_task(task), "seed": seed,
                "overrides": self.overrides, "grid": self.grid, "selection": SELECTION_RULE, "points": rows,
                "chosen": self.points[best_index], "chosen_index": best_index,
                "chosen_val_acc1": rows[best_index]["val_acc1"], "test": None, "finished": False}
            _atomic_json(path, record)   # the validation half, visible while the test run trains
            test = self.train("test", best_index, task, seed)
            if test is None:
                return None
            record["test"] = {"acc1": test.get("last_acc1"), "best_acc1": test.get("best_acc1"),
                              "epochs": test.get("epochs"), "run": str(self.run_dir("test", best_index, task, seed))}
            record["finished"] = True
            _atomic_json(path, record)
            log(f"{canonical_task(task)} seed {seed}: chose {self.names[best_index]} (val top-1 "
                f"{rows[best_index]['val_acc1']}); test top-1 {record['test']['acc1']} -> {path}")
            return record

    def run(self, task: str, seed: int, point: int | None = None) -> bool:
        """Train the grid (or only ``point``), then select and test when every point is finished.
        True when this task and seed are done (selected.json finished) or, with ``point``, when that point
        finished and the selection is someone else's or done."""
        if self.is_selected(task, seed):
            log(f"{canonical_task(task)} seed {seed}: selected earlier ({self.selected_path(task, seed)})")
            return True
        indices = range(len(self.points)) if point is None else [point]
        ok = True
        for i in indices:
            ok = self.train("val", i, task, seed) is not None and ok
        if self.stop is not None:
            return False
        if not all(self.finished("val", i, task, seed) for i in range(len(self.points))):
            if point is not None and ok:
                log(f"{canonical_task(task)} seed {seed}: point {point} done; the last point to finish selects")
            return point is not None and ok
        record = self.select(task, seed)
        return (record is not None and record.get("finished", False)) or (point is not None and ok)

    # ------------------------------------------------------------------------------------------ SLURM
    def slurm_commands(self, argv_items: list[str]) -> list[str]:
        """One command per unfinished task x seed x point; a task and seed whose points are all finished but
        whose selection is not get one element (point 0) to do it."""
        commands = []
        for task in self.tasks:
            for seed in self.seeds:
                if self.is_selected(task, seed):
                    continue
                todo = [i for i in range(len(self.points)) if self.finished("val", i, task, seed) is None]
                for i in todo or [0]:
                    commands.append(shlex.join([sys.executable, str(Path(__file__).resolve()), self.config, task,
                                                *argv_items, "--seeds", str(seed), "--point", str(i)]))
        return commands


def _tasks(text: str) -> list[str]:
    if text == "all":
        return list(TASK_ORDER)
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise SweepError("no task given")
    return tasks


def _seeds(text: str | None) -> list[int] | None:
    if not text or not text.strip():
        return None
    try:
        seeds = [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise SweepError(f"seeds must be integers, got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise SweepError(f"seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def _resolve_config(config: str) -> str:
    for candidate in (Path(config), ROOT / config, ROOT / "configs" / f"{config.removesuffix('.yaml')}.yaml"):
        if candidate.is_file():
            return str(candidate.resolve())
    raise SweepError(f"config not found: {config}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML file or its name under configs/ (e.g. vit_b16/lora_pyra_high)")
    p.add_argument("task", help="a task, several joined by commas, or 'all' (the 19, official order)")
    p.add_argument("items", nargs="*", metavar="key=...", help="grid items key=v1,v2,... and overrides key=value")
    p.add_argument("--seeds", help='seeds, e.g. "0 1 2" (default: $SEEDS, else the config\'s seed)')
    p.add_argument("--point", type=int, help="train only this grid point (an array element); select when all are done")
    p.add_argument("--slurm", nargs="?", const="", metavar="FILE", help="write a SLURM job array instead of training")
    p.add_argument("--submit", action="store_true", help="with --slurm: submit it (sbatch)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="with --slurm: an extra #SBATCH line, e.g. --sbatch=--time=8:00:00 (repeatable)")
    args = p.parse_args(argv)
    try:
        config = _resolve_config(args.config)
        tasks = _tasks(args.task)
        seeds = _seeds(args.seeds if args.seeds is not None else os.environ.get("SEEDS"))
        grid, overrides = parse_items(args.items)
        nproc = int(os.environ.get("NPROC", "1") or 1)
        sweep = Sweep(config, tasks, grid, overrides, seeds, nproc=nproc)
        if args.point is not None and not 0 <= args.point < len(sweep.points):
            raise SweepError(f"--point {args.point}: the grid has points 0-{len(sweep.points) - 1}")
        if args.submit and args.slurm is None:
            raise SweepError("--submit goes with --slurm")
        if args.slurm is not None and args.point is not None:
            raise SweepError("--slurm writes every point; drop --point")
    except (SweepError, ValueError) as e:
        print(f"sweep.py: {e}", file=sys.stderr)
        return 2
    if os.environ.get("GPU") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["GPU"]
    log(f"config {config}; tasks {' '.join(tasks)}; seeds {' '.join(map(str, sweep.seeds))}; "
        f"{len(sweep.points)} point(s): {', '.join(sweep.names)}")

    try:
        if args.slurm is not None:
            import importlib.util

            spec = importlib.util.spec_from_file_location("slurm_array", Path(__file__).with_name("slurm_array.py"))
            slurm_array = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(slurm_array)
            submit, write_array = slurm_array.submit, slurm_array.write_array

            commands = sweep.slurm_commands(args.items)
            if not commands:
                log("every task and seed is selected: nothing to submit")
                return 0
            path = Path(args.slurm) if args.slurm else sweep.output_dir / sweep.experiment / "sweep" / "slurm" / \
                "sweep.sbatch"
            env = [f"PYTHON={sweep.python}"] + ([f"NPROC={nproc}"] if nproc > 1 else [])
            write_array(path, commands, f"sweep-{Path(sweep.experiment).name}", gpus=nproc,
                        cpus=slurm_array.cpus_per_task(nproc, sweep.base.data.num_workers),
                        mem=str(sweep.base.train.slurm_mem), sbatch_options=args.sbatch, cwd=ROOT, env=env,
                        description=f"Written by scripts/sweep.py --slurm: {config}, tasks {' '.join(tasks)}, "
                                    f"seeds {' '.join(map(str, sweep.seeds))}, grid {sweep.names}.")
            log(f"wrote {path}: {len(commands)} element(s)")
            if args.submit:
                log(f"submitted job array {submit(path)}")
            return 0
    except (SweepError, RuntimeError) as e:
        print(f"sweep.py: {e}", file=sys.stderr)
        return 1 if isinstance(e, RuntimeError) else 2

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, sweep._on_signal)
    failed = []
    try:
        for task in tasks:
            for seed in sweep.seeds:
                if sweep.stop is not None:
                    failed.append(f"{task}/seed{seed}")
                    continue
                if not sweep.run(task, seed, args.point):
                    failed.append(f"{task}/seed{seed}")
    except KeyboardInterrupt:
        log("interrupted; run the same command again to continue")
        return 130
    except SweepError as e:
        print(f"sweep.py: {e}", file=sys.stderr)
        return 2
    if failed:
        log(f"not done: {' '.join(failed)}" + (f" (stopped by signal {sweep.stop})" if sweep.stop else "")
            + "; run the same command again to continue")
        return 1
    for task in tasks:
        for seed in sweep.seeds:
            data = _read_json(sweep.selected_path(task, seed))
            if data and data.get("finished"):
                log(f"{canonical_task(task)} seed {seed}: {data['chosen']} -> test top-1 {data['test']['acc1']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
