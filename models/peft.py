"""Parameter-efficient modules as in NOAH (which the official PYRA code uses): LoRA on qkv and an Adapter.

Only these modules (or the visual prompts of ``models.prompt``), the classification head(s) and PYRA
train; the backbone stays frozen (NOAH, Zhang et al. 2022, as in the official PYRA code).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

__all__ = [
    "LoRALinear", "Adapter", "QuickGELU", "PEFT_TYPES", "PEFT_INITS", "PARAM_CATEGORIES",
    "add_lora", "add_adapters", "init_peft", "fold_lora", "param_categories", "mark_trainable", "param_report",
    "LoRAProjection",
]

PEFT_TYPES = ("lora", "adapter", "prompt", "none", "full")
PARAM_CATEGORIES = ("backbone", "lora", "adapter", "prompt", "pyra", "reduction", "head")

class QuickGELU(nn.Module):
    """CLIP's GELU approximation ``x·σ(1.702x)``, used by the NOAH adapter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LoRAProjection(nn.Linear):
    """One of LoRA's two low-rank projections (a plain ``nn.Linear``); its class marks it as trainable."""

    param_category = "lora"


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update ``up(down(dropout(x)))``, with no α/rank scaling (NOAH's LoRA).

    It keeps the frozen ``weight``/``bias`` under their original names, so backbone checkpoints load
    unchanged; ``fold()`` returns the plain ``nn.Linear`` with the update merged into its weight.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dropout: float = 0.1, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_down = LoRAProjection(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_up = LoRAProjection(rank, out_features, bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.lora_up.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, dropout: float = 0.1) -> LoRALinear:
        """Wrap an existing layer, sharing (not copying) its weight and bias."""
        w = linear.weight
        lora = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                   dropout=dropout, device=w.device, dtype=w.dtype)
        lora.weight, lora.bias = linear.weight, linear.bias
        return lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ``x W + b + up(down(x))`` with no separate sum: the bias rides on the up projection, and the frozen
        # product accumulates onto that in one ``addmm`` (beta = 1). Same products, so the same FLOP count,
        # but one fewer full-width tensor written and read per call (README "Speed"). ``lora_up``'s weight is
        # used directly, so its own forward (and a hook on it) does not run; fvcore's per-module table puts
        # the up projection's FLOPs under this module.
        update = F.linear(self.lora_down(self.lora_dropout(x)), self.lora_up.weight, self.bias)
        out = torch.addmm(update.reshape(-1, self.out_features), x.reshape(-1, self.in_features), self.weight.t())
        return out.view(update.shape)

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """The equivalent plain layer for inference (dropout is the identity there): an ``nn.Linear``."""
        folded = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                             device=self.weight.device, dtype=self.weight.dtype)
        folded.weight.copy_(self.weight + self.lora_up.weight @ self.lora_down.weight)
        if self.bias is not None:
            folded.bias.copy_(self.bias)
        folded.weight.requires_grad_(self.weight.requires_grad)
        if folded.bias is not None:
            folded.bias.requires_grad_(self.bias.requires_grad)
        return folded

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_down.out_features}"


class Adapter(nn.Module):
    """Bottleneck adapter on the MLP output, inside the residual: ``h + up(dropout(QuickGELU(down(h))))``."""

    param_category = "adapter"

    def __init__(self, dim: int, hidden: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(hidden, dim)
        for linear in (self.down, self.up):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.normal_(linear.bias, std=1e-6)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.dropout(self.act(self.down(h))))


def add_lora(model: nn.Module, rank: int, dropout: float = 0.1) -> None:
    """Put LoRA on every block's fused qkv projection."""
    for block in model.blocks:
        block.attn.qkv = LoRALinear.from_linear(block.attn.qkv, rank, dropout)


def add_adapters(model: nn.Module, hidden: int, dropout: float = 0.1) -> None:
    """Put an Adapter in every block's ``adapter`` slot (after its MLP; ``nn.Identity`` by default)."""
    for block in model.blocks:
        w = block.norm2.weight
        block.adapter = Adapter(w.shape[0], hidden, dropout).to(device=w.device, dtype=w.dtype)


def _peft_linears(model: nn.Module) -> Iterator[nn.Linear]:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            yield module.lora_down
            yield module.lora_up
        elif isinstance(module, Adapter):
            yield module.down
            yield module.up


PEFT_INITS = ("official", "standard")   # peft.init: the modes of init_peft


@torch.no_grad()
def init_peft(model: nn.Module, mode: str = "official") -> None:
    """Initialise the PEFT layers: ``standard`` keeps the module defaults (LoRA up = 0, adapter xavier).

    ``official`` reproduces the released PYRA code, whose model-wide ViT init runs after the PEFT
    modules are built: every LoRA/Adapter Linear ends up trunc_normal(std 0.02) with zero bias.
    """
    if mode not in PEFT_INITS:
        raise ValueError(f"unknown PEFT init {mode!r}; expected one of {PEFT_INITS}")
    if mode == "standard":
        return
    for linear in _peft_linears(model):
        trunc_normal_(linear.weight, std=0.02)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)


@torch.no_grad()
def fold_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA update into its qkv weight, in place; the logits stay the same (in eval mode)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.fold())
    return model


def param_categories(model: nn.Module) -> dict[str, str]:
    """Which part of the model each parameter belongs to, by module type: ``{name: category}``.

    A module class declares its category with a ``param_category`` attribute (LoRA's projections,
    Adapter, visual prompts, PYRA's re-activations, a reduction method's own parameters); the deepest
    declaring module wins. The classifier head(s) are the model's ``head`` / ``head_dist``; every
    other parameter is the backbone's. Names play no part: a module named freely is never frozen
    silently because of its name.
    """
    categories = {name: "backbone" for name, _ in model.named_parameters()}
    heads = {id(getattr(model, h)) for h in ("head", "head_dist") if isinstance(getattr(model, h, None), nn.Module)}
    for prefix, module in model.named_modules():   # parents before children: the deepest declaration wins
        category = "head" if id(module) in heads else getattr(type(module), "param_category", None)
        if category is None:
            continue
        if category not in PARAM_CATEGORIES:
            raise ValueError(f"{type(module).__name__}.param_category is {category!r}; expected one of "
                             f"{PARAM_CATEGORIES}")
        for name, _ in module.named_parameters(prefix=prefix):
            categories[name] = category
    return categories


def mark_trainable(model: nn.Module, peft: str) -> None:
    """Freeze the backbone (unless ``full``); PEFT modules (or prompts), head(s) and PYRA train."""
    if peft not in PEFT_TYPES:
        raise ValueError(f"unknown PEFT type {peft!r}; expected one of {PEFT_TYPES}")
    categories = param_categories(model)
    for name, param in model.named_parameters():
        param.requires_grad_(peft == "full" or categories[name] != "backbone")


def param_report(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Parameter counts by category as ``{category: (total, trainable)}``, plus a ``total`` row."""
    report = {c: [0, 0] for c in PARAM_CATEGORIES}
    categories = param_categories(model)
    for name, param in model.named_parameters():
        row = report[categories[name]]
        row[0] += param.numel()
        row[1] += param.numel() if param.requires_grad else 0
    report["total"] = [sum(r[0] for r in report.values()), sum(r[1] for r in report.values())]
    return {k: (v[0], v[1]) for k, v in report.items()}
