"""The one way to build a configured model: ``build_model(cfg, num_classes)`` for train.py, eval.py and every script."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from models import CheckpointError, create_model, load_checkpoint

if TYPE_CHECKING:
    from lib.config import Config

__all__ = ["build_model", "model_kwargs"]

log = logging.getLogger("pyra")


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """``models.create_model`` arguments of a config (everything but the class count).

    The size keys go to a custom ``"vit"`` only (a named backbone's own sizes come from its spec).
    """
    m = cfg.model
    kwargs: dict[str, Any] = dict(
        peft=cfg.peft.type, peft_dim=cfg.peft.dim, peft_dropout=cfg.peft.dropout, peft_init=cfg.peft.init,
        prompt_mode=cfg.peft.prompt_mode, merging=cfg.merging.r, method=cfg.merging.method,
        method_options=cfg.merging.method_options, pyra=cfg.merging.pyra,
        prop_attn=cfg.merging.prop_attn, drop_path_rate=m.drop_path_rate, img_size=m.img_size)
    if m.name == "vit":
        kwargs.update(embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, patch_size=m.patch_size)
    if m.global_pool:
        kwargs["global_pool"] = m.global_pool
    return kwargs


def build_model(cfg: Config, num_classes: int, pretrained: bool = True) -> nn.Module:
    """The configured model with ``model.pretrained`` and then ``model.adapted`` loaded (load reports logged).

    Seeded with ``cfg.seed``, so weights that no file provides (a backbone trained from scratch, fresh
    PEFT/PYRA/head) are the same wherever the model is built.
    """
    torch.manual_seed(cfg.seed)
    with warnings.catch_warnings(record=True) as caught:   # e.g. a schedule clamped by the token count
        warnings.simplefilter("always")
        model = create_model(cfg.model.name, num_classes=num_classes, **model_kwargs(cfg))
    for warning in caught:
        log.warning(f"warning: {warning.message}")
    path = cfg.model.pretrained
    if pretrained and path:
        if not Path(path).is_file():
            raise CheckpointError(f"model.pretrained: {path} not found (see weight/README.md for where each "
                                  f"checkpoint comes from; model.pretrained='' trains from random weights)")
        log.info(load_checkpoint(model, path, kind="pretrained", allow_unused=cfg.model.allow_partial).summary())
    adapted = cfg.model.adapted   # a run's trained PEFT / head (a reduction method's search starts from one)
    if pretrained and adapted:
        if not Path(adapted).is_file():
            raise CheckpointError(f"model.adapted: {adapted} not found (a run's last.pth or best.pth)")
        log.info(load_checkpoint(model, adapted, kind="finetuned").summary())
    return model
