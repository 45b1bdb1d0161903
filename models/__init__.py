"""PYRA models: timm ViT backbones with LoRA/Adapter, ToMe token merging and PYRA re-activation."""
from .backbones import BACKBONES, SCHEDULES, get_backbone, named_schedule
from .checkpoint import (
    CheckpointError,
    LoadReport,
    load_checkpoint,
    read_checkpoint,
    trainable_state_dict,
    unwrap_model,
)
from .peft import Adapter, LoRALinear, fold_lora, mark_trainable, param_category, param_report
from .pyra import PYRA
from .tome import bipartite_soft_matching, merge_source, merge_wavg, parse_r
from .vit import apply_patch, create_model, resolve_schedule

__all__ = [
    "BACKBONES", "SCHEDULES", "get_backbone", "named_schedule",
    "CheckpointError", "LoadReport", "load_checkpoint", "read_checkpoint", "trainable_state_dict", "unwrap_model",
    "Adapter", "LoRALinear", "fold_lora", "mark_trainable", "param_category", "param_report",
    "PYRA", "bipartite_soft_matching", "merge_source", "merge_wavg", "parse_r",
    "apply_patch", "create_model", "resolve_schedule",
]
