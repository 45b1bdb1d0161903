"""Token reduction as a family: the seam between a merging block and the method that reduces its tokens.

A block asks its ``reduction`` module what to do with the layer's tokens and gets back the new tokens,
their sizes and the source map. A method is one module under ``models/`` with a :class:`TokenReduction`
subclass, plus one entry in :data:`REDUCTION_METHODS` (in ``models/methods.py``, torch-free for config loading:
``"name": "module:Class"``, imported when first used) or a :func:`register_reduction` call (a plugin, a test);
its own keys are ``merging.<name>`` (its ``Options``, checked by :func:`check_options`). The block knows no method:

- ``needs`` says what the attention must hand over besides the tokens (``"metric"``: the keys
  averaged over heads; ``"cls_attn"``: the class token's attention over the keys, averaged over heads;
  ``"features"``: the attention's input, ``norm1(x)``, for a method that embeds the tokens itself);
- ``max_reduction`` is the method's clamp (how many tokens it can remove from ``num_tokens`` inputs), which
  both the forward and the build-time schedule clamp use;
- the first ``protected`` tokens (class, distillation token, visual prompts) are never reduced and keep
  their positions: every method honours that;
- parameters a method learns belong to the method's module, whose ``param_category`` decides that they
  train (``models.peft.param_categories``), whatever they are called;
- ``context`` names what the method must know of the model when it is built (``MODEL_CONTEXT``: the patch
  grid, for a split by image position; the head width, the width of the ``metric``; the depth, for a step that
  depends on where the layer sits);
- ``prunes`` marks a layer that drops the tokens it removes instead of merging them: PYRA, which re-activates
  merged sources, skips it.

A method that learns its own per-layer counts (DiffRate) also acts on the whole model, through three class
methods that receive its layers in order (no-ops by default): ``setup`` once the model is built (it may size
itself and return its own schedule, which replaces ``merging.r``), ``auxiliary_loss`` (a training loss term the
engine adds) and ``learned_record`` (what it learned, written to the run folder as JSON); ``trains_alone``
marks a search phase in which only the method's parameters train.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .methods import REDUCTION_METHODS  # name -> "module:Class" or the class (torch-free, for config loading)

__all__ = ["TokenReduction", "NoOptions", "REDUCTION_METHODS", "DEFAULT_METHOD", "ATTENTION_OUTPUTS",
           "register_reduction", "get_reduction", "build_reduction", "clamp_schedule", "check_options",
           "MODEL_CONTEXT", "setup_reductions", "auxiliary_loss", "learned_records"]

DEFAULT_METHOD = "tome"
# What MergingAttention can hand to a method, besides the tokens themselves.
ATTENTION_OUTPUTS = ("metric", "cls_attn", "features")
# What the model can tell a method when it is built (keyword arguments of its __init__, if it declares them in
# ``context``): "grid", the (rows, cols) of the patch grid; "head_dim", the width of one attention head; "depth",
# the number of blocks (for a method whose step depends on where the layer sits, ToFu).
MODEL_CONTEXT = ("grid", "head_dim", "depth")

Tokens = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]   # (x, size, source)


@dataclass(frozen=True)
class NoOptions:  # a method's Options is a frozen dataclass; its __post_init__ raises "<key>: expected ..."
    """A method without keys of its own (``merging.<method>`` must then stay empty)."""


class TokenReduction(nn.Module):
    """One layer's token reduction: ``(x, size, source)`` and what ``needs`` asks for → new ``(x, size, source)``.

    ``r`` is the number of tokens the layer's schedule asks the method to remove; ``protected`` the
    leading tokens it must leave untouched; ``dim`` the token width (for methods with parameters);
    ``layer`` the block index (for messages). ``size`` is B×N×1 (None before the first reduction:
    every token stands for one patch); ``source`` is the B×N×N₀ map of which input patches each token
    holds, kept only when ``trace_source`` is on.
    """

    needs: ClassVar[frozenset[str]] = frozenset({"metric"})
    context: ClassVar[frozenset[str]] = frozenset()   # of MODEL_CONTEXT, passed to __init__ as keywords
    Options: ClassVar[type] = NoOptions
    param_category: ClassVar[str] = "reduction"   # any parameter of a method trains, under this name
    trains_alone: bool = False                     # a search phase: only the method's parameters train
    prunes: bool = False                           # the layer drops what it removes: PYRA has nothing to re-activate

    def __init__(self, r: int, protected: int = 1, dim: int = 0, layer: int | None = None,
                 options: Any = None) -> None:
        super().__init__()
        self.r = int(r)
        self.protected = int(protected)
        self.dim = int(dim)
        self.layer = layer
        self.options = options if options is not None else self.Options()

    def max_reduction(self, num_tokens: int) -> int:
        """How many of ``num_tokens`` inputs this method can remove at most (unprotected ones only)."""
        return max(0, num_tokens - self.protected)

    def effective_r(self, num_tokens: int) -> int:
        """The ``r`` really applied to ``num_tokens`` inputs: the schedule's, clamped by the method."""
        return max(0, min(self.r, self.max_reduction(num_tokens)))

    @property
    def active(self) -> bool:
        """Whether the layer reduces anything (the attention skips computing ``needs`` otherwise)."""
        return self.r > 0

    def forward(self, x: torch.Tensor, size: torch.Tensor | None, source: torch.Tensor | None, *,
                trace_source: bool = False, **needs: torch.Tensor) -> Tokens:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"r={self.r}, protected={self.protected}, layer={self.layer}"

    # Model-level hooks: ``layers`` are the model's modules of this class, in block order.
    @classmethod
    def setup(cls, model: nn.Module, layers: Sequence[TokenReduction]) -> list[int] | None:
        """Once the model is built: the per-layer ``r`` the method sets itself (None: it follows ``merging.r``)."""
        return None

    @classmethod
    def auxiliary_loss(cls, layers: Sequence[TokenReduction]) -> torch.Tensor | None:
        """A loss term of the last training forward that the engine adds to the task loss (None: none)."""
        return None

    @classmethod
    def learned_record(cls, layers: Sequence[TokenReduction]) -> dict[str, Any] | None:
        """What the method learned, ``{file stem: JSON-able data}``, written to the run folder (None: nothing)."""
        return None


def register_reduction(name: str, cls: type[TokenReduction] | None = None):
    """Add a method under ``name`` (also usable as a class decorator); selectable as ``merging.method: name``, its
    keys given as ``merging.<name>``."""
    def add(cls: type[TokenReduction]) -> type[TokenReduction]:
        if not (isinstance(cls, type) and issubclass(cls, TokenReduction)):
            raise TypeError(f"a reduction method must subclass TokenReduction, got {cls!r}")
        unknown = set(cls.needs) - set(ATTENTION_OUTPUTS)
        if unknown:
            raise ValueError(f"method {name!r} needs {sorted(unknown)}; the attention provides {ATTENTION_OUTPUTS}")
        unknown = set(cls.context) - set(MODEL_CONTEXT)
        if unknown:
            raise ValueError(f"method {name!r} asks for {sorted(unknown)}; the model tells {MODEL_CONTEXT}")
        REDUCTION_METHODS[name] = cls
        return cls
    return add if cls is None else add(cls)


def get_reduction(name: str) -> type[TokenReduction]:
    """The class of a registered method; a ValueError listing the registered ones otherwise."""
    try:
        entry = REDUCTION_METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown merging method {name!r}; expected one of: "
                         f"{', '.join(sorted(REDUCTION_METHODS))}") from None
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = REDUCTION_METHODS[name] = getattr(importlib.import_module(module), attr)
    return entry


def check_options(method: str, options: Mapping[str, Any] | None) -> Any:
    """The method's ``Options`` from a mapping (``merging.<method>``); an error names ``merging.<method>.<key>``
    (an unknown key: with the valid ones)."""
    cls = get_reduction(method).Options
    given = dict(options or {})
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in given if k not in valid]
    if unknown:
        expected = ", ".join(valid) if valid else "none (this method has no keys of its own)"
        raise ValueError(f"merging.{method}.{unknown[0]}: unknown key of method {method!r}; expected {expected}")
    try:
        return cls(**given)
    except (ValueError, TypeError) as e:   # an Options' own check: "<key>: expected ..., got ..."
        raise ValueError(f"merging.{method}.{e}") from None


def build_reduction(method: str, r: int, protected: int, dim: int, layer: int | None = None,
                    options: Any = None, context: Mapping[str, Any] | None = None) -> TokenReduction:
    """One layer's reduction module of ``method``; ``options`` a mapping or the method's ``Options``;
    ``context`` what the model tells (``MODEL_CONTEXT``), of which the method gets what it declares."""
    cls = get_reduction(method)
    if options is None or isinstance(options, Mapping):
        options = check_options(method, options)
    context = dict(context or {})
    missing = sorted(set(cls.context) - set(context))
    if missing:
        raise ValueError(f"method {method!r} is built knowing the model's {', '.join(missing)}: pass it in context")
    return cls(r, protected=protected, dim=dim, layer=layer, options=options, **{k: context[k] for k in cls.context})


def _methods(model: nn.Module) -> dict[type[TokenReduction], list[TokenReduction]]:
    """The reduction modules of a model (or of a DDP / compiled wrapper) grouped by class, in block order."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    groups: dict[type[TokenReduction], list[TokenReduction]] = {}
    for module in model.modules():
        if isinstance(module, TokenReduction):
            groups.setdefault(type(module), []).append(module)
    return groups


def setup_reductions(model: nn.Module) -> list[int] | None:
    """Run each method's ``setup``; the per-layer schedule a method sets itself, or None (``merging.r`` decides)."""
    schedule = None
    for cls, layers in _methods(model).items():
        own = cls.setup(model, layers)
        if own is not None:
            schedule = list(own)
    return schedule


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the methods' auxiliary losses of the last training forward (None: no method has one)."""
    terms = [t for cls, layers in _methods(model).items() if (t := cls.auxiliary_loss(layers)) is not None]
    return sum(terms[1:], terms[0]) if terms else None


def learned_records(model: nn.Module) -> dict[str, Any]:
    """``{file stem: data}`` of what the methods learned (empty for methods that learn no counts)."""
    records: dict[str, Any] = {}
    for cls, layers in _methods(model).items():
        records.update(cls.learned_record(layers) or {})
    return records


def clamp_schedule(reductions: Sequence[TokenReduction], num_tokens: int) -> list[int]:
    """The ``r`` each layer really removes from ``num_tokens`` inputs, each method clamping its own layer."""
    effective = []
    for reduction in reductions:
        r = reduction.effective_r(num_tokens)
        effective.append(r)
        num_tokens -= r
    return effective
