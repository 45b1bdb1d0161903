"""AdamW with the official parameter groups, plus PYRA's own learning rate, and timm's cosine schedule."""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler

from models.peft import param_category

__all__ = ["param_groups", "build_optimizer", "build_scheduler"]

# Never decayed (facts §5): biases and every 1-D parameter, the position embedding and the special tokens.
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token")


def param_groups(model: nn.Module, weight_decay: float, pyra_lr: float, pyra_weight_decay: float) -> List[Dict]:
    """Three groups of trainable parameters: decay, no-decay, and PYRA with its own lr and weight decay.

    The official optimiser meant to give PYRA ``pyra_lr`` but selected names containing "ssf", so PYRA
    trained at the base lr there; here the group is real (README: differences).
    """
    decay, no_decay, pyra = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param_category(name) == "pyra":
            pyra.append(param)
        elif param.ndim <= 1 or name.endswith(".bias") or name in _NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        {"params": pyra, "weight_decay": pyra_weight_decay, "lr": pyra_lr, "name": "pyra"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, optim_cfg: Any) -> torch.optim.AdamW:
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.pyra_lr, optim_cfg.pyra_weight_decay)
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, sched_cfg: Any, epochs: int) -> CosineLRScheduler:
    """timm cosine decay to ``min_lr`` after a linear warm-up from ``warmup_lr``; each group from its own lr.

    Step it with ``scheduler.step(epoch)`` *before* epoch ``epoch`` so that the epoch trains at lr(epoch).
    """
    return CosineLRScheduler(
        optimizer,
        t_initial=epochs,
        lr_min=sched_cfg.min_lr,
        warmup_t=sched_cfg.warmup_epochs,
        warmup_lr_init=sched_cfg.warmup_lr,
        t_in_epochs=True,
    )
