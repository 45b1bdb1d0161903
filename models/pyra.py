"""PYRA: parallel yielding re-activation of the tokens about to be merged, and its ablation variants.

Every variant modulates the ``r`` source tokens of one layer's merge as ``X_s + X_s ⊙ g`` just before
they are summed into their destinations, and starts with ``g = 0`` (exactly plain ToMe). A variant is
three choices (``PYRAVariant``; formulas in models/README.md §2):

- ``weights``: ``both`` (a channel-wise and a token-wise weight, the paper's), ``channel`` or ``token``;
- ``activation``: ``sigmoid`` (the paper's re-activation) or ``none`` (the raw weights);
- ``generator``: ``adaptive`` (the paper's: yielded from ``LayerNorm(X_s + X_t)`` by ``W_r`` and
  ``W_D``), ``static`` (learned weights that do not depend on the tokens) or ``gated_mlp`` (a gated
  MLP with an 8-wide bottleneck on the same ``LayerNorm(X_s + X_t)``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PYRA", "PYRAVariant", "Reactivation", "StaticReactivation", "GatedMLPReactivation", "build_pyra",
           "parse_pyra", "PYRA_WEIGHTS", "PYRA_ACTIVATIONS", "PYRA_GENERATORS",
           "GATED_MLP_HIDDEN"]

PYRA_WEIGHTS = ("both", "channel", "token")
PYRA_ACTIVATIONS = ("sigmoid", "none")
PYRA_GENERATORS = ("adaptive", "static", "gated_mlp")
GATED_MLP_HIDDEN = 8


@dataclass(frozen=True)
class PYRAVariant:
    """Which weights, activation and generator a re-activation uses; the defaults are the paper's PYRA."""

    weights: str = "both"
    activation: str = "sigmoid"
    generator: str = "adaptive"

    def __post_init__(self) -> None:
        for key, allowed in (("weights", PYRA_WEIGHTS), ("activation", PYRA_ACTIVATIONS),
                             ("generator", PYRA_GENERATORS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"merging.pyra.{key}: expected one of {', '.join(allowed)}; "
                                 f"got {getattr(self, key)!r}")

    @property
    def is_paper(self) -> bool:
        return self == PYRAVariant()

    def as_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_pyra(value: Any) -> PYRAVariant | None:
    """``merging.pyra`` / ``create_model(pyra=)``: False/None (off), True (the paper's), a mapping or a variant."""
    if value is None or value is False:
        return None
    if value is True:
        return PYRAVariant()
    if isinstance(value, PYRAVariant):
        return value
    if isinstance(value, Mapping):
        valid = [f.name for f in fields(PYRAVariant)]
        unknown = [k for k in value if k not in valid]
        if unknown:
            raise ValueError(f"merging.pyra.{unknown[0]}: unknown key; expected {', '.join(valid)}")
        bad = [k for k, v in value.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"merging.pyra.{bad[0]}: expected a string, got {value[bad[0]]!r}")
        return PYRAVariant(**value)
    raise ValueError(f"merging.pyra: expected true, false or a mapping of weights/activation/generator; "
                     f"got {value!r}")


def _centred_at_zero(delta: torch.Tensor, activation: str) -> torch.Tensor:
    """The factor that is 0 at ``delta = 0``: ``2σ(δ) − 1`` (sigmoid) or ``δ`` (none)."""
    return 2 * torch.sigmoid(delta) - 1 if activation == "sigmoid" else delta


class Reactivation(nn.Module):
    """Base of the variants: ``forward(src, dst)`` returns the modulated sources ``src + src ⊙ g``.

    ``src``: the size-weighted source tokens (B×r×D, matching order); ``dst``: their matched
    destinations (B×r×D). Built for at most ``r`` sources; a clamped merge (fewer tokens than the
    schedule expects) uses the first rows of any per-token weight.
    """

    param_category: ClassVar[str] = "pyra"   # these parameters train (models.peft.param_categories)

    def __init__(self, r: int, dim: int, variant: PYRAVariant, layer: int | None = None) -> None:
        super().__init__()
        if r <= 0 or dim <= 0:
            raise ValueError(f"PYRA needs r > 0 and dim > 0, got r={r}, dim={dim}")
        self.rows, self.layer, self.variant = r, layer, variant

    def _check(self, src: torch.Tensor) -> int:
        r = src.shape[-2]
        if r > self.rows:
            where = "" if self.layer is None else f" in layer {self.layer}"
            raise ValueError(f"PYRA{where} was built for r <= {self.rows} but the merge removes {r} tokens; "
                             f"rebuild the model with this merging schedule")
        return r

    def extra_repr(self) -> str:
        v = self.variant
        return f"r={self.rows}, layer={self.layer}, weights={v.weights}, activation={v.activation}"


class PYRA(Reactivation):
    """The adaptive generator: weights yielded in parallel from ``M = LayerNorm(X_s + X_t)``.

    ``δ_D = W_rᵀ·M`` (B×1×D, mixing the pairs; ``to_channel_weight`` is ``W_r``, r×1) and ``δ_r = M·W_Dᵀ``
    (B×r×1, mixing the channels; ``to_token_weight`` is ``W_D``, 1×D). The paper's PYRA (``weights:
    both``, sigmoid) returns ``X_s + (X_s ⊙ 2σ(δ_D)) ⊙ (2σ(δ_r) − 1)``; ``W_D`` starts at zero and
    ``W_r`` uniform(−1, 1) as in the official code. With one weight only, ``g`` is that weight centred at
    zero and its generator starts at zero.
    """

    def __init__(self, r: int, dim: int, variant: PYRAVariant | None = None, layer: int | None = None) -> None:
        variant = variant or PYRAVariant()
        if variant.generator != "adaptive":
            raise ValueError(f"PYRA is the adaptive generator, got generator={variant.generator!r}")
        super().__init__(r, dim, variant, layer)
        has_channel, has_token = variant.weights in ("both", "channel"), variant.weights in ("both", "token")
        self.to_channel_weight = nn.Parameter(torch.empty(r, 1)) if has_channel else None
        self.to_token_weight = nn.Parameter(torch.empty(1, dim)) if has_token else None
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        if self.to_token_weight is not None:
            nn.init.zeros_(self.to_token_weight)
        if self.to_channel_weight is not None:
            if self.variant.weights == "both":
                # kaiming_uniform(a=√5) on an r×1 tensor is uniform(−1, 1), as in the official code.
                nn.init.kaiming_uniform_(self.to_channel_weight, a=5 ** 0.5)
            else:
                nn.init.zeros_(self.to_channel_weight)

    def forward(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        r = self._check(src)
        m = self.norm(src + dst)
        act = self.variant.activation
        if self.variant.weights == "token":
            return src + src * _centred_at_zero(m @ self.to_token_weight.transpose(0, 1), act)
        delta_d = self.to_channel_weight[:r].transpose(0, 1) @ m       # B×1×D
        if self.variant.weights == "channel":
            return src + src * _centred_at_zero(delta_d, act)
        delta_r = m @ self.to_token_weight.transpose(0, 1)             # B×r×1
        channel = 2 * torch.sigmoid(delta_d) if act == "sigmoid" else delta_d
        return src + src * channel * _centred_at_zero(delta_r, act)


class StaticReactivation(Reactivation):
    """Learned weights that ignore the tokens: ``g = act(S)`` with ``S`` r×D (both), 1×D (channel) or r×1 (token).

    ``weights: both`` is the paper's "static D×r matrix" row. ``S`` starts at zero.
    """

    def __init__(self, r: int, dim: int, variant: PYRAVariant, layer: int | None = None) -> None:
        super().__init__(r, dim, variant, layer)
        shape = {"both": (r, dim), "channel": (1, dim), "token": (r, 1)}[variant.weights]
        self.static_weight = nn.Parameter(torch.zeros(shape))

    def forward(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        r = self._check(src)
        weight = self.static_weight if self.variant.weights == "channel" else self.static_weight[:r]
        return src + src * _centred_at_zero(weight, self.variant.activation)


class GatedMLPReactivation(Reactivation):
    """A gated MLP on ``M = LayerNorm(X_s + X_t)``: ``h = (M·W_v) ⊙ SiLU(M·W_g)`` (8 wide), ``g = act(h·W_o)``.

    ``weights``: ``both`` gives a weight per token and channel (W_o 8×D), ``token`` one per token (8×1),
    ``channel`` one per channel from ``h`` averaged over the pairs (8×D). ``W_o`` starts at zero; the
    projections have no bias.
    """

    def __init__(self, r: int, dim: int, variant: PYRAVariant, layer: int | None = None,
                 hidden: int = GATED_MLP_HIDDEN) -> None:
        super().__init__(r, dim, variant, layer)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.value = nn.Linear(dim, hidden, bias=False)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.to_weight = nn.Linear(hidden, 1 if variant.weights == "token" else dim, bias=False)
        nn.init.zeros_(self.to_weight.weight)

    def forward(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        self._check(src)
        m = self.norm(src + dst)
        h = self.value(m) * F.silu(self.gate(m))
        if self.variant.weights == "channel":
            h = h.mean(dim=-2, keepdim=True)
        return src + src * _centred_at_zero(self.to_weight(h), self.variant.activation)


_GENERATORS: dict[str, type[Reactivation]] = {
    "adaptive": PYRA, "static": StaticReactivation, "gated_mlp": GatedMLPReactivation}


def build_pyra(variant: PYRAVariant | bool | Mapping, r: int, dim: int, layer: int | None = None) -> Reactivation:
    """The re-activation module of one merging layer for a variant (or anything ``parse_pyra`` takes)."""
    variant = parse_pyra(variant)
    if variant is None:
        raise ValueError("build_pyra needs a PYRA variant, got none (merging.pyra is false)")
    return _GENERATORS[variant.generator](r, dim, variant, layer=layer)
