"""The backbones PYRA adapts, their default PEFT width and their merging schedules (see models/README.md).

One table, so that model creation, config validation and the VTAB configs agree on names,
depths and the per-layer ``r`` lists of the paper's "low" and "high" settings.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BackboneSpec", "BACKBONES", "SCHEDULES", "MERGING_SETTINGS", "MERGING_LABELS", "ABLATION_SETTINGS",
           "ABLATION_LABELS", "REDUCTION_SETTINGS", "get_backbone", "named_schedule", "method_label"]


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one named backbone with timm and what it defaults to."""

    timm_name: str            # timm architecture (built with pretrained=False; weights come from a file)
    depth: int
    embed_dim: int
    num_heads: int
    peft_dim: int             # LoRA rank / Adapter width used by the paper for this backbone
    schedule: str             # key into SCHEDULES
    checkpoint: str           # file name expected under weight/ (see weight/README.md)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    patch_size: int = 16      # side of the square patches of timm_name (a fact of the architecture)


# Schedules of the official code. ViT-S reuses ViT-B's, DeiT-S reuses DeiT-B's and MAE the
# ViT of its size, as the paper's code has none of its own for them.
SCHEDULES: dict[str, dict[str, list[int]]] = {
    "vit_base": {
        "low": [16] * 11 + [10],
        "high": [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3],
    },
    "vit_large": {
        "low": [8] * 23 + [6],
        "high": [20, 19, 18, 17, 15, 13, 13, 12, 10, 9, 8, 6, 6, 4, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1],
    },
    "deit_base": {
        "low": [16] * 6 + [10] * 6,
        "high": [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3],
    },
}

# The paper's merging settings as named config overrides (dotted key -> YAML value), with a label each.
# configs/generate.py writes configs/_base_/merging/<name>.yaml from them and scripts/benchmark.py
# measures these rows; "none" is the unmerged model.
MERGING_SETTINGS: dict[str, dict[str, Any]] = {
    "none": {"merging.method": "tome", "merging.r": None, "merging.pyra": False},   # from any base config
    "tome_low": {"merging.method": "tome", "merging.r": "low", "merging.pyra": False},
    "tome_high": {"merging.method": "tome", "merging.r": "high", "merging.pyra": False},
    "pyra_low": {"merging.method": "tome", "merging.r": "low", "merging.pyra": True},
    "pyra_high": {"merging.method": "tome", "merging.r": "high", "merging.pyra": True},
}
MERGING_LABELS: dict[str, str] = {
    "none": "no token merging", "tome_low": "ToMe, low compression", "tome_high": "ToMe, high compression",
    "pyra_low": "PYRA, low compression", "pyra_high": "PYRA, high compression",
}

# Reduction methods beside ToMe at the compression of ToMe's low / high (fvcore multiply-adds within 5 %):
# method -> {"low": overrides, "high": overrides}. configs/generate.py writes
# configs/vit_b16/lora_<method>_<level>.yaml (ViT-B/16 + LoRA, official recipe) from it.
# FPET merges a whole checkerboard half in each of its layers (models/fpet.py): the official code has one such layer
# (block 6: 13.47 G), so the two levels place three. fvcore, explicit attention, ViT-B/16 + LoRA 8, 100 classes:
# low (blocks 3, 6, 9) 8.739 G = ToMe low -0.9 %; high (blocks 0, 3, 7) 5.075 G = ToMe high -0.4 %.
# DiffRate: every layer after the first keeps a geometric share of the patches (196·ρ^l; ρ = 0.854 low, 0.676
# high), two thirds of each layer's reduction merged and one third pruned, and the last layer keeps 4 (only the
# class token is read after it); models/diffrate.md. A search (merging.diffrate.search) replaces them.
# ToFu: ToMe's own low / high schedules (same matching and clamp, so the same tokens per layer and FLOPs), blocks
# 0-5 pruning and 6-11 merging with MLERP (models/README.md §10).
# DTEM merges as ToMe does in evaluation, with ToMe's schedules; only its embedding (768 -> 64 per merging layer) adds
# multiply-adds: fvcore, explicit attention: low 8.880 G = ToMe low +0.7 %; high 5.138 G = ToMe high +0.8 %.
_DTEM = {"merging.pyra": False, "merging.dtem": {"embed_dim": None, "top_k": 3, "tau1": 0.1, "tau2": 0.1}}
# PiToMe: the official keep ratio (each block keeps ⌊ρ·T⌋ of its T patch tokens; models.pitome.pitome_schedule),
# ρ = 0.875 low, 0.76 high; official margins, ELU alpha and layer kinds; attention without sizes, as the official
# ViT code. fvcore, explicit attention, ViT-B/16 + LoRA 8, 100 classes: low 8.835 G = ToMe low +0.2 %; high
# 5.148 G = ToMe high +1.0 %.
_FPET = {"merging.pyra": False, "merging.fpet": {"refine_dim": 32, "refine_bits": 1, "refine_dropout": 0.1}}
_PITOME = {"merging.pyra": False, "merging.prop_attn": False,
           "merging.pitome": {"margin": 0.75, "alpha": 1.0, "bipartite_layers": "first_half"}}
_TOFU = {"merging.pyra": False, "merging.tofu": {"merge_from": 6, "mlerp": True}}
REDUCTION_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "diffrate": {
        "low": {"merging.method": "diffrate", "merging.diffrate": {
            "prune_kept": [196, 177, 151, 129, 110, 94, 80, 69, 58, 50, 42, 4],
            "merge_kept": [196, 167, 143, 122, 104, 89, 76, 65, 55, 47, 40, 4]}},
        "high": {"merging.method": "diffrate", "merging.diffrate": {
            "prune_kept": [196, 153, 104, 71, 48, 32, 22, 15, 10, 7, 5, 4],
            "merge_kept": [196, 132, 90, 61, 41, 28, 19, 13, 9, 6, 4, 4]}},
    },
    "dtem": {"low": {"merging.method": "dtem", "merging.r": "low", **_DTEM},
             "high": {"merging.method": "dtem", "merging.r": "high", **_DTEM}},
    "fpet": {"low": {"merging.method": "fpet", "merging.r": [0, 0, 0, 98, 0, 0, 49, 0, 0, 25, 0, 0], **_FPET},
             "high": {"merging.method": "fpet", "merging.r": [98, 0, 0, 49, 0, 0, 0, 25, 0, 0, 0, 0], **_FPET}},
    "tofu": {"low": {"merging.method": "tofu", "merging.r": "low", **_TOFU},
             "high": {"merging.method": "tofu", "merging.r": "high", **_TOFU}},
    "pitome": {
        "low": {"merging.method": "pitome", "merging.r": [24, 21, 18, 16, 14, 12, 11, 10, 8, 7, 6, 6], **_PITOME},
        "high": {"merging.method": "pitome", "merging.r": [47, 35, 27, 20, 16, 12, 9, 7, 5, 4, 3, 2], **_PITOME},
    },
}

# The rows of the paper's ablation (ViT-B/16 + LoRA 8, high compression): plain ToMe, PYRA's partial forms
# and two other weight generators (models/pyra.py, formulas in models/README.md). configs/generate.py
# writes configs/vit_b16/ablation/<name>.yaml from them.
_HIGH = {"merging.r": "high"}
ABLATION_SETTINGS: dict[str, dict[str, Any]] = {
    "tome": {**_HIGH, "merging.pyra": False},
    "channel_noact": {**_HIGH, "merging.pyra": {"weights": "channel", "activation": "none"}},
    "channel_sigmoid": {**_HIGH, "merging.pyra": {"weights": "channel", "activation": "sigmoid"}},
    "token_noact": {**_HIGH, "merging.pyra": {"weights": "token", "activation": "none"}},
    "token_sigmoid": {**_HIGH, "merging.pyra": {"weights": "token", "activation": "sigmoid"}},
    "both_noact": {**_HIGH, "merging.pyra": {"weights": "both", "activation": "none"}},
    "pyra": {**_HIGH, "merging.pyra": True},
    "static_matrix": {**_HIGH, "merging.pyra": {"generator": "static"}},
    "gated_mlp": {**_HIGH, "merging.pyra": {"generator": "gated_mlp"}},
}
ABLATION_LABELS: dict[str, str] = {
    "tome": "ToMe + LoRA", "channel_noact": "channel-wise weight only (W_r), no activation",
    "channel_sigmoid": "channel-wise weight only (W_r), sigmoid",
    "token_noact": "token-wise weight only (W_D), no activation",
    "token_sigmoid": "token-wise weight only (W_D), sigmoid", "both_noact": "both weights, no activation",
    "pyra": "PYRA (both weights, sigmoid)", "static_matrix": "static D x r matrix, sigmoid",
    "gated_mlp": "gated-MLP weight generator (8 wide), sigmoid",
}

_MAE = {"global_pool": "avg"}

BACKBONES: dict[str, BackboneSpec] = {
    "vit_small_patch16_224_in21k": BackboneSpec(
        "vit_small_patch16_224", 12, 384, 6, 4, "vit_base", "ViT-S_16.npz"),
    "vit_base_patch16_224_in21k": BackboneSpec(
        "vit_base_patch16_224", 12, 768, 12, 8, "vit_base", "ViT-B_16.npz"),
    "vit_large_patch16_224_in21k": BackboneSpec(
        "vit_large_patch16_224", 24, 1024, 16, 12, "vit_large", "ViT-L_16.npz"),
    "deit_small_distilled_patch16_224": BackboneSpec(
        "deit_small_distilled_patch16_224", 12, 384, 6, 4, "deit_base",
        "deit_small_distilled_patch16_224-649709d9.pth"),
    "deit_base_distilled_patch16_224": BackboneSpec(
        "deit_base_distilled_patch16_224", 12, 768, 12, 8, "deit_base",
        "deit_base_distilled_patch16_224-df68dfff.pth"),
    "mae_vit_base_patch16": BackboneSpec(
        "vit_base_patch16_224", 12, 768, 12, 8, "vit_base", "mae_pretrain_vit_base.pth", _MAE),
    "mae_vit_large_patch16": BackboneSpec(
        "vit_large_patch16_224", 24, 1024, 16, 12, "vit_large", "mae_pretrain_vit_large.pth", _MAE),
}

# A custom ViT ("vit" with explicit sizes) uses the schedule family of its depth, if there is one.
_SCHEDULE_BY_DEPTH = {12: "vit_base", 24: "vit_large"}


def get_backbone(name: str) -> BackboneSpec:
    """The spec of a named backbone; a clear error listing the valid names otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        valid = ", ".join(sorted(BACKBONES) + ["vit"])
        raise ValueError(f"unknown backbone {name!r}; expected one of: {valid}") from None


def named_schedule(schedule: str, backbone: str, depth: int | None = None) -> list[int]:
    """The per-layer r list of ``"low"``/``"high"`` for a backbone (or a custom "vit" of ``depth``)."""
    if backbone == "vit":
        family = _SCHEDULE_BY_DEPTH.get(depth)
        if family is None:
            raise ValueError(
                f"merging schedule {schedule!r} is defined for depth 12 or 24, not a custom depth of "
                f"{depth}; give merging as an int, (r, inflection) or a per-layer list")
    else:
        family = get_backbone(backbone).schedule
    try:
        return list(SCHEDULES[family][schedule])
    except KeyError:
        raise ValueError(f"unknown merging schedule {schedule!r}; expected 'low' or 'high'") from None


def method_label(merging: Any) -> str | None:
    """The reduction method a ``merging`` section names (a mapping, as in a run's config.yaml), as results show
    it: ``none`` (ToMe with an empty ``r``, or any method with an all-zero ``r`` list), ``tome``,
    ``pyra`` (PYRA on ToMe), ``<method>`` (``merging.method``; DiffRate takes its counts from its options, so its
    ``r`` may be null), ``<method>+pyra``; None for anything else (no section)."""
    if not isinstance(merging, Mapping):
        return None
    r, pyra, method = merging.get("r"), merging.get("pyra"), merging.get("method") or "tome"
    if (isinstance(r, list) and not any(r)) or (method == "tome" and not r):
        return "none"
    return "pyra" if pyra and method == "tome" else f"{method}+pyra" if pyra else method
