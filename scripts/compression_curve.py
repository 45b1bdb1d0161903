#!/usr/bin/env python
"""The accuracy–throughput curve: train a grid of compression rates × methods, then plot accuracy vs images/s.

Usage::

    python scripts/compression_curve.py <config> --r 2 4 8 12 16 --methods tome pyra [method ...]
        --tasks dtd kitti ... | all  [--seeds 0 1 2] [--small DIR_OR_CONFIG ...] [--include DIR ...]
        [key=value ...]
        [--slurm [FILE] [--submit] [--sbatch=OPTION ...]] [--collect-only] [--out DIR]
        [--throughput measure|recorded] [--device D] [--batch-size B] [--rounds N]

Each ``--r`` value is a ``merging.r`` (an int for every layer, ``low`` / ``high``, a per-layer list such as
``[24,16,8,4]``); each method is ``tome`` (ToMe), ``pyra`` (ToMe + PYRA) or another reduction method of
``models.reduction.REDUCTION_METHODS`` (``merging.method=<name>``). Every point, and the uncompressed
model (``merging.r=null``), is its own experiment ``<experiment>/curve/<method>_r<r>/`` (``curve/none``)
under the config's output folder, trained task by task with ``scripts/vtab.sh`` (``--resume auto``;
a finished seed, with its final.json, is skipped; an interrupted one resumes), so running the command
again continues the grid. ``--small`` adds the small model(s) to compare with: an experiment folder
(read as it is) or a config (trained on the same tasks and seeds, in its own experiment folder);
``--include`` adds experiments trained before (e.g. ``logs/vit_b16/lora_tome_high``) as points, their method
and r read from their config.yaml (an uncompressed one replaces the grid's own).

``--slurm`` trains nothing here: it writes one SLURM job array (``scripts/slurm_array.py``; default FILE
``<experiment>/curve/slurm/curve.sbatch``) with one element per unfinished point × task × seed, each a
``scripts/vtab.sh`` call; submitting it again is safe. ``--collect-only`` trains nothing and redraws.

Then (not with ``--slurm``): every point's accuracy (the VTAB-1k mean of group means, or for tasks
outside VTAB the mean over tasks; best test top-1 unless ``--metric``; mean ± std over seeds) and its
inference images/s, re-measured for all models **in this one process**, interleaved over ``--rounds``
rounds on one device and batch (``--throughput recorded``: the mean of the runs' efficiency.json
instead). Writes ``curve.png`` (one line per method, the uncompressed model and the small models
marked), ``curve.csv`` and ``curve.json`` to ``--out`` (default ``<experiment>/curve/``), with each
point's adverse-compression verdict against the first small model (scripts/adverse.py's rule).

Environment: ``PYTHON`` (interpreter of train.py), ``GPU`` / ``CUDA_VISIBLE_DEVICES``, ``NPROC`` as for
scripts/vtab.sh; ``SEEDS`` as ``--seeds``.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib.config import ConfigError, load_config  # noqa: E402
from models.backbones import method_label  # noqa: E402

try:  # noqa: E402
    from data.vtab_splits import TASK_ALIASES, VTAB_GROUPS, canonical_task
except ImportError:  # pragma: no cover
    from lib.data import TASK_ALIASES, VTAB_GROUPS, canonical_task

__all__ = ["Point", "Curve", "method_overrides", "r_tag", "accuracy", "collect", "plot", "main"]

VTAB = ROOT / "scripts" / "vtab.sh"
TASK_ORDER = [t for group in VTAB_GROUPS.values() for t in group]
Measure = Callable[[Sequence[dict]], list[list[float]]]
NO_ACCURACY = {"value": None, "std": None, "per_seed": {}, "n_seeds": 0, "complete": False, "label": ""}


class CurveError(Exception):
    """A usage or config problem, reported before anything trains (exit code 2)."""


def log(message: str) -> None:
    print(f"[curve] {message}", file=sys.stderr, flush=True)


def _script(name: str):
    """A sibling script as a module (scripts/ is not a package)."""
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- grid
def method_overrides(method: str) -> list[str]:
    """The merging overrides of a method name: tome, pyra (ToMe + PYRA) or another reduction method."""
    if method == "pyra":
        return ["merging.method=tome", "merging.pyra=true"]
    return [f"merging.method={method}", "merging.pyra=false"]


def r_tag(r: str) -> str:
    """A folder-safe name of a merging.r value: ``8``, ``high``, ``[24, 16, 8, 4]`` -> ``24-16-8-4``."""
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", r).strip("-")
    if not tag:
        raise CurveError(f"--r {r!r}: not a merging.r value")
    return tag


@dataclass
class Point:
    """One trained model of the curve: a method at a rate, the uncompressed model, or a small model."""

    name: str                       # label in the plot and tables
    kind: str                       # "point", "uncompressed", "small"
    method: str | None
    r: str | None
    config: str
    overrides: list[str]
    experiment: str = ""            # <output_dir>/<experiment>, set from the resolved config
    trained: bool = True            # False: a --small experiment folder, read as it is
    seed: int = 0
    extra: dict = field(default_factory=dict)


def _resolve_config(config: str) -> str:
    for candidate in (Path(config), ROOT / config, ROOT / "configs" / f"{config.removesuffix('.yaml')}.yaml"):
        if candidate.is_file():
            return str(candidate.resolve())
    raise CurveError(f"config not found: {config}")


def _tasks(items: Sequence[str]) -> list[str]:
    tasks = [t for item in items for t in item.replace(",", " ").split()]
    if tasks == ["all"]:
        return list(TASK_ORDER)
    if not tasks:
        raise CurveError("--tasks: no task given")
    return [canonical_task(t) for t in tasks]


def _seeds(items: Sequence[str] | None) -> list[int] | None:
    text = " ".join(items or ()) or os.environ.get("SEEDS", "")
    if not text.strip():
        return None
    try:
        seeds = [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise CurveError(f"--seeds: expected integers, got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise CurveError(f"--seeds: expected distinct non-negative integers, got {text!r}")
    return seeds


def included_point(folder: str) -> Point:
    """An existing experiment as a point of the curve (not trained): method and r from its runs' config.yaml."""
    import yaml

    cr = _script("collect_results")
    if not Path(folder).is_dir():
        raise CurveError(f"--include {folder}: not an experiment folder")
    for run in cr.find_runs(folder):
        try:
            cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        merging = cfg.get("merging") if isinstance(cfg, dict) else None
        if not isinstance(merging, dict):
            continue
        r, label = merging.get("r"), method_label(merging)
        experiment = str(Path(folder).resolve())
        if label == "none":
            return Point("uncompressed", "uncompressed", None, None, "", [], experiment=experiment, trained=False)
        return Point(f"{label}_r{r_tag(str(r))}", "point", label, str(r), "", [], experiment=experiment,
                     trained=False)
    raise CurveError(f"--include {folder}: no run with a config.yaml of this project (merging.r) found")


class Curve:
    """The grid: which models, where their runs go, what is finished, and how to train the rest."""

    def __init__(self, config: str, rates: Sequence[str], methods: Sequence[str], tasks: Sequence[str],
                 overrides: Sequence[str] = (), seeds: Sequence[int] | None = None,
                 small: Sequence[str] = (), include: Sequence[str] = ()) -> None:
        if not rates or not methods:
            raise CurveError("give at least one --r value and one --methods name")
        if len(set(methods)) != len(methods) or len(set(rates)) != len(rates):
            raise CurveError("--r and --methods: a value appears twice")
        self.config = _resolve_config(config)
        self.tasks = list(tasks)
        self.overrides = list(overrides)
        try:
            base = load_config(self.config, self.overrides)
        except ConfigError as e:
            raise CurveError(str(e)) from e
        self.seeds = list(seeds) if seeds else [int(base.seed)]
        self.output_dir = Path(base.output_dir) if Path(base.output_dir).is_absolute() else ROOT / base.output_dir
        self.experiment = base.experiment
        self.curve_dir = self.output_dir / self.experiment / "curve"
        points = [Point("uncompressed", "uncompressed", None, None, self.config,
                        ["merging.r=null", "merging.pyra=false", f"experiment={self.experiment}/curve/none"])]
        for method in methods:
            for r in rates:
                name = f"{method}_r{r_tag(r)}"
                points.append(Point(name, "point", method, r, self.config,
                                    [*method_overrides(method), f"merging.r={r}",
                                     f"experiment={self.experiment}/curve/{name}"]))
        for item in include:
            points.append(included_point(item))
        if any(p.kind == "uncompressed" and not p.trained for p in points):
            points = points[1:]                      # an included uncompressed experiment replaces the grid's
        for item in small:
            if Path(item).is_dir():
                points.append(Point(f"small: {Path(item).name}", "small", None, None, "", [], trained=False,
                                    experiment=str(Path(item).resolve())))
            else:
                points.append(Point("", "small", None, None, _resolve_config(item), []))
        names = [p.name for p in points if p.kind == "point"]
        if len(set(names)) != len(names):
            raise CurveError(f"two points share a folder name: {names} (give distinct --r values)")
        for p in points:
            if not p.trained:
                continue
            try:   # every point resolves before anything trains (a typo fails here, not after hours)
                cfg = load_config(p.config, [*self.overrides, *p.overrides])
            except ConfigError as e:
                raise CurveError(f"{p.name or p.config}: {e}") from e
            out = Path(cfg.output_dir) if Path(cfg.output_dir).is_absolute() else ROOT / cfg.output_dir
            p.experiment, p.seed = str(out / cfg.experiment), int(cfg.seed)
            p.name = p.name or f"small: {cfg.experiment}"
        names = [p.name for p in points]
        if len(set(names)) != len(names):
            raise CurveError(f"two models share a name: {names}")
        self.points = points

    # ------------------------------------------------------------------------------------------ runs
    def final_json(self, point: Point, task: str, seed: int) -> Path | None:
        """The final.json of a finished run (under any spelling of the task), or None."""
        canon = canonical_task(task)
        for name in [canon] + [a for a, c in TASK_ALIASES.items() if c == canon]:
            path = Path(point.experiment) / name / f"seed{seed}" / "final.json"
            try:
                if json.loads(path.read_text(encoding="utf-8")).get("finished"):
                    return path
            except (OSError, ValueError, AttributeError):
                continue
        return None

    def todo(self) -> list[tuple[Point, str, list[int]]]:
        """(point, task, unfinished seeds) for everything left to train, in grid order."""
        out = []
        for point in (p for p in self.points if p.trained):
            for task in self.tasks:
                seeds = [s for s in self.seeds if self.final_json(point, task, s) is None]
                for s in sorted(set(self.seeds) - set(seeds)):
                    log(f"skip {point.name} {task} seed {s}: {self.final_json(point, task, s)} exists")
                if seeds:
                    out.append((point, task, seeds))
        return out

    def command(self, point: Point, task: str) -> list[str]:
        return ["bash", str(VTAB), task, point.config, *self.overrides, *point.overrides]

    def train(self) -> list[str]:
        """Train what is left, one vtab.sh call per point and task; returns what did not finish."""
        failed, self.child, self.stop = [], None, None

        def on_signal(signum: int, frame: Any) -> None:
            self.stop = signum
            if self.child is not None and self.child.poll() is None:
                self.child.send_signal(signal.SIGTERM)    # train.py checkpoints and exits

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            for point, task, seeds in self.todo():
                label = f"{point.name} {task} seed(s) {' '.join(map(str, seeds))}"
                if self.stop is not None:
                    failed.append(label)
                    continue
                command = self.command(point, task)
                log(f"{label}: {shlex.join(command)}")
                self.child = subprocess.Popen(command, env={**os.environ, "SEEDS": " ".join(map(str, seeds))})
                status = self.child.wait()
                self.child = None
                if status != 0 or any(self.final_json(point, task, s) is None for s in seeds):
                    log(f"{label}: not finished (exit code {status})")
                    failed.append(label)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return failed

    def slurm_commands(self) -> list[str]:
        """One command per unfinished point × task × seed: ``env SEEDS=<k> scripts/vtab.sh ...``."""
        return [shlex.join(["env", f"SEEDS={seed}", *self.command(point, task)])
                for point, task, seeds in self.todo() for seed in seeds]


# ---------------------------------------------------------------------------------------------- collect
def accuracy(summary: dict[str, Any], metric: str = "best") -> dict[str, Any]:
    """The curve's accuracy of one experiment: the VTAB mean of group means when it has VTAB tasks, else
    the mean over its tasks; ``value``, ``std`` and ``per_seed`` (seeds every task has), ``label``."""
    cr = _script("collect_results")
    avg = summary[metric]["Average"]
    if avg["value"] is not None:
        return {"value": avg["value"], "std": avg["std"], "per_seed": avg["per_seed"], "n_seeds": avg["n_seeds"],
                "complete": avg["complete"], "label": "VTAB-1k mean of group means"}
    tasks = {t: e[metric]["values"] for t, e in summary["runs"].items() if e[metric]["values"]}
    if not tasks:
        return dict(NO_ACCURACY)
    common = sorted(set.intersection(*(set(v) for v in tasks.values())))
    per_seed = {s: sum(v[s] for v in tasks.values()) / len(tasks) for s in common}
    stats = cr.seed_stats(per_seed.values())
    value = sum(cr.seed_stats(v.values())["mean"] for v in tasks.values()) / len(tasks)
    return {"value": value, "std": stats["std"], "per_seed": per_seed, "n_seeds": len(per_seed), "complete": True,
            "label": "mean top-1 over " + ", ".join(tasks)}


def _timing_spec(point: Point, curve_overrides: Sequence[str], summary: dict[str, Any]) -> dict:
    """What to build for timing: the saved config.yaml of a finished run (what really trained), else the
    point's config and overrides."""
    from lib.data import task_num_classes

    runs = sorted((r for e in summary["runs"].values() for r in e["runs"].values()),
                  key=lambda r: r["status"] != "finished")
    classes = (task_num_classes(runs[0]["task"]) if runs else None) or 10
    for run in runs:
        path = Path(run["dir"]) / "config.yaml"
        if path.is_file() and run["kind"] == "pyra":
            try:
                load_config(path)
                return {"name": point.name, "config": str(path), "overrides": [], "num_classes": classes,
                        "source": str(path)}
            except ConfigError:
                continue
    if not point.trained:
        raise CurveError(f"{point.experiment}: no run config.yaml of this project to time the model from")
    overrides = [*curve_overrides, *point.overrides]
    return {"name": point.name, "config": point.config, "overrides": overrides, "num_classes": classes,
            "source": " ".join([point.config, *overrides])}


def collect(curve: Curve, out: Path, metric: str = "best", throughput: str = "measure",
            measure: Measure | None = None, batch_size: int = 64, device: str | None = None, rounds: int = 5,
            min_seconds: float = 0.3, precision: str = "fp32", plot_file: bool = True) -> dict[str, Any]:
    """Summarise every point (collect_results.summarize), time them (one process, interleaved; or the runs'
    recorded efficiency.json), write curve.csv / curve.json / curve.png; returns the JSON's content."""
    cr, adverse = _script("collect_results"), _script("adverse")
    rows: list[dict[str, Any]] = []
    have = []
    for p in curve.points:
        summary = cr.summarize(p.experiment) if Path(p.experiment).is_dir() else None
        acc = accuracy(summary, metric) if summary and summary["runs"] else dict(NO_ACCURACY)
        rows.append({"name": p.name, "kind": p.kind, "method": p.method, "r": p.r, "experiment": p.experiment,
                     "accuracy": acc, "recorded_throughput": summary["throughput"] if summary else None,
                     "gflops": summary["gflops"] if summary else None,
                     "n_parameters": summary["n_parameters"] if summary else None})
        if acc["value"] is not None:
            have.append((p, summary, rows[-1]))
        else:
            log(f"{p.name}: no finished run under {p.experiment}; left out of the curve")
    if not have:
        raise CurveError("no point of the curve has a finished run yet")
    if throughput == "measure":
        specs = [_timing_spec(p, curve.overrides, s) for p, s, _ in have]
        device = device or ("cuda" if _cuda() else "cpu")
        if measure is None:
            def measure(specs: Sequence[dict]) -> list[list[float]]:
                return adverse.measure_specs(specs, batch_size, device, rounds, min_seconds, precision)
        rates = measure(specs)
        for (_, _, row), spec, r in zip(have, specs, rates):
            row.update(rates=list(r), timed_as=spec["source"])
    else:
        for _, _, row in have:
            if row["recorded_throughput"] is None:
                raise CurveError(f"{row['name']}: no recorded throughput (efficiency.json); use --throughput measure")
            row.update(rates=[row["recorded_throughput"]], timed_as="efficiency.json (mean over the runs)")
    reference = next((row for _, _, row in have if row["kind"] == "uncompressed"), None)
    small = next((row for _, _, row in have if row["kind"] == "small"), None)
    for _, _, row in have:
        if reference is not None:
            row["speedup"] = adverse.speed_stats(row["rates"], reference["rates"])["ratio"]
        row["images_per_s"] = statistics.median(row["rates"])
        if small is not None and row is not small and row["kind"] != "small":
            speed = adverse.speed_stats(row["rates"], small["rates"])
            judged = adverse.verdict(list(row["accuracy"]["per_seed"].values()),
                                     list(small["accuracy"]["per_seed"].values()), speed["speed"],
                                     row["accuracy"]["value"] - small["accuracy"]["value"])
            row.update(vs_small=small["name"], ratio_to_small=speed["ratio"], speed_vs_small=speed["speed"],
                       diff_vs_small=judged["diff"], p_vs_small=judged["p"], adverse=judged["adverse"],
                       verdict=judged["verdict"].replace("*", ""))
    result = {"config": curve.config, "tasks": curve.tasks, "seeds": curve.seeds, "metric": metric,
              "accuracy": have[0][2]["accuracy"]["label"], "throughput": throughput, "batch_size": batch_size,
              "device": device if throughput == "measure" else None, "rounds": rounds, "precision": precision,
              "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    _write_csv(rows, out / "curve.csv")
    if plot_file:
        plot(result, out / "curve.png")
    return result


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = ["name", "kind", "method", "r", "accuracy", "accuracy_std", "n_seeds", "complete", "images_per_s",
            "speedup", "ratio_to_small", "speed_vs_small", "diff_vs_small", "p_vs_small", "adverse", "verdict",
            "gflops", "experiment"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        for row in rows:
            acc = row["accuracy"]
            flat = {**row, "accuracy": acc["value"], "accuracy_std": acc["std"], "n_seeds": acc["n_seeds"],
                    "complete": acc["complete"]}
            writer.writerow(["" if flat.get(k) is None else (f"{flat[k]:.4f}" if isinstance(flat[k], float)
                                                             else flat[k]) for k in keys])


def plot(result: dict[str, Any], path: Path) -> Path:
    """Accuracy against images/s: a line per method (points in order of throughput, labelled with r),
    the uncompressed model as a star, each small model as a square with dashed guides at its accuracy and
    throughput; error bars ±1 std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("images_per_s") is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["kind"] == "point"))
    for i, method in enumerate(methods):
        pts = sorted((r for r in rows if r["method"] == method and r["kind"] == "point"),
                     key=lambda r: r["images_per_s"])
        xs, ys = [r["images_per_s"] for r in pts], [r["accuracy"]["value"] for r in pts]
        ax.errorbar(xs, ys, yerr=[r["accuracy"]["std"] or 0 for r in pts], marker="o", capsize=3, color=f"C{i}",
                    label={"tome": "ToMe", "pyra": "PYRA"}.get(method, method))
        for r in pts:
            ax.annotate(f"r={r['r']}", (r["images_per_s"], r["accuracy"]["value"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color=f"C{i}")
    for r in rows:
        x, y, err = r["images_per_s"], r["accuracy"]["value"], r["accuracy"]["std"] or 0
        if r["kind"] == "uncompressed":
            ax.errorbar([x], [y], yerr=[err], marker="*", markersize=13, color="black", capsize=3,
                        linestyle="none", label="uncompressed")
        elif r["kind"] == "small":
            ax.errorbar([x], [y], yerr=[err], marker="s", markersize=8, color="tab:red", capsize=3,
                        linestyle="none", label=r["name"])
            ax.axhline(y, color="tab:red", linestyle=":", linewidth=1)
            ax.axvline(x, color="tab:red", linestyle=":", linewidth=1)
    where = f"{result['device']}, batch {result['batch_size']}, one process, interleaved" \
        if result["throughput"] == "measure" else "recorded in the runs' efficiency.json"
    ax.set_xlabel(f"inference images/s ({where})")
    ax.set_ylabel(f"{result['accuracy'] or 'accuracy'} ({result['metric']} top-1, %)", fontsize=8)
    ax.set_title("accuracy vs throughput (dotted: the small model; below it and right of it: adverse)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.margins(0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML file or its name under configs/ (e.g. vit_b16/lora_none)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    p.add_argument("--r", nargs="+", required=True, help="merging.r values (int, low/high, [per,layer,list])")
    p.add_argument("--methods", nargs="+", required=True, help="tome, pyra and/or other reduction methods")
    p.add_argument("--tasks", nargs="+", required=True, help="tasks (any spelling) or 'all'")
    p.add_argument("--seeds", nargs="+", help='seeds, e.g. --seeds 0 1 2 (default: $SEEDS, else the config\'s)')
    p.add_argument("--small", nargs="+", default=[], metavar="DIR_OR_CONFIG",
                   help="small model(s): an experiment folder, or a config to train on the same tasks and seeds")
    p.add_argument("--include", nargs="+", default=[], metavar="DIR",
                   help="existing experiments to add as points as they are (method and r from their config.yaml); "
                        "an uncompressed one replaces the grid's")
    p.add_argument("--slurm", nargs="?", const="", metavar="FILE", help="write a SLURM job array instead of training")
    p.add_argument("--submit", action="store_true", help="with --slurm: submit it (sbatch)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="with --slurm: an extra #SBATCH line (repeatable)")
    p.add_argument("--collect-only", action="store_true", help="train nothing: redraw from the existing runs")
    p.add_argument("--out", help="output folder (default: <experiment>/curve)")
    p.add_argument("--metric", default="best", choices=("best", "last", "selected"), help="accuracy (default: best)")
    p.add_argument("--throughput", default="measure", choices=("measure", "recorded"),
                   help="re-time every model here (default) or use the runs' efficiency.json")
    p.add_argument("--device", help="timing device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=64, help="timing batch (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default: %(default)s)")
    p.add_argument("--min-seconds", type=float, default=0.3, help="timed seconds per model and round")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, measure: Measure | None = None) -> int:
    args = parse_args(argv)
    try:
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            raise CurveError(f"{bad[0]!r}: expected dotted.key=value")
        if any(o.split("=", 1)[0] in ("merging.r", "merging.pyra", "merging.method", "experiment", "data.task",
                                      "seed") for o in args.overrides):
            raise CurveError("merging.r / merging.pyra / merging.method / experiment / data.task / seed are set by "
                             "the curve (--r, --methods, --tasks, --seeds)")
        if args.submit and args.slurm is None:
            raise CurveError("--submit goes with --slurm")
        if args.slurm is not None and args.collect_only:
            raise CurveError("--slurm and --collect-only exclude each other")
        if args.batch_size < 1 or args.rounds < 1:
            raise CurveError("--batch-size and --rounds must be ≥ 1")
        curve = Curve(args.config, args.r, args.methods, _tasks(args.tasks), args.overrides, _seeds(args.seeds),
                      args.small, args.include)
    except (CurveError, ValueError) as e:
        print(f"compression_curve.py: {e}", file=sys.stderr)
        return 2
    if os.environ.get("GPU") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["GPU"]
    log(f"{curve.config}: {len(curve.points)} models ({', '.join(p.name for p in curve.points)}); tasks "
        f"{' '.join(curve.tasks)}; seeds {' '.join(map(str, curve.seeds))}")

    if args.slurm is not None:
        commands = curve.slurm_commands()
        if not commands:
            log("every run is finished: nothing to submit")
            return 0
        slurm_array = _script("slurm_array")
        path = Path(args.slurm) if args.slurm else curve.curve_dir / "slurm" / "curve.sbatch"
        env = [f"PYTHON={os.environ.get('PYTHON') or sys.executable}"]
        env += [f"NPROC={os.environ['NPROC']}"] if os.environ.get("NPROC") else []
        slurm_array.write_array(path, commands, f"curve-{Path(curve.experiment).name}",
                                gpus=int(os.environ.get("NPROC") or 1), sbatch_options=args.sbatch, cwd=ROOT, env=env,
                                description=f"Written by scripts/compression_curve.py --slurm: {curve.config}, "
                                            f"r {' '.join(args.r)}, methods {' '.join(args.methods)}, tasks "
                                            f"{' '.join(curve.tasks)}, seeds {' '.join(map(str, curve.seeds))}.")
        log(f"wrote {path}: {len(commands)} element(s); collect afterwards with the same command and --collect-only")
        if args.submit:
            try:
                log(f"submitted job array {slurm_array.submit(path)}")
            except RuntimeError as e:
                log(str(e))
                return 1
        return 0

    failed: list[str] = []
    if not args.collect_only:
        try:
            failed = curve.train()
        except KeyboardInterrupt:
            log("interrupted; run the same command again to continue")
            return 130
        if failed:
            log(f"not finished: {'; '.join(failed)}; run the same command again to continue")
    try:
        out = Path(args.out) if args.out else curve.curve_dir
        result = collect(curve, out, args.metric, args.throughput, measure, args.batch_size, args.device,
                         args.rounds, args.min_seconds, args.precision)
    except (CurveError, ValueError, FileNotFoundError) as e:
        print(f"compression_curve.py: {e}", file=sys.stderr)
        return 1 if failed else 2
    for row in result["rows"]:
        if row.get("images_per_s") is None:
            continue
        acc = row["accuracy"]
        std = f" ± {acc['std']:.2f}" if acc["std"] is not None else ""
        tail = f"; vs {row['vs_small']}: {row['verdict']}" if row.get("verdict") else ""
        print(f"{row['name']:>24}: {acc['value']:.2f}{std} (n={acc['n_seeds']}) at {row['images_per_s']:.1f} img/s"
              + (f", {row['speedup']:.2f}x the uncompressed" if row.get("speedup") else "") + tail)
    log(f"wrote {out / 'curve.png'}, {out / 'curve.csv'}, {out / 'curve.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
