"""One training epoch and an exact (distributed) evaluation."""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from models.reduction import auxiliary_loss

from .distributed import all_reduce_sum, is_main

__all__ = ["PRECISIONS", "autocast_ctx", "EpochState", "NonFiniteLossError", "train_one_epoch", "evaluate"]

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


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stops (train.py says which checkpoint, if any, is kept)."""


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
) -> EpochState:
    """Train until the loader ends or ``should_stop()`` (then ``state.finished`` stays False)."""
    model.train()
    start = time.perf_counter()
    total = state.step + len(loader)
    log_every = max(1, total // 10)  # plain progress lines when there is no terminal for a bar
    for images, targets in _progress(loader, total=len(loader), desc=f"epoch {epoch}"):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast_ctx(device, precision):
            loss = F.cross_entropy(model(images), targets)
            extra = auxiliary_loss(model)   # a reduction method's own term (DiffRate's search: its FLOPs penalty)
            if extra is not None:
                loss = loss + extra
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(f"loss is {loss.item()} at epoch {epoch}, step {state.step}; stopping")
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
        state.step += 1
        state.loss_sum += loss.item() * targets.shape[0]
        state.samples += targets.shape[0]
        if not sys.stderr.isatty() and state.step % log_every == 0:
            log.info(f"epoch {epoch} step {state.step}/{total} loss {loss.item():.4f}")
        if should_stop():
            break
    else:
        state.finished = True
    state.seconds += time.perf_counter() - start
    return state


def _trainable(model: nn.Module):
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over the whole split; sums are reduced over ranks, so the result
    equals a single-process evaluation (each rank sees a disjoint shard, nothing padded)."""
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    for images, targets in _progress(loader, total=len(loader), desc="eval"):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast_ctx(device, precision):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += targets.shape[0]
    loss_sum, correct1, correct5, count = all_reduce_sum([loss_sum, correct1, correct5, count], device)
    if count == 0:
        raise ValueError("evaluation split is empty")
    return {"loss": loss_sum / count, "acc1": 100.0 * correct1 / count, "acc5": 100.0 * correct5 / count,
            "count": int(count)}
