#!/usr/bin/env python
"""README's Speed tables, generated from a benchmark JSON (``scripts/benchmark.py``), never typed by hand.

Usage::

    python scripts/speed_table.py RESULT.json --block NAME             # print the block
    python scripts/speed_table.py RESULT.json --block NAME --write README.md
    python scripts/speed_table.py RESULT.json --block NAME --check README.md   # exit 1 if it differs

A block is the text between ``<!-- speed:NAME:begin -->`` and ``<!-- speed:NAME:end -->`` in the README:
one line naming the machine, software and command, then a table with one row per measured row of the
JSON. ``parse_table`` reads such a table back into rows (the round trip the tests check).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "render", "render_table", "parse_table", "replace_block", "read_block", "main"]

# (header, row key, format, scale): the value shown is format(row[key] / scale); None shows as "".
COLUMNS: list[tuple[str, str, str, float]] = [
    ("variant", "label", "s", 1.0),
    ("batch", "batch_size", "d", 1.0),
    ("images/s (model)", "images_per_s", ".2f", 1.0),
    ("images/s (end to end)", "end_to_end_images_per_s", ".2f", 1.0),
    ("× plain", "ratio_to_plain", ".2f", 1.0),
    ("fvcore (G mult-adds)", "fvcore_flops", ".3f", 1e9),
    ("FlopCounterMode (GFLOPs)", "torch_flops", ".3f", 1e9),
    ("hidden attention (G mult-adds)", "attention_macs", ".3f", 1e9),
    ("efficiency", "efficiency", ".1%", 1.0),
    ("train step (s)", "train_step_s", ".3f", 1.0),
    ("train × plain", "train_ratio", ".2f", 1.0),
    ("peak train mem (MB)", "peak_mem_mb", ".0f", 1.0),
    ("compile (s)", "compile_s", ".1f", 1.0),
    ("spread", "spread", ".1%", 1.0),
]


def _cell(row: dict[str, Any], key: str, spec: str, scale: float) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if spec == "s":
        return str(value)
    if spec == "d":
        return str(int(value))
    return format(value / scale, spec)


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of ``rows`` (numbers right-aligned)."""
    header = "| " + " | ".join(h for h, *_ in COLUMNS) + " |"
    align = "|" + "|".join("---" if spec == "s" else "---:" for _, _, spec, _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r, k, spec, scale) for _, k, spec, scale in COLUMNS) + " |" for r in rows]
    return "\n".join([header, align, *body])


def parse_table(text: str) -> list[dict[str, Any]]:
    """Rows of a table written by ``render_table``: keys as in the JSON, numbers in the JSON's units
    (rounded as shown), empty cells as None."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    headers = [h.strip() for h in lines[0].strip("|").split("|")]
    by_header = {h: (k, spec, scale) for h, k, spec, scale in COLUMNS}
    rows = []
    for line in lines[2:]:
        row: dict[str, Any] = {}
        for header, cell in zip(headers, (c.strip() for c in line.strip().strip("|").split("|"))):
            key, spec, scale = by_header[header]
            if cell == "":
                row[key] = None
            elif spec == "s":
                row[key] = cell
            elif spec == "d":
                row[key] = int(cell)
            elif spec.endswith("%"):
                row[key] = float(cell.rstrip("%")) / 100
            else:
                row[key] = float(cell) * scale
        rows.append(row)
    return rows


def _environment(report: dict[str, Any]) -> str:
    e, c = report["env"], report["config"]
    loads = [x for v in e.get("load_avg_rounds", {}).values() for x in v]
    load = f"load average {min(loads):.1f}–{max(loads):.1f} during the rounds" if loads else \
        f"load average {e['load_avg_start']:.1f}→{e['load_avg_end']:.1f}"
    e2e = (f"end to end: the project's data path with {c['e2e_workers']} DataLoader worker(s) on "
           f"{c['e2e_image_size']}² JPEGs, {c['e2e_batches'] - 1} timed batch(es)"
           if c.get("end_to_end") else "no end-to-end pass")
    dirty = " (+ uncommitted changes in the tree)" if e["commit"].endswith("+dirty") else ""
    omp = "".join(f", {k}={v}" for k, v in (e.get("omp_env") or {}).items() if v)
    return (f"{e['device_name']} ({e['device']}), {e['threads']} threads, torch {e['torch']}, timm {e['timm']}, "
            f"{e['precision']}{omp}, {c['model']} + {c['peft']}, {c['num_classes']} classes, {c['img_size']}², "
            f"{c['rounds']} interleaved rounds × {c['runs_per_round']} timed batches; matmul peak "
            f"{e['peak_gflops']:.1f} GFLOP/s (fp32, n={e['peak_size']}, same run{_peak_pairing(report)}); "
            f"allocator: {e['allocator']}; "
            f"commit {e['commit'][:12]}{dirty}; "
            f"{load}; {e2e}; {c['timestamp']}.\n"
            f"Command: `{c['command']}`")


def _peak_pairing(report: dict[str, Any]) -> str:
    """How efficiency was paired with the peak: per-row peaks bracketing each timing, or (older records) one
    measured right before it; nothing for the oldest, which paired one peak per round."""
    if all(row.get("peak_gflops_bracket_rounds") for row in report["results"]):
        return "; efficiency against the mean of peaks measured right before and after each timing"
    if all(row.get("peak_gflops_rounds") for row in report["results"]):
        return "; efficiency against a peak measured right before each timing"
    return ""


def _backends(report: dict[str, Any]) -> str:
    seen: dict[str, list[str]] = {}
    for row in report["results"]:
        names = sorted(set(row.get("sdpa_backends") or [])) or ["none seen by the profiler"]
        seen.setdefault(", ".join(names), []).append(f"{row['label']} @{row['batch_size']}")
    if len(seen) == 1:
        return f"SDPA backend of every attention layer: {next(iter(seen))}."
    return "SDPA backends: " + "; ".join(f"{b} ({', '.join(v)})" for b, v in seen.items()) + "."


def render(report: dict[str, Any]) -> str:
    """The README block of one benchmark JSON: environment line, backends line, table."""
    return "\n".join([_environment(report), "", _backends(report), "", render_table(report["results"])])


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- speed:{name}:begin -->", f"<!-- speed:{name}:end -->"


def read_block(text: str, name: str) -> str | None:
    """The generated text between the block's markers, or None when the README has no such block."""
    begin, end = _markers(name)
    match = re.search(re.escape(begin) + r"\n(.*?)" + re.escape(end), text, flags=re.DOTALL)
    return None if match is None else match.group(1).removesuffix("\n")


def replace_block(text: str, name: str, block: str) -> str:
    begin, end = _markers(name)
    if read_block(text, name) is None:
        raise ValueError(f"no '{begin}' ... '{end}' block in the README")
    return re.sub(re.escape(begin) + r"\n.*?" + re.escape(end), lambda _: f"{begin}\n{block}\n{end}", text,
                  flags=re.DOTALL)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", type=Path, help="a scripts/benchmark.py result")
    p.add_argument("--block", required=True, help="the block's name in the README markers")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="README", help="replace the block in this file")
    group.add_argument("--check", type=Path, metavar="README", help="exit 1 if the block differs from the JSON")
    args = p.parse_args(argv)
    block = render(json.loads(args.json.read_text(encoding="utf-8")))
    if args.write:
        args.write.write_text(replace_block(args.write.read_text(encoding="utf-8"), args.block, block),
                              encoding="utf-8")
        print(f"updated block {args.block!r} of {args.write}")
    elif args.check:
        current = read_block(args.check.read_text(encoding="utf-8"), args.block)
        if current != block:
            print(f"block {args.block!r} of {args.check} is not what {args.json} generates", file=sys.stderr)
            return 1
        print(f"block {args.block!r} of {args.check} matches {args.json}")
    else:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
