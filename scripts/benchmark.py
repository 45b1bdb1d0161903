#!/usr/bin/env python
"""Speed, FLOPs, efficiency, training step and memory of the merging settings, in one process, as a JSON record.

Usage::

    python scripts/benchmark.py [--config configs/vit_b16/lora_none.yaml] [key=value ...]
        [--settings none tome_low tome_high pyra_low pyra_high fpet_high diffrate_low ...] [--batch-sizes 1 8 64 256]
        [--device cpu|cuda] [--precision fp32|bf16|fp16] [--threads N] [--rounds 3] [--runs 3]
        [--fold both|no|yes] [--compile off on frozen | both] [--attention mask feature]
        [--no-train] [--no-e2e] [--workers N] [--json PATH] [--plot PATH]

Every model comes from ``lib.build.build_model`` (the config plus the overrides, each setting being the merging
overrides of a row of ``models.backbones.MERGING_SETTINGS`` or a ``<method>_<level>`` of REDUCTION_SETTINGS), with the
seed's random weights unless ``--pretrained``. Variants: LoRA as is and folded (``--fold``), eager and
``torch.compile`` (``frozen``: inductor's freezing, inference only), and the two forms of proportional
attention (``--attention``, ``models.vit.set_size_bias``).

Per batch size, the variants are timed round-robin (each round opens with one large-GEMM peak, and the order
rotates), so drift of the machine hits all alike: images/s is the median of all timed batches; ``× none`` and
efficiency (2 × FLOPs × images/s ÷ the round's peak) are medians of per-round values. Then each variant runs
through the project's eval data path on JPEGs written in the VTAB-1k layout (end-to-end images/s, timed over at
least 4 × workers + 1 batches so the batches prefetched before timing are a minority). Compiled variants are
compiled after ``torch._dynamo.reset()``; their compile time is the first call minus the steady state.
Training (unfolded, eager): one AdamW step per round, and its peak memory (CUDA: ``max_memory_allocated``;
CPU: peak resident-set growth of a fresh subprocess). FLOPs: fvcore (multiply-adds), FlopCounterMode
(2 per multiply-add) and the attention hidden from both inside the fused kernel. SDPA backends come from the
profiler. ``scripts/speed_table.py`` turns the record into tables.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from lib.benchmark import fvcore_analysis, synchronize, time_fn  # noqa: E402
from lib.build import build_model  # noqa: E402
from lib.config import load_config  # noqa: E402
from lib.data import build_dataset  # noqa: E402
from lib.distributed import DistInfo  # noqa: E402
from lib.engine import PRECISIONS, autocast_ctx  # noqa: E402
from lib.loaders import build_eval_loader  # noqa: E402
from models import fold_lora  # noqa: E402
from models.backbones import MERGING_SETTINGS, REDUCTION_SETTINGS  # noqa: E402
from models.vit import set_size_bias  # noqa: E402

REFERENCE = "none"   # every ratio is taken against this setting's eager, unfolded run of the same round
DEFAULT_CONFIG = "configs/vit_b16/lora_none.yaml"
SETTINGS = {**MERGING_SETTINGS, **{f"{method}_{level}": overrides for method, levels in REDUCTION_SETTINGS.items()
                                   for level, overrides in levels.items()}}   # e.g. fpet_high, diffrate_low
E2E_TASK = "benchmark_images"
DISTURBED = 0.10     # relative spread of the per-round medians above which a row is flagged
ROW_FIELDS: dict[str, tuple] = {   # field -> JSON type(s) of every row (None: null allowed)
    "setting": (str,), "batch_size": (int,), "images_per_s": (float,), "end_to_end_images_per_s": (float, None),
    "fvcore_flops": (int,), "torch_flops": (int,), "train_step_s": (float, None), "peak_mem_mb": (float, None),
    "compile_s": (float, None), "efficiency": (float,), "ratio_to_none": (float,),
}
ENV_FIELDS: dict[str, tuple] = {
    "device": (str,), "torch": (str,), "timm": (str,), "threads": (int,), "precision": (str,), "commit": (str,),
    "float32_matmul_precision": (str,), "cuda_matmul_allow_tf32": (bool,), "cudnn_allow_tf32": (bool,),
}
_SDPA_BACKENDS = {   # profiler event -> the kernel scaled_dot_product_attention dispatched to
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
}


# ------------------------------------------------------------------------------------------ measurements
def flop_counts(model: nn.Module, img_size: int, device: torch.device | None = None) -> dict[str, Any]:
    """One image, three ways: fvcore as a user runs it (multiply-adds, ``fvcore_flops``), the attention
    multiply-adds of fused SDPA calls that it does not see (``attention_macs``), and FlopCounterMode's total
    (``torch_flops``, 2 per multiply-add, no LayerNorm; ``torch_counts_attention``: whether it saw the kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    with fvcore_analysis(model, img_size, device) as (analysis, x):
        total = int(analysis.total())
        attention = int(analysis.by_operator().get("scaled_dot_product_attention", 0))
        with FlopCounterMode(display=False) as counter:
            model(x)
    ops = {str(op) for op in counter.get_flop_counts().get("Global", {})}
    return dict(fvcore_flops=total - attention, attention_macs=attention, torch_flops=int(counter.get_total_flops()),
                torch_counts_attention=any("attention" in op for op in ops))


def matmul_peak(device: torch.device, size: int, dtype: torch.dtype | None = None, runs: int = 3) -> float:
    """FLOP/s (2·n³ per product) of an n×n GEMM in ``dtype`` (None: fp32): the practical peak."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype or torch.float32) for _ in range(2))
    return 2.0 * size ** 3 / statistics.median(time_fn(lambda: torch.mm(a, b), device, warmup=1, runs=runs))


def efficiency(flops: float, images_per_s: float, peak_flops: float) -> float:
    """``2 · multiply-adds · images/s ÷ peak FLOP/s`` (the peak counts a multiply-add as two FLOPs)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return 2.0 * flops * images_per_s / peak_flops


def make_train_step(model: nn.Module, batch_size: int, num_classes: int, img_size: int, device: torch.device,
                    precision: str = "fp32") -> Callable[[], None]:
    """One AdamW step (trainable parameters only) on a fixed random batch: forward, cross-entropy, backward."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(num_classes, (batch_size,), device=device)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast_ctx(device, precision):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def _proc_status_kb(field_name: str) -> int:
    text = Path("/proc/self/status").read_text(encoding="ascii")
    return int(re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory growth (MiB) while ``fn`` runs. CUDA: tensors (``max_memory_allocated``). CPU: the resident
    set (``VmHWM`` reset through ``/proc/self/clear_refs``), which counts only pages never touched before:
    run it in a fresh process."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    base = _proc_status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")   # VmHWM := VmRSS (Linux >= 4.0)
    fn()
    return (_proc_status_kb("VmHWM") - base) / 1024


def sdpa_backends(fn: Callable[[], Any], device: torch.device) -> list[str]:
    """The SDPA kernel of every ``scaled_dot_product_attention`` call of one ``fn()``, in call order (empty when
    none shows up as an operator: explicit attention, or a compiled graph that inlined it)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    return [_SDPA_BACKENDS[e.name] for e in events if e.name in _SDPA_BACKENDS]


def write_vtab_images(root: Path, task: str, count: int, num_classes: int, size: tuple[int, int] = (384, 384),
                      seed: int = 0) -> Path:
    """A VTAB-1k task folder of ``count`` JPEGs (smooth colour fields plus noise, so decoding costs like a
    photo's); every split lists every image."""
    import numpy as np
    from PIL import Image

    task_dir = Path(root) / task
    (task_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
    lines = []
    for i in range(count):
        f, phase = rng.uniform(0.005, 0.05, size=(3, 2)), rng.uniform(0, 6.3, size=3)
        base = np.stack([np.sin(f[c, 0] * xx + f[c, 1] * yy + phase[c]) for c in range(3)], axis=-1)
        pixels = np.clip(127.5 * (1 + base) + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(task_dir / f"images/{i:05d}.jpg", quality=90)
        lines.append(f"images/{i:05d}.jpg {i % num_classes}\n")
    for split in ("train800", "val200", "train800val200", "test"):
        (task_dir / f"{split}.txt").write_text("".join(lines), encoding="utf-8")
    (task_dir / "classes.txt").write_text("".join(f"class{c}\n" for c in range(num_classes)), encoding="utf-8")
    return task_dir


@torch.no_grad()
def end_to_end_images_per_s(model: Callable[[torch.Tensor], Any], loader: Any, device: torch.device,
                            precision: str = "fp32") -> dict[str, float]:
    """Images/s of a pass over ``loader`` (decode, resize, normalise in its workers, copy, the model), timed from
    the arrival of the first batch so that starting the workers is left out."""
    start, timed, images = time.perf_counter(), None, 0
    with autocast_ctx(device, precision):
        for batch, _ in loader:
            model(batch.to(device, non_blocking=True))
            if timed is None:   # the first batch: the clock starts when it is done
                synchronize(device)
                timed = time.perf_counter()
            else:
                images += len(batch)
        synchronize(device)
    if images == 0:
        raise ValueError("end-to-end timing needs a loader of at least two batches")
    return {"images_per_s": images / (time.perf_counter() - timed), "first_batch_s": timed - start, "images": images}


def _commit() -> str:
    """HEAD, with "+dirty" when tracked code differs from it (records and Markdown do not count)."""
    try:
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)scripts/speed_records", ":(exclude)*.md"],
                               capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.strip() + ("+dirty" if dirty.strip() else "")


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: hardware, versions, threads, precision and TF32 state, the commit."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").is_file() else ""
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        name = match.group(1).strip() if match else platform.processor() or platform.machine()
    return dict(device=str(device), device_name=name, torch=torch.__version__, timm=timm.__version__,
                python=platform.python_version(), cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                threads=torch.get_num_threads(), cpu_count=os.cpu_count(), precision=args.precision,
                float32_matmul_precision=torch.get_float32_matmul_precision(),
                cuda_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, commit=_commit(), peak_size=args.peak_size,
                omp_env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
                memory_method="cuda max_memory_allocated" if device.type == "cuda" else "VmHWM growth, fresh process")


# ------------------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class Variant:
    """One measured model: a merging setting, LoRA folded or not, compiled (frozen: with inductor's freezing) or
    not, and the form of proportional attention (None where nothing merges)."""

    setting: str
    folded: bool = False
    compiled: bool = False
    attention: str | None = None
    frozen: bool = False

    @property
    def label(self) -> str:
        parts = [self.setting, "feature-attn" if self.attention == "feature" else "", "folded" if self.folded else "",
                 ("compiled frozen" if self.frozen else "compiled") if self.compiled else ""]
        return " ".join(p for p in parts if p)


def setting_overrides(setting: str) -> list[str]:
    """The config overrides of one setting (str values as they are: ``merging.method`` takes the raw text)."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in SETTINGS[setting].items()]


def load_setting_config(args: argparse.Namespace, setting: str) -> Any:
    """The config file, then the user's overrides, then the setting's."""
    return load_config(args.config, [*args.overrides, *setting_overrides(setting)])


def build(args: argparse.Namespace, setting: str, device: torch.device) -> nn.Module:
    """The unfolded model of one setting through ``lib.build.build_model`` (same seed, same backbone weights)."""
    return build_model(load_setting_config(args, setting), args.num_classes, pretrained=args.pretrained).to(device)


def _settings(requested: Sequence[str] | None) -> list[str]:
    """The requested settings in SETTINGS' order (default: MERGING_SETTINGS'), always with the reference."""
    wanted = set(requested or MERGING_SETTINGS)
    unknown = wanted - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; expected some of {list(SETTINGS)}")
    return [s for s in SETTINGS if s in wanted | {REFERENCE}]


def _variants(args: argparse.Namespace, settings: Sequence[str], has_lora: bool) -> list[Variant]:
    folds = {"no": [False], "yes": [True], "both": [False, True]}[args.fold] if has_lora else [False]
    modes = {"off": (False, False), "on": (True, False), "frozen": (True, True)}
    out = [Variant(s, folded, modes[c][0], None if s == REFERENCE else attention, modes[c][1])
           for s in settings for attention in args.attention for folded in folds for c in args.compile]
    out = list(dict.fromkeys(out))   # "none" has one attention form
    return out if Variant(REFERENCE) in out else [Variant(REFERENCE), *out]


@dataclass
class Prepared:
    """A variant ready to time: its eager model, what runs it (compiled or not), FLOPs, and what was measured."""

    variant: Variant
    model: nn.Module
    runner: Callable[[torch.Tensor], Any]
    counts: dict[str, Any]
    times: dict[int, list[list[float]]] = field(default_factory=dict)    # batch -> rounds -> seconds per batch
    first_call_s: dict[int, float] = field(default_factory=dict)
    backends: dict[int, list[str]] = field(default_factory=dict)
    e2e: dict[int, dict[str, float]] = field(default_factory=dict)


def prepare(args: argparse.Namespace, settings: list[str], device: torch.device, img_size: int) -> list[Prepared]:
    """Each variant's model: built once per setting, copied, folded and given its attention form."""
    prepared = []
    for setting in settings:
        base = build(args, setting, device).eval()
        for v in [v for v in args.variants if v.setting == setting]:
            model = fold_lora(copy.deepcopy(base)) if v.folded else copy.deepcopy(base)
            set_size_bias(model, v.attention)
            runner = torch.compile(model, dynamic=False, options={"freezing": True} if v.frozen else None) \
                if v.compiled else model
            prepared.append(Prepared(v, model, runner, flop_counts(model, img_size, device)))
    return prepared


# ------------------------------------------------------------------------------------------ one batch size
def _inference(p: Prepared, x: torch.Tensor, precision: str) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad(), autocast_ctx(x.device, precision):
            p.runner(x)
    return run


def warm_up(args: argparse.Namespace, prepared: list[Prepared], x: torch.Tensor) -> None:
    """First calls (compiling each compiled variant from a clean dynamo state, timed), SDPA backends, warm-up.

    A reset drops the graphs compiled before it, so every variant is warmed again after all first calls."""
    bs = len(x)
    compiled = [p for p in prepared if p.variant.compiled]
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(compiled) + 1)
    for p in prepared:
        if p.variant.compiled:
            torch._dynamo.reset()
        run = _inference(p, x, args.precision)
        p.first_call_s[bs] = time_fn(run, x.device, warmup=0, runs=1)[0]
        p.backends[bs] = sdpa_backends(run, x.device)
    for p in prepared:
        time_fn(_inference(p, x, args.precision), x.device, warmup=args.warmup, runs=0)
        p.times[bs] = []


def time_rounds(args: argparse.Namespace, prepared: list[Prepared], steps: dict[Variant, Any],
                x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Interleaved rounds: a matmul peak, every variant's inference, every training step; the order rotates.
    Returns the peaks (FLOP/s) and the load average of each round."""
    peaks, loads, bs, device = [], [], len(x), x.device
    for rnd in range(args.rounds):
        loads.append(os.getloadavg()[0])
        peaks.append(matmul_peak(device, args.peak_size, PRECISIONS[args.precision], runs=args.runs))
        for p in _rotate(prepared, rnd):
            p.times[bs].append(time_fn(_inference(p, x, args.precision), device, warmup=0, runs=args.runs))
        for v in _rotate(list(steps), rnd):
            steps[v]["times"].append(time_fn(steps[v]["step"], device, warmup=0, runs=args.train_runs))
    return peaks, loads


def train_steps(args: argparse.Namespace, prepared: list[Prepared], bs: int, img_size: int,
                device: torch.device) -> dict[Variant, dict[str, Any]]:
    """A warmed-up training step (on a copy) of every unfolded eager variant, unless ``--no-train``."""
    steps = {}
    for p in [] if args.no_train else [p for p in prepared if not p.variant.folded and not p.variant.compiled]:
        step = make_train_step(copy.deepcopy(p.model), bs, args.num_classes, img_size, device, args.precision)
        time_fn(step, device, warmup=1, runs=0)
        steps[p.variant] = {"step": step, "times": []}
    return steps


def e2e_loader(args: argparse.Namespace, root: Path, bs: int, img_size: int, device: torch.device) -> Any:
    """The project's eval data path over the harness's images: ``build_dataset`` + ``build_eval_loader``."""
    cfg = load_config(args.config, [*args.overrides, f"data.root={root}", f"data.task={E2E_TASK}",
                                    "data.eval_split=test", "data.augment=", "data.num_classes=null"])
    dataset = build_dataset(cfg.data, cfg.data.eval_split, img_size, is_train=False)
    dataset = Subset(dataset, range(bs * (1 + args.e2e_timed)))
    return build_eval_loader(dataset, bs, DistInfo(), args.e2e_workers, pin_memory=device.type == "cuda")


def memory_probe(args: argparse.Namespace, variant: Variant, bs: int, device: torch.device) -> float:
    """Peak memory of two training steps of ``variant``: in this process on CUDA, in a fresh one on CPU."""
    if device.type == "cpu" and not args.memory_probe:
        cmd = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--memory-probe", variant.setting,
               "--memory-batch", str(bs), "--memory-attention", variant.attention or "mask"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe of {variant.label} at batch {bs} failed:\n{proc.stderr}")
        return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mem_mb"])
    model = build(args, variant.setting, device)
    set_size_bias(model, variant.attention)
    img_size = load_setting_config(args, variant.setting).model.img_size
    step = make_train_step(model, bs, args.num_classes, img_size, device, args.precision)
    return peak_memory_mb(lambda: [step() for _ in range(2)], device)


def rows_of_batch(prepared: list[Prepared], steps: dict[Variant, Any], memory: dict[Variant, float],
                  peaks: list[float], bs: int) -> list[dict[str, Any]]:
    """The record's rows of one batch size: medians, per-round ratios to the reference and efficiencies."""
    ref_rounds = _round_medians(next(p for p in prepared if p.variant == Variant(REFERENCE)).times[bs])
    ref_train = _round_medians(steps[Variant(REFERENCE)]["times"]) if Variant(REFERENCE) in steps else None
    rows = []
    for p in prepared:
        v, rounds = p.variant, _round_medians(p.times[bs])
        median_s, spread = _median_and_spread(p.times[bs])
        flops = p.counts["fvcore_flops"] + p.counts["attention_macs"]
        row = dict(setting=v.setting, label=v.label, batch_size=bs, folded=v.folded, compiled=v.compiled,
                   frozen=v.frozen, attention=v.attention, images_per_s=bs / median_s,
                   end_to_end_images_per_s=p.e2e[bs]["images_per_s"] if bs in p.e2e else None,
                   **{k: int(p.counts[k]) for k in ("fvcore_flops", "torch_flops", "attention_macs")},
                   torch_counts_attention=p.counts["torch_counts_attention"], flops=flops, gflops=flops / 2 ** 30,
                   params=sum(t.numel() for t in p.model.parameters()),
                   trainable=sum(t.numel() for t in p.model.parameters() if t.requires_grad),
                   ratio_to_none=statistics.median(r / s for r, s in zip(ref_rounds, rounds)),
                   efficiency=statistics.median(efficiency(flops, bs / s, pk) for s, pk in zip(rounds, peaks)),
                   train_step_s=None, train_ratio=None, train_spread=None, peak_mem_mb=None,
                   compile_s=max(p.first_call_s[bs] - median_s, 0.0) if v.compiled else None,
                   first_call_s=p.first_call_s[bs], sdpa_backends=p.backends[bs], median_s=median_s,
                   spread=spread, round_s=rounds, runs=sum(len(t) for t in p.times[bs]))
        if v in steps:
            train = steps[v]["times"]
            row["train_step_s"], row["train_spread"] = _median_and_spread(train)
            row["train_ratio"] = statistics.median(r / s for r, s in zip(ref_train, _round_medians(train)))
            row["peak_mem_mb"] = memory[v]
        rows.append(row)
    return rows


def _rotate(items: list[Any], shift: int) -> list[Any]:
    shift = shift % len(items) if items else 0
    return items[shift:] + items[:shift]


def _round_medians(times: list[list[float]]) -> list[float]:
    return [statistics.median(rnd) for rnd in times]


def _median_and_spread(times: list[list[float]]) -> tuple[float, float]:
    """Median of all timed runs, and the relative spread of the per-round medians (a disturbance flag)."""
    median, per_round = statistics.median(t for rnd in times for t in rnd), _round_medians(times)
    return median, (max(per_round) - min(per_round)) / median


# ------------------------------------------------------------------------------------------ the run
def measure_batch(args: argparse.Namespace, prepared: list[Prepared], bs: int, img_size: int, device: torch.device,
                  e2e_root: Path | None) -> tuple[list[dict[str, Any]], list[float], list[float]]:
    """Everything at one batch size: warm-up, interleaved rounds, end-to-end pass, training memory."""
    x = torch.randn(bs, 3, img_size, img_size, device=device)
    warm_up(args, prepared, x)
    steps = train_steps(args, prepared, bs, img_size, device)
    peaks, loads = time_rounds(args, prepared, steps, x)
    loads.append(os.getloadavg()[0])
    if e2e_root is not None:
        loader = e2e_loader(args, e2e_root, bs, img_size, device)
        for p in prepared:
            p.e2e[bs] = end_to_end_images_per_s(p.runner, loader, device, args.precision)
    for s in steps.values():
        s["step"] = None   # free the training copies before the memory probes
    memory = {v: memory_probe(args, v, bs, device) for v in steps}
    return rows_of_batch(prepared, steps, memory, peaks, bs), peaks, loads


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every variant at every batch size; the JSON-ready record (env, config, results, speedup_curve)."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    ref_cfg = load_setting_config(args, REFERENCE)
    settings = _settings(args.settings)
    args.variants = _variants(args, settings, has_lora=ref_cfg.peft.type == "lora")
    args.e2e_workers = ref_cfg.data.num_workers if args.workers is None else args.workers
    args.e2e_timed = max(args.e2e_batches, 4 * args.e2e_workers + 1)   # the workers prefetch 2 batches each
    prepared = prepare(args, settings, device, ref_cfg.model.img_size)
    env, rows, peaks, loads = environment(args, device), [], {}, {}
    with tempfile.TemporaryDirectory(prefix="pyra_bench_") as tmp:
        e2e_root = None if args.no_e2e else write_vtab_images(
            Path(tmp), E2E_TASK, max(args.batch_sizes) * (1 + args.e2e_timed), args.num_classes,
            (args.e2e_image_size,) * 2, ref_cfg.seed).parent
        for bs in args.batch_sizes:
            batch_rows, peaks[str(bs)], loads[str(bs)] = measure_batch(args, prepared, bs, ref_cfg.model.img_size,
                                                                       device, e2e_root)
            rows += batch_rows
    env.update(peak_gflops=statistics.median(p for ps in peaks.values() for p in ps) / 1e9,
               peak_gflops_rounds={bs: [p / 1e9 for p in ps] for bs, ps in peaks.items()}, load_avg_rounds=loads)
    return dict(env=env, config=record_config(args, ref_cfg), results=rows, speedup_curve=speedup_curve(rows))


def speedup_curve(rows: list[dict[str, Any]]) -> dict[str, dict[str, list]]:
    """Per variant: its batch sizes with the ratio to none and images/s at each (the plot's data)."""
    fields = (("batch_sizes", "batch_size"), ("ratio_to_none", "ratio_to_none"), ("images_per_s", "images_per_s"))
    return {label: {name: [r[key] for r in rows if r["label"] == label] for name, key in fields}
            for label in dict.fromkeys(r["label"] for r in rows)}


def record_config(args: argparse.Namespace, ref_cfg: Any) -> dict[str, Any]:
    """What was measured and how: the model, the options, the command line and when."""
    e2e = not args.no_e2e
    return dict(config=str(args.config), overrides=list(args.overrides), model=ref_cfg.model.name,
                peft=ref_cfg.peft.type, num_classes=args.num_classes, img_size=ref_cfg.model.img_size,
                batch_sizes=list(args.batch_sizes), rounds=args.rounds, runs_per_round=args.runs,
                train_runs_per_round=args.train_runs, fold=args.fold, compile=args.compile,
                attention=list(args.attention), train=not args.no_train, end_to_end=e2e,
                e2e_workers=args.e2e_workers if e2e else None, e2e_timed_batches=args.e2e_timed if e2e else None,
                e2e_image_size=args.e2e_image_size, pretrained=args.pretrained,
                command=" ".join(["python scripts/benchmark.py", *args.argv]),
                timestamp=datetime.datetime.now().isoformat(timespec="seconds"))


def plot_curve(report: dict[str, Any], path: Path) -> Path:
    """Speed-up over none against batch size, one line per variant (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, entry in report["speedup_curve"].items():
        if label != REFERENCE:
            ax.plot(entry["batch_sizes"], entry["ratio_to_none"], marker="o", label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ticks = sorted({b for entry in report["speedup_curve"].values() for b in entry["batch_sizes"]})
    ax.set_xticks(ticks, [str(b) for b in ticks])
    ax.minorticks_off()
    ax.set(xlabel="batch size", ylabel="images/s ÷ none (same round)")
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
    add = p.add_argument
    add("overrides", nargs="*", metavar="key=value", help="config overrides, anywhere on the command line")
    add("--config", default=DEFAULT_CONFIG, help="the config every setting starts from")
    add("--settings", nargs="+", help=f"subset of {list(SETTINGS)} (default: {list(MERGING_SETTINGS)}; "
        "the reference is always added)")
    add("--num-classes", type=int, default=100)
    add("--pretrained", action="store_true", help="load model.pretrained (default: random weights)")
    add("--device", default="cpu", choices=["cpu", "cuda"])
    add("--precision", default="fp32", choices=list(PRECISIONS))
    add("--batch-sizes", type=int, nargs="+", default=[8])
    add("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add("--rounds", type=int, default=3, help="round-robin passes over all variants")
    add("--runs", type=int, default=3, help="timed inference batches per variant and round")
    add("--train-runs", type=int, default=2, help="timed training steps per variant and round")
    add("--warmup", type=int, default=2, help="untimed inference batches per variant after the first call")
    add("--peak-size", type=int, default=None, help="matrix size of the peak GEMM (2048 CPU, 8192 CUDA)")
    add("--fold", default="both", choices=["both", "no", "yes"], help="LoRA as is and/or folded")
    add("--compile", nargs="+", default=["off"], choices=["off", "on", "frozen", "both"],
        help="eager (off), torch.compile (on), with inductor's freezing (frozen); both = off on")
    add("--attention", nargs="+", default=["mask"], choices=["mask", "feature"],
        help="forms of proportional attention (models.vit.set_size_bias)")
    add("--no-train", action="store_true", help="skip the training step and memory")
    add("--no-e2e", action="store_true", help="skip the end-to-end pass through the data path")
    add("--workers", type=int, default=None, help="DataLoader workers end to end (default: data.num_workers)")
    add("--e2e-batches", type=int, default=2, help="timed end-to-end batches, at least 4 x workers + 1")
    add("--e2e-image-size", type=int, default=384, help="edge of the JPEGs the harness writes")
    add("--json", type=Path, default=None, help="default: benchmark_results/<timestamp>.json")
    add("--plot", type=Path, default=None, help="speed-up vs batch size PNG (default: next to the JSON)")
    for hidden in ("--memory-probe", "--memory-batch", "--memory-attention"):
        add(hidden, default=None, type=int if hidden == "--memory-batch" else str, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]   # also after --settings
    args = p.parse_args([a for a in argv if a not in overrides])
    args.overrides, args.argv = overrides, argv
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    args.peak_size = args.peak_size or (8192 if args.device == "cuda" else 2048)
    args.warmup = max(args.warmup, 1)   # compiled variants compile again here after a later variant's reset
    args.compile = list(dict.fromkeys(c for m in args.compile for c in (("off", "on") if m == "both" else (m,))))
    try:
        _settings(args.settings)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.memory_probe:   # a fresh process: peak memory of one variant's training steps
        if args.threads:
            torch.set_num_threads(args.threads)
        variant = Variant(args.memory_probe, attention=args.memory_attention)
        print(json.dumps({"peak_mem_mb": memory_probe(args, variant, args.memory_batch, torch.device(args.device))}))
        return {}
    report = run_benchmark(args)
    sys.path.insert(0, str(ROOT / "scripts"))
    from speed_table import render

    print(render(report))
    disturbed = [f"{r['label']} @{r['batch_size']}" for r in report["results"]
                 if max(r["spread"], r["train_spread"] or 0.0) > DISTURBED]
    if disturbed:
        print(f"warning: per-round times differ by more than {DISTURBED:.0%} for {', '.join(disturbed)}: "
              f"the machine was busy; re-run when it is quiet")
    path = args.json or ROOT / "benchmark_results" / f"{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path} and {plot_curve(report, args.plot or path.with_suffix('.png'))}")
    return report


if __name__ == "__main__":
    main()
