"""PYRA models: timm ViT backbones with LoRA/Adapter/visual prompts, ToMe token merging and PYRA re-activation.

Public names load on first use (module ``__getattr__``), so ``import models`` and ``models.backbones``
(the pure-Python backbone table that config loading needs) cost no torch or timm start-up.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it
_SOURCES: dict[str, str] = {
    **dict.fromkeys(["ABLATION_SETTINGS", "BACKBONES", "MERGING_SETTINGS", "SCHEDULES", "get_backbone",
                     "named_schedule"], "backbones"),
    **dict.fromkeys(["CheckpointError", "LoadReport", "load_checkpoint", "read_checkpoint", "trainable_state_dict",
                     "unwrap_model"], "checkpoint"),
    **dict.fromkeys(["Adapter", "LoRALinear", "fold_lora", "mark_trainable", "param_categories", "param_report"],
                    "peft"),
    **dict.fromkeys(["VisualPrompts", "add_prompts"], "prompt"),
    **dict.fromkeys(["PYRA", "PYRAVariant", "build_pyra", "parse_pyra"], "pyra"),
    **dict.fromkeys(["REDUCTION_METHODS", "TokenReduction", "get_reduction", "register_reduction"], "reduction"),
    **dict.fromkeys(["ToMe", "bipartite_soft_matching", "merge_source", "merge_wavg", "parse_r"], "tome"),
    **dict.fromkeys(["add_pyra", "apply_patch", "create_model", "resolve_schedule", "set_reduction"], "vit"),
}

__all__ = list(_SOURCES)


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value   # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:   # what static tools see: the same names, imported eagerly
    from .backbones import (  # noqa: F401
        ABLATION_SETTINGS,
        BACKBONES,
        MERGING_SETTINGS,
        SCHEDULES,
        get_backbone,
        named_schedule,
    )
    from .checkpoint import (  # noqa: F401
        CheckpointError,
        LoadReport,
        load_checkpoint,
        read_checkpoint,
        trainable_state_dict,
        unwrap_model,
    )
    from .peft import Adapter, LoRALinear, fold_lora, mark_trainable, param_categories, param_report  # noqa: F401
    from .prompt import VisualPrompts, add_prompts  # noqa: F401
    from .pyra import PYRA, PYRAVariant, build_pyra, parse_pyra  # noqa: F401
    from .reduction import REDUCTION_METHODS, TokenReduction, get_reduction, register_reduction  # noqa: F401
    from .tome import ToMe, bipartite_soft_matching, merge_source, merge_wavg, parse_r  # noqa: F401
    from .vit import add_pyra, apply_patch, create_model, resolve_schedule, set_reduction  # noqa: F401
