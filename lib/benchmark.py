"""What train.py and eval.py report about efficiency, with the paper's conventions: fvcore FLOPs, images/s,
the merged-vs-unmerged speed-up and the tokens each layer holds.

fvcore counts one multiply-add as one FLOP (the official code prints that total / 2³⁰ as "GFLOPS"). It does
not see inside PyTorch's fused attention kernel, so ``count_flops`` adds q·kᵀ and attn·v (``sdpa_flop_jit``).
The speed harness (``scripts/benchmark.py``) builds on these.
"""
from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from .engine import autocast_ctx

__all__ = ["sdpa_flop_jit", "fvcore_analysis", "count_flops", "synchronize", "time_fn", "measure_throughput",
           "merged_speedup", "tokens_per_layer"]


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: q·kᵀ and attn·v, as two matmuls count."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    n, d, s, dv = q[-2], q[-1], k[-2], v[-1]
    return math.prod(q[:-2]) * n * s * (d + dv)


@contextlib.contextmanager
def fvcore_analysis(model: nn.Module, img_size: int = 224,
                    device: torch.device | None = None) -> Iterator[tuple[Any, torch.Tensor]]:
    """fvcore's analysis of ``model`` on one random image (eval mode, no grad, fused attention counted as its own
    operator ``scaled_dot_product_attention``, tracer chatter off), and that image."""
    from fvcore.nn import FlopCountAnalysis

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.randn(1, 3, img_size, img_size, device=device)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and torch.jit deprecation chatter
            analysis = FlopCountAnalysis(model, x).set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            logging.getLogger("fvcore.nn.jit_analysis").setLevel(logging.ERROR)
            yield analysis, x
    finally:
        model.train(was_training)


def count_flops(model: nn.Module, img_size: int = 224, device: torch.device | None = None) -> int:
    """fvcore's total (multiply-adds) for one image, in eval mode, with fused attention counted."""
    with fvcore_analysis(model, img_size, device) as (analysis, _):
        return int(analysis.total())


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 2, runs: int = 5,
            min_seconds: float = 0.0) -> list[float]:
    """Seconds per call of ``fn`` for ``runs`` timed calls (and until ``min_seconds`` have passed) after
    ``warmup`` untimed ones; on CUDA each call is closed by a synchronisation, so it times the kernels."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start_all < min_seconds:
        start = time.perf_counter()
        fn()
        synchronize(device)
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
    schedule, ratios, merged, unmerged = model.r, [], [], []
    try:
        for _ in range(rounds):
            for r, rates in ((schedule, merged), (0, unmerged)):
                model.r = r
                rates.append(measure_throughput(model, batch_size, img_size, device, precision, warmup=1,
                                                runs=runs)["images_per_s"])
            ratios.append(merged[-1] / unmerged[-1])
    finally:
        model.r = schedule
    speedup = statistics.median(ratios)
    return {"speedup": speedup, "spread": (max(ratios) - min(ratios)) / speedup, "ratios": ratios,
            "merged_images_per_s": statistics.median(merged), "plain_images_per_s": statistics.median(unmerged),
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
