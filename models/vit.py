"""timm Vision Transformers with ToMe merging, patched in place (class swap, as ToMe does), and the model builder.

``apply_patch`` changes only what merging needs: attention takes the token sizes (proportional
attention) and hands the reduction method what it needs (the mean key as the matching metric, ...),
and blocks reduce their tokens between attention and MLP through a declared ``reduction`` module
(``models.reduction``; ToMe by default), carrying ``(x, size, source)`` explicitly. timm's ``forward_features``,
``forward_head``, ``forward_intermediates``, ``get_intermediate_layers``, ``reset_classifier`` and
``set_grad_checkpointing`` keep working on the patched model (on merged tokens). PEFT
(``models.peft``), visual prompts (``models.prompt``), the reduction method (``set_reduction``) and
PYRA (``add_pyra``) are set by their own functions; ``create_model`` composes them. The class token,
a distillation token and the prompts are *protected*: they lead the sequence, never merge and keep their positions.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .backbones import get_backbone, named_schedule
from .peft import PEFT_TYPES, add_adapters, add_lora, init_peft, mark_trainable, param_categories
from .prompt import DEFAULT_PROMPT_LENGTH, PROMPT_MODES, add_prompts
from .pyra import PYRAVariant, Reactivation, build_pyra, parse_pyra
from .reduction import DEFAULT_METHOD, TokenReduction, build_reduction, check_options, clamp_schedule, setup_reductions
from .tome import Schedule, ToMe, parse_r

__all__ = ["MergingAttention", "MergingBlock", "TokenMergingMixin", "apply_patch", "add_pyra", "set_reduction",
           "create_model", "resolve_schedule", "Merging", "GLOBAL_POOLS", "any_pyra"]

Merging = None | str | Schedule
# Poolings a merging ViT supports (``forward_head``): "" keeps the backbone's own (timm's default for the
# architecture: the class token; MAE: avg), "token" reads the class token, "avg" is the size-weighted
# average of the merged tokens.
GLOBAL_POOLS = ("", "token", "avg")


class MergingAttention(Attention):
    """timm attention that adds ``log(size)`` to the logits of each key and hands over what a reduction needs.

    ``outputs`` names what to return beside the attention output (``models.reduction.ATTENTION_OUTPUTS``):
    ``"metric"``, the keys averaged over heads (B×N×d, ToMe's matching metric), ``"cls_attn"``, the
    class token's attention over the keys averaged over heads (B×N, computed apart from the fused kernel),
    and ``"features"``, the attention's own input (B×N×C, ``norm1(x)``; DTEM embeds it for its matching).

    Proportional attention, ``softmax(q·kᵀ·scale + log(size_k)) v``, runs in one of two forms
    (``size_bias``; the class default is the form measured faster, see ``SIZE_BIAS_BY_DEVICE``):

    - ``"mask"``: ``log(size)`` reaches ``scaled_dot_product_attention`` as an additive mask;
    - ``"feature"``: no mask. The bias depends only on the key, so it rides along as one extra head
      feature (``size_bias_attention``), which leaves every SDPA kernel eligible (flash on CUDA).

    Both are plain PyTorch and give the same result (``tests/test_attention.py``). ``fused_attn = False``
    (timm's ``set_fused_attn(False)`` before building) gives the explicit softmax, which is also what
    FLOP counters see in full.
    """

    size_bias: str | None = None   # "mask" | "feature"; None: SIZE_BIAS_BY_DEVICE[device type]

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None,
                outputs: frozenset[str] = frozenset()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Attention output and the requested ``outputs`` (a dict, empty when none is asked for)."""
        B, N, _ = x.shape
        features = x
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if self.fused_attn and size is not None and _size_bias_form(self.size_bias, q) == "feature":
            x = size_bias_attention(q, k, v, size.view(B, N), self.scale, dropout_p)
        elif self.fused_attn:
            bias = None if size is None else size.log().to(q.dtype).view(B, 1, 1, N)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if size is not None:
                attn = attn + size.log().to(q.dtype).view(B, 1, 1, N)
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.proj_drop(self.proj(self.norm(x)))
        extra = {}
        if "metric" in outputs:
            extra["metric"] = k.mean(1)
        if "cls_attn" in outputs:
            logits = (q[:, :, :1] * self.scale) @ k.transpose(-2, -1)            # B×H×1×N
            if size is not None:
                logits = logits + size.log().to(q.dtype).view(B, 1, 1, N)
            extra["cls_attn"] = logits.softmax(dim=-1).mean(1)[:, 0]          # B×N
        if "features" in outputs:
            extra["features"] = features                                     # B×N×C, the attention's input
        return x, extra


# The proportional-attention form each device runs by default, chosen by a same-run measurement
# (scripts/benchmark.py --attention mask feature; README "Speed"). CPU: the mask, since PyTorch's CPU
# flash kernel takes an additive mask at no extra cost while a head dim of 65 (or 72, 80) runs it
# 2-3x slower. CUDA: not measured yet, so the mask stays until a measurement says otherwise.
SIZE_BIAS_BY_DEVICE: dict[str, str] = {"cpu": "mask", "cuda": "mask"}
SIZE_BIAS_FORMS = ("mask", "feature")


def _size_bias_form(requested: str | None, q: torch.Tensor) -> str:
    form = requested or SIZE_BIAS_BY_DEVICE.get(q.device.type, "mask")
    if form not in SIZE_BIAS_FORMS:
        raise ValueError(f"size_bias must be one of {SIZE_BIAS_FORMS} or None, got {form!r}")
    return form


def size_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor, scale: float,
                        dropout_p: float = 0.0, multiple: int | None = None) -> torch.Tensor:
    """``softmax(q·kᵀ·scale + log(size_k)) v`` through ``scaled_dot_product_attention`` with no mask.

    ``q``, ``k``, ``v``: B×H×N×D; ``size``: B×N (tokens per key). q gains a constant feature 1 and k
    gains ``log(size) / scale``, so the extra product, scaled by the kernel's ``scale``, is exactly
    ``log(size_k)``. v is zero-padded to the same width (kernels want one head dim) and the output
    sliced back to D. ``multiple`` rounds the width up (default: 8 on CUDA, where the flash kernel
    works on multiples of 8; none on CPU).
    """
    B, H, N, D = q.shape
    if multiple is None:
        multiple = 8 if q.is_cuda else 1
    pad = -(D + 1) % multiple
    one = q.new_ones(()).expand(B, H, N, 1)
    key_bias = (size.log() / scale).to(k.dtype).view(B, 1, N, 1).expand(B, H, N, 1)
    q = F.pad(torch.cat([q, one], dim=-1), (0, pad))
    k = F.pad(torch.cat([k, key_bias], dim=-1), (0, pad))
    v = F.pad(v, (0, 1 + pad))
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)[..., :D]


def set_size_bias(model: nn.Module, form: str | None) -> nn.Module:
    """Run proportional attention of every ``MergingAttention`` of ``model`` as ``"mask"`` or ``"feature"``
    (``None``: the device's default, ``SIZE_BIAS_BY_DEVICE``). Same results; only the speed differs."""
    if form is not None and form not in SIZE_BIAS_FORMS:
        raise ValueError(f"size_bias must be one of {SIZE_BIAS_FORMS} or None, got {form!r}")
    for module in model.modules():
        if isinstance(module, MergingAttention):
            module.size_bias = form
    return model


class MergingBlock(Block):
    """Pre-norm block: attention → ``reduction`` (merge ``r`` tokens; ToMe by default) → MLP → ``adapter``.

    The merge state travels explicitly: ``block(x, size, source)`` returns the new ``(x, size,
    source)``, so hooks, gradient checkpointing, ``torch.compile`` and ``torch.export`` see a pure
    function. ``reduction`` (a ``models.reduction.TokenReduction``) and ``adapter`` (``nn.Identity`` unless
    PEFT puts an Adapter there) are declared submodules; the adapter sits after drop-path, inside the
    residual (NOAH). Usable as timm's ``block_fn`` (attention becomes ``MergingAttention``) or by
    ``apply_patch`` on a built model.
    """

    prop_attn: bool = True
    trace_source: bool = False

    def __init__(self, dim: int, num_heads: int, *args: Any, attn_layer: Any = None, **kwargs: Any) -> None:
        # timm's VisionTransformer hands its own default attention class to block_fn: merging needs its subclass.
        if attn_layer is None or attn_layer is Attention:
            attn_layer = MergingAttention
        super().__init__(dim, num_heads, *args, attn_layer=attn_layer, **kwargs)
        self.declare_slots()

    def declare_slots(self, protected: int = 1) -> None:
        """The per-block modules a merging block always has: the reduction method (ToMe, r = 0) and the adapter."""
        if not isinstance(getattr(self, "adapter", None), nn.Module):
            self.adapter = nn.Identity()
        if not isinstance(getattr(self, "reduction", None), TokenReduction):
            self.reduction = ToMe(0, protected=protected, dim=self.norm1.weight.shape[0])

    @property
    def r(self) -> int:
        """Tokens this block's schedule asks its reduction method to remove."""
        return self.reduction.r

    @r.setter
    def r(self, value: int) -> None:
        self.reduction.r = int(value)

    @property
    def protected(self) -> int:
        """Leading tokens that are never reduced: class (+ distillation) token (+ prompts)."""
        return self.reduction.protected

    @protected.setter
    def protected(self, value: int) -> None:
        self.reduction.protected = int(value)

    def forward(
            self, x: torch.Tensor, size: torch.Tensor | None = None, source: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        reduction = self.reduction
        needs = reduction.needs if reduction.active else frozenset()
        x_attn, extra = self.attn(self.norm1(x), size if self.prop_attn else None, outputs=needs)
        x = x + self.drop_path1(self.ls1(x_attn))
        if reduction.active:
            x, size, source = reduction(x, size, source, trace_source=self.trace_source, **extra)
        return x + self.adapter(self.drop_path2(self.ls2(self.mlp(self.norm2(x))))), size, source


class TokenMergingMixin:
    """What a patched ViT gains: a settable ``r`` schedule, the merge state through the blocks, and
    timm's feature API on merged tokens (size-weighted average pooling, ``forward_intermediates``)."""

    @property
    def r(self) -> list[int]:
        """The per-layer number of tokens each block merges."""
        return [block.r for block in self.blocks]

    @r.setter
    def r(self, value: Schedule) -> None:
        """An int, ``(r, inflection)`` or a per-layer list, as in ToMe (``models.resolve_schedule`` for names)."""
        schedule = parse_r(len(self.blocks), value)
        has_pyra = any_pyra(self)
        for i, (block, r) in enumerate(zip(self.blocks, schedule)):
            if has_pyra and r > 0 and _pyra_of(block) is None and not block.reduction.prunes:
                raise ValueError(f"layer {i} would merge {r} tokens but has no PYRA module; "
                                 f"rebuild the model with this merging schedule")
        for block, r in zip(self.blocks, schedule):
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

    @property
    def num_prompt_tokens(self) -> int:
        """Visual prompt tokens after the class/distillation token (0 without prompts)."""
        prompt = getattr(self, "prompt", None)
        return 0 if prompt is None else prompt.num_tokens

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

    def _block_input(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Prompts inserted before block 0 and, if deep, replaced by block ``layer``'s own before later blocks."""
        prompt = getattr(self, "prompt", None)
        return x if prompt is None else prompt(x, layer)

    def _drop_prompts(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_prompt_tokens
        if not p:
            return x
        o = self.num_prefix_tokens
        return torch.cat([x[:, :o], x[:, o + p:]], dim=1)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Tokens after the final norm, their sizes (B×N×1; None if nothing merged) and the source map.

        With prompts the tokens are ``[cls, (dist), prompts, patch tokens]``; each prompt stays its own
        and only source.
        """
        x = self._stem(x)
        size = source = None
        for i, block in enumerate(self.blocks):
            x = self._block_input(x, i)
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x, size, source = checkpoint(block, x, size, source, use_reentrant=False)
            else:
                x, size, source = block(x, size, source)
        return self.norm(x), size, source

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        """timm's ``forward_features``: the (merged) tokens after the final norm."""
        _no_mask(attn_mask, is_causal)
        return self.forward_tokens(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, size: torch.Tensor | None = None) -> torch.Tensor:
        """timm's ``forward_head``; ``size`` (from ``forward_tokens``) weights merged tokens in average pooling.

        Prompt tokens are dropped first: no pooling sees them (the class token is read as it is).
        """
        if size is None and self.global_pool in ("avg", "avgmax") and x.shape[1] != self._num_input_tokens():
            raise ValueError("average pooling of merged tokens needs their sizes: call model(x), or "
                             "forward_head(x, size=size) with (x, size, _) = model.forward_tokens(images)")
        x = self._drop_prompts(x)
        size = None if size is None else self._drop_prompts(size)
        if size is not None and self.global_pool == "avg" and self.attn_pool is None:
            skip = 0 if self.pool_include_prefix else self.num_prefix_tokens
            x = (x[:, skip:] * size[:, skip:]).sum(dim=1) / size[:, skip:].sum(dim=1)
            x = self.head_drop(self.fc_norm(x))
            return x if pre_logits else self.head(x)
        return super().forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        x, size, source = self.forward_tokens(x)
        if self.trace_source:
            self.source = source  # for visualisation (ToMe keeps it in _tome_info["source"])
        return self.forward_head(x, size=size)

    def _num_input_tokens(self) -> int:
        """Tokens entering block 0: patches, class/distillation token and prompts."""
        return self.patch_embed.num_patches + self.num_prefix_tokens + self.num_prompt_tokens

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: torch.Tensor | None = None,
            is_causal: bool = False,
    ) -> Any:
        """timm's ``forward_intermediates``; after a merge the intermediates are merged tokens (``'NLC'`` only).

        Prompt tokens are in neither the intermediates nor the prefix tokens (class/distillation token).
        """
        _no_mask(attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = _take_indices(len(self.blocks), indices)
        if output_fmt == "NCHW" and any(self.r[:max_index + 1]):
            raise ValueError("merged tokens no longer form a spatial grid: use output_fmt='NLC' (or "
                             "get_intermediate_layers(..., reshape=False)), or set model.r = 0")
        height, width = x.shape[-2:]
        x = self._stem(x)
        size = source = None
        intermediates = []
        for i, block in enumerate(self.blocks[:max_index + 1] if stop_early else self.blocks):
            x = self._block_input(x, i)
            x, size, source = block(x, size, source)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, :self.num_prefix_tokens] for y in intermediates] if self.num_prefix_tokens else None
        intermediates = [y[:, self.num_prefix_tokens + self.num_prompt_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            h, w = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefix is not None:
            intermediates = list(zip(intermediates, prefix))
        return intermediates if intermediates_only else (self.norm(x), intermediates)


def _no_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("a token-merging ViT takes no attention mask: merging changes the sequence")


def _take_indices(num_blocks: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's convention for ``forward_intermediates``: None = every block, n = the last n, a list = those
    (negative from the end). Returns the indices and the largest one."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices={indices}: expected 1 to {num_blocks} blocks")
        take = list(range(num_blocks - indices, num_blocks))
    else:
        take = [num_blocks + i if i < 0 else i for i in indices]
        if not take or any(not 0 <= i < num_blocks for i in take):
            raise ValueError(f"indices={list(indices)}: expected block indices in [-{num_blocks}, {num_blocks})")
    return take, max(take)


def _pyra_of(block: nn.Module) -> Reactivation | None:
    return next((m for m in block.reduction.modules() if isinstance(m, Reactivation)), None)


def any_pyra(model: nn.Module) -> bool:
    """Whether any block of ``model`` has a PYRA re-activation (of any variant)."""
    return any(isinstance(m, Reactivation) for m in model.modules())


_PATCHED_CLASSES: dict = {}


def _patched_class(vit_class: type) -> type:
    """``TokenMergingMixin`` on top of the model's own class (VisionTransformer, its DeiT subclass...)."""
    if issubclass(vit_class, TokenMergingMixin):
        return vit_class
    if vit_class not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[vit_class] = type(f"Merging{vit_class.__name__}", (TokenMergingMixin, vit_class), {})
    return _PATCHED_CLASSES[vit_class]


def apply_patch(model: VisionTransformer, trace_source: bool = False, prop_attn: bool = True) -> VisionTransformer:
    """Turn a timm ViT into a merging one in place (ToMe's contract); with ``model.r = 0`` it computes the same."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"apply_patch needs a timm VisionTransformer, got {type(model).__name__}")
    for i, block in enumerate(model.blocks):
        if type(block) not in (Block, MergingBlock) or type(block.attn) not in (Attention, MergingAttention):
            raise TypeError(f"block {i} is {type(block).__name__} with {type(block.attn).__name__}; "
                            f"only timm's standard Block/Attention can be patched")
        if getattr(block.attn, "gate", None) is not None:
            raise TypeError("gated attention is not supported by token merging")
    model.__class__ = _patched_class(type(model))
    protected = (int(model.cls_token is not None) + int(getattr(model, "dist_token", None) is not None)
                 + model.num_prompt_tokens)
    for block in model.blocks:
        block.__class__ = MergingBlock
        block.attn.__class__ = MergingAttention
        block.declare_slots(protected)
        block.r = 0
        block.protected = protected
    model.prop_attn = prop_attn
    model.trace_source = trace_source
    return model


def resolve_schedule(merging: Merging, backbone: str, depth: int) -> list[int]:
    """One r per layer from None, ``"low"``/``"high"``, an int, ``(r, inflection)``/mapping or a per-layer list."""
    if merging is None:
        return [0] * depth
    if isinstance(merging, str):
        merging = named_schedule(merging, backbone, depth)
    return parse_r(depth, merging)


def effective_schedule(model: VisionTransformer, schedule: Sequence[int]) -> list[int]:
    """``schedule`` as the blocks' reduction methods will really apply it to this model's token count.

    Each method clamps its own layer (``TokenReduction.max_reduction``); only unprotected tokens count:
    prompts add tokens to every layer but never room to merge.
    """
    saved = model.r
    model.r = list(schedule)
    try:
        return clamp_schedule([block.reduction for block in model.blocks], model._num_input_tokens())
    finally:
        model.r = saved


def set_reduction(model: VisionTransformer, method: str = DEFAULT_METHOD, options: Any = None) -> None:
    """Give every block a fresh reduction module of ``method`` (its current ``r`` and protected tokens kept).

    ``options``: the method's own keys (a mapping, checked against the method's ``Options``).
    """
    options = check_options(method, options) if options is None or isinstance(options, Mapping) else options
    device = model.blocks[0].norm1.weight.device
    context = {"grid": tuple(model.patch_embed.grid_size), "head_dim": model.blocks[0].attn.head_dim,
               "depth": len(model.blocks)}
    for i, block in enumerate(model.blocks):
        block.reduction = build_reduction(method, block.r, block.protected, model.embed_dim, layer=i,
                                          options=options, context=context).to(device)


def add_pyra(model: VisionTransformer, variant: PYRAVariant | bool | Mapping = True) -> None:
    """Give every merging layer a PYRA re-activation of ``variant`` (True: the paper's), sized for its ``r``."""
    variant = parse_pyra(variant)
    if variant is None:
        return
    if not any(model.r):
        raise ValueError("PYRA re-activates merged tokens: it needs a merging schedule (merging is None or 0)")
    merging = [i for i, block in enumerate(model.blocks) if block.r > 0 and not block.reduction.prunes]
    if not merging:   # a pruning layer drops its sources: nothing to re-activate
        raise ValueError("merging.pyra: every layer of the schedule prunes; PYRA re-activates merged tokens only")
    for i in merging:
        block = model.blocks[i]
        if "pyra" not in block.reduction._modules:
            raise ValueError(f"merging.pyra: method {type(block.reduction).__name__} does not merge through a "
                             f"re-activation; PYRA composes with token merging (merging.method: tome)")
        block.reduction.pyra = build_pyra(variant, block.r, model.embed_dim, layer=i).to(block.norm1.weight.device)


def _build_backbone(name: str, common: dict[str, Any], embed_dim: int | None, depth: int | None,
                    num_heads: int | None, patch_size: int | None) -> tuple[VisionTransformer, int]:
    """The timm model of a named backbone (or a custom ``"vit"``) and its default PEFT width."""
    if name == "vit":
        sizes = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size)
        missing = [k for k, v in sizes.items() if v is None]
        if missing:
            raise ValueError(f"a custom 'vit' needs {', '.join(missing)}")
        return VisionTransformer(**sizes, **common), 8
    spec = get_backbone(name)
    return timm.create_model(spec.timm_name, pretrained=False, **{**spec.timm_kwargs, **common}), spec.peft_dim


def create_model(
        name: str,
        *,
        num_classes: int,
        peft: str = "lora",
        peft_dim: int | None = None,
        peft_dropout: float = 0.1,
        peft_init: str = "official",
        prompt_mode: str = "shallow",
        merging: Merging = None,
        method: str = DEFAULT_METHOD,
        method_options: Mapping[str, Any] | None = None,
        pyra: bool | Mapping[str, str] | PYRAVariant = False,
        prop_attn: bool = True,
        trace_source: bool = False,
        drop_path_rate: float = 0.1,
        img_size: int = 224,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        patch_size: int | None = None,
        **kwargs: Any,
) -> VisionTransformer:
    """Build a backbone of the table in ``models.backbones`` (or a custom ``"vit"``), ready to adapt.

    Steps: timm backbone → ``apply_patch`` → PEFT → PEFT init → reduction ``method`` (``"tome"``; its own
    keys in ``method_options``) → per-layer schedule (clamped by the method to the token count, with a
    warning) → PYRA (``pyra``: True for the paper's, or a variant mapping, ``models.pyra.PYRAVariant``) →
    freeze. Weights are random: load a pretrained checkpoint
    with ``models.load_checkpoint``. Only the PEFT modules (or prompts), the head(s) and PYRA are
    trainable (everything for ``peft="full"``; only the reduction's parameters in a method's search phase,
    ``trains_alone``). Extra ``kwargs`` go to timm (e.g. ``global_pool``).
    ``peft="prompt"``: ``peft_dim`` prompt tokens (default 10), ``prompt_mode`` ``"shallow"`` or
    ``"deep"``, ``peft_dropout`` on the prompts; ``peft_init`` does not apply (VPT's init).
    """
    if peft not in PEFT_TYPES:
        raise ValueError(f"unknown peft {peft!r}; expected one of {PEFT_TYPES}")
    if prompt_mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt_mode {prompt_mode!r}; expected one of {PROMPT_MODES}")
    if prompt_mode != "shallow" and peft != "prompt":
        raise ValueError(f"prompt_mode={prompt_mode!r} needs peft='prompt', got peft={peft!r}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if kwargs.get("global_pool", "") not in GLOBAL_POOLS:
        raise ValueError(f"unknown global_pool {kwargs['global_pool']!r}; expected one of {GLOBAL_POOLS}")
    if kwargs.get("global_pool") == "":
        del kwargs["global_pool"]   # the backbone's own
    common = dict(num_classes=num_classes, drop_path_rate=drop_path_rate, img_size=img_size, **kwargs)
    model, default_dim = _build_backbone(name, common, embed_dim, depth, num_heads, patch_size)
    apply_patch(model, trace_source=trace_source, prop_attn=prop_attn)

    dim = (DEFAULT_PROMPT_LENGTH if peft == "prompt" else default_dim) if peft_dim is None else peft_dim
    if peft in ("lora", "adapter", "prompt") and dim <= 0:
        raise ValueError(f"peft_dim must be positive, got {dim}")
    if peft == "lora":
        add_lora(model, dim, peft_dropout)
    elif peft == "adapter":
        add_adapters(model, dim, peft_dropout)
    elif peft == "prompt":
        add_prompts(model, dim, prompt_mode, peft_dropout)
    init_peft(model, peft_init)
    variant = parse_pyra(pyra)
    requested = resolve_schedule(merging, name, len(model.blocks))
    model.r = requested   # each layer's method is built knowing its r (a method may learn only where r > 0)
    set_reduction(model, method, method_options)
    own = setup_reductions(model)   # a method that sets its own per-layer counts (DiffRate): they are the schedule
    if own is not None:
        if merging is not None and requested != own:
            raise ValueError(f"merging.r: method {method!r} sets its own per-layer counts (merging.{method}), which "
                             f"remove {own}; leave merging.r null (got {merging!r})")
        requested = own
    schedule = effective_schedule(model, requested)
    if schedule != requested:
        warnings.warn(f"merging schedule {requested} asks for more tokens than the "
                      f"{model._num_input_tokens()} inputs ({model.blocks[0].protected} protected) hold; "
                      f"per layer it becomes {schedule}", stacklevel=2)
    model.r = schedule
    add_pyra(model, variant)
    mark_trainable(model, peft)
    if any(block.reduction.trains_alone for block in model.blocks):   # a method's search phase
        categories = param_categories(model)
        for param_name, param in model.named_parameters():
            param.requires_grad_(categories[param_name] == "reduction")
    return model
