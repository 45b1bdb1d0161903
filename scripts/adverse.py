#!/usr/bin/env python
"""The adverse-compression table: each compressed large model next to the small model it should beat.

    python scripts/collect_results.py --adverse logs/vit_b16/lora_tome_high logs/vit_b16/lora_pyra_high \\
        --small logs/vit_s16/lora_none --out results/adverse [--device cuda --batch-size 64]

PYRA's claim: at high compression a large model with ToMe falls below simply tuning a smaller model of
the same throughput ("adverse compression"), and PYRA lifts it back above. The table puts the numbers
side by side: per experiment the VTAB-1k group means and their mean (best test top-1, mean ± std over
seeds, :func:`collect_results.group_stats`) and its inference images/s, **all models timed again in
this one process**, on the same device and batch, round-robin over ``--rounds`` rounds (the order
rotates each round), so that a drifting machine slows every model alike. Each model is built from its
run's saved ``config.yaml`` through ``lib.build.build_model`` with random weights (speed does not depend
on them); a run of the official code's layout (no config of this project) is timed as the config its
``cfg`` names (``ViT-B..._lora_8`` + ``merging_schedule`` / ``pyra``: :func:`official_timing_config`),
or as the config given with ``--timing-config EXPERIMENT=CONFIG``.

The verdict (:func:`verdict`) uses the noise rule of ``--compare``: Welch's t-test over the per-seed
means of group means; "adverse compression" when the compressed model is at least as fast as the small
one (median over rounds of the per-round speed ratio ≥ 1, or no round slower: the timing cannot tell it
slower) and below it with p < 0.05. Writes ``adverse.md``, ``adverse.csv`` and ``adverse.json``.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _collect_results():
    """scripts/collect_results.py as a module (scripts/ is not a package)."""
    module = sys.modules.get("collect_results")
    if module is None:
        spec = importlib.util.spec_from_file_location("collect_results", Path(__file__).with_name("collect_results.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["collect_results"] = module
        spec.loader.exec_module(module)
    return module


cr = _collect_results()

__all__ = ["TimingSpec", "timing_spec", "official_timing_config", "interleaved_rates", "speed_stats", "verdict",
           "adverse_table", "render", "write_outputs", "add_arguments", "run", "GROUPS"]

GROUPS = ("Natural", "Specialized", "Structured", "Average")
# A rate function: the specs in order -> per spec, its images/s in each round.
Measure = Callable[[Sequence["TimingSpec"]], list[list[float]]]
OFFICIAL_BACKBONES = {"S": "vit_s16", "B": "vit_b16", "L": "vit_l16"}


class TimingSpec(dict):
    """What to build for timing one experiment: ``name``, ``config`` (a path), ``overrides``, ``num_classes``,
    ``source`` (where the config came from, for the notes)."""


# ----------------------------------------------------------------------------------------- what to time
def official_timing_config(cfg: dict[str, Any]) -> tuple[str, list[str]] | None:
    """The project config an official-layout run corresponds to, from its argparse dump: the backbone and
    LoRA rank in the name of its ``cfg`` file (``.../ViT-B_prompt_lora_8.yaml``), merging from
    ``token_merging`` / ``merging_schedule`` and ``pyra``. None when the dump does not say."""
    name = Path(str(cfg.get("cfg", ""))).stem
    backbone = re.search(r"ViT-([SBL])", name)
    rank = re.search(r"lora_(\d+)", name)
    if not backbone or not rank:
        return None
    merge = bool(cfg.get("token_merging", cfg.get("merging_schedule")))
    schedule = cfg.get("merging_schedule") if merge else None
    if merge and schedule not in ("low", "high"):
        return None
    overrides = [f"peft.dim={int(rank[1])}", f"merging.r={schedule or 'null'}",
                 f"merging.pyra={'true' if merge and cfg.get('pyra') else 'false'}"]
    return str(ROOT / "configs" / OFFICIAL_BACKBONES[backbone[1]] / "lora_none.yaml"), overrides


def _config_source(path: str) -> str:
    """A config argument as a path: a file, or a name under configs/ (as scripts/vtab.sh takes it)."""
    for candidate in (Path(path), ROOT / path, ROOT / "configs" / f"{path.removesuffix('.yaml')}.yaml"):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"--timing-config: config not found: {path}")


def timing_spec(summary: dict[str, Any], override: str | None = None) -> TimingSpec:
    """How to build one experiment's model for timing: ``override`` (a config), else the saved config.yaml
    of its first run of this project's layout, else the config an official run names."""
    from lib.data import task_num_classes

    runs = [r for e in summary["runs"].values() for r in e["runs"].values()]
    runs.sort(key=lambda r: r["status"] != "finished")
    task = runs[0]["task"] if runs else "cifar"
    classes = task_num_classes(task) or 10
    if override:
        return TimingSpec(name=summary["name"], config=_config_source(override), overrides=[], num_classes=classes,
                          source=f"--timing-config {override}")
    for run in runs:
        if run["kind"] == "pyra" and (Path(run["dir"]) / "config.yaml").is_file():
            path = str(Path(run["dir"]) / "config.yaml")
            return TimingSpec(name=summary["name"], config=path, overrides=[], num_classes=classes, source=path)
    for run in runs:
        if run["kind"] == "official":
            found = official_timing_config(cr._read_yaml(Path(run["dir"]) / "config.yaml") or {})
            if found:
                config, overrides = found
                return TimingSpec(name=summary["name"], config=config, overrides=overrides, num_classes=classes,
                                  source=f"{Path(config).relative_to(ROOT)} {' '.join(overrides)} (from the "
                                         f"official config of {run['dir']})")
    raise ValueError(f"{summary['dir']}: no run config to build the model from for timing (expected "
                     f"<task>/seed<k>/config.yaml); pass --timing-config {summary['dir']}=CONFIG")


# ---------------------------------------------------------------------------------------------- timing
def interleaved_rates(models: Sequence[Any], batch_size: int, img_sizes: Sequence[int], device: Any, rounds: int,
                      min_seconds: float = 0.3, precision: str = "fp32") -> list[list[float]]:
    """Per model its images/s in each of ``rounds`` rounds; every round times each model once (eval mode,
    random input, ``lib.benchmark.measure_throughput``), in an order that rotates from round to round."""
    from lib.benchmark import measure_throughput

    rates: list[list[float]] = [[] for _ in models]
    for k in range(rounds):
        order = list(range(len(models)))
        order = order[k % len(order):] + order[:k % len(order)]
        for i in order:
            rates[i].append(measure_throughput(models[i], batch_size, img_sizes[i], device, precision, warmup=1,
                                               runs=3, min_seconds=min_seconds)["images_per_s"])
    return rates


def measure_specs(specs: Sequence[TimingSpec], batch_size: int, device: str, rounds: int, min_seconds: float,
                  precision: str) -> list[list[float]]:
    """Build every spec's model (``lib.build.build_model``, random weights) on ``device`` and time them together."""
    import torch

    from lib.build import build_model
    from lib.config import load_config

    dev = torch.device(device)
    models, sizes = [], []
    for spec in specs:
        cfg = load_config(spec["config"], spec["overrides"])
        models.append(build_model(cfg, spec["num_classes"], pretrained=False).to(dev).eval())
        sizes.append(cfg.model.img_size)
    with torch.no_grad():
        return interleaved_rates(models, batch_size, sizes, dev, rounds, min_seconds, precision)


def speed_stats(rates: Sequence[float], reference: Sequence[float]) -> dict[str, Any]:
    """Median images/s and, against the reference timed in the same rounds, the per-round ratios, their
    median and range, and ``speed``: "faster" (median ratio ≥ 1), "matched" (slower in the median but
    not in every round: the timing cannot tell) or "slower" (slower in every round)."""
    ratios = [a / b for a, b in zip(rates, reference)]
    ratio = statistics.median(ratios)
    speed = "faster" if ratio >= 1 else "matched" if max(ratios) >= 1 else "slower"
    return {"images_per_s": statistics.median(rates), "rates": list(rates), "ratios": ratios, "ratio": ratio,
            "ratio_min": min(ratios), "ratio_max": max(ratios), "speed": speed}


def verdict(compressed: Sequence[float], small: Sequence[float], speed: str | None,
            diff: float | None = None) -> dict[str, Any]:
    """Adverse compression or not, from per-seed accuracies (Welch, as ``--compare``) and the speed class.

    ``adverse``: True (at least as fast and below with p < ALPHA), False (slower, within seed noise, or
    above), None (no claim possible: a side without accuracy or with fewer than 2 seeds). ``diff`` defaults
    to mean(compressed) − mean(small).
    """
    test = cr.welch(list(small), list(compressed))          # diff = compressed − small
    diff = test["diff"] if diff is None else diff
    out = {"diff": diff, "p": test["p"], "t": test["t"], "df": test["df"], "adverse": None}
    if diff is None:
        return {**out, "verdict": "no accuracy to compare"}
    if speed == "slower":
        return {**out, "adverse": False, "verdict": "no: slower than the small model"}
    if test["p"] is None:
        return {**out, "verdict": "unknown: fewer than 2 seeds on a side"}
    if test["p"] >= cr.ALPHA:
        return {**out, "adverse": False, "verdict": "no: within seed noise"}
    if diff < 0:
        return {**out, "adverse": True, "verdict": "**yes: adverse compression**"}
    return {**out, "adverse": False, "verdict": "no: above the small model"}


# ----------------------------------------------------------------------------------------------- table
def _groups(summary: dict[str, Any], metric: str) -> dict[str, dict[str, Any]]:
    return {g: summary[metric][g] for g in GROUPS}


def adverse_table(compressed: Sequence[str], small: str, measure: Measure | None = None, metric: str = "best",
                  timing_configs: dict[str, str] | None = None, include_unfinished: bool = False,
                  batch_size: int = 64, device: str = "cpu", rounds: int = 5, min_seconds: float = 0.3,
                  precision: str = "fp32") -> dict[str, Any]:
    """The rows (small model first): name, dir, group statistics, speed against the small model and the
    verdict. ``measure`` (default: build and time the models, :func:`measure_specs`) gets the timing specs
    in row order and returns each one's per-round images/s; tests inject one."""
    if metric not in cr.METRICS:
        raise ValueError(f"--metric: expected one of {', '.join(cr.METRICS)}, got {metric!r}")
    if not compressed:
        raise ValueError("--adverse needs at least one compressed experiment")
    timing_configs = dict(timing_configs or {})
    summaries = [cr.summarize(d, include_unfinished=include_unfinished) for d in [small, *compressed]]
    for s in summaries:
        if not s["runs"]:
            raise ValueError(f"{s['dir']}: no runs found (expected <experiment>/<task>/seed<k>/)")
    known = {k for s in summaries for k in (s["dir"], s["name"])}
    unknown = sorted(set(timing_configs) - known)
    if unknown:
        raise ValueError(f"--timing-config {unknown[0]}=...: no experiment of that folder or name; "
                         f"expected one of {', '.join(s['dir'] for s in summaries)}")
    specs = [timing_spec(s, timing_configs.get(s["dir"], timing_configs.get(s["name"]))) for s in summaries]
    if measure is None:
        def measure(specs: Sequence[TimingSpec]) -> list[list[float]]:
            return measure_specs(specs, batch_size, device, rounds, min_seconds, precision)
    rates = measure(specs)
    if len(rates) != len(specs) or len({len(r) for r in rates}) != 1 or not rates[0]:
        raise ValueError(f"the timing gave {[len(r) for r in rates]} rounds for {len(specs)} models; "
                         "expected the same number of rounds (≥ 1) for each")
    small_summary, small_rates = summaries[0], rates[0]
    small_avg = small_summary[metric]["Average"]
    rows = []
    for i, (s, spec, r) in enumerate(zip(summaries, specs, rates)):
        row: dict[str, Any] = {"name": s["name"], "dir": s["dir"], "role": "small" if i == 0 else "compressed",
                               "timed_as": spec["source"], "groups": _groups(s, metric),
                               "tasks": sorted(s["runs"]), "missing": s["missing"], "unfinished": s["unfinished"],
                               **speed_stats(r, small_rates)}
        if i:
            avg = s[metric]["Average"]
            diff = None if avg["value"] is None or small_avg["value"] is None else avg["value"] - small_avg["value"]
            row.update(verdict(list(avg["per_seed"].values()), list(small_avg["per_seed"].values()), row["speed"],
                               diff))
            row["same_tasks"] = row["tasks"] == sorted(small_summary["runs"])
        rows.append(row)
    return {"rows": rows, "metric": metric, "batch_size": batch_size, "device": device, "rounds": len(rates[0]),
            "precision": precision, "alpha": cr.ALPHA}


def render(table: dict[str, Any]) -> str:
    """adverse.md: one row per model, the small model first, then the notes (rule, timing, flags)."""
    header = ["Model", "", *("Average (groups)" if g == "Average" else g for g in GROUPS), "images/s",
              "× small", "Δ Average", "p (Welch)", "adverse compression?"]
    body = []
    for r in table["rows"]:
        cells = [r["name"], r["role"]] + [cr._mean_cell(r["groups"][g], show_n=True) for g in GROUPS]
        cells += [f"{r['images_per_s']:.1f}", f"{r['ratio']:.2f}×" + ("" if r["role"] == "small" else
                                                                        f" ({r['speed']})")]
        if r["role"] == "small":
            cells += ["", "", "reference"]
        else:
            cells += ["" if r["diff"] is None else f"{r['diff']:+.2f}", "" if r["p"] is None else f"{r['p']:.3f}",
                      r["verdict"]]
        body.append(cells)
    title = cr.METRICS[table["metric"]][1]
    notes = [f"- Accuracy: {title}; a cell is the mean over seeds ± the sample std of the per-seed value (n "
             f"seeds); `{cr.INCOMPLETE_MARK}`: fewer tasks than the group has.",
             f"- Throughput: every model built from its run's config (random weights), timed in one process on "
             f"`{table['device']}` at batch {table['batch_size']} ({table['precision']}), {table['rounds']} "
             "interleaved rounds (order rotating); images/s is the median over rounds, × small the median of the "
             "per-round ratios to the small model. faster: median ratio ≥ 1; matched: slower in the median but "
             "not in every round (the timing cannot tell it slower); slower: slower in every round.",
             f"- Adverse compression: at least as fast as the small model (faster or matched) and below it in the "
             f"mean of group means with p < {table['alpha']} (Welch's t-test over the per-seed values, two-sided, "
             "as `--compare`). Within seed noise, or with fewer than 2 seeds on a side, no claim is made."]
    for r in table["rows"]:
        notes.append(f"- {r['name']}: timed as {r['timed_as']}; range of × small over rounds "
                     f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f}.")
        if r["role"] == "compressed" and not r["same_tasks"]:
            notes.append(f"- {r['name']}: **not the small model's task set** ({len(r['tasks'])} vs "
                         f"{len(table['rows'][0]['tasks'])} tasks): the means are not comparable task for task.")
        if r["unfinished"]:
            notes.append(f"- {r['name']}: unfinished runs left out: {', '.join(r['unfinished'])}.")
    return "\n".join(["# Adverse compression: compressed large models vs the small model", "",
                      cr._md_table(header, body), "", "## Notes", "", *notes, ""])


def write_outputs(table: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """adverse.md, adverse.csv (one row per model) and adverse.json (everything, with the per-round rates)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "adverse.md", "csv": out_dir / "adverse.csv", "json": out_dir / "adverse.json"}
    paths["markdown"].write_text(render(table), encoding="utf-8")
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["experiment", "role", "dir", *[f"{g.lower()}{s}" for g in GROUPS for s in ("", "_std", "_n")],
                         "complete", "images_per_s", "ratio_to_small", "ratio_min", "ratio_max", "speed", "diff",
                         "p", "adverse", "verdict", "timed_as"])
        for r in table["rows"]:
            stats = [x for g in GROUPS for x in (cr._fmt(r["groups"][g]["value"], 4),
                                                  cr._fmt(r["groups"][g].get("std"), 4),
                                                  r["groups"][g].get("n_seeds", 0))]
            writer.writerow([r["name"], r["role"], r["dir"], *stats, r["groups"]["Average"]["complete"],
                             f"{r['images_per_s']:.2f}", f"{r['ratio']:.4f}", f"{r['ratio_min']:.4f}",
                             f"{r['ratio_max']:.4f}", r["speed"], cr._fmt(r.get("diff"), 4),
                             cr._fmt(r.get("p"), 4), "" if r.get("adverse") is None else r["adverse"],
                             r.get("verdict", "reference").replace("*", ""), r["timed_as"]])
    paths["json"].write_text(json.dumps(table, indent=2, default=str), encoding="utf-8")
    return paths


# ------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --adverse options of scripts/collect_results.py."""
    g = parser.add_argument_group("adverse compression (--adverse; see scripts/adverse.py)")
    g.add_argument("--adverse", nargs="+", metavar="COMPRESSED",
                   help="compressed large-model experiments to put next to --small")
    g.add_argument("--small", metavar="SMALL", help="the small model's experiment")
    g.add_argument("--device", default=None, help="timing device (default: cuda if available, else cpu)")
    g.add_argument("--batch-size", type=int, default=64, help="timing batch (default: %(default)s)")
    g.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default: %(default)s)")
    g.add_argument("--min-seconds", type=float, default=0.5, help="timed seconds per model and round")
    g.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="timing precision")
    g.add_argument("--metric", default="best", choices=tuple(cr.METRICS), help="accuracy (default: best)")
    g.add_argument("--timing-config", action="append", default=[], metavar="EXPERIMENT=CONFIG",
                   help="time EXPERIMENT (its folder or name) as CONFIG (repeatable)")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace, measure: Measure | None = None) -> int:
    """collect_results.py --adverse: the table to stdout and to --out (default: the small experiment)."""
    try:
        if not args.small:
            raise ValueError("--adverse needs --small SMALL_EXPERIMENT")
        if args.experiments or args.compare or args.ablation:
            raise ValueError("--adverse takes its experiments itself; drop the positional folders / --compare / "
                             "--ablation")
        if args.batch_size < 1 or args.rounds < 1:
            raise ValueError(f"--batch-size and --rounds must be ≥ 1, got {args.batch_size} and {args.rounds}")
        configs = {}
        for item in args.timing_config:
            key, sep, value = item.partition("=")
            if not sep or not key or not value:
                raise ValueError(f"--timing-config {item!r}: expected EXPERIMENT=CONFIG")
            configs[key] = value
        table = adverse_table(args.adverse, args.small, measure, args.metric, configs, args.include_unfinished,
                              args.batch_size, args.device or _default_device(), args.rounds, args.min_seconds,
                              args.precision)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_outputs(table, Path(args.out) if args.out else cr._split_dirs(args.small)[0])
    print(paths["markdown"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0
