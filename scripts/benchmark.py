#!/usr/bin/env python
"""Speed, FLOPs, memory and hardware efficiency of plain / ToMe / PYRA models, all in one process.

Usage::

    python scripts/benchmark.py [--model vit_base_patch16_224_in21k] [--device cpu|cuda]
        [--precision fp32|bf16|fp16] [--batch-size 8] [--threads N] [--rounds 3] [--img-size 224]
        [--compile] [--no-train] [--settings plain tome_high pyra_high] [--json PATH]

Every setting (plain, ToMe low/high, PYRA low/high) is built from the same random weights, with LoRA
as is and folded into qkv (``models.fold_lora`` on a copy). Inference and training are timed
round-robin over the settings for several rounds, so that drift of the machine hits all of them
alike; the reported time is the median over all timed runs. The machine's fp32 matmul peak is
measured in every round too, and each model's efficiency is ``2 · fvcore count · images/s ÷ peak``.
Ratios to plain and efficiencies are taken per round (against the plain run / the peak of the same
round) and their median is reported, so that the speed drift of a shared machine cancels.

Training memory is the peak growth over the built model during a few optimizer steps (activations,
gradients, AdamW state, workspaces): ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak
resident set (``VmHWM``) of a fresh subprocess per setting, since a process that already ran other
settings reuses their freed pages without growing. Folded rows have no training numbers: folding is
an inference-time transform (the LoRA parameters are gone).

CPU allocator (``--allocator tuned``, the default): glibc keeps freed blocks for reuse instead of
unmapping them (no page faults on every activation) and, run as a script, the heap sits on
transparent huge pages (the script restarts itself with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``).
``--allocator default`` measures glibc as it comes. The JSON records which one ran.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from lib.benchmark import (  # noqa: E402
    autocast_ctx,
    count_flops,
    device_name,
    efficiency,
    flops_by_block,
    make_train_step,
    matmul_peak,
    peak_memory_mb,
    profile_table,
    time_blocks,
    time_fn,
    tokens_per_layer,
    tune_cpu_allocator,
)
from models import create_model, fold_lora  # noqa: E402

__all__ = ["SETTINGS", "build_model", "run_benchmark", "format_table", "parse_args", "main"]

# setting name -> (merging schedule, PYRA on)
SETTINGS: Dict[str, tuple] = {
    "plain": (None, False),
    "tome_low": ("low", False),
    "tome_high": ("high", False),
    "pyra_low": ("low", True),
    "pyra_high": ("high", True),
}
REFERENCE = "plain"
DISTURBED = 0.10  # relative spread of the per-round medians above which the table is flagged
HUGE_PAGES = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: madvise(MADV_HUGEPAGE) on the heap
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(args: argparse.Namespace, setting: str, device: torch.device) -> nn.Module:
    """The unfolded model of one setting, from the seed shared by all settings (same backbone weights)."""
    merging, pyra = SETTINGS[setting]
    torch.manual_seed(args.seed)
    model = create_model(
        args.model, num_classes=args.num_classes, peft=args.peft, merging=merging, pyra=pyra,
        img_size=args.img_size, embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
        patch_size=args.patch_size)
    return model.to(device)


def _count_params(model: nn.Module) -> tuple:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _has_lora(model: nn.Module) -> bool:
    return any(name.endswith("lora_down.weight") for name, _ in model.named_parameters())


def _settings(requested: Optional[Sequence[str]]) -> List[str]:
    """The requested settings in canonical order, always with the plain reference."""
    wanted = set(requested or SETTINGS)
    unknown = wanted - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; expected some of {list(SETTINGS)}")
    wanted.add(REFERENCE)
    return [s for s in SETTINGS if s in wanted]


def _memory_in_subprocesses(args: argparse.Namespace, settings: Sequence[str]) -> Dict[str, float]:
    """Run the training-memory probe of each setting in a fresh interpreter (two at a time); MiB each."""
    script = str(Path(__file__).resolve())
    results: Dict[str, float] = {}
    pending = list(settings)
    while pending:
        batch, pending = pending[:2], pending[2:]
        procs = {s: subprocess.Popen([sys.executable, script, "--memory-probe", s, *args.argv], cwd=str(ROOT),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in batch}
        for setting, proc in procs.items():
            out, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"memory probe of {setting} failed:\n{err}")
            results[setting] = float(json.loads(out.strip().splitlines()[-1])["peak_mem_mb"])
    return results


def _memory_probe(args: argparse.Namespace, device: torch.device) -> float:
    """Peak memory growth of a few training steps of one setting, in this (fresh) process."""
    model = build_model(args, args.memory_probe, device)
    step = make_train_step(model, args.batch_size, args.num_classes, args.img_size, device, args.precision)
    return peak_memory_mb(lambda: [step() for _ in range(args.memory_steps)], device)


def _write_profiles(args: argparse.Namespace, variants: Dict[tuple, Dict[str, Any]], train_steps: Dict[str, Any],
                    infer: Any, device: torch.device, peak: float) -> None:
    """Where the time beyond the GEMMs goes: torch.profiler top-operator tables per setting, and the time
    and efficiency of every block (profile_<setting>[_folded]_{infer,train,blocks}.txt)."""
    out_dir = args.profile
    out_dir.mkdir(parents=True, exist_ok=True)
    for (setting, folded), v in variants.items():
        stem = f"profile_{setting}{'_folded' if folded else ''}"
        (out_dir / f"{stem}_infer.txt").write_text(profile_table(lambda v=v: infer(v["runner"]), device),
                                                   encoding="utf-8")
        (out_dir / f"{stem}_blocks.txt").write_text(_block_table(args, v["model"], device, peak), encoding="utf-8")
    for setting, s in train_steps.items():
        (out_dir / f"profile_{setting}_train.txt").write_text(profile_table(s["step"], device), encoding="utf-8")


def _block_table(args: argparse.Namespace, model: nn.Module, device: torch.device, peak: float) -> str:
    """Per block: tokens in -> out, milliseconds per batch, fvcore GFLOP per batch and % of the matmul peak."""
    seconds = time_blocks(model, args.batch_size, args.img_size, device, args.precision, runs=args.runs)
    flops = flops_by_block(model, args.img_size, device)
    tokens = tokens_per_layer(model, args.img_size)
    lines = [f"batch {args.batch_size}, peak {peak / 1e9:.1f} GFLOP/s; efficiency = 2 x fvcore x batch / time / peak",
             f"{'block':>5}  {'tokens':>10}  {'ms':>8}  {'GFLOP':>7}  {'eff':>6}"]
    for i, (sec, f) in enumerate(zip(seconds, flops)):
        work = 2.0 * f * args.batch_size
        lines.append(f"{i:>5}  {f'{tokens[i]}->{tokens[i + 1]}':>10}  {1e3 * sec:8.2f}  {work / 1e9:7.2f}  "
                     f"{100 * work / sec / peak:5.1f}%")
    total_s, total_work = sum(seconds), 2.0 * sum(flops) * args.batch_size
    lines.append(f"{'all':>5}  {'':>10}  {1e3 * total_s:8.2f}  {total_work / 1e9:7.2f}  "
                 f"{100 * total_work / total_s / peak:5.1f}%")
    return "\n".join(lines) + "\n"


def _rotate(items: List[Any], shift: int) -> List[Any]:
    shift = shift % len(items) if items else 0
    return items[shift:] + items[:shift]


def _round_medians(times: List[List[float]]) -> List[float]:
    return [statistics.median(rnd) for rnd in times]


def _median_over_rounds(times: List[List[float]]) -> tuple:
    """Median of all timed runs, and the relative spread of the per-round medians (a disturbance flag)."""
    flat = [t for rnd in times for t in rnd]
    per_round = [statistics.median(rnd) for rnd in times]
    median = statistics.median(flat)
    return median, (max(per_round) - min(per_round)) / median


def run_benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    """Measure every setting (folded and not) and return the JSON-ready report."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = _settings(args.settings)
    load_start = os.getloadavg()

    variants: Dict[tuple, Dict[str, Any]] = {}
    for setting in settings:
        model = build_model(args, setting, device).eval()
        forms = [(False, model)]
        if _has_lora(model):
            forms.append((True, fold_lora(copy.deepcopy(model))))
        for folded, m in forms:
            params, trainable = _count_params(m)
            runner = torch.compile(m) if args.compile else m
            variants[(setting, folded)] = dict(model=m, runner=runner, flops=count_flops(m, args.img_size, device),
                                               params=params, trainable=trainable, times=[])

    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)

    def infer(runner: nn.Module) -> None:
        with torch.no_grad(), autocast_ctx(device, args.precision):
            runner(x)

    for v in variants.values():  # warm-up (and compilation) outside the timed rounds
        time_fn(lambda v=v: infer(v["runner"]), device, warmup=args.warmup, runs=0)

    peak_dtype = PRECISIONS[args.precision]
    peaks: Dict[str, List[float]] = {"fp32": []}
    if args.precision != "fp32":
        peaks[args.precision] = []
    train_steps = {} if args.no_train else {
        s: dict(step=make_train_step(copy.deepcopy(variants[(s, False)]["model"]), args.batch_size,
                                     args.num_classes, args.img_size, device, args.precision), times=[])
        for s in settings}
    for s in train_steps.values():
        time_fn(s["step"], device, warmup=1, runs=0)

    keys = list(variants)
    for rnd in range(args.rounds):
        peaks["fp32"].append(matmul_peak(device, args.peak_size, runs=args.runs))
        if args.precision != "fp32":
            peaks[args.precision].append(matmul_peak(device, args.peak_size, dtype=peak_dtype, runs=args.runs))
        for key in _rotate(keys, rnd):  # no setting always runs first
            v = variants[key]
            v["times"].append(time_fn(lambda v=v: infer(v["runner"]), device, warmup=0, runs=args.runs))
        for name in _rotate(list(train_steps), rnd):
            s = train_steps[name]
            s["times"].append(time_fn(s["step"], device, warmup=0, runs=args.train_runs))

    if args.profile:
        _write_profiles(args, variants, train_steps, infer, device, statistics.median(peaks[args.precision]))

    memory: Dict[str, float] = {}
    if not args.no_train and device.type == "cpu":
        memory = _memory_in_subprocesses(args, settings)
    elif not args.no_train:
        for name in settings:
            memory[name] = _memory_probe(argparse.Namespace(**{**vars(args), "memory_probe": name}), device)

    # Ratios and efficiencies pair each setting with the reference / the peak of the same round, so that
    # drift of the machine's speed between rounds cancels; the median over rounds is reported.
    peak_rounds = peaks[args.precision]
    ref_rounds = _round_medians(variants[(REFERENCE, False)]["times"])
    train_ref = _round_medians(train_steps[REFERENCE]["times"]) if REFERENCE in train_steps else None
    rows = []
    for (setting, folded), v in variants.items():
        median_s, spread = _median_over_rounds(v["times"])
        rounds = _round_medians(v["times"])
        row = dict(setting=setting, folded=folded, images_per_s=args.batch_size / median_s, batch=args.batch_size,
                   flops=v["flops"], gflops=v["flops"] / 2 ** 30, params=v["params"], trainable=v["trainable"],
                   ratio_to_plain=statistics.median(r / s for r, s in zip(ref_rounds, rounds)),
                   train_step_s=None, train_ratio=None, peak_mem_mb=None,
                   efficiency=statistics.median(efficiency(v["flops"], args.batch_size / s, p)
                                                for s, p in zip(rounds, peak_rounds)),
                   median_s=median_s, spread=spread, round_s=rounds, runs=sum(len(t) for t in v["times"]))
        if not folded and setting in train_steps:
            row["train_step_s"], row["train_spread"] = _median_over_rounds(train_steps[setting]["times"])
            row["train_round_s"] = _round_medians(train_steps[setting]["times"])
            row["train_ratio"] = statistics.median(r / s for r, s in zip(train_ref, row["train_round_s"]))
            row["peak_mem_mb"] = memory[setting]
        rows.append(row)

    machine = dict(device=str(device), device_name=device_name(device), threads=torch.get_num_threads(),
                   torch_version=torch.__version__, timm_version=timm.__version__,
                   peak_gflops=statistics.median(peaks["fp32"]) / 1e9,
                   peak_gflops_rounds=[p / 1e9 for p in peaks["fp32"]], peak_size=args.peak_size,
                   peak_gflops_precision_rounds=[p / 1e9 for p in peak_rounds],
                   load_avg_start=load_start[0], load_avg_end=os.getloadavg()[0],
                   cpu_allocator=_allocator_info(args),
                   memory_method=("cuda max_memory_allocated" if device.type == "cuda"
                                  else "VmHWM growth of a fresh subprocess per setting"))
    if args.precision != "fp32":
        machine[f"peak_gflops_{args.precision}"] = statistics.median(peak_rounds) / 1e9
    config = dict(model=args.model, precision=args.precision, batch_size=args.batch_size, img_size=args.img_size,
                  rounds=args.rounds, runs_per_round=args.runs, train_runs_per_round=args.train_runs,
                  compile=args.compile, train=not args.no_train, peft=args.peft, num_classes=args.num_classes,
                  timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
    return dict(machine=machine, config=config, results=rows)


def _allocator_info(args: argparse.Namespace) -> str:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    parts = ["glibc", "keeps freed blocks (mallopt)" if args.allocator_tuned else "default thresholds",
             f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}"]
    if thp.is_file():
        parts.append(f"THP {thp.read_text().strip()}")
    return "; ".join(parts)


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: Dict[str, Any]) -> str:
    """The aligned terminal table of a report."""
    header = ["setting", "folded", "img/s", "x plain", "GFLOPs", "params", "trainable", "eff",
              "train s", "x plain", "mem MiB", "spread"]
    lines = [[r["setting"], "yes" if r["folded"] else "no", _fmt(r["images_per_s"], ".2f"),
              _fmt(r["ratio_to_plain"], ".2f"), _fmt(r["gflops"], ".3f"), f"{r['params'] / 1e6:.2f}M",
              f"{r['trainable']:,}", _fmt(100 * r["efficiency"], ".1f") + "%", _fmt(r["train_step_s"], ".3f"),
              _fmt(r["train_ratio"], ".2f"), _fmt(r["peak_mem_mb"], ".0f"), _fmt(100 * r["spread"], ".1f") + "%"]
             for r in report["results"]]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    out = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [header, *lines]]
    out.insert(1, "  ".join("-" * w for w in widths))
    m, c = report["machine"], report["config"]
    out.insert(0, f"{c['model']}  {c['precision']}  batch {c['batch_size']}  {c['img_size']}px  "
                  f"{m['device_name']}  {m['threads']} threads  torch {m['torch_version']}  "
                  f"matmul peak {m['peak_gflops']:.1f} GFLOP/s (fp32, n={m['peak_size']})  "
                  f"load {m['load_avg_start']:.2f}->{m['load_avg_end']:.2f}")
    return "\n".join(out)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224_in21k",
                   help="a backbone of models.backbones, or 'vit' with --embed-dim/--depth/--num-heads/--patch-size")
    p.add_argument("--embed-dim", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--peft", default="lora", choices=["lora", "adapter", "none"])
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--rounds", type=int, default=3, help="round-robin passes over all settings")
    p.add_argument("--runs", type=int, default=3, help="timed inference batches per setting and round")
    p.add_argument("--train-runs", type=int, default=2, help="timed training steps per setting and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed inference batches per setting before round 1")
    p.add_argument("--memory-steps", type=int, default=2, help="training steps the memory probe runs")
    p.add_argument("--peak-size", type=int, default=None, help="matrix size of the peak GEMM (2048 CPU, 8192 CUDA)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the inference models")
    p.add_argument("--no-train", action="store_true", help="skip the training step and memory measurements")
    p.add_argument("--allocator", default="tuned", choices=["tuned", "default"],
                   help="CPU: 'tuned' keeps freed blocks in glibc's heap (lib.benchmark.tune_cpu_allocator) and, "
                        "run as a script, backs it with transparent huge pages (GLIBC_TUNABLES)")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), help="subset of settings (plain is added)")
    p.add_argument("--json", type=Path, default=None, help="default: benchmark_results/<timestamp>.json")
    p.add_argument("--profile", type=Path, nargs="?", const=ROOT / "benchmark_results", default=None,
                   help="also write torch.profiler top-operator tables (profile_<setting>_*.txt) to this folder")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else list(argv))]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.peak_size is None:
        args.peak_size = 8192 if args.device == "cuda" else 2048
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    args.allocator_tuned = args.allocator == "tuned" and tune_cpu_allocator()
    if args.memory_probe:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps({"peak_mem_mb": _memory_probe(args, torch.device(args.device))}))
        return {}
    report = run_benchmark(args)
    print(format_table(report))
    worst = max(max(r["spread"], r.get("train_spread") or 0.0) for r in report["results"])
    if worst > DISTURBED:
        print(f"warning: per-round times differ by up to {100 * worst:.0f}% (load "
              f"{report['machine']['load_avg_end']:.1f}): the machine was busy, re-run when it is quiet")
    path = args.json or ROOT / "benchmark_results" / f"{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return report


def _reexec_with_huge_pages() -> None:
    """Restart this script with glibc's heap on transparent huge pages (a tunable read only at start-up).

    With ``--allocator tuned`` (the default) the weights and activations then sit on 2 MiB pages:
    fewer TLB misses while the GEMMs stream 28 MB of weights per ViT-B block (+1-2% here).
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or "glibc.malloc.hugetlb" in tunables:
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, HUGE_PAGES])))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env)


if __name__ == "__main__":
    _args = parse_args()
    if _args.allocator == "tuned" and not _args.memory_probe:
        _reexec_with_huge_pages()
    main()
