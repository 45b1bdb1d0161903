"""Efficiency measurements with the paper's conventions (facts §7): fvcore FLOPs and images/second.

fvcore counts one multiply-add as one FLOP; the official code prints that total / 2³⁰ as "GFLOPS".
"""
from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

__all__ = ["count_flops", "sdpa_flop_jit", "measure_throughput", "tokens_per_layer", "time_fn", "autocast_ctx"]


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: q·kᵀ and attn·v, as two matmuls count."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    batch_heads = math.prod(q[:-2])
    n, d, s, dv = q[-2], q[-1], k[-2], v[-1]
    return batch_heads * n * s * (d + dv)


def count_flops(model: nn.Module, img_size: int = 224, device: Optional[torch.device] = None) -> int:
    """fvcore's total (multiply-adds) for one image, in eval mode, with fused attention counted."""
    from fvcore.nn import FlopCountAnalysis

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.randn(1, 3, img_size, img_size, device=device)
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, x)
            analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            logging.getLogger("fvcore.nn.jit_analysis").setLevel(logging.ERROR)
            return int(analysis.total())
    finally:
        model.train(was_training)


def autocast_ctx(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 2, runs: int = 5,
            min_seconds: float = 0.0) -> List[float]:
    """Seconds per call of ``fn`` for ``runs`` timed calls after ``warmup`` (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start_all < min_seconds:
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def measure_throughput(model: nn.Module, batch_size: int, img_size: int = 224, device: Optional[torch.device] = None,
                       precision: str = "fp32", warmup: int = 2, runs: int = 5,
                       min_seconds: float = 0.0) -> Dict[str, float]:
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


@torch.no_grad()
def tokens_per_layer(model: nn.Module, img_size: int = 224) -> List[int]:
    """Token count entering each block, and after the last one (the merge schedule actually realised)."""
    device = next(model.parameters()).device
    counts: List[int] = []
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
