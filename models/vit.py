"""timm Vision Transformers with ToMe merging, PYRA and PEFT, patched in place (class swap, as ToMe does).

The patched classes change only what merging needs: attention takes the token sizes (proportional
attention) and returns the mean key as the matching metric, blocks merge ``r`` tokens between attention
and MLP, and the model threads ``(x, size, source)`` through its blocks. Everything else is timm's.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

from .backbones import get_backbone, named_schedule
from .peft import PEFT_TYPES, SplitLinear, add_adapters, add_lora, init_peft, mark_trainable
from .pyra import PYRA
from .tome import bipartite_soft_matching, merge_source, merge_wavg, parse_r

__all__ = ["MergingAttention", "MergingBlock", "TokenMergingMixin", "apply_patch", "create_model",
           "resolve_schedule", "Merging"]

Merging = Union[None, str, int, Tuple[int, float], Sequence[int]]


class MergingAttention(Attention):
    """timm attention that adds ``log(size)`` to the logits of each key and also returns the mean key.

    The bias goes to ``scaled_dot_product_attention`` as an additive mask, so the fused kernel still
    runs; ``fused_attn = False`` gives the explicit softmax, the reference for tests.
    """

    def forward(self, x: torch.Tensor, size: Optional[torch.Tensor] = None,
                metric: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attention output and, if ``metric``, the keys averaged over heads (B×N×d) for the matching."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None if size is None else size.log().to(q.dtype).view(B, 1, 1, N)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.proj_drop(self.proj(self.norm(x)))
        return x, k.mean(1) if metric else None


class MergingBlock(Block):
    """Pre-norm block: attention → merge ``r`` tokens (PYRA-re-activated if present) → MLP → adapter."""

    r: int = 0
    layer: int = 0
    prop_attn: bool = True
    trace_source: bool = False
    class_token: bool = True
    distill_token: bool = False

    def forward(
            self,
            x: torch.Tensor,
            size: Optional[torch.Tensor] = None,
            source: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        x_attn, metric = self.attn(self.norm1(x), size if self.prop_attn else None, metric=self.r > 0)
        x = x + self.drop_path1(self.ls1(x_attn))
        if self.r > 0:
            merge, _ = bipartite_soft_matching(metric, self.r, self.class_token, self.distill_token)
            if self.trace_source:
                source = merge_source(merge, x, source)
            x, size = merge_wavg(merge, x, size, pyra=self.pyra)
        x = x + self.adapter(self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))
        return x, size, source


class TokenMergingMixin:
    """Methods a patched ViT gains: a settable ``r`` schedule and a forward that carries token sizes."""

    backbone_name: str = "vit"

    @property
    def r(self) -> List[int]:
        """The per-layer number of tokens each block merges."""
        return [block.r for block in self.blocks]

    @r.setter
    def r(self, value: Merging) -> None:
        schedule = resolve_schedule(value, self.backbone_name, len(self.blocks))
        has_pyra = any(block.pyra is not None for block in self.blocks)
        for block, r in zip(self.blocks, schedule):
            if has_pyra and r > 0 and block.pyra is None:
                raise ValueError(f"layer {block.layer} would merge {r} tokens but has no PYRA module; "
                                 f"rebuild the model with this merging schedule")
            block.r = r

    @property
    def prop_attn(self) -> bool:
        return self.blocks[0].prop_attn

    @prop_attn.setter
    def prop_attn(self, value: bool) -> None:
        for block in self.blocks:
            block.prop_attn = bool(value)

    @property
    def trace_source(self) -> bool:
        return self.blocks[0].trace_source

    @trace_source.setter
    def trace_source(self, value: bool) -> None:
        for block in self.blocks:
            block.trace_source = bool(value)

    def forward_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Tokens after the final norm, their sizes (B×N×1, None if nothing merged) and the source map."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        size = source = None
        for block in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x, size, source = checkpoint(block, x, size, source, use_reentrant=False)
            else:
                x, size, source = block(x, size, source)
        return self.norm(x), size, source

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, size, source = self.forward_tokens(x)
        if self.trace_source:
            self.source = source  # for visualisation (ToMe keeps it in _tome_info["source"])
        if self.global_pool == "avg":
            # Mean over the patches the tokens stand for: weight each merged token by its size.
            x = x[:, self.num_prefix_tokens:]
            if size is None:
                x = x.mean(dim=1)
            else:
                size = size[:, self.num_prefix_tokens:]
                x = (x * size).sum(dim=1) / size.sum(dim=1)
            return self.head(self.head_drop(self.fc_norm(x)))
        return self.forward_head(x)


_PATCHED_CLASSES: dict = {}


def _patched_class(vit_class: type) -> type:
    """``TokenMergingMixin`` on top of the model's own class (VisionTransformer, its DeiT subclass...)."""
    if issubclass(vit_class, TokenMergingMixin):
        return vit_class
    if vit_class not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[vit_class] = type(f"Merging{vit_class.__name__}", (TokenMergingMixin, vit_class), {})
    return _PATCHED_CLASSES[vit_class]


def apply_patch(model: VisionTransformer, trace_source: bool = False, prop_attn: bool = True) -> VisionTransformer:
    """Turn a timm ViT into a merging one in place; with ``model.r = 0`` it computes the same as before."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"apply_patch needs a timm VisionTransformer, got {type(model).__name__}")
    model.__class__ = _patched_class(type(model))
    distill_token = getattr(model, "dist_token", None) is not None
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) not in (Attention, MergingAttention):
            raise TypeError(f"block {i} is {type(block).__name__} with {type(block.attn).__name__}; "
                            f"only timm's standard Block/Attention can be patched")
        if getattr(block.attn, "gate", None) is not None:
            raise TypeError("gated attention is not supported by token merging")
        block.__class__ = MergingBlock
        block.attn.__class__ = MergingAttention
        block.layer = i
        block.r = 0
        block.class_token = model.cls_token is not None
        block.distill_token = distill_token
        block.register_module("pyra", None)
        block.adapter = nn.Identity()
        _split_linears(block)
    model.prop_attn = prop_attn
    model.trace_source = trace_source
    return model


def _split_linears(block: nn.Module) -> None:
    """Give the block's plain Linears ``SplitLinear``'s forward (faster when merging leaves few tokens)."""
    for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc1"), (block.mlp, "fc2")):
        layer = getattr(parent, name, None)
        if type(layer) is nn.Linear:
            layer.__class__ = SplitLinear


def resolve_schedule(merging: Merging, backbone: str, depth: int) -> List[int]:
    """One r per layer from None, ``"low"``/``"high"``, an int, ``(r, inflection)`` or a per-layer list."""
    if merging is None:
        return [0] * depth
    if isinstance(merging, str):
        merging = named_schedule(merging, backbone, depth)
    if isinstance(merging, bool):
        raise ValueError(f"merging must be None, 'low', 'high', an int, (r, inflection) or a list, got {merging}")
    return parse_r(depth, merging)


def add_pyra(model: nn.Module) -> None:
    """Give every merging layer a PYRA module with one row of ``weight_r`` per merged token."""
    dim = model.embed_dim
    for block in model.blocks:
        if block.r > 0:
            block.pyra = PYRA(block.r, dim, layer=block.layer).to(block.norm1.weight.device)


def create_model(
        name: str,
        *,
        num_classes: int,
        peft: str = "lora",
        peft_dim: Optional[int] = None,
        peft_dropout: float = 0.1,
        peft_init: str = "official",
        merging: Merging = None,
        pyra: bool = False,
        prop_attn: bool = True,
        trace_source: bool = False,
        drop_path_rate: float = 0.1,
        img_size: int = 224,
        embed_dim: Optional[int] = None,
        depth: Optional[int] = None,
        num_heads: Optional[int] = None,
        patch_size: Optional[int] = None,
        **kwargs: Any,
) -> VisionTransformer:
    """Build a backbone of the table in ``models.backbones`` (or a custom ``"vit"``), ready to adapt.

    Weights are random: load a pretrained checkpoint with ``models.load_checkpoint``. Only the PEFT
    modules, the head(s) and PYRA are trainable (everything for ``peft="full"``).
    """
    if peft not in PEFT_TYPES:
        raise ValueError(f"unknown peft {peft!r}; expected one of {PEFT_TYPES}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    common = dict(num_classes=num_classes, drop_path_rate=drop_path_rate, img_size=img_size, **kwargs)
    if name == "vit":
        missing = [k for k, v in dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                      patch_size=patch_size).items() if v is None]
        if missing:
            raise ValueError(f"a custom 'vit' needs {', '.join(missing)}")
        model = VisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size,
                                  **common)
        default_dim = 8
    else:
        spec = get_backbone(name)
        model = timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs, **common)
        default_dim = spec.peft_dim
    apply_patch(model, trace_source=trace_source, prop_attn=prop_attn)
    model.backbone_name = name

    dim = default_dim if peft_dim is None else peft_dim
    if peft in ("lora", "adapter") and dim <= 0:
        raise ValueError(f"peft_dim must be positive, got {dim}")
    if peft == "lora":
        add_lora(model, dim, peft_dropout)
    elif peft == "adapter":
        add_adapters(model, dim, peft_dropout)
    init_peft(model, peft_init)

    model.r = merging
    if pyra:
        if not any(model.r):
            raise ValueError("PYRA re-activates merged tokens: it needs a merging schedule (merging is None or 0)")
        add_pyra(model)
    mark_trainable(model, peft)
    return model
