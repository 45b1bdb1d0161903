"""Visual prompt tuning (VPT, Jia et al., ECCV 2022) that composes with token merging.

``P`` learnable prompt tokens sit right after the class token (and the distillation token, if any), as
in VPT: ``[cls, (dist), prompts, patches]``. *Shallow* prompts are inserted once, before block 0;
*deep* prompts are inserted before block 0 and, before every later block, that block's own prompts
replace the ones that came out of the previous block. The merge treats the class/distillation token and
all prompts as protected leading tokens (``models.tome.bipartite_soft_matching(..., protected=k)``):
they never merge and never receive a merge and keep their positions, so a deep layer replaces exactly
the prompts, and the merging schedule only ever removes patch tokens.

The official PYRA code appends prompts at the end of the sequence and strips "the last P tokens"
later, which merging reorders and merges away; its README warns that PYRA with prompt tuning breaks.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["VisualPrompts", "PROMPT_MODES", "DEFAULT_PROMPT_LENGTH", "add_prompts"]

PROMPT_MODES = ("shallow", "deep")
# VPT tunes the length per task ({1, 5, 10, 50, 100, 200}); 10 is this project's fixed VTAB-1k default.
DEFAULT_PROMPT_LENGTH = 10


class VisualPrompts(nn.Module):
    """The prompt tokens of a ViT: ``tokens`` is L×P×D (L = 1 shallow, the depth for deep).

    ``offset`` is the number of tokens before the prompts (class + distillation token). Initialised
    as VPT: uniform in ±√(6 / (3·p² + D)) for patch size p (Xavier over the patch-embedding fan-in
    3·p² and the width D). Dropout (VPT's prompt dropout) acts on the prompts, per sample.
    """

    param_category = "prompt"

    def __init__(self, num_tokens: int, dim: int, layers: int, offset: int, patch_size: int | tuple[int, int],
                 dropout: float = 0.1) -> None:
        super().__init__()
        if num_tokens <= 0 or dim <= 0 or layers <= 0:
            raise ValueError(f"prompts need num_tokens, dim and layers > 0, got {num_tokens}, {dim}, {layers}")
        self.offset = offset
        self.patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.tokens = nn.Parameter(torch.empty(layers, num_tokens, dim))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def deep(self) -> bool:
        return self.tokens.shape[0] > 1

    def reset_parameters(self) -> None:
        fan_in = 3 * self.patch_size[0] * self.patch_size[1]
        bound = math.sqrt(6.0 / (fan_in + self.tokens.shape[-1]))
        nn.init.uniform_(self.tokens, -bound, bound)

    def _prompts(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.tokens[layer].to(x.dtype).expand(x.shape[0], -1, -1))

    def forward(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """The input of block ``layer``: prompts inserted (layer 0), replaced (deep) or left as they are."""
        o = self.offset
        if layer == 0:
            return torch.cat([x[:, :o], self._prompts(0, x), x[:, o:]], dim=1)
        if layer < self.tokens.shape[0]:
            return torch.cat([x[:, :o], self._prompts(layer, x), x[:, o + self.num_tokens:]], dim=1)
        return x

    def extra_repr(self) -> str:
        mode = "deep" if self.deep else "shallow"
        return f"num_tokens={self.num_tokens}, dim={self.tokens.shape[-1]}, {mode}, offset={self.offset}"


def add_prompts(model: nn.Module, num_tokens: int, mode: str = "shallow", dropout: float = 0.1) -> VisualPrompts:
    """Give a patched timm ViT ``num_tokens`` prompts after its class/distillation token (``model.prompt``).

    Every block then protects the class/distillation token and the prompts from merging.
    """
    if mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt mode {mode!r}; expected one of {PROMPT_MODES}")
    if getattr(model, "prompt", None) is not None:
        raise ValueError("the model already has prompts")
    offset = int(model.cls_token is not None) + int(getattr(model, "dist_token", None) is not None)
    if model.num_prefix_tokens != offset:
        raise ValueError(f"prompts follow the class/distillation token; this model has "
                         f"{model.num_prefix_tokens - offset} other prefix (register) tokens")
    w = model.pos_embed if model.pos_embed is not None else model.patch_embed.proj.weight
    layers = len(model.blocks) if mode == "deep" else 1
    prompts = VisualPrompts(num_tokens, model.embed_dim, layers, offset, model.patch_embed.patch_size, dropout)
    model.prompt = prompts.to(device=w.device, dtype=w.dtype)
    for block in model.blocks:
        block.protected = offset + num_tokens
    return model.prompt
