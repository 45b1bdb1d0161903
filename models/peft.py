"""Parameter-efficient modules as in NOAH (which the official PYRA code uses): LoRA on qkv and an Adapter.

Only these modules, the classification head(s) and PYRA train; the backbone stays frozen (facts §3).
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

__all__ = [
    "linear", "SplitLinear", "LoRALinear", "Adapter", "QuickGELU", "PEFT_TYPES", "PARAM_CATEGORIES",
    "add_lora", "add_adapters", "init_peft", "fold_lora", "param_category", "mark_trainable", "param_report",
]

PEFT_TYPES = ("lora", "adapter", "none", "full")
PARAM_CATEGORIES = ("backbone", "lora", "adapter", "pyra", "head")

# ``linear`` splits CPU GEMMs of at most this many rows (batch × tokens) into one block of output features
# per thread, each block at least this wide (measured on 2 AVX2 cores; 0 rows turns the split off).
SPLIT_MAX_ROWS = 1000
SPLIT_MIN_WIDTH = 256


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``, but a short CPU GEMM runs as a batched GEMM over blocks of output features, one per thread.

    After merging, late layers see few tokens (batch × tokens ≤ ~1000 rows). MKL threads such a GEMM
    poorly (60-95% of the large-GEMM peak on 2 cores, lower the fewer the rows); a batched GEMM gives
    every thread a full-height block of the weight instead (+2 to +12 points). Same result up to float
    rounding, and fvcore counts the same multiply-adds (``lib.benchmark.count_flops``).
    """
    threads = torch.get_num_threads()
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    if (threads < 2 or not 0 < rows <= SPLIT_MAX_ROWS or out_features % threads
            or out_features // threads < SPLIT_MIN_WIDTH or x.device.type != "cpu"
            or x.dtype != torch.float32 or weight.dtype != torch.float32 or not weight.is_contiguous()
            or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    blocks = weight.view(threads, out_features // threads, in_features).transpose(1, 2)
    x3 = x.reshape(1, rows, in_features).expand(threads, rows, in_features)
    y = torch.bmm(x3, blocks) if bias is None else torch.baddbmm(bias.view(threads, 1, -1), x3, blocks)
    return y.transpose(0, 1).reshape(*x.shape[:-1], out_features)


class SplitLinear(nn.Linear):
    """``nn.Linear`` computed by ``linear`` (short CPU GEMMs split per thread); same parameters and state."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class QuickGELU(nn.Module):
    """CLIP's GELU approximation ``x·σ(1.702x)``, used by the NOAH adapter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update ``up(down(dropout(x)))``, with no α/rank scaling (NOAH's LoRA).

    It keeps the frozen ``weight``/``bias`` under their original names, so backbone checkpoints load
    unchanged; ``fold()`` returns the plain ``nn.Linear`` with the update merged into its weight.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dropout: float = 0.1, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_up = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
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
        out = linear(x, self.weight, self.bias)
        z = self.lora_down(self.lora_dropout(x))
        # ``out + lora_up(z)`` accumulated into ``out`` by the GEMM itself (β=1): bitwise the same sum,
        # without a second output-sized tensor and pass. In place is safe: linear saves its input, not
        # its output. fvcore counts it as addmm (``lib.benchmark.count_flops`` registers the handle).
        up = self.lora_up.weight
        out.view(-1, self.out_features).addmm_(z.reshape(-1, z.shape[-1]), up.t().to(out.dtype))
        return out

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """The equivalent plain layer for inference (dropout is the identity there): an ``nn.Linear``."""
        folded = SplitLinear(self.in_features, self.out_features, bias=self.bias is not None,
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
    """Give every block an Adapter after its MLP (blocks call ``self.adapter``, identity by default)."""
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


@torch.no_grad()
def init_peft(model: nn.Module, mode: str = "official") -> None:
    """Initialise the PEFT layers: ``standard`` keeps the module defaults (LoRA up = 0, adapter xavier).

    ``official`` reproduces the released PYRA code, whose model-wide ViT init runs after the PEFT
    modules are built: every LoRA/Adapter Linear ends up trunc_normal(std 0.02) with zero bias.
    """
    if mode == "standard":
        return
    if mode != "official":
        raise ValueError(f"unknown PEFT init {mode!r}; expected 'official' or 'standard'")
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


def param_category(name: str) -> str:
    """Which part of the model a parameter belongs to, from its name."""
    if ".lora_" in name:
        return "lora"
    if ".adapter." in name:
        return "adapter"
    if ".pyra." in name:
        return "pyra"
    if name.startswith(("head.", "head_dist.")):
        return "head"
    return "backbone"


def mark_trainable(model: nn.Module, peft: str) -> None:
    """Freeze the backbone (unless ``full``); PEFT modules, head(s) and PYRA train."""
    if peft not in PEFT_TYPES:
        raise ValueError(f"unknown PEFT type {peft!r}; expected one of {PEFT_TYPES}")
    for name, param in model.named_parameters():
        param.requires_grad_(peft == "full" or param_category(name) != "backbone")


def param_report(model: nn.Module) -> Dict[str, Tuple[int, int]]:
    """Parameter counts by category as ``{category: (total, trainable)}``, plus a ``total`` row."""
    report = {c: [0, 0] for c in PARAM_CATEGORIES}
    for name, param in model.named_parameters():
        row = report[param_category(name)]
        row[0] += param.numel()
        row[1] += param.numel() if param.requires_grad else 0
    report["total"] = [sum(r[0] for r in report.values()), sum(r[1] for r in report.values())]
    return {k: (v[0], v[1]) for k, v in report.items()}
