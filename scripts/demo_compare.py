#!/usr/bin/env python
"""Table and plot of the demo comparison (``scripts/demo_compare.sh``): no merging / ToMe / PYRA.

    python scripts/demo_compare.py logs/demo_compare [--names lora lora_tome_high lora_pyra_high] [--rounds 7]

Reads the one finished run under each ``<root>/<name>/`` (train.py's ``<experiment>/<task>/seed<k>/``)
as train.py wrote it (``final.json``: last and best top-1; ``efficiency.json``: fvcore GFLOPs, trainable
parameters, tokens per layer; ``config.yaml``; the trained ``last.pth``), then measures inference images/s
of all runs again **in this one process, interleaved** over ``--rounds`` rounds at the runs'
``report.benchmark_batch`` (eval mode, random input), so that a busy machine slows every setting alike;
the speed-up is the median over rounds of each run's images/s over the first run's (no merging) in the
same round. Prints one Markdown table and writes ``compare.md``, ``compare.json`` and ``compare.png``
(top-1 against images/s) into ``<root>``.
"""
from __future__ import annotations

import argparse
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

from lib.benchmark import measure_throughput  # noqa: E402
from models import create_model, load_checkpoint, read_checkpoint  # noqa: E402

DEFAULT_NAMES = ("lora", "lora_tome_high", "lora_pyra_high")
LABELS = {"lora": "LoRA, no merging", "lora_tome_high": "LoRA + ToMe high", "lora_pyra_high": "LoRA + PYRA high"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="the folder demo_compare.sh trained into (its OUT)")
    p.add_argument("--names", nargs="+", default=list(DEFAULT_NAMES),
                   help="experiment names under root; the first is the no-merging reference")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default: %(default)s)")
    p.add_argument("--min-seconds", type=float, default=0.3, help="timed seconds per setting and round")
    return p.parse_args(argv)


def find_run(root: Path, name: str) -> Path:
    """The one finished run folder (holding ``final.json``) under ``<root>/<name>``."""
    found = sorted(p.parent for p in (root / name).rglob("final.json"))
    if len(found) != 1:
        what = "no finished run (final.json)" if not found else f"{len(found)} finished runs ({found})"
        raise FileNotFoundError(f"{root / name}: expected one finished run, found {what}")
    return found[0]


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
                           min_seconds: float) -> tuple[list[float], list[float]]:
    """Median images/s of each model, and the median over rounds of its ratio to the first model in the
    same round (drift of a busy machine cancels within a round), over ``rounds`` rounds."""
    rates: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, model in enumerate(models):
            rates[i].append(measure_throughput(model, batch, img_size, torch.device("cpu"), warmup=1, runs=3,
                                               min_seconds=min_seconds)["images_per_s"])
    ratios = [statistics.median(a / b for a, b in zip(r, rates[0])) for r in rates]
    return [statistics.median(r) for r in rates], ratios


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.root)
    folders = {name: find_run(root, name) for name in args.names}
    runs = {name: read_run(folder) for name, folder in folders.items()}
    cfgs = [run["config"] for run in runs.values()]
    batch, img_size = cfgs[0]["report"]["benchmark_batch"], cfgs[0]["model"]["img_size"]
    models = [rebuild(folders[name], run["config"]) for name, run in runs.items()]
    with torch.no_grad():
        speeds, ratios = interleaved_throughput(models, batch, img_size, args.rounds, args.min_seconds)
    rows = []
    for (name, run), speed, ratio in zip(runs.items(), speeds, ratios):
        eff, final = run["efficiency"], run["final"]
        rows.append({"name": name, "label": LABELS.get(name, name), "r": run["config"]["merging"]["r"],
                     "tokens": eff["tokens_per_layer"], "top1": final["last_acc1"], "best_top1": final["best_acc1"],
                     "epochs": final["epochs"], "gflops": eff.get("gflops", float("nan")), "images_per_s": speed,
                     "speedup": ratio, "trainable": eff["n_parameters"]})
    text = table(rows, batch)
    print(text)
    (root / "compare.md").write_text(text + "\n")
    (root / "compare.json").write_text(json.dumps({"batch": batch, "threads": torch.get_num_threads(),
                                                   "rounds": args.rounds, "rows": rows}, indent=2))
    plot(rows, root / "compare.png")
    print(f"wrote {root / 'compare.md'}, {root / 'compare.json'}, {root / 'compare.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
