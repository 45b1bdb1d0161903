"""PYRA models: timm ViT backbones with LoRA/Adapter/visual prompts, ToMe token merging and PYRA re-activation."""
from .backbones import (
    ABLATION_SETTINGS,
    BACKBONES,
    MERGING_SETTINGS,
    SCHEDULES,
    get_backbone,
    named_schedule,
)
from .checkpoint import (
    CheckpointError,
    LoadReport,
    load_checkpoint,
    read_checkpoint,
    trainable_state_dict,
    unwrap_model,
)
from .peft import Adapter, LoRALinear, fold_lora, mark_trainable, param_categories, param_report
from .prompt import VisualPrompts, add_prompts
from .pyra import PYRA, PYRAVariant, build_pyra, parse_pyra
from .reduction import REDUCTION_METHODS, TokenReduction, get_reduction, register_reduction
from .tome import ToMe, bipartite_soft_matching, merge_source, merge_wavg, parse_r
from .vit import add_pyra, apply_patch, create_model, resolve_schedule, set_reduction

__all__ = [
    "ABLATION_SETTINGS", "BACKBONES", "MERGING_SETTINGS", "SCHEDULES", "get_backbone", "named_schedule",
    "CheckpointError", "LoadReport", "load_checkpoint", "read_checkpoint", "trainable_state_dict", "unwrap_model",
    "Adapter", "LoRALinear", "fold_lora", "mark_trainable", "param_categories", "param_report",
    "VisualPrompts", "add_prompts", "PYRA", "PYRAVariant", "build_pyra", "parse_pyra",
    "REDUCTION_METHODS", "TokenReduction", "get_reduction", "register_reduction", "ToMe",
    "bipartite_soft_matching", "merge_source", "merge_wavg", "parse_r",
    "add_pyra", "apply_patch", "create_model", "resolve_schedule", "set_reduction",
]
