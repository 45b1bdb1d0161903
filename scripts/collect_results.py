#!/usr/bin/env python
"""Collect VTAB-1k results of one or more experiments into tables (Markdown, CSV) and plots.

Usage::

    python scripts/collect_results.py logs/vit_b16/lora_pyra_high [logs/vit_b16/lora_tome_high ...]
        [--out DIR] [--names NAME ...] [--include-unfinished] [--no-plots]

Each experiment folder holds one folder per task as written by train.py (``log.txt``, ``efficiency.json``,
``final.json``). The paper's number per task is the best test top-1 over the evaluations; its "average"
is the mean of the three group means (facts §6), not the mean of the 19 tasks, so both are reported.
Missing and unfinished tasks are flagged instead of silently shrinking the means.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:  # numpy-only table, importable without torch
    from data.vtab_splits import VTAB_GROUPS, VTAB_TASKS, canonical_task
except ImportError:  # pragma: no cover - older layouts keep the table in lib.data only
    from lib.data import VTAB_GROUPS, VTAB_TASKS, canonical_task

__all__ = ["load_run", "summarize", "group_means", "find_task_dirs", "experiment_name", "render_markdown",
           "write_csv", "plot_curves", "plot_accuracy_vs_throughput", "collect", "main",
           "GROUP_KEYS", "TASK_ORDER", "SHORT_NAMES"]

TASK_ORDER: List[str] = [t for group in VTAB_GROUPS.values() for t in group]
GROUP_KEYS: List[str] = list(VTAB_GROUPS) + ["Average", "All"]
MEAN_LABELS = {"Natural": "Natural", "Specialized": "Specialized", "Structured": "Structured",
               "Average": "Average (groups)", "All": "Mean (19)"}
# Column headers of the paper's VTAB tables.
SHORT_NAMES: Dict[str, str] = {
    "cifar": "Cifar100", "caltech101": "Caltech101", "dtd": "DTD", "oxford_flowers102": "Flowers102",
    "oxford_iiit_pet": "Pets", "svhn": "SVHN", "sun397": "Sun397", "patch_camelyon": "Camelyon",
    "eurosat": "EuroSAT", "resisc45": "Resisc45", "diabetic_retinopathy": "Retinopathy",
    "clevr_count": "Clevr-Count", "clevr_dist": "Clevr-Dist", "dmlab": "DMLab", "kitti": "KITTI-Dist",
    "dsprites_loc": "dSpr-Loc", "dsprites_ori": "dSpr-Ori", "smallnorb_azi": "sNORB-Azim",
    "smallnorb_ele": "sNORB-Elev",
}
RUN_FILES = ("log.txt", "final.json", "efficiency.json")
INCOMPLETE_MARK = "*"   # a mean over fewer tasks than the group has
UNFINISHED_MARK = "†"   # a task value read from a run without final.json


# --------------------------------------------------------------------------------------------- reading
def _read_json(path: Path, warnings: List[str]) -> Optional[Dict[str, Any]]:
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


def _read_log(path: Path, warnings: List[str]) -> List[Dict[str, Any]]:
    """The JSON-lines log; a malformed line (e.g. cut by a crash mid-write) is skipped with a warning."""
    records: List[Dict[str, Any]] = []
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


def _number(value: Any) -> Optional[float]:
    """A finite float, or None for missing / non-numeric / NaN values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _config_epochs(task_dir: Path) -> Optional[int]:
    """``train.epochs`` of the run's saved config.yaml (to show progress of unfinished runs)."""
    cfg = _read_yaml(task_dir / "config.yaml")
    epochs = (cfg.get("train") or {}).get("epochs") if isinstance(cfg, dict) else None
    return epochs if isinstance(epochs, int) else None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        import yaml

        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # a broken config must not stop the collection of results
        return None


def load_run(task_dir: str | os.PathLike) -> Dict[str, Any]:
    """Everything the tables need from one task folder.

    ``status`` is ``"finished"`` only when final.json says so; best/last top-1 come from final.json,
    else from the log (so an unfinished run still shows its progress, flagged).
    """
    task_dir = Path(task_dir)
    warnings: List[str] = []
    records = _read_log(task_dir / "log.txt", warnings)
    final = _read_json(task_dir / "final.json", warnings)
    eff = _read_json(task_dir / "efficiency.json", warnings) or {}

    curve = [(int(r["epoch"]), _number(r.get("test_acc1"))) for r in records
             if isinstance(r.get("epoch"), int) and _number(r.get("test_acc1")) is not None]
    accs = [acc for _, acc in curve]
    finished = bool(final and final.get("finished", False))
    best = _number(final.get("best_acc1")) if final else None
    last = _number(final.get("last_acc1")) if final else None
    if best is None and accs:
        best = max(accs)
    if last is None and accs:
        last = accs[-1]
    epochs_done = max((e for e, _ in curve), default=-1) + 1 if curve else 0
    epochs_total = final.get("epochs") if final and isinstance(final.get("epochs"), int) else _config_epochs(task_dir)

    n_params = _number(eff.get("n_parameters"))
    if n_params is None and records:
        n_params = _number(records[-1].get("n_parameters"))
    gflops = _number(eff.get("gflops"))
    if gflops is None and _number(eff.get("flops")) is not None:
        gflops = eff["flops"] / 2 ** 30
    return {
        "task": canonical_task(task_dir.name),
        "dir": str(task_dir),
        "status": "finished" if finished else "unfinished",
        "records": records,
        "curve": curve,
        "best_acc1": best,
        "last_acc1": last,
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


def find_task_dirs(exp_dir: str | os.PathLike) -> Dict[str, Path]:
    """Task name (canonical spelling) -> folder, for every subfolder that holds a run file or a VTAB name."""
    exp_dir = Path(exp_dir)
    found: Dict[str, Path] = {}
    for sub in sorted(p for p in exp_dir.iterdir() if p.is_dir()):
        task = canonical_task(sub.name)
        if task not in VTAB_TASKS and not any((sub / f).is_file() for f in RUN_FILES):
            continue
        if task in found:  # both spellings (cifar and cifar100): prefer the finished one
            if (found[task] / "final.json").is_file() or not (sub / "final.json").is_file():
                print(f"warning: {exp_dir}: both {found[task].name}/ and {sub.name}/ hold {task}; "
                      f"using {found[task].name}/", file=sys.stderr)
                continue
        found[task] = sub
    return found


def experiment_name(exp_dir: str | os.PathLike) -> str:
    """The ``experiment`` of a task's saved config.yaml, else the path below ``logs/``, else the folder name."""
    exp_dir = Path(exp_dir)
    if exp_dir.is_dir():
        for sub in sorted(p for p in exp_dir.iterdir() if p.is_dir()):
            cfg = _read_yaml(sub / "config.yaml")
            if isinstance(cfg, dict) and isinstance(cfg.get("experiment"), str) and cfg["experiment"]:
                return cfg["experiment"]
    parts = exp_dir.resolve().parts
    if "logs" in parts[:-1]:
        i = len(parts) - 1 - parts[::-1].index("logs")
        return "/".join(parts[i + 1:])
    return exp_dir.name


# ------------------------------------------------------------------------------------------------ means
def _mean(values: Iterable[float]) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def group_means(per_task: Dict[str, Optional[float]]) -> Dict[str, Dict[str, Any]]:
    """Group means of per-task accuracies (keys in any accepted spelling; None = not available).

    Returns, for each of Natural / Specialized / Structured, ``Average`` (the paper's: mean of the group
    means) and ``All`` (mean of the 19 tasks): ``{"value": float | None, "n": tasks used, "total": tasks
    expected, "complete": bool}``. A group with no task has value None; ``Average`` is taken over the
    groups that have a value and is incomplete unless every group is complete.
    """
    values = {canonical_task(k): v for k, v in per_task.items() if _number(v) is not None}
    out: Dict[str, Dict[str, Any]] = {}
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


def _ordered(tasks: Iterable[str]) -> List[str]:
    """VTAB tasks in the official order, then any other task alphabetically."""
    tasks = set(tasks)
    return [t for t in TASK_ORDER if t in tasks] + sorted(tasks - set(TASK_ORDER))


def summarize(exp_dir: str | os.PathLike, name: Optional[str] = None,
              include_unfinished: bool = False) -> Dict[str, Any]:
    """One experiment: its runs, missing/unfinished tasks, group means of best and last top-1, efficiency.

    Unfinished runs are left out of the means unless ``include_unfinished`` (their partial best is not
    comparable with a finished run's); either way they are listed.
    """
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise FileNotFoundError(f"experiment folder not found: {exp_dir}")
    runs = {task: load_run(path) for task, path in find_task_dirs(exp_dir).items()}
    counted = {t: r for t, r in runs.items() if r["status"] == "finished" or include_unfinished}

    def efficiency_mean(key: str) -> Optional[float]:
        return _mean(r[key] for r in runs.values() if r[key] is not None)

    return {
        "name": name or experiment_name(exp_dir),
        "dir": str(exp_dir),
        "runs": runs,
        "missing": [t for t in TASK_ORDER if t not in runs],
        "unfinished": [t for t in _ordered(runs) if runs[t]["status"] != "finished"],
        "extra_tasks": sorted(t for t in runs if t not in VTAB_TASKS),
        "best": group_means({t: r["best_acc1"] for t, r in counted.items()}),
        "last": group_means({t: r["last_acc1"] for t, r in counted.items()}),
        "include_unfinished": include_unfinished,
        # Per-task efficiency differs only by the head's class count: report the mean over the tasks.
        "n_parameters": efficiency_mean("n_parameters"),
        "gflops": efficiency_mean("gflops"),
        "throughput": efficiency_mean("throughput"),
        "devices": sorted({str(r["device"]) for r in runs.values() if r["device"]}),
        "warnings": [w for r in runs.values() for w in r["warnings"]],
    }


# --------------------------------------------------------------------------------------------- tables
def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _columns(summaries: Sequence[Dict[str, Any]]) -> tuple[List[str], List[str]]:
    """(task columns, mean columns): the 19 VTAB tasks when any experiment has one, then extra tasks."""
    has_vtab = any(t in VTAB_TASKS for s in summaries for t in s["runs"])
    extra = sorted({t for s in summaries for t in s["extra_tasks"]})
    return (TASK_ORDER if has_vtab else []) + extra, (GROUP_KEYS if has_vtab else [])


def _task_cell(summary: Dict[str, Any], task: str, metric: str) -> str:
    run = summary["runs"].get(task)
    if run is None:
        return "–"
    text = _fmt(run[metric])
    return text + UNFINISHED_MARK if run["status"] != "finished" else text


def _mean_cell(entry: Dict[str, Any]) -> str:
    if entry["value"] is None:
        return ""
    return _fmt(entry["value"]) + ("" if entry["complete"] else INCOMPLETE_MARK)


def _md_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(summaries: Sequence[Dict[str, Any]]) -> str:
    """The results as Markdown: best and last top-1 side by side per experiment, then the flags."""
    tasks, means = _columns(summaries)
    header = ["Experiment"] + [SHORT_NAMES.get(t, t) for t in tasks] + [MEAN_LABELS[m] for m in means]
    parts = ["# VTAB-1k results", ""]
    for metric, title in (("best", "Best test top-1 (%) over the evaluations — the paper's metric"),
                          ("last", "Last-epoch test top-1 (%)")):
        rows = [[s["name"]] + [_task_cell(s, t, f"{metric}_acc1") for t in tasks]
                + [_mean_cell(s[metric][m]) for m in means] for s in summaries]
        parts += [f"## {title}", "", _md_table(header, rows), ""]

    eff_header = ["Experiment", "Params (M, trainable)", "GFLOPs", "Throughput (img/s)", "Batch", "Device",
                  "Tasks finished", "Average (groups, best)"]
    eff_rows = [[s["name"], _fmt(None if s["n_parameters"] is None else s["n_parameters"] / 1e6, 3),
                 _fmt(s["gflops"]), _fmt(s["throughput"], 1),
                 ", ".join(sorted({str(r["throughput_batch"]) for r in s["runs"].values() if r["throughput_batch"]})),
                 ", ".join(s["devices"]),
                 f"{sum(r['status'] == 'finished' for r in s['runs'].values())}/{len(s['runs'])}"
                 + (f" (of {len(TASK_ORDER)})" if 0 < len(s["runs"].keys() & set(TASK_ORDER)) < len(TASK_ORDER)
                    else ""),
                 _mean_cell(s["best"]["Average"]) if means else ""] for s in summaries]
    parts += ["## Efficiency (mean over the tasks' efficiency.json)", "", _md_table(eff_header, eff_rows), ""]

    notes = [f"- `–`: task missing (no folder). `{UNFINISHED_MARK}`: run without final.json (value from its log "
             f"so far). `{INCOMPLETE_MARK}`: mean over fewer tasks than the group has; an empty mean: no task of "
             "that group is available.",
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
        for t in s["unfinished"]:
            run = s["runs"][t]
            total = f"/{run['epochs_total']}" if run["epochs_total"] else ""
            notes.append(f"- {s['name']}: {t} unfinished ({run['epochs_done']}{total} epochs logged), "
                         f"{counted} the means.")
        for w in s["warnings"]:
            notes.append(f"- {s['name']}: warning: {w}")
    parts += ["## Notes", ""] + notes + [""]
    return "\n".join(parts)


def write_csv(summaries: Sequence[Dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    """``results.csv`` (one row per experiment) and ``results_long.csv`` (one row per experiment and task)."""
    tasks, means = _columns(summaries)
    wide = out_dir / "results.csv"
    with open(wide, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        header = ["experiment", "dir"] + [f"{t}_best" for t in tasks] + [f"{t}_last" for t in tasks]
        header += [f"{m}_{metric}" for metric in ("best", "last") for m in means]
        header += [f"{m}_complete" for m in means]
        header += ["params_m", "gflops", "throughput", "n_finished", "missing", "unfinished"]
        writer.writerow(header)
        for s in summaries:
            row: List[Any] = [s["name"], s["dir"]]
            for metric in ("best_acc1", "last_acc1"):
                row += [_fmt((s["runs"].get(t) or {}).get(metric), 4) for t in tasks]
            row += [_fmt(s[metric][m]["value"], 4) for metric in ("best", "last") for m in means]
            row += [s["best"][m]["complete"] for m in means]
            row += [_fmt(None if s["n_parameters"] is None else s["n_parameters"] / 1e6, 6), _fmt(s["gflops"], 4),
                    _fmt(s["throughput"], 2), sum(r["status"] == "finished" for r in s["runs"].values()),
                    " ".join(s["missing"]), " ".join(s["unfinished"])]
            writer.writerow(row)
    group_of = {t: g for g, ts in VTAB_GROUPS.items() for t in ts}
    long = out_dir / "results_long.csv"
    with open(long, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["experiment", "task", "group", "status", "best_acc1", "last_acc1", "epochs_done",
                         "epochs_total", "n_parameters", "gflops", "throughput", "throughput_batch", "device"])
        for s in summaries:
            for t in tasks:
                run = s["runs"].get(t)
                if run is None:
                    writer.writerow([s["name"], t, group_of.get(t, ""), "missing"] + [""] * 9)
                    continue
                writer.writerow([s["name"], t, group_of.get(t, ""), run["status"], _fmt(run["best_acc1"], 4),
                                 _fmt(run["last_acc1"], 4), run["epochs_done"], run["epochs_total"] or "",
                                 "" if run["n_parameters"] is None else int(run["n_parameters"]),
                                 _fmt(run["gflops"], 4), _fmt(run["throughput"], 2),
                                 run["throughput_batch"] or "", run["device"] or ""])
    return wide, long


# ---------------------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(summaries: Sequence[Dict[str, Any]], path: Path) -> Path:
    """Test top-1 per evaluated epoch: a subplot per task, a line per experiment."""
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
            run = s["runs"].get(task)
            if run and run["curve"]:
                epochs, accs = zip(*run["curve"])
                style = "-" if run["status"] == "finished" else "--"
                ax.plot([e + 1 for e in epochs], accs, style, marker=".", color=f"C{i % 10}", label=s["name"])
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


def plot_accuracy_vs_throughput(summaries: Sequence[Dict[str, Any]], path: Path) -> Path:
    """The paper's average (best top-1) against throughput, one point per experiment."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = [(s["throughput"], s["best"]["Average"]["value"], s) for s in summaries]
    points = [(x, y, s) for x, y, s in points if x is not None and y is not None]
    for i, (x, y, s) in enumerate(points):
        incomplete = "" if s["best"]["Average"]["complete"] else INCOMPLETE_MARK
        ax.scatter([x], [y], color=f"C{i % 10}", marker="o" if not incomplete else "x")
        ax.annotate(s["name"] + incomplete, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if not points:
        ax.text(0.5, 0.5, "no experiment has both throughput and accuracy", ha="center", va="center",
                transform=ax.transAxes)
    ax.margins(0.2)
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("VTAB average of group means, best top-1 (%)")
    ax.set_title(f"accuracy vs. throughput ({INCOMPLETE_MARK} / x: incomplete tasks)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------- CLI
def _hint(path: Path) -> str:
    """Where the experiment folders are, when a task folder or a parent of experiments was given."""
    if any((path / f).is_file() for f in RUN_FILES):
        return f"; {path} is a task folder: pass its parent {path.parent}"
    below = sorted({str(p.parent.parent) for p in path.glob("**/log.txt")})
    if below:
        more = f" (+{len(below) - 5} more)" if len(below) > 5 else ""
        return "; experiment folders below it: " + " ".join(below[:5]) + more
    return ""


def collect(exp_dirs: Sequence[str | os.PathLike], out: Optional[str | os.PathLike] = None,
            names: Optional[Sequence[str]] = None, include_unfinished: bool = False,
            plots: bool = True) -> Dict[str, Any]:
    """Summarise the experiments and write results.md / results.csv / results_long.csv (and PNGs) to ``out``."""
    if names and len(names) != len(exp_dirs):
        raise ValueError(f"--names has {len(names)} name(s) for {len(exp_dirs)} experiment(s)")
    summaries = [summarize(d, name=names[i] if names else None, include_unfinished=include_unfinished)
                 for i, d in enumerate(exp_dirs)]
    for s in summaries:
        if not s["runs"]:
            print(f"warning: no task folders under {s['dir']} (expected <experiment>/<task>/log.txt)"
                  + _hint(Path(s["dir"])), file=sys.stderr)
    out_dir = Path(out) if out else Path(exp_dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(summaries)
    (out_dir / "results.md").write_text(markdown, encoding="utf-8")
    files = {"markdown": out_dir / "results.md"}
    files["csv"], files["long_csv"] = write_csv(summaries, out_dir)
    if plots:
        files["curves"] = plot_curves(summaries, out_dir / "acc_curves.png")
        files["tradeoff"] = plot_accuracy_vs_throughput(summaries, out_dir / "acc_vs_throughput.png")
    return {"summaries": summaries, "markdown": markdown, "files": files}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+", help="experiment folders, e.g. logs/vit_b16/lora_pyra_high")
    parser.add_argument("--out", help="output folder (default: the first experiment folder)")
    parser.add_argument("--names", nargs="+", help="display names, one per experiment")
    parser.add_argument("--include-unfinished", action="store_true",
                        help="count unfinished runs (their best so far) in the means")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    try:
        result = collect(args.experiments, args.out, args.names, args.include_unfinished, not args.no_plots)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result["markdown"])
    print("wrote " + ", ".join(str(p) for p in result["files"].values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
