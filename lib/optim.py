"""AdamW with the official parameter groups, plus PYRA's own learning rate, and timm's cosine schedule."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.scheduler import CosineLRScheduler

from models.peft import param_categories

__all__ = ["param_groups", "build_optimizer", "build_scheduler"]

# Never decayed (timm's convention for ViTs): biases and every 1-D parameter, the position embedding and
# the special tokens.
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token")


def param_groups(model: nn.Module, weight_decay: float, pyra_lr: float, pyra_weight_decay: float) -> list[dict]:
    """Trainable parameters in four groups: decay / no-decay at the base lr, and PYRA's decay / no-decay
    at ``pyra_lr`` (PYRA's weight decay applies to its weight matrices, never to its LayerNorm or biases).
    PYRA's parameters are found by module type (``models.peft.param_categories``), whatever the variant.

    The official optimiser meant to give PYRA ``pyra_lr`` but selected names containing "ssf", so PYRA
    trained at the base lr there; here the groups are real (README: differences).
    """
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "pyra": [], "pyra_no_decay": []}
    categories = param_categories(model)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name.endswith(".bias") or name in _NO_DECAY_NAMES
        if categories[name] == "pyra":
            groups["pyra_no_decay" if exempt else "pyra"].append(param)
        else:
            groups["no_decay" if exempt else "decay"].append(param)
    settings = {"decay": {"weight_decay": weight_decay}, "no_decay": {"weight_decay": 0.0},
                "pyra": {"weight_decay": pyra_weight_decay, "lr": pyra_lr},
                "pyra_no_decay": {"weight_decay": 0.0, "lr": pyra_lr}}
    return [{"params": params, "name": name, **settings[name]} for name, params in groups.items() if params]


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
