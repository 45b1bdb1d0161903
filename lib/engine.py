"""One training epoch, an exact (distributed) evaluation, and the execution switches they run under
(autocast precision, ``torch.compile`` mode, TF32)."""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from models.reduction import auxiliary_loss

from .distributed import all_reduce_sum, is_main

__all__ = ["PRECISIONS", "COMPILE_MODES", "CHECK_EVERY", "autocast_ctx", "compile_model", "apply_tf32", "tf32_state",
           "EpochState", "NonFiniteLossError", "NonFiniteWatch", "train_one_epoch", "evaluate"]

log = logging.getLogger("pyra")


@dataclass
class EpochState:
    """Where an epoch is: steps done and the running loss sums (enough to resume it mid-way)."""

    step: int = 0
    loss_sum: float = 0.0
    samples: int = 0
    finished: bool = False
    seconds: float = 0.0


# train.precision -> the autocast dtype (None: plain fp32, no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_ctx(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16, nothing for fp32 (``PRECISIONS``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# train.compile -> torch.compile's mode (None: eager). reduce-overhead adds CUDA graphs, which merged models
# need most: their many small kernels (PYRA high launches ~570 per forward) leave the GPU waiting on launches.
COMPILE_MODES: dict[str, str | None] = {"off": None, "default": "default", "reduce-overhead": "reduce-overhead",
                                        "max-autotune": "max-autotune"}


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """``torch.compile(model, mode=...)`` for a ``COMPILE_MODES`` key; ``model`` itself for ``off``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; expected one of {', '.join(COMPILE_MODES)}")
    return model if COMPILE_MODES[mode] is None else torch.compile(model, mode=COMPILE_MODES[mode])


def apply_tf32(enabled: bool) -> dict[str, object]:
    """TF32 for fp32 matrix products and cuDNN convolutions (Ampere+ GPUs) on or off; returns ``tf32_state``."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    return tf32_state()


def tf32_state() -> dict[str, object]:
    """What fp32 GEMMs and convolutions really run with (for logs and benchmark records)."""
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32)}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf on some rank; every rank stops (train.py says which checkpoint, if any, is kept)."""


# Optimizer steps between the host syncs that read the flags (stop, non-finite loss): reading them every
# step would stall the GPU queue each step. A stop takes effect within this many steps.
CHECK_EVERY = 10


class NonFiniteWatch:
    """The first non-finite loss of this process, recorded on the device; ``check`` reads it on every rank."""

    NONE = 2 ** 62  # "no bad step" (exact in float64, above any step)

    def __init__(self, device: torch.device) -> None:
        self.step = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.value = torch.zeros((), dtype=torch.float32, device=device)

    def record(self, loss: torch.Tensor, step: int) -> None:
        first = ~torch.isfinite(loss) & (self.step == self.NONE)
        self.step = torch.where(first, step, self.step)
        self.value = torch.where(first, loss.float(), self.value)

    def check(self, epoch: int) -> None:
        """Raise NonFiniteLossError on every rank with the same message if any rank saw one (a collective)."""
        mine = torch.stack([self.step.double(), self.value.double()])
        rows = [mine]
        if dist.is_initialized():
            rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(rows, mine)
        found = sorted((int(r[0]), rank, float(r[1])) for rank, r in enumerate(rows) if int(r[0]) != self.NONE)
        if found:
            step, rank, value = found[0]
            where = f" on rank {rank}" if len(rows) > 1 else ""
            raise NonFiniteLossError(f"loss is {value} at epoch {epoch}, step {step}{where}; stopping")


def _progress(loader: DataLoader, total: int, desc: str):
    """A progress bar on a terminal (main process), the plain iterator otherwise."""
    if is_main() and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(loader, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return loader


def train_one_epoch(
        model: nn.Module,
        loader: DataLoader,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        epoch: int,
        state: EpochState,
        precision: str = "fp32",
        scaler: torch.amp.GradScaler | None = None,
        clip_grad: float | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        cudagraphs: bool = False,
) -> EpochState:
    """Train until the loader ends or ``should_stop()`` (then ``state.finished`` stays False).

    Nothing reads the GPU each step: the loss sum and the non-finite watch stay on the device, and the
    flags are read every ``CHECK_EVERY`` steps and at the end (before the caller saves anything).
    ``should_stop`` is called only then; it must agree across ranks. ``cudagraphs``: the model is compiled
    with CUDA graphs (``reduce-overhead``), so each step is marked as a new one.
    """
    model.train()
    start = time.perf_counter()
    total = state.step + len(loader)
    log_every = CHECK_EVERY * max(1, round(total / 10 / CHECK_EVERY))  # ~10 progress lines without a terminal
    loss_sum = torch.tensor(state.loss_sum, dtype=torch.float64, device=device)
    watch = NonFiniteWatch(device)
    for images, targets in _progress(loader, total=len(loader), desc=f"epoch {epoch}"):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast_ctx(device, precision):
            loss = F.cross_entropy(model(images), targets)
            extra = auxiliary_loss(model)   # a reduction method's own term (DiffRate's search: its FLOPs penalty)
            if extra is not None:
                loss = loss + extra
        watch.record(loss.detach(), state.step)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(_trainable(model), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(_trainable(model), clip_grad)
            optimizer.step()
        loss_sum += loss.detach().double() * targets.shape[0]
        state.step += 1
        state.samples += targets.shape[0]
        if state.step % CHECK_EVERY == 0:
            watch.check(epoch)
            if not sys.stderr.isatty() and state.step % log_every == 0:
                log.info(f"epoch {epoch} step {state.step}/{total} loss {loss.item():.4f}")
            if should_stop():
                break
    else:
        state.finished = True
    watch.check(epoch)  # before this epoch's state can be saved
    state.loss_sum = loss_sum.item()
    state.seconds += time.perf_counter() - start
    return state


def _trainable(model: nn.Module):
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32",
             cudagraphs: bool = False) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over the whole split; sums are reduced over ranks, so the result
    equals a single-process evaluation (each rank sees a disjoint shard, nothing padded). The sums stay
    on the device until the end (float64: counts are exact). ``cudagraphs`` as for ``train_one_epoch``."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits
    count = 0
    for images, targets in _progress(loader, total=len(loader), desc="eval"):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast_ctx(device, precision):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        sums += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
        count += targets.shape[0]
    loss_sum, correct1, correct5, count = all_reduce_sum([*sums.tolist(), count], device)
    if count == 0:
        raise ValueError("evaluation split is empty")
    return {"loss": loss_sum / count, "acc1": 100.0 * correct1 / count, "acc5": 100.0 * correct5 / count,
            "count": int(count)}
