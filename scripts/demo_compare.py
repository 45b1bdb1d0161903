#!/usr/bin/env python
"""Table and plot of the demo comparison (``scripts/demo_compare.sh``): no merging / ToMe / PYRA / small backbone.

    python scripts/demo_compare.py logs/demo_compare [--names lora lora_tome_high lora_pyra_high small_lora]
        [--small small_lora] [--rounds 7]

Reads the finished runs under each ``<root>/<name>/`` (train.py's ``<experiment>/<task>/seed<k>/``, one
per seed; top-1 is the mean over seeds) as train.py wrote them (``final.json``: last and best top-1;
``efficiency.json``: fvcore GFLOPs, trainable parameters, tokens per layer; ``config.yaml``; the trained
``last.pth``), then measures inference images/s of the first seed's models again **in this one process,
interleaved** over ``--rounds`` rounds at the runs' ``report.benchmark_batch`` (eval mode, random input),
so that a busy machine slows every setting alike; the speed-up is the median over rounds of each run's
images/s over the first run's (no merging) in the same round. Then the adverse-compression verdict of these
numbers (scripts/adverse.py's rule): is each merged large model below the small backbone (``--small``)
while at least as fast? With one seed per row the noise is unknown and no claim is made (``SEEDS="0 1 2"``
in demo_compare.sh gives Welch's test over seeds). Prints the table and the verdicts, and writes
``compare.md``, ``compare.json`` and ``compare.png`` (top-1 against images/s) into ``<root>``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import yaml  # noqa: E402

from models import create_model, load_checkpoint, read_checkpoint  # noqa: E402

_spec = importlib.util.spec_from_file_location("adverse", Path(__file__).with_name("adverse.py"))
adverse = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(adverse)

DEFAULT_NAMES = ("lora", "lora_tome_high", "lora_pyra_high", "small_lora")
LABELS = {"lora": "LoRA, no merging", "lora_tome_high": "LoRA + ToMe high", "lora_pyra_high": "LoRA + PYRA high",
          "small_lora": "small backbone, LoRA, no merging"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="the folder demo_compare.sh trained into (its OUT)")
    p.add_argument("--names", nargs="+", default=list(DEFAULT_NAMES),
                   help="experiment names under root; the first is the no-merging reference")
    p.add_argument("--small", default="small_lora",
                   help="the name of the small-backbone row that merged rows are judged against ('' : none)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default: %(default)s)")
    p.add_argument("--min-seconds", type=float, default=0.3, help="timed seconds per setting and round")
    return p.parse_args(argv)


def find_runs(root: Path, name: str) -> list[Path]:
    """The finished run folders (holding ``final.json``) under ``<root>/<name>``, one per seed."""
    found = sorted(p.parent for p in (root / name).rglob("final.json"))
    if not found:
        raise FileNotFoundError(f"{root / name}: expected a finished run (final.json), found none")
    return found


def read_run(folder: Path) -> dict[str, Any]:
    """The run's JSON outputs and config."""
    return {"final": json.loads((folder / "final.json").read_text()),
            "efficiency": json.loads((folder / "efficiency.json").read_text()),
            "config": yaml.safe_load((folder / "config.yaml").read_text())}


def rebuild(folder: Path, cfg: dict[str, Any]) -> nn.Module:
    """The run's model with its backbone and trained weights, as eval.py would build it."""
    m, peft, merging = cfg["model"], cfg["peft"], cfg["merging"]
    trained = read_checkpoint(str(folder / "last.pth"))["model"]
    custom = {k: m[k] for k in ("embed_dim", "depth", "num_heads", "patch_size")} if m["name"] == "vit" else {}
    if m.get("global_pool"):
        custom["global_pool"] = m["global_pool"]
    model = create_model(m["name"], num_classes=int(trained["head.weight"].shape[0]), peft=peft["type"],
                         peft_dim=peft["dim"], peft_dropout=peft["dropout"], peft_init=peft["init"],
                         merging=merging["r"], pyra=merging["pyra"], prop_attn=merging["prop_attn"],
                         drop_path_rate=m["drop_path_rate"], img_size=m["img_size"], **custom)
    if m.get("pretrained"):
        load_checkpoint(model, m["pretrained"], kind="pretrained")
    load_checkpoint(model, str(folder / "last.pth"), kind="finetuned")
    return model.eval()


def interleaved_throughput(models: list[nn.Module], batch: int, img_size: int, rounds: int,
                           min_seconds: float) -> tuple[list[float], list[float], list[list[float]]]:
    """Median images/s of each model, the median over rounds of its ratio to the first model in the same
    round (drift of a busy machine cancels within a round), and the per-round rates, over ``rounds`` rounds
    (``adverse.interleaved_rates``: the order rotates from round to round)."""
    rates = adverse.interleaved_rates(models, batch, [img_size] * len(models), torch.device("cpu"), rounds,
                                      min_seconds)
    ratios = [statistics.median(a / b for a, b in zip(r, rates[0])) for r in rates]
    return [statistics.median(r) for r in rates], ratios, rates


def table(rows: list[dict[str, Any]], batch: int) -> str:
    lines = [f"| setting | merging r per layer | tokens per layer | top-1 (last) | best top-1 | GFLOPs | "
             f"images/s (batch {batch}) | speed-up | trainable params |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['r']} | {r['tokens']} | {r['top1']:.2f} | {r['best_top1']:.2f} | "
                     f"{r['gflops']:.4f} | {r['images_per_s']:.0f} | {r['speedup']:.2f}x | {r['trainable']:,} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        ax.scatter(r["images_per_s"], r["top1"], s=60)
        ax.annotate(f"{r['label']}\n{r['gflops']:.3f} GFLOPs", (r["images_per_s"], r["top1"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("inference images/s (CPU, same process, interleaved)")
    ax.set_ylabel("top-1 on the 797 test digits (%)")
    ax.set_title("Demo: pretrained tiny ViT + LoRA on digits")
    ax.grid(alpha=0.3)
    ax.margins(x=0.35, y=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def verdicts(rows: list[dict[str, Any]], small: str) -> list[dict[str, Any]]:
    """Each merged row against the small-backbone row: speed from the per-round rates, accuracy (last top-1
    per seed) by Welch's rule (adverse.verdict)."""
    ref = next((r for r in rows if r["name"] == small), None)
    if ref is None:
        return []
    out = []
    for r in rows:
        if r is ref or not any(r["r"] or []):
            continue
        speed = adverse.speed_stats(r["rates"], ref["rates"])
        judged = adverse.verdict(r["top1_seeds"], ref["top1_seeds"], speed["speed"])
        out.append({"row": r["label"], "small": ref["label"], "top1": r["top1"], "small_top1": ref["top1"],
                    "ratio": speed["ratio"], "speed": speed["speed"], "diff": judged["diff"], "p": judged["p"],
                    "adverse": judged["adverse"], "verdict": judged["verdict"].replace("*", ""),
                    "seeds": [len(r["top1_seeds"]), len(ref["top1_seeds"])]})
    return out


def verdict_text(items: list[dict[str, Any]]) -> str:
    lines = ["Adverse compression (below the small backbone at ≥ its images/s; Welch's test over seeds, p < 0.05):"]
    for v in items:
        lines.append(f"- {v['row']} vs {v['small']}: top-1 {v['top1']:.2f} vs {v['small_top1']:.2f} "
                     f"(Δ {v['diff']:+.2f}), {v['ratio']:.2f}× its images/s ({v['speed']}), seeds "
                     f"{v['seeds'][0]} vs {v['seeds'][1]} → {v['verdict']}"
                     + ("" if v["p"] is None else f" (p = {v['p']:.3f})"))
    if any(v["p"] is None for v in items):
        lines.append('  (one seed per row: the noise is unknown; SEEDS="0 1 2" scripts/demo_compare.sh trains '
                     "three and applies the test)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.root)
    folders = {name: find_runs(root, name) for name in args.names}
    runs = {name: [read_run(f) for f in found] for name, found in folders.items()}
    cfgs = [seeds[0]["config"] for seeds in runs.values()]
    batch, img_size = cfgs[0]["report"]["benchmark_batch"], cfgs[0]["model"]["img_size"]
    models = [rebuild(folders[name][0], seeds[0]["config"]) for name, seeds in runs.items()]
    with torch.no_grad():
        speeds, ratios, rates = interleaved_throughput(models, batch, img_size, args.rounds, args.min_seconds)
    rows = []
    for (name, seeds), speed, ratio, rate in zip(runs.items(), speeds, ratios, rates):
        eff = seeds[0]["efficiency"]
        last = [s["final"]["last_acc1"] for s in seeds]
        rows.append({"name": name, "label": LABELS.get(name, name), "r": seeds[0]["config"]["merging"]["r"],
                     "tokens": eff["tokens_per_layer"], "top1": statistics.mean(last), "top1_seeds": last,
                     "best_top1": statistics.mean(s["final"]["best_acc1"] for s in seeds),
                     "seeds": [s["config"]["seed"] for s in seeds], "epochs": seeds[0]["final"]["epochs"],
                     "gflops": eff.get("gflops", float("nan")), "images_per_s": speed, "speedup": ratio,
                     "rates": rate, "trainable": eff["n_parameters"]})
    judged = verdicts(rows, args.small)
    text = table(rows, batch) + ("\n\n" + verdict_text(judged) if judged else "")
    print(text)
    (root / "compare.md").write_text(text + "\n")
    (root / "compare.json").write_text(json.dumps({"batch": batch, "threads": torch.get_num_threads(),
                                                   "rounds": args.rounds, "rows": rows, "verdicts": judged},
                                                  indent=2))
    plot(rows, root / "compare.png")
    print(f"wrote {root / 'compare.md'}, {root / 'compare.json'}, {root / 'compare.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
