#!/usr/bin/env python
"""Speed, FLOPs, memory and hardware efficiency of the merging settings, all in one process, with the record.

Usage::

    python scripts/benchmark.py [--config configs/vit_b16/lora_none.yaml] [key=value ...]
        [--settings none tome_low tome_high pyra_low pyra_high] [--batch-sizes 1 8 32 64 256]
        [--device cpu|cuda] [--precision fp32|bf16|fp16] [--threads N] [--rounds 3]
        [--fold both|no|yes] [--compile off on frozen | both] [--attention mask feature]
        [--no-train] [--no-e2e] [--workers N] [--json PATH] [--plot PATH] [--profile [DIR]]

Every model is built by the project's one build path, ``lib.build.build_model(cfg, num_classes)``, from
the config (``lib.config.load_config``) plus the ``key=value`` overrides, with each setting applied as
the overrides ``merging.r`` / ``merging.pyra`` of ``models.backbones.MERGING_SETTINGS`` ("none" is
shown as "plain"). Weights are the config's seed's random ones unless ``--pretrained`` (speed does not
depend on them). Variants: LoRA as is and folded into qkv (``--fold``), eager and ``torch.compile``
(``--compile``; ``frozen`` compiles with inductor's ``freezing``: weights become constants of the graph,
folded and, on CPU, pre-packed for MKL, which is valid for inference only; the compile time is reported
apart from the steady-state speed), and the two forms of
proportional attention (``--attention``: ``log(size)`` as an SDPA mask or as an extra head feature).

For every batch size, inference and training are timed round-robin over the variants for several
rounds, so that drift of the machine hits all of them alike; the reported time is the median over all
timed runs, and ratios to plain and efficiencies are medians of per-round pairs: against the plain run
of the same round, and against the mean of the matmul peaks measured right before and right after the
variant's own timing (the speed of a shared machine drifts within a round; each row keeps its peaks in
``peak_gflops_rounds`` and the two sides in ``peak_gflops_bracket_rounds``). The load average is
recorded every round. Then each variant runs once through the project's own data path
(``lib.data.build_dataset`` → ``lib.loaders.build_eval_loader`` with its workers: JPEG decode, bicubic
resize, normalise, then the model) on JPEGs the harness writes in the VTAB-1k layout:
``end_to_end_images_per_s``, next to the model-only ``images_per_s`` on a tensor already in memory.

FLOPs for one image, three ways (``lib.benchmark.flop_counts``): fvcore as a user runs it
(multiply-adds), ``FlopCounterMode`` (FLOPs, two per multiply-add), and the attention multiply-adds
that the fused CPU kernel hides from both; ``flops`` = fvcore + attention is what the efficiency
column uses: ``2 · flops · images/s ÷ matmul peak``. On every device the SDPA backend each layer ran
(flash, memory-efficient, math, "flash (cpu)") is read from the profiler.

Training memory is the peak growth over the built model during a few optimizer steps:
``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak resident set (``VmHWM``) of a fresh
subprocess per variant. Folded and compiled rows have no training numbers (folding is an inference
transform; compilation is measured for inference).

CPU allocator (``--allocator tuned``, the default): glibc keeps freed blocks for reuse instead of
unmapping them and, run as a script, the heap sits on transparent huge pages (the script restarts
itself with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``). ``--allocator default`` measures glibc as it
comes. The JSON records which one ran (``env.allocator``). ``scripts/speed_table.py`` turns the JSON
into README's Speed table.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from lib.benchmark import (  # noqa: E402
    autocast_ctx,
    device_name,
    efficiency,
    end_to_end_images_per_s,
    flop_counts,
    flops_by_block,
    linear_replay,
    make_train_step,
    matmul_peak,
    peak_memory_mb,
    profile_table,
    sdpa_backends,
    time_blocks,
    time_fn,
    tokens_per_layer,
    tune_cpu_allocator,
    write_vtab_images,
)
from lib.build import build_model  # noqa: E402
from lib.config import load_config  # noqa: E402
from lib.data import build_dataset  # noqa: E402
from lib.distributed import DistInfo  # noqa: E402
from lib.engine import PRECISIONS  # noqa: E402
from lib.loaders import build_eval_loader  # noqa: E402
from models import fold_lora  # noqa: E402
from models.backbones import MERGING_SETTINGS  # noqa: E402
from models.pyra import PYRA  # noqa: E402
from models.vit import any_pyra, set_size_bias  # noqa: E402

__all__ = ["Variant", "setting_overrides", "load_setting_config", "build", "run_benchmark", "format_table",
           "plot_curve", "parse_args", "main", "ROW_FIELDS", "ENV_FIELDS"]

REFERENCE = "none"                 # the setting every ratio is taken against (its plain, eager, unfolded run)
DISPLAY = {"none": "plain"}        # display names; the rest are MERGING_SETTINGS' keys
DEFAULT_CONFIG = "configs/vit_b16/lora_none.yaml"
E2E_TASK = "benchmark_images"
DISTURBED = 0.10  # relative spread of the per-round medians above which a row is flagged
HUGE_PAGES = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: madvise(MADV_HUGEPAGE) on the heap

# The record of every row and of the environment (issue 14): field -> JSON type(s) (None: null allowed).
ROW_FIELDS: dict[str, tuple] = {
    "setting": (str,), "batch_size": (int,), "images_per_s": (float,), "end_to_end_images_per_s": (float, None),
    "fvcore_flops": (int,), "torch_flops": (int,), "train_step_s": (float, None), "peak_mem_mb": (float, None),
}
ENV_FIELDS: dict[str, tuple] = {
    "device": (str,), "torch": (str,), "timm": (str,), "threads": (int,), "precision": (str,),
    "allocator": (str,), "commit": (str,),
}


@dataclass(frozen=True)
class Variant:
    """One measured model: a merging setting, LoRA folded or not, compiled or not, and the form of
    proportional attention (None where nothing merges, so there is no size bias)."""

    setting: str
    folded: bool = False
    compiled: bool = False
    attention: str | None = None
    frozen: bool = False   # compiled with inductor's freezing (inference only)

    @property
    def label(self) -> str:
        parts = [DISPLAY.get(self.setting, self.setting)]
        if self.attention == "feature":
            parts.append("feature-attn")
        if self.folded:
            parts.append("folded")
        if self.compiled:
            parts.append("compiled frozen" if self.frozen else "compiled")
        return " ".join(parts)


def setting_overrides(setting: str) -> list[str]:
    """The config overrides of one row of ``models.backbones.MERGING_SETTINGS``."""
    return [f"{key}={json.dumps(value)}" for key, value in MERGING_SETTINGS[setting].items()]


def load_setting_config(args: argparse.Namespace, setting: str) -> Any:
    """The config file, then the user's overrides, then the setting's."""
    return load_config(args.config, [*args.overrides, *setting_overrides(setting)])


def build(args: argparse.Namespace, setting: str, device: torch.device) -> nn.Module:
    """The unfolded model of one setting through ``lib.build.build_model`` (same seed, same backbone weights)."""
    cfg = load_setting_config(args, setting)
    return build_model(cfg, args.num_classes, pretrained=args.pretrained).to(device)


def _count_params(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _has_lora(model: nn.Module) -> bool:
    return any(name.endswith("lora_down.weight") for name, _ in model.named_parameters())


def _settings(requested: Sequence[str] | None) -> list[str]:
    """The requested settings in MERGING_SETTINGS' order, always with the reference ("plain" = "none")."""
    wanted = {"none" if s == "plain" else s for s in (requested or MERGING_SETTINGS)}
    unknown = wanted - set(MERGING_SETTINGS)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; expected some of {list(MERGING_SETTINGS)}")
    wanted.add(REFERENCE)
    return [s for s in MERGING_SETTINGS if s in wanted]


def _variants(args: argparse.Namespace, settings: Sequence[str], has_lora: bool) -> list[Variant]:
    folds = {"no": [False], "yes": [True], "both": [False, True]}[args.fold] if has_lora else [False]
    modes = {"off": (False, False), "on": (True, False), "frozen": (True, True)}
    compiles = [modes[c] for c in args.compile]
    out = [Variant(s, folded, compiled, None if MERGING_SETTINGS[s]["merging.r"] is None else attention, frozen)
           for s in settings for attention in args.attention for folded in folds for compiled, frozen in compiles]
    out = list(dict.fromkeys(out))   # "none" has one attention form
    reference = Variant(REFERENCE)
    return out if reference in out else [reference, *out]


def _memory_in_subprocesses(args: argparse.Namespace, jobs: Sequence[tuple[Variant, int]]) -> dict[tuple, float]:
    """The training-memory probe of each (variant, batch) in a fresh interpreter, two at a time; MiB each."""
    script = str(Path(__file__).resolve())
    results: dict[tuple, float] = {}
    pending = list(jobs)
    while pending:
        batch, pending = pending[:2], pending[2:]
        procs = {}
        for variant, bs in batch:
            cmd = [sys.executable, script, *args.argv, "--memory-probe", variant.setting,
                   "--memory-batch", str(bs), "--memory-attention", variant.attention or "mask"]
            procs[(variant, bs)] = subprocess.Popen(cmd, cwd=str(ROOT), stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, text=True)
        for key, proc in procs.items():
            out, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"memory probe of {key[0].label} at batch {key[1]} failed:\n{err}")
            results[key] = float(json.loads(out.strip().splitlines()[-1])["peak_mem_mb"])
    return results


def _memory_probe(args: argparse.Namespace, device: torch.device) -> float:
    """Peak memory growth of a few training steps of one setting, in this (fresh) process."""
    model = build(args, args.memory_probe, device)
    set_size_bias(model, args.memory_attention)
    img_size = load_setting_config(args, args.memory_probe).model.img_size
    step = make_train_step(model, args.memory_batch, args.num_classes, img_size, device, args.precision)
    return peak_memory_mb(lambda: [step() for _ in range(args.memory_steps)], device)


def _block_table(model: nn.Module, batch_size: int, img_size: int, device: torch.device, precision: str,
                 runs: int, peak: float) -> str:
    """Per block: tokens in -> out, milliseconds per batch, GFLOP per batch and % of the matmul peak."""
    seconds = time_blocks(model, batch_size, img_size, device, precision, runs=runs)
    flops = flops_by_block(model, img_size, device)
    tokens = tokens_per_layer(model, img_size)
    lines = [f"batch {batch_size}, peak {peak / 1e9:.1f} GFLOP/s; efficiency = 2 x fvcore x batch / time / peak",
             f"{'block':>5}  {'tokens':>10}  {'ms':>8}  {'GFLOP':>7}  {'eff':>6}"]
    for i, (sec, f) in enumerate(zip(seconds, flops)):
        work = 2.0 * f * batch_size
        lines.append(f"{i:>5}  {f'{tokens[i]}->{tokens[i + 1]}':>10}  {1e3 * sec:8.2f}  {work / 1e9:7.2f}  "
                     f"{100 * work / sec / peak:5.1f}%")
    total_s, total_work = sum(seconds), 2.0 * sum(flops) * batch_size
    lines.append(f"{'all':>5}  {'':>10}  {1e3 * total_s:8.2f}  {total_work / 1e9:7.2f}  "
                 f"{100 * total_work / total_s / peak:5.1f}%")
    return "\n".join(lines) + "\n"


def _gemm_share(model: nn.Module, batch_size: int, img_size: int, device: torch.device, precision: str,
                runs: int, peak_size: int, counts: dict[str, Any]) -> str:
    """The model's nn.Linear GEMMs replayed alone (lib.benchmark.linear_replay) against its forward."""
    has_pyra = any_pyra(model)
    r = linear_replay(model, batch_size, img_size, device, precision, runs=runs, peak_size=peak_size,
                      also=PYRA if has_pyra else None)
    model_work = 2.0 * (counts["fvcore_flops"] + counts["attention_macs"]) * batch_size
    gemm_work = 2.0 * r["linear_macs"]
    share = r["linear_share"]
    return "\n".join([
        f"batch {batch_size}, {precision}, medians of {runs} rounds, each timing back to back the forward, the "
        f"GEMM replay{', the PYRA replay' if has_pyra else ''} and a matmul peak (n={peak_size}); shares and "
        f"percentages of peak are per round",
        f"forward: {1e3 * r['forward_s']:.2f} ms, {model_work / 1e9:.2f} GFLOP, "
        f"efficiency {100 * model_work / r['forward_peak_flop']:.1f}%",
        f"{int(r['linear_calls'])} nn.Linear calls replayed alone: {1e3 * r['linear_s']:.2f} ms, "
        f"{gemm_work / 1e9:.2f} GFLOP ({100 * gemm_work / model_work:.1f}% of the model's), "
        f"rate {gemm_work / r['linear_s'] / 1e9:.1f} GFLOP/s = {100 * r['gemm_to_peak']:.1f}% of peak",
        f"share of the forward: GEMMs {100 * share:.1f}%, everything else (attention, "
        f"norms, GELU, merging, copies) {100 * (1 - share):.1f}%",
    ] + ([f"{int(r['also_calls'])} PYRA modules replayed alone (LayerNorm, the W_r and W_D products, sigmoids, "
          f"modulation): {1e3 * r['also_s']:.2f} ms, {100 * r['also_share']:.2f}% of the forward"]
        if has_pyra else [])) + "\n"


def _rotate(items: list[Any], shift: int) -> list[Any]:
    shift = shift % len(items) if items else 0
    return items[shift:] + items[:shift]


def _round_medians(times: list[list[float]]) -> list[float]:
    return [statistics.median(rnd) for rnd in times]


def _median_over_rounds(times: list[list[float]]) -> tuple[float, float]:
    """Median of all timed runs, and the relative spread of the per-round medians (a disturbance flag)."""
    flat = [t for rnd in times for t in rnd]
    per_round = [statistics.median(rnd) for rnd in times]
    median = statistics.median(flat)
    return median, (max(per_round) - min(per_round)) / median


def _commit() -> str:
    """HEAD's hash, "+dirty" when tracked files differ from it (the measured code is then not exactly HEAD).

    The committed records (``scripts/speed_records/``) and Markdown files do not count: a series of runs
    rewrites the former, and neither changes what is measured."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)scripts/speed_records", ":(exclude)*.md"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _allocator_info(args: argparse.Namespace, device: torch.device) -> str:
    if device.type == "cuda":
        return "torch CUDA caching allocator"
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    parts = ["glibc", "keeps freed blocks (mallopt)" if args.allocator_tuned else "default thresholds",
             f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}"]
    if thp.is_file():
        parts.append(f"THP {thp.read_text().strip()}")
    return "; ".join(parts)


class _Prepared:
    """A variant ready to time: its model (eager, possibly folded), what runs it, counts and timings."""

    def __init__(self, variant: Variant, model: nn.Module, device: torch.device, img_size: int) -> None:
        self.variant = variant
        self.model = model
        self.runner: Callable[[torch.Tensor], Any] = model
        if variant.compiled:
            self.runner = torch.compile(model, dynamic=False, options={"freezing": True} if variant.frozen else None)
        self.params, self.trainable = _count_params(model)
        self.counts = flop_counts(model, img_size, device)
        self.times: dict[int, list[list[float]]] = {}
        self.brackets: dict[int, list[tuple[float, float]]] = {}   # per round: (peak before, peak after) the timing
        self.first_call_s: dict[int, float] = {}
        self.backends: dict[int, list[str]] = {}
        self.e2e: dict[int, dict[str, float]] = {}

    def __call__(self, x: torch.Tensor) -> Any:
        return self.runner(x)

    def peaks(self, batch_size: int) -> list[float]:
        """Per round, the peak the timing is paired with: the mean of the two bracketing it."""
        return [(before + after) / 2 for before, after in self.brackets[batch_size]]


def _prepare(args: argparse.Namespace, settings: list[str], device: torch.device,
             img_size: int) -> dict[Variant, _Prepared]:
    prepared: dict[Variant, _Prepared] = {}
    for setting in settings:
        base = build(args, setting, device).eval()
        for variant in [v for v in args.variants if v.setting == setting]:
            model = copy.deepcopy(base)
            if variant.folded:
                model = fold_lora(model)
            set_size_bias(model, variant.attention)
            prepared[variant] = _Prepared(variant, model, device, img_size)
        del base
    return prepared


def _e2e_loader(args: argparse.Namespace, root: Path, batch_size: int, img_size: int, device: torch.device) -> Any:
    """The project's eval data path on the harness's images: build_dataset + build_eval_loader."""
    cfg = load_config(args.config, [*args.overrides, f"data.root={root}", f"data.task={E2E_TASK}",
                                    "data.eval_split=test", "data.augment=", "data.num_classes=null"])
    dataset = build_dataset(cfg.data, cfg.data.eval_split, img_size, is_train=False)
    dataset = Subset(dataset, range(batch_size * args.e2e_batches))
    workers = cfg.data.num_workers if args.workers is None else args.workers
    return build_eval_loader(dataset, batch_size, DistInfo(), workers, pin_memory=device.type == "cuda"), workers


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every variant at every batch size and return the JSON-ready report."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = _settings(args.settings)
    ref_cfg = load_setting_config(args, REFERENCE)
    img_size = ref_cfg.model.img_size
    load_start = os.getloadavg()
    probe = build(args, REFERENCE, device)
    args.variants = _variants(args, settings, _has_lora(probe))
    del probe
    prepared = _prepare(args, settings, device, img_size)
    reference = prepared[Variant(REFERENCE)]

    train_variants = [] if args.no_train else [v for v in prepared if not v.folded and not v.compiled]
    steps: dict[tuple[Variant, int], dict[str, Any]] = {}
    peaks: dict[int, dict[str, list[float]]] = {}
    loads: dict[int, list[float]] = {}
    e2e_root = Path(args.e2e_dir or tempfile.mkdtemp(prefix="pyra_bench_"))
    workers = None
    try:
        if not args.no_e2e:
            write_vtab_images(e2e_root, E2E_TASK, max(args.batch_sizes) * args.e2e_batches, args.num_classes,
                              (args.e2e_image_size, args.e2e_image_size), seed=ref_cfg.seed)
        for bs in args.batch_sizes:
            x = torch.randn(bs, 3, img_size, img_size, device=device)

            def infer(p: _Prepared, x: torch.Tensor = x) -> None:
                with torch.no_grad(), autocast_ctx(device, args.precision):
                    p(x)

            for p in prepared.values():   # warm-up (and compilation) outside the timed rounds
                start = time.perf_counter()
                infer(p)
                p.first_call_s[bs] = time.perf_counter() - start
                p.backends[bs] = sdpa_backends(lambda p=p: infer(p), device)
                time_fn(lambda p=p: infer(p), device, warmup=max(args.warmup - 2, 0), runs=0)
                p.times[bs], p.brackets[bs] = [], []
            for v in (train_variants if bs in args.train_batch_sizes else []):
                m = copy.deepcopy(prepared[v].model)
                steps[(v, bs)] = dict(step=make_train_step(m, bs, args.num_classes, img_size, device, args.precision),
                                      times=[])
                time_fn(steps[(v, bs)]["step"], device, warmup=1, runs=0)

            peaks[bs] = {"fp32": [], args.precision: []}
            loads[bs] = []
            keys = list(prepared)

            def peak() -> float:
                return matmul_peak(device, args.peak_size, dtype=PRECISIONS[args.precision], warmup=1, runs=args.runs)

            for rnd in range(args.rounds):
                loads[bs].append(os.getloadavg()[0])
                if args.precision != "fp32":   # the environment's fp32 peak; the precision's is timed per variant
                    peaks[bs]["fp32"].append(matmul_peak(device, args.peak_size, runs=args.runs))
                # Each timing is bracketed by matmul peaks (one after every variant, so each peak closes one
                # timing and opens the next): the machine's speed drifts within a round, and the mean of the
                # peaks on both sides tracks a timing's speed better than either one alone.
                before = peak()
                for key in _rotate(keys, rnd):   # no variant always runs first
                    p = prepared[key]
                    p.times[bs].append(time_fn(lambda p=p: infer(p), device, warmup=0, runs=args.runs))
                    after = peak()
                    p.brackets[bs].append((before, after))
                    before = after
                for v in _rotate([v for v in train_variants if (v, bs) in steps], rnd):
                    s = steps[(v, bs)]
                    s["times"].append(time_fn(s["step"], device, warmup=0, runs=args.train_runs))
            loads[bs].append(os.getloadavg()[0])
            # The round's peak: the median of the peaks measured beside its variants' timings.
            peaks[bs][args.precision] = [statistics.median(p.peaks(bs)[rnd] for p in prepared.values())
                                         for rnd in range(args.rounds)]
            for v in [v for v in train_variants if (v, bs) in steps]:   # free the training copies
                steps[(v, bs)]["step"] = None

            if not args.no_e2e:
                loader, workers = _e2e_loader(args, e2e_root, bs, img_size, device)
                for key in _rotate(keys, args.rounds):
                    prepared[key].e2e[bs] = end_to_end_images_per_s(prepared[key], loader, device, args.precision)

        if args.profile:
            _write_profiles(args, prepared, device, img_size, statistics.median(peaks[args.batch_sizes[0]]["fp32"]))
    finally:
        if not args.e2e_dir:
            shutil.rmtree(e2e_root, ignore_errors=True)

    memory: dict[tuple, float] = {}
    jobs = [(v, bs) for bs in args.batch_sizes for v in train_variants if (v, bs) in steps]
    if jobs and device.type == "cpu":
        memory = _memory_in_subprocesses(args, jobs)
    elif jobs:
        for v, bs in jobs:
            ns = argparse.Namespace(**{**vars(args), "memory_probe": v.setting, "memory_batch": bs,
                                       "memory_attention": v.attention or "mask"})
            memory[(v, bs)] = _memory_probe(ns, device)

    rows = []
    for bs in args.batch_sizes:
        ref_rounds = _round_medians(reference.times[bs])
        ref_step = steps.get((Variant(REFERENCE), bs))
        train_ref = _round_medians(ref_step["times"]) if ref_step else None
        for v, p in prepared.items():
            median_s, spread = _median_over_rounds(p.times[bs])
            rounds = _round_medians(p.times[bs])
            flops = p.counts["fvcore_flops"] + p.counts["attention_macs"]
            row: dict[str, Any] = dict(
                setting=DISPLAY.get(v.setting, v.setting), merging=v.setting, label=v.label, batch_size=bs,
                folded=v.folded, compiled=v.compiled, frozen=v.frozen, attention=v.attention,
                images_per_s=bs / median_s,
                end_to_end_images_per_s=p.e2e[bs]["images_per_s"] if bs in p.e2e else None,
                fvcore_flops=int(p.counts["fvcore_flops"]), torch_flops=int(p.counts["torch_flops"]),
                attention_macs=int(p.counts["attention_macs"]),
                torch_counts_attention=bool(p.counts["torch_counts_attention"]),
                flops=int(flops), gflops=flops / 2 ** 30, params=p.params, trainable=p.trainable,
                ratio_to_plain=statistics.median(r / s for r, s in zip(ref_rounds, rounds)),
                efficiency=statistics.median(efficiency(flops, bs / s, pk) for s, pk in zip(rounds, p.peaks(bs))),
                peak_gflops_rounds=[pk / 1e9 for pk in p.peaks(bs)],
                peak_gflops_bracket_rounds=[[b / 1e9, a / 1e9] for b, a in p.brackets[bs]],
                train_step_s=None, train_ratio=None, train_spread=None, train_round_s=None, peak_mem_mb=None,
                compile_s=max(p.first_call_s[bs] - median_s, 0.0) if v.compiled else None,
                first_call_s=p.first_call_s[bs], sdpa_backends=p.backends[bs],
                e2e_first_batch_s=p.e2e[bs]["first_batch_s"] if bs in p.e2e else None,
                median_s=median_s, spread=spread, round_s=rounds, runs=sum(len(t) for t in p.times[bs]))
            if (v, bs) in steps:
                train = steps[(v, bs)]["times"]
                row["train_step_s"], row["train_spread"] = _median_over_rounds(train)
                row["train_round_s"] = _round_medians(train)
                row["train_ratio"] = statistics.median(r / s for r, s in zip(train_ref, row["train_round_s"]))
                row["peak_mem_mb"] = memory[(v, bs)]
            rows.append(row)

    curve: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        entry = curve.setdefault(row["label"], {"batch_sizes": [], "ratio_to_plain": [], "images_per_s": []})
        entry["batch_sizes"].append(row["batch_size"])
        entry["ratio_to_plain"].append(row["ratio_to_plain"])
        entry["images_per_s"].append(row["images_per_s"])

    all_peaks = [p for bs in args.batch_sizes for p in peaks[bs]["fp32"]]
    env = dict(device=str(device), torch=torch.__version__, timm=timm.__version__, threads=torch.get_num_threads(),
               precision=args.precision, allocator=_allocator_info(args, device), commit=_commit(),
               device_name=device_name(device), python=platform.python_version(),
               peak_gflops=statistics.median(all_peaks) / 1e9,
               peak_gflops_rounds={str(bs): [p / 1e9 for p in peaks[bs]["fp32"]] for bs in args.batch_sizes},
               peak_gflops_precision_rounds={str(bs): [p / 1e9 for p in peaks[bs][args.precision]]
                                             for bs in args.batch_sizes},
               omp_env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
               peak_size=args.peak_size, load_avg_start=load_start[0], load_avg_end=os.getloadavg()[0],
               load_avg_rounds={str(bs): loads[bs] for bs in args.batch_sizes}, cpu_count=os.cpu_count(),
               memory_method=("cuda max_memory_allocated" if device.type == "cuda"
                              else "VmHWM growth of a fresh subprocess per variant"))
    config = dict(config=str(args.config), overrides=list(args.overrides), model=ref_cfg.model.name,
                  peft=ref_cfg.peft.type, num_classes=args.num_classes, img_size=img_size,
                  batch_sizes=list(args.batch_sizes), rounds=args.rounds, runs_per_round=args.runs,
                  train_runs_per_round=args.train_runs, train_batch_sizes=list(args.train_batch_sizes),
                  fold=args.fold, compile=args.compile,
                  attention=list(args.attention), train=not args.no_train, end_to_end=not args.no_e2e,
                  e2e_workers=workers, e2e_batches=args.e2e_batches, e2e_image_size=args.e2e_image_size,
                  pretrained=args.pretrained, command=" ".join(["python scripts/benchmark.py", *args.argv]),
                  timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
    return dict(env=env, config=config, results=rows, speedup_curve=curve)


def _write_profiles(args: argparse.Namespace, prepared: dict[Variant, _Prepared], device: torch.device,
                    img_size: int, peak: float) -> None:
    """Where the time beyond the GEMMs goes, at the first batch size: torch.profiler top-operator tables per
    variant (inference and training) and the time and efficiency of every block."""
    out_dir = args.profile
    out_dir.mkdir(parents=True, exist_ok=True)
    bs = args.batch_sizes[0]
    x = torch.randn(bs, 3, img_size, img_size, device=device)
    for v, p in prepared.items():
        stem = "profile_" + v.label.replace(" ", "_")

        def infer(p: _Prepared = p) -> None:
            with torch.no_grad(), autocast_ctx(device, args.precision):
                p(x)

        (out_dir / f"{stem}_infer.txt").write_text(profile_table(infer, device), encoding="utf-8")
        if not v.compiled:
            (out_dir / f"{stem}_blocks.txt").write_text(
                _block_table(p.model, bs, img_size, device, args.precision, args.runs, peak), encoding="utf-8")
            (out_dir / f"{stem}_gemm.txt").write_text(
                _gemm_share(p.model, bs, img_size, device, args.precision, max(args.runs, 7), args.peak_size, p.counts),
                encoding="utf-8")
        if not v.folded and not v.compiled and not args.no_train:
            step = make_train_step(copy.deepcopy(p.model), bs, args.num_classes, img_size, device, args.precision)
            (out_dir / f"{stem}_train.txt").write_text(profile_table(step, device), encoding="utf-8")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict[str, Any]) -> str:
    """The aligned terminal table of a report."""
    header = ["variant", "batch", "img/s", "e2e img/s", "x plain", "fvcore G", "torch G", "attn G", "eff",
              "train s", "x plain", "mem MiB", "compile s", "spread"]
    lines = [[r["label"], str(r["batch_size"]), _fmt(r["images_per_s"], ".2f"),
              _fmt(r["end_to_end_images_per_s"], ".2f"), _fmt(r["ratio_to_plain"], ".2f"),
              f"{r['fvcore_flops'] / 1e9:.3f}", f"{r['torch_flops'] / 1e9:.3f}", f"{r['attention_macs'] / 1e9:.3f}",
              _fmt(100 * r["efficiency"], ".1f") + "%", _fmt(r["train_step_s"], ".3f"), _fmt(r["train_ratio"], ".2f"),
              _fmt(r["peak_mem_mb"], ".0f"), _fmt(r["compile_s"], ".1f"), _fmt(100 * r["spread"], ".1f") + "%"]
             for r in report["results"]]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    out = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [header, *lines]]
    out.insert(1, "  ".join("-" * w for w in widths))
    e, c = report["env"], report["config"]
    out.insert(0, f"{c['model']} {c['peft']}  {e['precision']}  {c['img_size']}px  {e['device_name']}  "
                  f"{e['threads']} threads  torch {e['torch']}  matmul peak {e['peak_gflops']:.1f} GFLOP/s "
                  f"(fp32, n={e['peak_size']})  load {e['load_avg_start']:.2f}->{e['load_avg_end']:.2f}  "
                  f"commit {e['commit'][:12]}")
    out.append("fvcore G: multiply-adds (1e9) as fvcore sees them; torch G: FlopCounterMode FLOPs (1e9, 2 per "
               "multiply-add); attn G: attention multiply-adds a fused kernel hides from both")
    return "\n".join(out)


def plot_curve(report: dict[str, Any], path: Path) -> Path:
    """Speed-up over plain against batch size, one line per variant (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, entry in report["speedup_curve"].items():
        if label == DISPLAY[REFERENCE]:
            continue
        ax.plot(entry["batch_sizes"], entry["ratio_to_plain"], marker="o", label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ticks = sorted({b for entry in report["speedup_curve"].values() for b in entry["batch_sizes"]})
    ax.set_xticks(ticks, [str(b) for b in ticks])
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s ÷ plain (same round)")
    e, c = report["env"], report["config"]
    ax.set_title(f"{c['model']} {c['peft']}, {e['precision']}, {e['device_name'][:40]}, {e['threads']} threads",
                 fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides (lib.config syntax), anywhere on the command line")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the config every setting starts from")
    p.add_argument("--settings", nargs="+", help=f"subset of {list(MERGING_SETTINGS)} ('plain' = 'none'; "
                                                 f"the reference is always added)")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--pretrained", action="store_true", help="load model.pretrained (default: random weights)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--rounds", type=int, default=3, help="round-robin passes over all variants")
    p.add_argument("--runs", type=int, default=3, help="timed inference batches per variant and round")
    p.add_argument("--train-runs", type=int, default=2, help="timed training steps per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed inference batches per variant (at least 2)")
    p.add_argument("--memory-steps", type=int, default=2, help="training steps the memory probe runs")
    p.add_argument("--peak-size", type=int, default=None, help="matrix size of the peak GEMM (2048 CPU, 8192 CUDA)")
    p.add_argument("--fold", default="both", choices=["both", "no", "yes"], help="LoRA as is and/or folded")
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on", "frozen", "both"],
                   help="eager (off) and/or torch.compile'd (on; frozen: with inductor's freezing, inference only) "
                        "rows; both = off on; the compile time is reported apart")
    p.add_argument("--attention", nargs="+", default=["mask"], choices=["mask", "feature"],
                   help="forms of proportional attention to measure (models.vit.set_size_bias)")
    p.add_argument("--no-train", action="store_true", help="skip the training step and memory measurements")
    p.add_argument("--train-batch-sizes", type=int, nargs="+", default=None,
                   help="the batch sizes with training measurements (default: all of --batch-sizes)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end pass through the data path")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of the end-to-end pass "
                                                             "(default: the config's data.num_workers)")
    p.add_argument("--e2e-batches", type=int, default=3, help="batches of the end-to-end pass (the first untimed)")
    p.add_argument("--e2e-image-size", type=int, default=384, help="edge of the JPEGs the harness writes")
    p.add_argument("--e2e-dir", type=Path, default=None, help="where to write them (default: a temporary folder)")
    p.add_argument("--allocator", default="tuned", choices=["tuned", "default"],
                   help="CPU: 'tuned' keeps freed blocks in glibc's heap (lib.benchmark.tune_cpu_allocator) and, "
                        "run as a script, backs it with transparent huge pages (GLIBC_TUNABLES)")
    p.add_argument("--json", type=Path, default=None, help="default: benchmark_results/<timestamp>.json")
    p.add_argument("--plot", type=Path, default=None, help="speed-up vs batch size PNG (default: next to the JSON)")
    p.add_argument("--profile", type=Path, nargs="?", const=ROOT / "benchmark_results", default=None,
                   help="also write torch.profiler tables (profile_<variant>_*.txt) to this folder")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-attention", default="mask", help=argparse.SUPPRESS)
    args_argv = list(sys.argv[1:] if argv is None else argv)
    # key=value tokens are overrides wherever they stand (also after a multi-value option such as --settings)
    overrides = [a for a in args_argv if "=" in a and not a.startswith("-")]
    args = p.parse_args([a for a in args_argv if a not in overrides])
    args.overrides = overrides
    args.argv = args_argv
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.peak_size is None:
        args.peak_size = 8192 if args.device == "cuda" else 2048
    if args.e2e_batches < 2:
        p.error("--e2e-batches must be at least 2 (the first batch is not timed)")
    args.warmup = max(args.warmup, 2)
    expanded = (c for mode in args.compile for c in (("off", "on") if mode == "both" else (mode,)))
    args.compile = list(dict.fromkeys(expanded))
    if args.train_batch_sizes is None:
        args.train_batch_sizes = list(args.batch_sizes)
    try:
        _settings(args.settings)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.allocator_tuned = args.allocator == "tuned" and tune_cpu_allocator()
    if args.memory_probe:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps({"peak_mem_mb": _memory_probe(args, torch.device(args.device))}))
        return {}
    report = run_benchmark(args)
    print(format_table(report))
    disturbed = [r["label"] + f" @{r['batch_size']}" for r in report["results"]
                 if max(r["spread"], r["train_spread"] or 0.0) > DISTURBED]
    if disturbed:
        print(f"warning: per-round times differ by more than {100 * DISTURBED:.0f}% for {', '.join(disturbed)} "
              f"(load {report['env']['load_avg_start']:.1f}->{report['env']['load_avg_end']:.1f}): the machine "
              f"was busy; re-run when it is quiet")
    path = args.json or ROOT / "benchmark_results" / f"{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    plot = plot_curve(report, args.plot or path.with_suffix(".png"))
    print(f"wrote {plot}")
    return report


def _reexec_with_huge_pages() -> None:
    """Restart this script with glibc's heap on transparent huge pages (a tunable read only at start-up)."""
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
