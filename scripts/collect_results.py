#!/usr/bin/env python
"""Collect VTAB-1k results of one or more experiments into tables (Markdown, CSV) and plots.

Usage::

    python scripts/collect_results.py logs/vit_b16/lora_pyra_high [logs/vit_b16/lora_tome_high ...]
        [--compare A B] [--out DIR] [--names NAME ...] [--include-unfinished] [--no-plots] [--ablation]

An experiment folder holds one folder per task. Three layouts are read as they are:

- this project's: ``<task>/seed<k>/`` as written by train.py (``log.txt``, ``config.yaml``,
  ``efficiency.json``, ``final.json``) and by scripts/sweep.py (``selected.json``); runs of older
  versions without the ``seed<k>`` level (``<task>/log.txt``) too;
- the official PYRA and NOAH code's: ``outputs/<stamp>_<CONFIG>_compress_<schedule>_PYRA_LR_<lr>/`` holding
  ``<dataset>_lr-<LR>_wd-<WD>/`` with ``log.txt`` (a JSON line per evaluated epoch: ``train_lr``,
  ``train_loss``, ``test_loss``, ``test_acc1``, ``test_acc5``, ``epoch``, ``n_parameters``) and
  ``config.yaml`` (its argparse namespace: ``data_set``, ``epochs``, ``seed``, ...).

Several folders joined by commas count as one experiment (e.g. three official output folders, one per
seed). A run counts as finished when its final.json says so or when its log reaches the last epoch of
its config (``epochs - 1``); unfinished runs are left out of the means and listed.

Per task and per group, each accuracy is the mean ± sample standard deviation over seeds, with n: the
best test top-1 over the evaluations (the papers' convention), the last-epoch test top-1, and the
validation-selected test top-1 (scripts/sweep.py: grid chosen on val200, winner retrained on
train800val200, its last-epoch test top-1). The paper's "average" is the mean of the three group means,
not the mean of the 19 tasks, so both are reported. ``--compare A B`` adds per-task and
per-group differences B − A, each flagged "within seed noise" unless Welch's t-test (two-sided, unequal
variances, over the per-seed values) gives p < 0.05. ``--ablation`` adds the layout of the paper's
ablation table (one row per experiment: Natural / Specialized / Structured / mean of the group means, and
trainable parameters), also written to ablation.md; e.g. on the nine folders of configs/vit_b16/ablation::

    python scripts/collect_results.py logs/vit_b16/ablation/* --ablation

The tables and CSVs have each experiment's **method** (``models.backbones.method_label`` of its runs' ``merging``):
``none`` (nothing reduced), ``tome``, ``pyra`` (PYRA on ToMe), another ``merging.method`` (``fpet``, ``diffrate``, ...;
``+pyra`` when PYRA rides on it). Runs without the key read as ToMe, or none when their ``merging.r`` is empty;
official run folders by their ``token_merging`` / ``pyra``; runs without a merging section by the tokens per layer of
their efficiency.json. The accuracy-vs-throughput plot gives each method a colour and a marker.

``--adverse COMPRESSED... --small SMALL`` writes the adverse-compression table instead (scripts/adverse.py).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data.vtab_splits import VTAB_GROUPS, VTAB_TASKS, canonical_task  # noqa: E402
from models.backbones import method_label  # noqa: E402

__all__ = ["load_run", "find_runs", "summarize", "group_means", "group_stats", "seed_stats", "welch",
           "compare", "experiment_name", "render_markdown", "render_compare", "write_csv",
           "plot_curves", "plot_accuracy_vs_throughput", "collect", "main", "GROUP_KEYS", "TASK_ORDER",
           "SHORT_NAMES", "METRICS", "ALPHA", "write_compare_csv", "method_label"]

TASK_ORDER: list[str] = [t for group in VTAB_GROUPS.values() for t in group]
GROUP_KEYS: list[str] = list(VTAB_GROUPS) + ["Average", "All"]
MEAN_LABELS = {"Natural": "Natural", "Specialized": "Specialized", "Structured": "Structured",
               "Average": "Average (groups)", "All": "Mean (19)"}
# Column headers of the paper's VTAB tables.
SHORT_NAMES: dict[str, str] = {
    "cifar": "Cifar100", "caltech101": "Caltech101", "dtd": "DTD", "oxford_flowers102": "Flowers102",
    "oxford_iiit_pet": "Pets", "svhn": "SVHN", "sun397": "Sun397", "patch_camelyon": "Camelyon",
    "eurosat": "EuroSAT", "resisc45": "Resisc45", "diabetic_retinopathy": "Retinopathy",
    "clevr_count": "Clevr-Count", "clevr_dist": "Clevr-Dist", "dmlab": "DMLab", "kitti": "KITTI-Dist",
    "dsprites_loc": "dSpr-Loc", "dsprites_ori": "dSpr-Ori", "smallnorb_azi": "sNORB-Azim",
    "smallnorb_ele": "sNORB-Elev",
}
# The three accuracies: key in the summaries -> (run key, title).
METRICS: dict[str, tuple[str, str]] = {
    "best": ("best_acc1", "Best test top-1 (%) over the evaluations — the papers' metric"),
    "last": ("last_acc1", "Last-epoch test top-1 (%)"),
    "selected": ("selected_acc1", "Validation-selected test top-1 (%) — VTAB's protocol (scripts/sweep.py)"),
}
RUN_FILES = ("log.txt", "final.json", "efficiency.json", "selected.json")
SKIP_DIRS = ("sweep", "slurm")        # written by scripts/sweep.py / --slurm next to the task folders
SEED_DIR = re.compile(r"seed(\d+)")
OFFICIAL_DIR = re.compile(r"(?P<task>.+?)_lr-[^_]+_wd-.+")   # <dataset>_lr-<LR>_wd-<WD>[...]
INCOMPLETE_MARK = "*"   # a mean over fewer tasks than the group has
UNFINISHED_MARK = "†"   # a task value read from unfinished runs only
ALPHA = 0.05            # Welch's t-test level of --compare


# --------------------------------------------------------------------------------------------- reading
def _read_json(path: Path, warnings: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        warnings.append(f"{path}: unreadable JSON ({e})")
        return None
    if not isinstance(data, dict):
        warnings.append(f"{path}: expected a JSON object")
        return None
    return data


def _read_log(path: Path, warnings: list[str]) -> list[dict[str, Any]]:
    """The JSON-lines log; a malformed line (e.g. cut by a crash mid-write) is skipped with a warning."""
    records: list[dict[str, Any]] = []
    if not path.is_file():
        return records
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            warnings.append(f"{path}:{lineno}: skipped a line that is not JSON")
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        import yaml

        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # a broken config must not stop the collection of results
        return None


def _run_config(run_dir: Path) -> dict[str, Any]:
    """What the run's config.yaml says: ``kind`` ("pyra": this project's nested config, "official": the
    PYRA/NOAH argparse dump, None: no config), ``epochs``, ``seed``, ``task``, ``experiment``, ``method``."""
    cfg = _read_yaml(run_dir / "config.yaml")
    out: dict[str, Any] = {"kind": None, "epochs": None, "seed": None, "task": None, "experiment": None,
                           "method": None}
    if not isinstance(cfg, dict):
        return out
    out["seed"] = _int(cfg.get("seed"))
    if isinstance(cfg.get("train"), dict):
        out["kind"] = "pyra"
        out["method"] = method_label(cfg.get("merging"))
        out["epochs"] = _int(cfg["train"].get("epochs"))
        data = cfg.get("data")
        if isinstance(data, dict) and isinstance(data.get("task"), str) and data["task"]:
            out["task"] = data["task"]
        if isinstance(cfg.get("experiment"), str) and cfg["experiment"]:
            out["experiment"] = cfg["experiment"]
    elif "epochs" in cfg or "data_set" in cfg:
        out["kind"] = "official"
        out["epochs"] = _int(cfg.get("epochs"))
        out["method"] = ("pyra" if cfg.get("pyra") else "tome") if cfg.get("token_merging") else "none"
        if isinstance(cfg.get("data_set"), str) and cfg["data_set"]:
            out["task"] = cfg["data_set"]
    return out


def _run_task(run_dir: Path, cfg: dict[str, Any]) -> str:
    """The canonical task of a run folder: its folder name (``<task>/`` or ``<task>/seed<k>/``), for the
    official layout the config's ``data_set`` (else the folder name before ``_lr-``)."""
    folder = run_dir.parent if SEED_DIR.fullmatch(run_dir.name) else run_dir
    if cfg["kind"] == "official" and cfg["task"]:
        return canonical_task(cfg["task"])
    match = OFFICIAL_DIR.fullmatch(folder.name)
    if match and canonical_task(folder.name) not in VTAB_TASKS:
        return canonical_task(match["task"])
    return canonical_task(folder.name)


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Everything the tables need from one run folder (one task, one seed).

    ``status``: ``"finished"`` when final.json says so or when the log reaches the last epoch of the
    run's config; ``"unfinished"`` for a run that has not got there (or has no config to tell);
    ``"none"`` for a folder that holds only a sweep's selected.json. Best/last top-1 come from final.json,
    else from the log (so an unfinished run still shows its progress, flagged). ``selected_acc1`` is the
    validation-selected test top-1 of a finished sweep (selected.json), else None.
    """
    run_dir = Path(run_dir)
    warnings: list[str] = []
    records = _read_log(run_dir / "log.txt", warnings)
    final = _read_json(run_dir / "final.json", warnings)
    eff = _read_json(run_dir / "efficiency.json", warnings) or {}
    selected = _read_json(run_dir / "selected.json", warnings)
    cfg = _run_config(run_dir)

    curve = [(int(r["epoch"]), _number(r.get("test_acc1"))) for r in records
             if _int(r.get("epoch")) is not None and _number(r.get("test_acc1")) is not None]
    accs = [acc for _, acc in curve]
    best = _number(final.get("best_acc1")) if final else None
    last = _number(final.get("last_acc1")) if final else None
    if best is None and accs:
        best = max(accs)
    if last is None and accs:
        last = accs[-1]
    last_epoch = max((e for e, _ in curve), default=-1)
    epochs_done = last_epoch + 1
    epochs_total = _int(final.get("epochs")) if final else None
    epochs_total = epochs_total if epochs_total is not None else cfg["epochs"]
    has_run = bool(records or final or eff or not selected)
    if final and final.get("finished", False):
        status = "finished"
    elif epochs_total is not None and curve and last_epoch >= epochs_total - 1:
        status = "finished"     # the log reached the config's last epoch (official runs; no final.json)
    else:
        status = "unfinished" if has_run else "none"

    seed_match = SEED_DIR.fullmatch(run_dir.name)
    seed = int(seed_match[1]) if seed_match else cfg["seed"] if cfg["seed"] is not None else 0
    selected_acc1 = None
    if selected is not None:
        test = selected.get("test") if isinstance(selected.get("test"), dict) else {}
        if selected.get("finished", False):
            selected_acc1 = _number(test.get("acc1"))
        if selected_acc1 is None:
            warnings.append(f"{run_dir / 'selected.json'}: the sweep has no test result yet (unfinished)")

    n_params = _number(eff.get("n_parameters"))
    if n_params is None and records:
        n_params = _number(records[-1].get("n_parameters"))
    gflops = _number(eff.get("gflops"))
    if gflops is None and _number(eff.get("flops")) is not None:
        gflops = eff["flops"] / 2 ** 30
    tokens = eff.get("tokens_per_layer")
    method = cfg["method"]
    if method is None and isinstance(tokens, list) and tokens:   # no merging section: what the tokens did
        method = "tome" if tokens[-1] != tokens[0] else "none"
    return {
        "task": _run_task(run_dir, cfg),
        "seed": seed,
        "dir": str(run_dir),
        "kind": cfg["kind"] or ("pyra" if eff or final else None),
        "experiment": cfg["experiment"],
        "method": method,
        "status": status,
        "records": records,
        "curve": curve,
        "best_acc1": best,
        "last_acc1": last,
        "selected_acc1": selected_acc1,
        "selected": selected,
        "epochs_done": epochs_done,
        "epochs_total": epochs_total,
        "n_parameters": n_params,
        "total_parameters": _number(eff.get("total_parameters")),
        "gflops": gflops,
        "throughput": _number(eff.get("throughput")),
        "throughput_batch": eff.get("throughput_batch"),
        "device": eff.get("device"),
        "precision": eff.get("precision"),
        "warnings": warnings,
    }


def _has_run_files(path: Path) -> bool:
    return any((path / f).is_file() for f in RUN_FILES)


def _split_dirs(exp_dir: str | os.PathLike) -> list[Path]:
    """An experiment argument: one folder, or several joined by commas."""
    text = str(exp_dir)
    return [Path(p) for p in text.split(",") if p] if "," in text and not Path(text).exists() else [Path(text)]


def find_runs(exp_dir: str | os.PathLike) -> list[Path]:
    """Every run folder of an experiment (see the module docstring for the layouts), sorted.

    A VTAB-named task folder without any run file is returned too (an empty run: shown as unfinished).
    """
    found: list[Path] = []
    for root in _split_dirs(exp_dir):
        if not root.is_dir():
            raise FileNotFoundError(f"experiment folder not found: {root}")
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            if sub.name in SKIP_DIRS:
                continue
            seeds = sorted((p for p in sub.iterdir() if p.is_dir() and SEED_DIR.fullmatch(p.name)),
                           key=lambda p: int(p.name[4:]))
            if _has_run_files(sub) or (not seeds and canonical_task(sub.name) in VTAB_TASKS):
                found.append(sub)
            found += [p for p in seeds if _has_run_files(p)]
    return found


def experiment_name(exp_dir: str | os.PathLike) -> str:
    """The ``experiment`` of a run's saved config.yaml, else the path below ``logs/``, else the folder name."""
    dirs = _split_dirs(exp_dir)
    for d in dirs:
        if d.is_dir():
            for run in find_runs(d):
                cfg = _run_config(run)
                if cfg["experiment"]:
                    return cfg["experiment"]
    parts = dirs[0].resolve().parts
    if "logs" in parts[:-1]:
        i = len(parts) - 1 - parts[::-1].index("logs")
        return "/".join(parts[i + 1:])
    return dirs[0].name


# ------------------------------------------------------------------------------------------ statistics
def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def seed_stats(values: Iterable[float]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` of per-seed values: the sample standard deviation (n − 1), None below 2."""
    values = [float(v) for v in values]
    return {"mean": _mean(values), "std": statistics.stdev(values) if len(values) >= 2 else None, "n": len(values)}


def group_means(per_task: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """Group means of per-task accuracies (keys in any accepted spelling; None = not available).

    Returns, for each of Natural / Specialized / Structured, ``Average`` (the paper's: mean of the group
    means) and ``All`` (mean of the 19 tasks): ``{"value": float | None, "n": tasks used, "total": tasks
    expected, "complete": bool}``. A group with no task has value None; ``Average`` is taken over the
    groups that have a value and is incomplete unless every group is complete.
    """
    values = {canonical_task(k): v for k, v in per_task.items() if _number(v) is not None}
    out: dict[str, dict[str, Any]] = {}
    for group, tasks in VTAB_GROUPS.items():
        have = [values[t] for t in tasks if t in values]
        out[group] = {"value": _mean(have), "n": len(have), "total": len(tasks), "complete": len(have) == len(tasks)}
    groups = [out[g] for g in VTAB_GROUPS]
    with_value = [g["value"] for g in groups if g["value"] is not None]
    out["Average"] = {"value": _mean(with_value), "n": len(with_value), "total": len(groups),
                      "complete": all(g["complete"] for g in groups)}
    have = [values[t] for t in TASK_ORDER if t in values]
    out["All"] = {"value": _mean(have), "n": len(have), "total": len(TASK_ORDER),
                  "complete": len(have) == len(TASK_ORDER)}
    return out


def group_stats(per_seed: dict[str, dict[int, float]]) -> dict[str, dict[str, Any]]:
    """Group means with their seed noise, from task -> {seed: accuracy}.

    Each entry of :func:`group_means` (``value`` = mean of the task means) plus ``per_seed`` (seed ->
    the group's value computed from that seed's runs alone, for the seeds that every task available in
    the group has), ``std`` (sample standard deviation of ``per_seed``; None below 2 seeds) and
    ``n_seeds``. ``Average`` and ``All`` per seed likewise (a seed counts when it has every task used).
    """
    per_seed = {canonical_task(t): {s: float(v) for s, v in seeds.items() if _number(v) is not None}
                for t, seeds in per_seed.items()}
    per_seed = {t: seeds for t, seeds in per_seed.items() if seeds}
    out = group_means({t: _mean(seeds.values()) for t, seeds in per_seed.items()})

    def common_seeds(tasks: list[str]) -> list[int]:
        sets = [set(per_seed[t]) for t in tasks]
        return sorted(set.intersection(*sets)) if sets else []

    def fill(key: str, tasks: list[str], value_of) -> None:
        seeds = common_seeds(tasks)
        values = {s: value_of(s) for s in seeds}
        out[key].update(per_seed=values, n_seeds=len(values),
                        std=statistics.stdev(values.values()) if len(values) >= 2 else None)

    used: dict[str, list[str]] = {}
    for group, tasks in VTAB_GROUPS.items():
        used[group] = [t for t in tasks if t in per_seed]
        fill(group, used[group], lambda s, ts=used[group]: _mean(per_seed[t][s] for t in ts))
    groups = [g for g in VTAB_GROUPS if used[g]]
    all_used = [t for g in groups for t in used[g]]
    fill("Average", all_used, lambda s: _mean(_mean(per_seed[t][s] for t in used[g]) for g in groups))
    tasks_all = [t for t in TASK_ORDER if t in per_seed]
    fill("All", tasks_all, lambda s: _mean(per_seed[t][s] for t in tasks_all))
    return out


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Welch's unequal-variances t-test of mean(b) − mean(a): ``{"diff", "t", "df", "p"}``, two-sided.

    Needs at least 2 values on each side (else t, df and p are None). Two samples without any spread
    give p = 1 for equal means and p = 0 otherwise.
    """
    a, b = [float(v) for v in a], [float(v) for v in b]
    diff = (_mean(b) - _mean(a)) if a and b else None
    out: dict[str, Any] = {"diff": diff, "t": None, "df": None, "p": None}
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        out["p"] = 1.0 if diff == 0 else 0.0
        return out
    from scipy.stats import t as student_t

    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1) if va else 0.0) + (vb ** 2 / (len(b) - 1) if vb else 0.0))
    out.update(t=t, df=df, p=float(2 * student_t.sf(abs(t), df)))
    return out


def _verdict(test: dict[str, Any], name_a: str, name_b: str) -> str:
    if test["diff"] is None:
        return ""
    if test["p"] is None:
        return "noise unknown (n < 2)"
    if test["p"] >= ALPHA:
        return "within seed noise"
    return f"{name_b} > {name_a}" if test["diff"] > 0 else f"{name_a} > {name_b}"


# ------------------------------------------------------------------------------------------- summaries
def _ordered(tasks: Iterable[str]) -> list[str]:
    """VTAB tasks in the official order, then any other task alphabetically."""
    tasks = set(tasks)
    return [t for t in TASK_ORDER if t in tasks] + sorted(tasks - set(TASK_ORDER))


def _prefer(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Of two runs of the same task and seed: the finished one, else the one with more epochs."""
    rank = {"finished": 2, "unfinished": 1, "none": 0}
    ka, kb = (rank[a["status"]], a["epochs_done"]), (rank[b["status"]], b["epochs_done"])
    return b if kb > ka else a


def _methods(items: Iterable[dict[str, Any]]) -> str | None:
    """The methods of runs or tasks, in order of appearance, joined by "/" (one, unless an experiment mixes them)."""
    found = [m for i in items for m in (i["method"] or "").split("/") if m]
    return "/".join(dict.fromkeys(found)) or None


def _task_entry(task: str, runs: dict[int, dict[str, Any]], include_unfinished: bool) -> dict[str, Any]:
    """One task over its seeds: per metric the per-seed values and their mean ± std (n).

    best/last count finished runs (and unfinished ones with ``include_unfinished``); when none counts,
    the unfinished runs' values are still shown (``shown_unfinished``), never used in a mean.
    """
    counted = {s: r for s, r in runs.items()
               if r["status"] == "finished" or (include_unfinished and r["status"] == "unfinished")}
    unfinished = {s: r for s, r in runs.items() if r["status"] == "unfinished"}
    entry: dict[str, Any] = {"task": task, "runs": runs, "seeds": sorted(runs),
                             "unfinished_seeds": sorted(unfinished), "shown_unfinished": False}
    for metric, (key, _) in METRICS.items():
        pool = counted if metric != "selected" else runs
        values = {s: r[key] for s, r in pool.items() if r[key] is not None}
        if not values and metric != "selected" and unfinished:
            entry["shown_unfinished"] = True
            shown = {s: r[key] for s, r in unfinished.items() if r[key] is not None}
            stats = seed_stats(shown.values())
        else:
            stats = seed_stats(values.values())
        entry[metric] = {"values": values, **stats}
        entry[key], entry[f"{key}_std"], entry[f"{key}_n"] = stats["mean"], stats["std"], stats["n"]
    with_run = [r for r in runs.values() if r["status"] != "none"]
    entry["status"] = ("finished" if with_run and all(r["status"] == "finished" for r in with_run)
                       else "unfinished" if with_run else "none")
    first = runs[min(runs)]
    entry["dir"] = str(Path(first["dir"]).parent) if SEED_DIR.fullmatch(Path(first["dir"]).name) else first["dir"]
    entry["epochs_done"] = min((r["epochs_done"] for r in with_run), default=0)
    entry["epochs_total"] = next((r["epochs_total"] for r in with_run if r["epochs_total"]), None)
    for key in ("n_parameters", "total_parameters", "gflops", "throughput"):
        entry[key] = _mean(r[key] for r in runs.values() if r[key] is not None)
    for key in ("throughput_batch", "device", "precision"):
        entry[key] = next((r[key] for r in runs.values() if r[key]), None)
    entry["method"] = _methods(runs.values())
    entry["curve"] = first["curve"]
    return entry


def summarize(exp_dir: str | os.PathLike, name: str | None = None,
              include_unfinished: bool = False) -> dict[str, Any]:
    """One experiment: its tasks over seeds, missing/unfinished runs, group statistics of the three
    accuracies (:func:`group_stats`), efficiency.

    Unfinished runs are left out of the means unless ``include_unfinished`` (their partial best is not
    comparable with a finished run's); either way they are listed.
    """
    for d in _split_dirs(exp_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"experiment folder not found: {d}")
    by_task: dict[str, dict[int, dict[str, Any]]] = {}
    warnings: list[str] = []
    for path in find_runs(exp_dir):
        run = load_run(path)
        seeds = by_task.setdefault(run["task"], {})
        if run["seed"] in seeds:
            keep = _prefer(seeds[run["seed"]], run)
            other = run if keep is seeds[run["seed"]] else seeds[run["seed"]]
            warnings.append(f"{run['task']} seed {run['seed']}: two runs, {keep['dir']} and {other['dir']}; "
                            f"using {keep['dir']}")
            run = keep
        seeds[run["seed"]] = run
    tasks = {t: _task_entry(t, seeds, include_unfinished) for t, seeds in by_task.items()}
    tasks = {t: tasks[t] for t in _ordered(tasks)}

    def efficiency_mean(key: str) -> float | None:
        return _mean(e[key] for e in tasks.values() if e[key] is not None)

    # Throughput per seed (mean over the tasks of that seed) for the error bars of the plot.
    throughput_seeds: dict[int, list[float]] = {}
    for e in tasks.values():
        for s, r in e["runs"].items():
            if r["throughput"] is not None:
                throughput_seeds.setdefault(s, []).append(r["throughput"])
    throughput_per_seed = [_mean(v) for v in throughput_seeds.values()]

    unfinished_runs = [(t, s) for t, e in tasks.items() for s in e["unfinished_seeds"]]
    return {
        "name": name or experiment_name(exp_dir),
        "dir": str(exp_dir),
        "method": _methods(tasks.values()),
        "runs": tasks,
        "seeds": sorted({s for e in tasks.values() for s in e["seeds"]}),
        "missing": [t for t in TASK_ORDER if t not in tasks],
        "unfinished": [t for t, e in tasks.items() if e["unfinished_seeds"]],
        "unfinished_runs": unfinished_runs,
        "extra_tasks": sorted(t for t in tasks if t not in VTAB_TASKS),
        **{metric: group_stats({t: e[metric]["values"] for t, e in tasks.items()
                                if metric == "selected" or not e["shown_unfinished"]})
           for metric in METRICS},
        "include_unfinished": include_unfinished,
        # Per-task efficiency differs only by the head's class count: report the mean over the tasks.
        "n_parameters": efficiency_mean("n_parameters"),
        "gflops": efficiency_mean("gflops"),
        "throughput": efficiency_mean("throughput"),
        "throughput_std": statistics.stdev(throughput_per_seed) if len(throughput_per_seed) >= 2 else None,
        "devices": sorted({str(e["device"]) for e in tasks.values() if e["device"]}),
        "warnings": warnings + [w for e in tasks.values() for r in e["runs"].values() for w in r["warnings"]],
    }


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per metric, rows for every task either experiment has and the group means: both sides' mean ±
    std (n), the difference b − a, Welch's test over the per-seed values and the verdict."""
    out: dict[str, list[dict[str, Any]]] = {}
    tasks = _ordered(set(a["runs"]) | set(b["runs"]))
    for metric in METRICS:
        rows = []
        for task in tasks:
            ea, eb = a["runs"].get(task), b["runs"].get(task)
            # "values" holds counted runs only (never the unfinished ones shown with a dagger).
            va = list(ea[metric]["values"].values()) if ea else []
            vb = list(eb[metric]["values"].values()) if eb else []
            rows.append(_compare_row(task, va, vb, a["name"], b["name"]))
        if any(t in VTAB_TASKS for t in tasks):
            for key in GROUP_KEYS:
                va, vb = list(a[metric][key]["per_seed"].values()), list(b[metric][key]["per_seed"].values())
                row = _compare_row(key, va, vb, a["name"], b["name"])
                # The group's value is the mean of the task means (it may use more seeds than per_seed).
                row["a_mean"], row["b_mean"] = a[metric][key]["value"], b[metric][key]["value"]
                if row["a_mean"] is not None and row["b_mean"] is not None:
                    row["diff"] = row["b_mean"] - row["a_mean"]
                row["complete"] = a[metric][key]["complete"] and b[metric][key]["complete"]
                rows.append(row)
        if any(r["diff"] is not None for r in rows):
            out[metric] = rows
    return out


def _compare_row(key: str, va: list[float], vb: list[float], name_a: str, name_b: str) -> dict[str, Any]:
    sa, sb = seed_stats(va), seed_stats(vb)
    test = welch(va, vb)
    return {"key": key, "a_mean": sa["mean"], "a_std": sa["std"], "a_n": sa["n"], "b_mean": sb["mean"],
            "b_std": sb["std"], "b_n": sb["n"], "diff": test["diff"], "t": test["t"], "df": test["df"],
            "p": test["p"], "verdict": _verdict(test, name_a, name_b), "complete": True}


# --------------------------------------------------------------------------------------------- tables
def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _pm(mean: float | None, std: float | None, n: int, show_n: bool = False) -> str:
    """``mean ± std (n)``; a single seed: the plain number (with ``(n=1)`` when ``show_n``)."""
    if mean is None:
        return ""
    text = _fmt(mean) + ("" if std is None else f" ± {std:.2f}")
    return text + (f" (n={n})" if show_n or n > 1 else "")


def _columns(summaries: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(task columns, mean columns): the 19 VTAB tasks when any experiment has one, then extra tasks."""
    has_vtab = any(t in VTAB_TASKS for s in summaries for t in s["runs"])
    extra = sorted({t for s in summaries for t in s["extra_tasks"]})
    return (TASK_ORDER if has_vtab else []) + extra, (GROUP_KEYS if has_vtab else [])


def _task_cell(summary: dict[str, Any], task: str, metric: str, show_n: bool = False) -> str:
    entry = summary["runs"].get(task)
    if entry is None:
        return "–"
    stats = entry[metric]
    text = _pm(stats["mean"], stats["std"], stats["n"], show_n and stats["mean"] is not None)
    return text + UNFINISHED_MARK if text and entry["shown_unfinished"] and metric != "selected" else text


def _mean_cell(entry: dict[str, Any], show_n: bool = False) -> str:
    if entry["value"] is None:
        return ""
    std, n = entry.get("std"), entry.get("n_seeds", 1)
    return _pm(entry["value"], std, n, show_n) + ("" if entry["complete"] else INCOMPLETE_MARK)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _has_metric(summaries: Sequence[dict[str, Any]], metric: str) -> bool:
    return any(e[metric]["mean"] is not None for s in summaries for e in s["runs"].values())


def render_markdown(summaries: Sequence[dict[str, Any]]) -> str:
    """The results as Markdown: a wide table per accuracy (tasks and group means, one row per experiment),
    the three accuracies side by side per experiment, efficiency, then the flags and definitions."""
    tasks, means = _columns(summaries)
    header = ["Experiment", "Method"] + [SHORT_NAMES.get(t, t) for t in tasks] + [MEAN_LABELS[m] for m in means]
    parts = ["# VTAB-1k results", ""]
    for metric, (_, title) in METRICS.items():
        if metric == "selected" and not _has_metric(summaries, "selected"):
            continue
        rows = [[s["name"], s["method"] or ""] + [_task_cell(s, t, metric) for t in tasks]
                + [_mean_cell(s[metric][m]) for m in means] for s in summaries]
        parts += [f"## {title}", "", _md_table(header, rows), ""]

    parts += ["## Side by side: best-test, last-epoch and validation-selected top-1 (%), mean ± std over seeds (n)",
              ""]
    for s in summaries:
        rows = []
        for t in s["runs"]:
            rows.append([SHORT_NAMES.get(t, t)] + [_task_cell(s, t, m, show_n=True) for m in METRICS]
                        + [" ".join(str(k) for k in s["runs"][t]["seeds"])])
        for m in means:
            rows.append([f"**{MEAN_LABELS[m]}**"] + [_mean_cell(s[metric][m], show_n=True) for metric in METRICS]
                        + [""])
        parts += [f"### {s['name']}", "",
                  _md_table(["Task", "Best test", "Last epoch", "Val-selected", "Seeds"], rows), ""]

    eff_header = ["Experiment", "Method", "Params (M, trainable)", "GFLOPs", "Throughput (img/s)", "Batch", "Device",
                  "Tasks finished", "Seeds", "Average (groups, best)"]
    eff_rows = [[s["name"], s["method"] or "", _fmt(None if s["n_parameters"] is None else s["n_parameters"] / 1e6, 3),
                 _fmt(s["gflops"]), _fmt(s["throughput"], 1),
                 ", ".join(sorted({str(e["throughput_batch"]) for e in s["runs"].values() if e["throughput_batch"]})),
                 ", ".join(s["devices"]),
                 f"{sum(e['status'] == 'finished' for e in s['runs'].values())}/{len(s['runs'])}"
                 + (f" (of {len(TASK_ORDER)})" if 0 < len(s["runs"].keys() & set(TASK_ORDER)) < len(TASK_ORDER)
                    else ""),
                 " ".join(str(k) for k in s["seeds"]),
                 _mean_cell(s["best"]["Average"]) if means else ""] for s in summaries]
    parts += ["## Efficiency (mean over the tasks' efficiency.json)", "", _md_table(eff_header, eff_rows), ""]

    notes = [f"- `–`: task missing (no folder). `{UNFINISHED_MARK}`: only unfinished runs (value from their log "
             f"so far). `{INCOMPLETE_MARK}`: mean over fewer tasks than the group has; an empty mean: no task of "
             "that group is available.",
             "- A cell is the mean over seeds ± the sample standard deviation (n − 1), with n the number of seeds; "
             "a plain number is one seed. A group's value is the mean of its task means; its ± is the standard "
             "deviation over seeds of the group mean computed per seed, over the n seeds that every task of the "
             "group has.",
             "- A run is finished when its final.json says so or when its log reaches the last epoch of its "
             "config. Validation-selected: scripts/sweep.py's selected.json (grid trained on train800, chosen by "
             "val200 top-1 at the last epoch, the winner retrained on train800val200; its last-epoch test top-1).",
             "- Method: the runs' `merging` (none, tome, pyra = PYRA on ToMe, or the `merging.method`, "
             "`+pyra` with PYRA on it); several joined by / when an experiment's runs differ.",
             "- Average (groups) is the paper's VTAB average: the mean of the Natural, Specialized and Structured "
             "means. Mean (19) is the plain mean over tasks."]
    for s in summaries:
        counted = "included in" if s["include_unfinished"] else "left out of"
        if s["missing"] and s["missing"] != TASK_ORDER:
            notes.append(f"- {s['name']}: missing {len(s['missing'])} task(s): {', '.join(s['missing'])}.")
        empty = [g for g in VTAB_GROUPS if s["best"][g]["value"] is None]
        if means and empty and len(empty) < len(VTAB_GROUPS):
            notes.append(f"- {s['name']}: Average (groups) is over {s['best']['Average']['n']} of "
                         f"{len(VTAB_GROUPS)} groups; no task available in: {', '.join(empty)}.")
        for t, seed in s["unfinished_runs"]:
            run = s["runs"][t]["runs"][seed]
            total = f"/{run['epochs_total']}" if run["epochs_total"] else ""
            label = t if len(s["runs"][t]["runs"]) == 1 else f"{t} seed {seed}"
            notes.append(f"- {s['name']}: {label} unfinished ({run['epochs_done']}{total} epochs logged), "
                         f"{counted} the means.")
        for w in s["warnings"]:
            notes.append(f"- {s['name']}: warning: {w}")
    parts += ["## Notes", ""] + notes + [""]
    return "\n".join(parts)


def render_ablation(summaries: Sequence[dict[str, Any]]) -> str:
    """The paper's ablation layout: per experiment the three group means and their mean (best test top-1,
    each mean ± std over seeds) and the trainable parameters (K)."""
    header = ["Experiment", "Natural", "Specialized", "Structured", "Average (groups)", "Trainable params (K)"]
    rows = [[s["name"]] + [_mean_cell(s["best"][g], show_n=True) for g in (*VTAB_GROUPS, "Average")]
            + [_fmt(None if s["n_parameters"] is None else s["n_parameters"] / 1e3)] for s in summaries]
    return "\n".join(["## Ablation layout: best test top-1 (%), mean ± std over seeds (n)", "",
                      _md_table(header, rows), "",
                      "Trainable parameters include the head (mean over the tasks' class counts); "
                      "models/README.md gives each variant's own count.", ""])


def render_compare(a: dict[str, Any], b: dict[str, Any], table: dict[str, list[dict[str, Any]]]) -> str:
    """The comparison as Markdown: per metric, a row per task and group mean."""
    parts = [f"# Comparison: {b['name']} − {a['name']}", "",
             f"Rule: a difference is **within seed noise** unless Welch's t-test (two-sided, unequal variances, "
             f"over the per-seed values; for a group mean, the per-seed group means) gives p < {ALPHA}. "
             "With fewer than 2 seeds on a side the noise is unknown and no claim can be made.", ""]
    for metric, rows in table.items():
        md_rows = []
        for r in rows:
            label = SHORT_NAMES.get(r["key"], MEAN_LABELS.get(r["key"], r["key"]))
            if r["key"] in MEAN_LABELS:
                label = f"**{label}**" + ("" if r["complete"] else INCOMPLETE_MARK)
            md_rows.append([label, _pm(r["a_mean"], r["a_std"], r["a_n"], r["a_mean"] is not None),
                            _pm(r["b_mean"], r["b_std"], r["b_n"], r["b_mean"] is not None),
                            "" if r["diff"] is None else f"{r['diff']:+.2f}",
                            "" if r["p"] is None else f"{r['p']:.3f}", r["verdict"]])
        parts += [f"## {METRICS[metric][1]}", "",
                  _md_table(["", a["name"], b["name"], "Δ (B − A)", "p (Welch)", "verdict"], md_rows), ""]
    if not table:
        parts += ["No task has a value in both experiments.", ""]
    return "\n".join(parts)


def write_csv(summaries: Sequence[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """``results.csv`` (one row per experiment), ``results_long.csv`` (one row per experiment and task) and
    ``results_runs.csv`` (one row per run: experiment, task, seed). Returns the first two paths."""
    tasks, means = _columns(summaries)
    wide = out_dir / "results.csv"
    with open(wide, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        header = ["experiment", "method", "dir"]
        for metric in METRICS:
            header += [f"{t}_{metric}" for t in tasks]
        for metric in METRICS:
            header += [f"{t}_{metric}_std" for t in tasks] + [f"{t}_{metric}_n" for t in tasks]
        header += [f"{m}_{metric}" for metric in METRICS for m in means]
        header += [f"{m}_{metric}_std" for metric in METRICS for m in means]
        header += [f"{m}_{metric}_n" for metric in METRICS for m in means]
        header += [f"{m}_complete" for m in means]
        header += ["params_m", "gflops", "throughput", "n_finished", "seeds", "missing", "unfinished"]
        writer.writerow(header)
        for s in summaries:
            row: list[Any] = [s["name"], s["method"] or "", s["dir"]]
            empty = {"mean": None, "std": None, "n": 0}
            for metric in METRICS:
                row += [_fmt(((s["runs"].get(t) or {}).get(metric) or empty)["mean"], 4) for t in tasks]
            for metric in METRICS:
                row += [_fmt(((s["runs"].get(t) or {}).get(metric) or empty)["std"], 4) for t in tasks]
                row += [((s["runs"].get(t) or {}).get(metric) or empty)["n"] for t in tasks]
            row += [_fmt(s[metric][m]["value"], 4) for metric in METRICS for m in means]
            row += [_fmt(s[metric][m]["std"], 4) for metric in METRICS for m in means]
            row += [s[metric][m]["n_seeds"] for metric in METRICS for m in means]
            row += [s["best"][m]["complete"] for m in means]
            row += [_fmt(None if s["n_parameters"] is None else s["n_parameters"] / 1e6, 6), _fmt(s["gflops"], 4),
                    _fmt(s["throughput"], 2), sum(e["status"] == "finished" for e in s["runs"].values()),
                    " ".join(map(str, s["seeds"])), " ".join(s["missing"]), " ".join(s["unfinished"])]
            writer.writerow(row)
    group_of = {t: g for g, ts in VTAB_GROUPS.items() for t in ts}
    long = out_dir / "results_long.csv"
    with open(long, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        stats_header = [f"{k}_{metric}" for metric in METRICS for k in ("mean", "std", "n")]
        writer.writerow(["experiment", "method", "task", "group", "status", "best_acc1", "last_acc1", "selected_acc1",
                         "epochs_done", "epochs_total", "n_parameters", "gflops", "throughput", "throughput_batch",
                         "device", "seeds"] + stats_header)
        for s in summaries:
            for t in tasks:
                e = s["runs"].get(t)
                if e is None:
                    writer.writerow([s["name"], s["method"] or "", t, group_of.get(t, ""), "missing"]
                                    + [""] * (11 + len(stats_header)))
                    continue
                writer.writerow([s["name"], e["method"] or "", t, group_of.get(t, ""), e["status"],
                                 _fmt(e["best_acc1"], 4), _fmt(e["last_acc1"], 4), _fmt(e["selected_acc1"], 4),
                                 e["epochs_done"], e["epochs_total"] or "",
                                 "" if e["n_parameters"] is None else int(e["n_parameters"]), _fmt(e["gflops"], 4),
                                 _fmt(e["throughput"], 2), e["throughput_batch"] or "", e["device"] or "",
                                 " ".join(map(str, e["seeds"]))]
                                + [x for metric in METRICS for x in (_fmt(e[metric]["mean"], 4),
                                                                     _fmt(e[metric]["std"], 4), e[metric]["n"])])
    with open(out_dir / "results_runs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["experiment", "method", "task", "seed", "status", "kind", "best_acc1", "last_acc1",
                         "selected_acc1", "epochs_done", "epochs_total", "throughput", "dir"])
        for s in summaries:
            for t, e in s["runs"].items():
                for seed, r in sorted(e["runs"].items()):
                    writer.writerow([s["name"], r["method"] or "", t, seed, r["status"], r["kind"] or "",
                                     _fmt(r["best_acc1"], 4), _fmt(r["last_acc1"], 4), _fmt(r["selected_acc1"], 4),
                                     r["epochs_done"], r["epochs_total"] or "", _fmt(r["throughput"], 2), r["dir"]])
    return wide, long


def write_compare_csv(table: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    keys = ["key", "a_mean", "a_std", "a_n", "b_mean", "b_std", "b_n", "diff", "t", "df", "p", "verdict", "complete"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["metric"] + keys)
        for metric, rows in table.items():
            for r in rows:
                writer.writerow([metric] + ["" if r[k] is None else r[k] for k in keys])
    return path


# ---------------------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(summaries: Sequence[dict[str, Any]], path: Path) -> Path:
    """Test top-1 per evaluated epoch: a subplot per task, a colour per experiment, a line per seed."""
    plt = _pyplot()
    tasks = [t for t in TASK_ORDER + sorted({t for s in summaries for t in s["extra_tasks"]})
             if any(t in s["runs"] for s in summaries)]
    ncols = min(5, max(1, len(tasks)))
    nrows = max(1, math.ceil(len(tasks) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    if not tasks:
        axes[0, 0].text(0.5, 0.5, "no runs found", ha="center", va="center")
    for ax, task in zip(axes.flat, tasks):
        for i, s in enumerate(summaries):
            entry = s["runs"].get(task)
            for run in (entry["runs"].values() if entry else ()):
                if run["curve"]:
                    epochs, accs = zip(*run["curve"])
                    style = "-" if run["status"] == "finished" else "--"
                    ax.plot([e + 1 for e in epochs], accs, style, marker=".", color=f"C{i % 10}", alpha=0.8,
                            linewidth=1)
        ax.set_title(SHORT_NAMES.get(task, task), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("test top-1 (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=f"C{i % 10}", marker=".", label=s["name"]) for i, s in enumerate(summaries)]
    fig.legend(handles=handles, loc="upper center", ncol=min(4, len(handles)) or 1, fontsize=8,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


METHOD_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")   # one per method in the accuracy plot


def plot_accuracy_vs_throughput(summaries: Sequence[dict[str, Any]], path: Path) -> Path:
    """The paper's average (best top-1) against throughput, one point per experiment, a colour and a marker per
    method (legend; hollow: incomplete tasks), with error bars of one standard deviation over seeds (accuracy:
    of the per-seed average; throughput: of the per-seed mean over tasks) where there are at least 2 seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = [(s["throughput"], s["best"]["Average"]["value"], s) for s in summaries]
    points = [(x, y, s) for x, y, s in points if x is not None and y is not None]
    methods: list[str] = []   # in order of first appearance: the colour and marker index
    for x, y, s in points:
        incomplete = "" if s["best"]["Average"]["complete"] else INCOMPLETE_MARK
        yerr, xerr = s["best"]["Average"].get("std"), s.get("throughput_std")
        method = s["method"] or "unknown"
        label = None if method in methods else method   # one legend entry per method
        methods += [method] if label else []
        i, colour = methods.index(method), f"C{methods.index(method) % 10}"
        ax.errorbar([x], [y], yerr=None if yerr is None else [yerr], xerr=None if xerr is None else [xerr],
                    color=colour, marker=METHOD_MARKERS[i % len(METHOD_MARKERS)], capsize=3, linestyle="none",
                    markerfacecolor="none" if incomplete else colour, label=label)
        n = s["best"]["Average"].get("n_seeds", 1)
        ax.annotate(s["name"] + incomplete + (f" (n={n})" if n > 1 else ""), (x, y), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    if not points:
        ax.text(0.5, 0.5, "no experiment has both throughput and accuracy", ha="center", va="center",
                transform=ax.transAxes)
    ax.margins(0.2)
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("VTAB average of group means, best top-1 (%)")
    ax.set_title(f"accuracy vs. throughput (error bars: ±1 std over seeds; {INCOMPLETE_MARK} / hollow: incomplete "
                 "tasks)", fontsize=9)
    ax.grid(alpha=0.3)
    if points:
        ax.legend(title="method", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------- CLI
def _hint(path: Path) -> str:
    """Where the experiment folders are, when a task folder or a parent of experiments was given."""
    if _has_run_files(path) or any(_has_run_files(p) for p in path.glob("seed*")):
        return f"; {path} is a task folder: pass its parent {path.parent}"
    below = sorted({str(p.parent.parent.parent if SEED_DIR.fullmatch(p.parent.name) else p.parent.parent)
                    for p in path.glob("**/log.txt")})
    if below:
        more = f" (+{len(below) - 5} more)" if len(below) > 5 else ""
        return "; experiment folders below it: " + " ".join(below[:5]) + more
    return ""


def collect(exp_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
            names: Sequence[str] | None = None, include_unfinished: bool = False,
            plots: bool = True, compare_pair: Sequence[str | os.PathLike] | None = None,
            ablation: bool = False) -> dict[str, Any]:
    """Summarise the experiments and write results.md / results.csv / results_long.csv / results_runs.csv
    (and PNGs) to ``out``; with ``compare_pair`` (A, B) also compare.md / compare.csv (B − A); with
    ``ablation`` also ablation.md (:func:`render_ablation`)."""
    exp_dirs = list(exp_dirs)
    if names and len(names) != len(exp_dirs):
        raise ValueError(f"--names has {len(names)} name(s) for {len(exp_dirs)} experiment(s)")
    names = list(names) if names else [None] * len(exp_dirs)
    for d in compare_pair or ():
        if str(d) not in [str(e) for e in exp_dirs]:
            exp_dirs.append(d)
            names.append(None)
    if not exp_dirs:
        raise ValueError("no experiment folder given")
    summaries = [summarize(d, name=names[i], include_unfinished=include_unfinished) for i, d in enumerate(exp_dirs)]
    for s in summaries:
        if not s["runs"]:
            print(f"warning: no task folders under {s['dir']} (expected <experiment>/<task>/seed<k>/log.txt)"
                  + _hint(Path(_split_dirs(s["dir"])[0])), file=sys.stderr)
    out_dir = Path(out) if out else _split_dirs(exp_dirs[0])[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(summaries)
    result: dict[str, Any] = {"summaries": summaries}
    files = {"markdown": out_dir / "results.md"}
    if ablation:
        ablation_md = render_ablation(summaries)
        markdown = ablation_md + "\n" + markdown
        (out_dir / "ablation.md").write_text(ablation_md, encoding="utf-8")
        files["ablation"] = out_dir / "ablation.md"
    if compare_pair:
        index = [str(e) for e in exp_dirs]
        a, b = (summaries[index.index(str(d))] for d in compare_pair)
        table = compare(a, b)
        compare_md = render_compare(a, b, table)
        markdown += "\n" + compare_md
        (out_dir / "compare.md").write_text(compare_md, encoding="utf-8")
        files["compare"] = out_dir / "compare.md"
        files["compare_csv"] = write_compare_csv(table, out_dir / "compare.csv")
        result["compare"] = table
    (out_dir / "results.md").write_text(markdown, encoding="utf-8")
    files["csv"], files["long_csv"] = write_csv(summaries, out_dir)
    files["runs_csv"] = out_dir / "results_runs.csv"
    if plots:
        files["curves"] = plot_curves(summaries, out_dir / "acc_curves.png")
        files["tradeoff"] = plot_accuracy_vs_throughput(summaries, out_dir / "acc_vs_throughput.png")
    result.update(markdown=markdown, files=files)
    return result


def _adverse_module():
    """scripts/adverse.py (the --adverse table), loaded by path: scripts/ is not a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("adverse", Path(__file__).with_name("adverse.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("experiments", nargs="*",
                        help="experiment folders, e.g. logs/vit_b16/lora_pyra_high (several joined by commas: one)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="also compare B with A per task and group, flagging differences within seed noise")
    parser.add_argument("--out", help="output folder (default: the first experiment folder)")
    parser.add_argument("--names", nargs="+", help="display names, one per positional experiment")
    parser.add_argument("--include-unfinished", action="store_true",
                        help="count unfinished runs (their best so far) in the means")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--ablation", action="store_true",
                        help="also the ablation table's layout (group means and trainable parameters per row)")
    adverse = _adverse_module()
    adverse.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.adverse or args.small:
        return adverse.run(args)
    if not args.experiments and not args.compare:
        parser.error("give experiment folders, --compare A B, or both")
    try:
        result = collect(args.experiments, args.out, args.names, args.include_unfinished, not args.no_plots,
                         compare_pair=args.compare, ablation=args.ablation)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print("wrote " + ", ".join(str(p) for p in result["files"].values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
