"""Efficiency measurements with the paper's conventions: fvcore FLOPs and images/second.

Units: fvcore counts one multiply-add as one FLOP (the official code prints that total / 2³⁰ as
"GFLOPS"); ``torch.utils.flop_counter.FlopCounterMode`` counts a multiply-add as two FLOPs. Neither sees
the work inside PyTorch's fused CPU attention kernel; ``count_flops`` adds it (``sdpa_flop_jit``) and
``flop_counts`` reports the three numbers side by side. Also here: the machine's matmul peak and the
efficiency against it, the time of one training step and the peak memory of training steps, the SDPA
backend each attention call ran, and the end-to-end rate through the project's data path, for
``scripts/benchmark.py``.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .engine import PRECISIONS, autocast_ctx

__all__ = ["count_flops", "flop_counts", "sdpa_flop_jit", "measure_throughput", "merged_speedup", "tokens_per_layer",
           "time_fn", "autocast_ctx", "efficiency", "matmul_peak", "make_train_step", "measure_train_step",
           "peak_memory_mb", "device_name", "tune_cpu_allocator", "profile_table", "flops_by_block", "time_blocks",
           "sdpa_backends", "write_vtab_images", "end_to_end_images_per_s", "linear_replay"]


_SDPA_OPS = "aten::scaled_dot_product_attention"


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: q·kᵀ and attn·v, as two matmuls count."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    batch_heads = math.prod(q[:-2])
    n, d, s, dv = q[-2], q[-1], k[-2], v[-1]
    return batch_heads * n * s * (d + dv)


def count_flops(model: nn.Module, img_size: int = 224, device: torch.device | None = None) -> int:
    """fvcore's total (multiply-adds) for one image, in eval mode, with fused attention counted."""
    return _flop_counts(model, img_size, device)[0]


def flops_by_block(model: nn.Module, img_size: int = 224, device: torch.device | None = None) -> list[int]:
    """fvcore's multiply-adds of each transformer block for one image (the conventions of ``count_flops``)."""
    by_module = _flop_counts(model, img_size, device)[1]
    return [int(by_module.get(f"blocks.{i}", 0)) for i in range(len(model.blocks))]


@contextlib.contextmanager
def _one_image_analysis(model: nn.Module, img_size: int, device: torch.device | None) -> Iterator[tuple[Any, Any]]:
    """fvcore's analysis of ``model`` on one random image (eval mode, no grad, fused attention counted by
    ``sdpa_flop_jit`` as an operator of its own, tracer chatter off), and that image."""
    from fvcore.nn import FlopCountAnalysis

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.randn(1, 3, img_size, img_size, device=device)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and torch.jit deprecation chatter
            analysis = FlopCountAnalysis(model, x).set_op_handle(_SDPA_OPS, sdpa_flop_jit)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            logging.getLogger("fvcore.nn.jit_analysis").setLevel(logging.ERROR)
            yield analysis, x
    finally:
        model.train(was_training)


def _flop_counts(model: nn.Module, img_size: int, device: torch.device | None) -> tuple[int, dict[str, int]]:
    with _one_image_analysis(model, img_size, device) as (analysis, _):
        return int(analysis.total()), {k: int(v) for k, v in analysis.by_module().items()}


@torch.no_grad()
def time_blocks(model: nn.Module, batch_size: int, img_size: int = 224, device: torch.device | None = None,
                precision: str = "fp32", runs: int = 3) -> list[float]:
    """Median seconds of each transformer block over ``runs`` eval forwards (hooks; synchronised on CUDA)."""
    device = device or next(model.parameters()).device
    times: list[list[float]] = [[] for _ in model.blocks]
    starts: list[float] = [0.0]

    def before(module: nn.Module, args: Any) -> None:
        _sync(device)
        starts[0] = time.perf_counter()

    def after(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            _sync(device)
            times[i].append(time.perf_counter() - starts[0])
        return hook

    hooks = [h for i, b in enumerate(model.blocks)
             for h in (b.register_forward_pre_hook(before), b.register_forward_hook(after(i)))]
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    try:
        with autocast_ctx(device, precision):
            model(x)
            for t in times:
                t.clear()
            for _ in range(runs):
                model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return [statistics.median(t) for t in times]


def linear_replay(model: nn.Module, batch_size: int, img_size: int = 224, device: torch.device | None = None,
                  precision: str = "fp32", runs: int = 3, peak_size: int | None = None,
                  also: type[nn.Module] | None = None) -> dict[str, float]:
    """The model's ``nn.Linear`` GEMMs timed alone, against its whole forward: how much of the time is GEMM.

    One eval forward records every ``nn.Linear`` call's input; ``linear_s`` is then the median time of
    replaying all of them (``F.linear`` with the module's own weight and bias, in order, nothing in
    between) and ``forward_s`` the median forward, the two timed alternately ``runs`` times.
    ``linear_share`` is the median of the per-pair ratios (robust to a machine whose speed drifts between
    pairs); ``1 − linear_share`` is the time of everything else (attention, norms, GELU, merging, copies).
    ``linear_macs`` are the replayed multiply-adds per batch (a LoRA layer's base GEMM and its two
    low-rank ones are separate calls). With ``peak_size``, each pair is followed by a matmul peak
    (``matmul_peak``, the precision's dtype): ``gemm_to_peak`` is the median per-pair ratio of the
    replay's rate to that peak, and ``forward_peak_flop`` the median of forward time × peak (the FLOPs
    the peak does in one forward, so the model's FLOPs divided by it are its efficiency, paired alike).
    No faster attention or merging can lift the model's efficiency above ``gemm_to_peak`` × (model FLOPs
    ÷ GEMM FLOPs), the efficiency of a forward that would be all GEMM time. ``also`` (a module class, e.g.
    ``models.pyra.PYRA``) records those modules' calls too and replays them alone in the same rounds
    (``module(*inputs)``): ``also_s``, and ``also_share`` of the forward, is what that module costs.
    """
    device = device or next(model.parameters()).device
    calls: list[tuple[nn.Linear, torch.Tensor]] = []
    also_calls: list[tuple[nn.Module, tuple[torch.Tensor, ...]]] = []

    def record(module: nn.Module, args: Any, output: Any) -> None:
        calls.append((module, args[0].detach()))

    def record_also(module: nn.Module, args: Any, output: Any) -> None:
        also_calls.append((module, tuple(a.detach() for a in args)))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Linear)]
    if also is not None:
        hooks += [m.register_forward_hook(record_also) for m in model.modules() if isinstance(m, also)]
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    try:
        with torch.no_grad(), autocast_ctx(device, precision):
            model(x)
            for h in hooks:
                h.remove()

            def forward() -> None:
                model(x)

            def replay() -> None:
                for module, inp in calls:
                    F.linear(inp, module.weight, module.bias)

            def replay_also() -> None:
                for module, inputs in also_calls:
                    module(*inputs)

            forward_s, linear_s, also_s, peaks = [], [], [], []
            for _ in range(runs):
                forward_s += time_fn(forward, device, warmup=1, runs=1)
                linear_s += time_fn(replay, device, warmup=1, runs=1)
                if also is not None:
                    also_s += time_fn(replay_also, device, warmup=1, runs=1)
                if peak_size:
                    peaks.append(matmul_peak(device, peak_size, dtype=PRECISIONS[precision],
                                             warmup=1, runs=1))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    macs = sum(inp.numel() // inp.shape[-1] * module.in_features * module.out_features for module, inp in calls)
    result = {"forward_s": statistics.median(forward_s), "linear_s": statistics.median(linear_s),
              "linear_share": statistics.median(g / f for g, f in zip(linear_s, forward_s)),
              "linear_macs": float(macs), "linear_calls": float(len(calls))}
    if also is not None:
        result.update(also_s=statistics.median(also_s), also_calls=float(len(also_calls)),
                      also_share=statistics.median(a / f for a, f in zip(also_s, forward_s)))
    if peaks:
        result["gemm_to_peak"] = statistics.median(2.0 * macs / g / pk for g, pk in zip(linear_s, peaks))
        result["forward_peak_flop"] = statistics.median(f * pk for f, pk in zip(forward_s, peaks))
    return result


def _sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 2, runs: int = 5,
            min_seconds: float = 0.0) -> list[float]:
    """Seconds per call of ``fn`` for ``runs`` timed calls after ``warmup`` (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start_all < min_seconds:
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def measure_throughput(model: nn.Module, batch_size: int, img_size: int = 224, device: torch.device | None = None,
                       precision: str = "fp32", warmup: int = 2, runs: int = 5,
                       min_seconds: float = 0.0) -> dict[str, float]:
    """Eval-mode images/second on random input: the median of timed batches, at the batch actually used."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    try:
        with autocast_ctx(device, precision):
            times = time_fn(lambda: model(x), device, warmup=warmup, runs=runs, min_seconds=min_seconds)
    finally:
        model.train(was_training)
    median = statistics.median(times)
    return {"images_per_s": batch_size / median, "batch_size": batch_size, "median_s": median, "runs": len(times)}


def merged_speedup(model: nn.Module, batch_size: int, img_size: int = 224, device: torch.device | None = None,
                   precision: str = "fp32", rounds: int = 5, runs: int = 3) -> dict[str, Any] | None:
    """Images/s of ``model`` with its merging schedule over the same model with none (``r = 0``).

    The two settings alternate for ``rounds`` rounds so that drift of the machine hits both alike; the
    speed-up is the median of the per-round ratios, and ``spread`` is (max − min) / median of those
    ratios. ``None`` for a model that merges nothing.
    """
    if not any(model.r):
        return None
    schedule, ratios, merged, plain = model.r, [], [], []
    try:
        for _ in range(rounds):
            for r, rates in ((schedule, merged), (0, plain)):
                model.r = r
                rates.append(measure_throughput(model, batch_size, img_size, device, precision, warmup=1,
                                                runs=runs)["images_per_s"])
            ratios.append(merged[-1] / plain[-1])
    finally:
        model.r = schedule
    speedup = statistics.median(ratios)
    return {"speedup": speedup, "spread": (max(ratios) - min(ratios)) / speedup, "ratios": ratios,
            "merged_images_per_s": statistics.median(merged), "plain_images_per_s": statistics.median(plain),
            "batch_size": batch_size, "rounds": rounds}


@torch.no_grad()
def tokens_per_layer(model: nn.Module, img_size: int = 224) -> list[int]:
    """Token count entering each block, and after the last one (the merge schedule actually realised)."""
    device = next(model.parameters()).device
    counts: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda m, args: counts.append(args[0].shape[1])) for b in model.blocks]
    hooks.append(model.norm.register_forward_pre_hook(lambda m, args: counts.append(args[0].shape[1])))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, img_size, img_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return counts


def efficiency(flops: float, images_per_s: float, peak_flops: float) -> float:
    """Fraction of the matmul peak a model sustains: ``2 · fvcore count · images/s ÷ peak FLOP/s``.

    fvcore counts a multiply-add as one FLOP while the peak counts it as two, hence the factor 2.
    """
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return 2.0 * flops * images_per_s / peak_flops


def matmul_peak(device: torch.device, size: int | None = None, dtype: torch.dtype | None = None,
                warmup: int = 2, runs: int = 5) -> float:
    """FLOP/s (2·n³ per product) of a large square GEMM: the practical peak the model is compared with.

    The median of ``runs`` products of n×n matrices, n = 2048 on CPU and 8192 on CUDA by default, at
    the current thread count; ``dtype`` None is fp32 (as ``lib.engine.PRECISIONS`` maps "fp32").
    """
    device = torch.device(device)
    dtype = dtype or torch.float32
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    times = time_fn(lambda: torch.mm(a, b, out=out), device, warmup=warmup, runs=runs)
    return 2.0 * size ** 3 / statistics.median(times)


def make_train_step(model: nn.Module, batch_size: int, num_classes: int, img_size: int = 224,
                    device: torch.device | None = None, precision: str = "fp32",
                    lr: float = 1e-3) -> Callable[[], None]:
    """One optimizer step on a fixed random batch: forward, cross-entropy, backward, AdamW (train mode).

    AdamW holds only the trainable parameters (PEFT, head, PYRA), as in fine-tuning. fp16 runs without
    a gradient scaler: the step costs the same and the loss value does not matter here.
    """
    device = device or next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
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


def measure_train_step(step: Callable[[], None], device: torch.device, warmup: int = 1,
                       runs: int = 3) -> list[float]:
    """Seconds per training step (see ``make_train_step``), synchronised on CUDA."""
    return time_fn(step, device, warmup=warmup, runs=runs)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def tune_cpu_allocator(keep_mb: int = 1024) -> bool:
    """Make glibc keep freed blocks below ``keep_mb`` for reuse instead of unmapping them; True if applied.

    By default glibc serves large blocks with fresh ``mmap``s and gives them back on free, so every
    large activation of every forward is page-faulted (and zeroed by the kernel) anew: about 0.4 GB per
    ViT-B batch of 8, 5% of a CPU forward. This is the usual "use a caching allocator" advice of the
    PyTorch CPU tuning guide (jemalloc/tcmalloc), done in place; the price is a resident set that does
    not shrink after a peak. Call it before the large allocations; it changes no result.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    size = keep_mb * 2 ** 20
    return bool(libc.mallopt(m_mmap_threshold, size)) and bool(libc.mallopt(m_trim_threshold, size))


def _release_cpu_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them), so resident size tracks live memory."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory growth (MiB) while ``fn`` runs, over what was held just before it.

    CUDA: ``max_memory_allocated`` minus ``memory_allocated`` at the start (tensors only, not the
    caching allocator's reserve). CPU: the peak resident set (``VmHWM``, reset through
    ``/proc/self/clear_refs``) minus the resident set at the start, after freed heap pages went back
    to the OS. The CPU number sees everything (tensors, allocator and library workspaces), but only
    memory never touched before: run it in a fresh process, before any other forward/backward.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    _release_cpu_memory()
    base = _proc_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
    fn()
    return (_proc_status_kb("VmHWM") - base) / 1024


def profile_table(fn: Callable[[], Any], device: torch.device, runs: int = 2, row_limit: int = 30) -> str:
    """torch.profiler's top operators (by self time) over ``runs`` calls of ``fn``: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    _sync(device)
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(runs):
            fn()
        _sync(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    by_shape = prof.key_averages(group_by_input_shape=True)
    return (f"{runs} calls, sorted by {sort_by}\n"
            + events.table(sort_by=sort_by, row_limit=row_limit, max_name_column_width=48)
            + "\n\nby input shape\n"
            + by_shape.table(sort_by=sort_by, row_limit=row_limit, max_name_column_width=48,
                             max_shapes_column_width=80))


def device_name(device: torch.device) -> str:
    """A readable name of the accelerator or CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    import platform

    return platform.processor() or platform.machine()



def flop_counts(model: nn.Module, img_size: int = 224, device: torch.device | None = None) -> dict[str, int | bool]:
    """What each counter sees for one image, eval mode, no grad, with its unit:

    - ``fvcore_flops``: ``fvcore.nn.FlopCountAnalysis(model, x).total()`` as a user gets it (multiply-adds);
    - ``attention_macs``: the multiply-adds of ``scaled_dot_product_attention`` calls (q·kᵀ and attn·v),
      which fvcore does not count (``count_flops`` = ``fvcore_flops + attention_macs``);
    - ``torch_flops``: ``FlopCounterMode``'s total (FLOPs: 2 per multiply-add; LayerNorm not counted);
    - ``torch_counts_attention``: whether ``FlopCounterMode`` saw the attention kernel it ran (it has
      formulas for the CUDA flash / memory-efficient kernels, not for the fused CPU one).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with _one_image_analysis(model, img_size, device) as (analysis, x):
        total = int(analysis.total())
        attention = int(analysis.by_operator().get("scaled_dot_product_attention", 0))
        with FlopCounterMode(display=False) as counter:
            model(x)
    counted_ops = {str(op) for op in counter.get_flop_counts().get("Global", {})}
    return dict(fvcore_flops=total - attention, attention_macs=attention, torch_flops=int(counter.get_total_flops()),
                torch_counts_attention=any("attention" in op for op in counted_ops))


# profiler event name -> SDPA backend (the kernel scaled_dot_product_attention dispatched to)
_SDPA_BACKENDS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (overrideable)",
    "aten::_scaled_dot_product_attention_math": "math",
}


def sdpa_backends(fn: Callable[[], Any], device: torch.device) -> list[str]:
    """The SDPA backend of every ``scaled_dot_product_attention`` call of one ``fn()``, in call order
    (one entry per attention layer for a model forward): flash, memory-efficient, cudnn, math, or
    "flash (cpu)". Read from the profiler's operator events; empty when no SDPA call shows up as an
    operator (explicit attention, or a compiled graph that inlined it)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    return [_SDPA_BACKENDS[e.name] for e in sorted(prof.events(), key=lambda e: e.time_range.start)
            if e.name in _SDPA_BACKENDS]


def write_vtab_images(root: str | Any, task: str, count: int, num_classes: int, size: tuple[int, int] = (384, 384),
                      seed: int = 0, quality: int = 90) -> Any:
    """A VTAB-1k style task folder (``<root>/<task>/images/*.jpg``, list files, ``classes.txt``) of ``count``
    JPEGs of ``size`` (width, height): smooth colour fields plus noise, so that decoding costs like a photo's.
    All four list files list every image. Returns the task folder."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    task_dir = Path(root) / task
    (task_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    lines = []
    for i in range(count):
        f = rng.uniform(0.005, 0.05, size=(3, 2))
        phase = rng.uniform(0, 6.3, size=3)
        base = np.stack([np.sin(f[c, 0] * xx + f[c, 1] * yy + phase[c]) for c in range(3)], axis=-1)
        pixels = np.clip(127.5 * (1 + base) + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
        name = f"images/{i:05d}.jpg"
        Image.fromarray(pixels).save(task_dir / name, quality=quality)
        lines.append(f"{name} {i % num_classes}")
    text = "\n".join(lines) + "\n"
    for split in ("train800", "val200", "train800val200", "test"):
        (task_dir / f"{split}.txt").write_text(text, encoding="utf-8")
    (task_dir / "classes.txt").write_text("".join(f"class{c}\n" for c in range(num_classes)), encoding="utf-8")
    return task_dir


@torch.no_grad()
def end_to_end_images_per_s(model: Callable[[torch.Tensor], Any], loader: Any, device: torch.device,
                            precision: str = "fp32") -> dict[str, float]:
    """Images/s of a full pass over ``loader`` (JPEG decode, resize, normalise in its workers, host-to-device
    copy, the model), timed from the arrival of the first batch, so that starting the workers (once per
    pass) is left out; at least two batches are needed. Also the seconds to the first batch."""
    device = torch.device(device)
    start = time.perf_counter()
    first = timed = None
    images = 0
    with autocast_ctx(device, precision):
        for batch, _ in loader:
            if first is None:
                first = time.perf_counter() - start
                model(batch.to(device, non_blocking=True))
                _sync(device)
                timed = time.perf_counter()
                continue
            model(batch.to(device, non_blocking=True))
            images += len(batch)
        _sync(device)
    if timed is None or images == 0:
        raise ValueError("end-to-end timing needs a loader of at least two batches")
    return {"images_per_s": images / (time.perf_counter() - timed), "first_batch_s": first, "images": images}
