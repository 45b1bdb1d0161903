"""FPET's token redundancy reduction (Kim et al., *Faster Parameter-Efficient Tuning with Token Redundancy
Reduction*, CVPR 2025) as a method of the merging blocks (``merging.method: fpet``; models/README.md §7).

A layer that runs it takes the mean keys of its attention (detached), refines them with a small binary
adapter (``metric + refine(metric)``) and splits the patch tokens like a checkerboard: every "black" token
(set A) merges into the "white" token (set B) it is most similar to, so the layer keeps B only. The
matching is a hard 0/1 matrix in the forward and a sigmoid around each row's mean of its two best scores in
the backward (a straight-through estimator), which is how the refinement learns from the task loss.
Tokens merge as a size-weighted average, and later layers attend proportionally to the sizes, as in ToMe.

The official code runs one such layer (block 6 of ViT-B). Here any layer whose ``r`` is non-zero runs one;
the split of a later layer continues the checkerboard on the tokens the earlier ones kept (``checkerboard_stages``).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from statistics import NormalDist

import torch
import torch.nn as nn
import torch.nn.functional as F

from .reduction import TokenReduction, Tokens

__all__ = ["FPET", "FPETOptions", "Refinement", "BinaryLinear", "Stage", "checkerboard_stages", "fpet_schedule",
           "REFINE_BITS"]

REFINE_BITS = (1, 32)   # 1: the official binary adapter; 32: the same adapter in full precision
# Binary Adapter's 1-bit code for a standardised weight: ±Φ⁻¹(3/4), the medians of the two halves of N(0, 1).
BINARY_LEVEL = NormalDist().inv_cdf(0.75)
_STD_EPS = 1e-5


@dataclass(frozen=True)
class FPETOptions:
    """FPET's own keys (``merging.fpet``); the defaults are the official code's refinement adapter."""

    refine_dim: int = 32            # hidden width of the refinement adapter
    refine_bits: int = 1            # weight precision of the refinement adapter (REFINE_BITS)
    refine_dropout: float = 0.1     # dropout on its hidden activations (training only)

    def __post_init__(self) -> None:
        if isinstance(self.refine_dim, bool) or not isinstance(self.refine_dim, int) or self.refine_dim < 1:
            raise ValueError(f"refine_dim: expected an integer >= 1, got {self.refine_dim!r}")
        if isinstance(self.refine_bits, bool) or self.refine_bits not in REFINE_BITS:
            raise ValueError(f"refine_bits: expected one of {', '.join(map(str, REFINE_BITS))}, "
                             f"got {self.refine_bits!r}")
        p = self.refine_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"refine_dropout: expected a number in [0, 1), got {p!r}")


class BinaryLinear(nn.Linear):
    """A bias-free linear layer whose weight is binarised in the forward (Binary Adapter's 1-bit ``QLinear``).

    The weight is standardised over the whole matrix, replaced by ``±BINARY_LEVEL`` by sign, and mapped
    back with the same mean and standard deviation; the backward goes straight through the sign.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def binarized_weight(self) -> torch.Tensor:
        w = self.weight
        mean, std = w.mean(), w.std()
        z = (w - mean) / (std + _STD_EPS)
        zb = (torch.sign(z) * BINARY_LEVEL).detach() + z - z.detach()
        return zb * std + mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.binarized_weight())


class Refinement(nn.Module):
    """FPET's refinement adapter on the key metric: ``up(dropout(ReLU(down(k))))``, added to ``k`` by the caller.

    1 bit (the official): down keeps ``nn.Linear``'s init, up is truncated normal (std 1e-3, within ±2e-3),
    so the binarised up is small but not zero. 32 bits: plain linear layers with up at zero.
    """

    def __init__(self, width: int, hidden: int, bits: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        if bits == 1:
            self.down, self.up = BinaryLinear(width, hidden), BinaryLinear(hidden, width)
            nn.init.trunc_normal_(self.up.weight, mean=0.0, std=0.001, a=-0.002, b=0.002)
        else:
            self.down, self.up = nn.Linear(width, hidden, bias=False), nn.Linear(hidden, width, bias=False)
            nn.init.zeros_(self.up.weight)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))


# --- the checkerboard split ---------------------------------------------------------------------------

Grid = tuple[int, int]


@dataclass(frozen=True)
class Stage:
    """One FPET layer's split of the patch tokens it receives, laid out as ``grids`` (row-major, in order).

    ``a`` (merged away) and ``b`` (kept, in this order) are positions among those tokens.
    """

    grids: tuple[Grid, ...]
    a: tuple[int, ...]
    b: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.a) + len(self.b)


def _split(grids: tuple[Grid, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[Grid, ...]]:
    """(A, B, layout of B) of one layout: one grid, or the two grids the previous split kept.

    One h×w grid: A = (even row, even col) then (odd row, odd col); B = (odd row, even col) then (even row,
    odd col), the order of the official code. The two grids B forms lie on the white squares, where each
    one's neighbours are in the other: the next split merges the first grid into the second.
    """
    if len(grids) == 1:
        h, w = grids[0]

        def cells(rows: int, cols: int) -> list[int]:   # row-major positions of rows % 2 == rows, cols % 2 == cols
            return [i * w + j for i in range(rows, h, 2) for j in range(cols, w, 2)]

        kept = ((h // 2, (w + 1) // 2), ((h + 1) // 2, w // 2))
        return (tuple(cells(0, 0) + cells(1, 1)), tuple(cells(1, 0) + cells(0, 1)),
                tuple(g for g in kept if g[0] * g[1] > 0))
    (h1, w1), (h2, w2) = grids
    first = h1 * w1
    return tuple(range(first)), tuple(range(first, first + h2 * w2)), ((h2, w2),)


@functools.lru_cache(maxsize=32)
def checkerboard_stages(grid: Grid) -> tuple[Stage, ...]:
    """The splits of successive FPET layers on an image of ``grid`` patches, for as long as one is possible
    (A not empty, B with the two tokens the matching's top-2 needs). Token counts strictly decrease, so the
    count a layer receives names its stage."""
    stages, grids = [], (tuple(grid),)
    while True:
        a, b, kept = _split(grids)
        if not a or len(b) < 2:
            return tuple(stages)
        stages.append(Stage(grids, a, b))
        grids = kept


def _fp32() -> contextlib.AbstractContextManager:
    """Autocast off for the refinement and the scores (near-ties in bf16 would flip the hard matching)."""
    for device in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device):
            return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


class FPET(TokenReduction):
    """One layer of FPET's token redundancy reduction: refine the mean keys, then merge the checkerboard's
    set A into its best matches in set B (size-weighted). In training mode the merge is the straight-through
    matching matrix (hard forward, sigmoid backward); in eval mode the same hard matching as a scatter.

    ``r`` is 0 (the layer keeps its tokens) or the size of its set A (``max_reduction``): FPET merges a
    whole checkerboard half or nothing. The leading ``protected`` tokens take no part.
    """

    needs = frozenset({"metric"})
    context = frozenset({"grid", "head_dim"})
    Options = FPETOptions

    def __init__(self, r: int, protected: int = 1, dim: int = 0, layer: int | None = None,
                 options: FPETOptions | None = None, *, grid: Grid, head_dim: int) -> None:
        super().__init__(r, protected, dim, layer, options)
        self.grid = (int(grid[0]), int(grid[1]))
        self.head_dim = int(head_dim)
        stages = checkerboard_stages(self.grid)
        self._stage_sizes = tuple(s.num_tokens for s in stages)   # what the forward looks up (plain ints)
        for k, stage in enumerate(stages):                         # index tensors that follow the module's device
            self.register_buffer(f"stage{k}_a", torch.tensor(stage.a), persistent=False)
            self.register_buffer(f"stage{k}_b", torch.tensor(stage.b), persistent=False)
        o = self.options
        # Only a layer built to merge learns a refinement (the official code: one, in its one FPET layer).
        self.refine = Refinement(self.head_dim, o.refine_dim, o.refine_bits, o.refine_dropout) if self.r > 0 else None

    def stage(self, num_patches: int) -> Stage | None:
        """The split of ``num_patches`` unprotected tokens (None if no FPET layer receives that many)."""
        return next((s for s in checkerboard_stages(self.grid) if s.num_tokens == num_patches), None)

    def max_reduction(self, num_tokens: int) -> int:
        stage = self.stage(num_tokens - self.protected)
        return 0 if stage is None else len(stage.a)

    def effective_r(self, num_tokens: int) -> int:
        if self.r <= 0:
            return 0
        whole = self.max_reduction(num_tokens)
        if self.r < whole:
            raise ValueError(self._partial_message(num_tokens - self.protected, whole))
        return whole

    def _partial_message(self, num_patches: int, whole: int) -> str:
        return (f"merging.r: layer {self.layer} asks FPET to merge {self.r} tokens, but an FPET layer merges the "
                f"whole checkerboard half of its {num_patches} patch tokens: set r to {whole} there (or 0)")

    def forward(self, x: torch.Tensor, size: torch.Tensor | None, source: torch.Tensor | None, *,
                trace_source: bool = False, metric: torch.Tensor | None = None) -> Tokens:
        if self.r <= 0:
            return x, size, source
        p, n = self.protected, x.shape[1] - self.protected
        if n not in self._stage_sizes:
            raise ValueError(f"FPET layer {self.layer}: {n} patch tokens are no stage of the checkerboard of a "
                             f"{self.grid[0]}x{self.grid[1]} patch grid (an image of another size?)")
        k = self._stage_sizes.index(n)
        a_idx, b_idx = getattr(self, f"stage{k}_a"), getattr(self, f"stage{k}_b")
        if self.r < a_idx.shape[0]:
            raise ValueError(self._partial_message(n, a_idx.shape[0]))
        if self.refine is None:
            raise ValueError(f"FPET layer {self.layer} was built with r = 0 and has no refinement adapter; "
                             f"rebuild the model with this merging schedule")
        with _fp32():
            m = metric.detach().float()
            m = m + self.refine(m)
            m = m[:, p:]
            m = m / m.norm(dim=-1, keepdim=True)
            scores = m.index_select(1, a_idx) @ m.index_select(1, b_idx).transpose(-1, -2)   # B×|A|×|B|
            mean12 = scores.topk(2, dim=-1).values.mean(dim=-1, keepdim=True)
            soft = torch.sigmoid(scores - mean12)
            hard = (soft > 0.5).to(soft.dtype)   # at most one 1 per row: the best match, unless it ties

        if size is None:
            size = torch.ones_like(x[..., :1])
        weighted = x[:, p:] * size[:, p:]
        xa, xb = weighted.index_select(1, a_idx), weighted.index_select(1, b_idx)
        sa, sb = size[:, p:].index_select(1, a_idx), size[:, p:].index_select(1, b_idx)
        if self.training:   # the straight-through matching matrix: hard values, sigmoid gradients
            match = (soft + (hard - soft).detach()).to(x.dtype)
            xb = xb + torch.einsum("bik,bij->bkj", match, xa)
            sb = sb + torch.einsum("bik,bij->bkj", match.to(sb.dtype), sa)
        else:               # the same hard matching, as a scatter (no |A|×|B| product)
            dst, keep = self._hard_targets(scores, hard)
            xb = xb.scatter_add(1, dst.expand(-1, -1, xb.shape[-1]), xa * keep.to(xa.dtype))
            sb = sb.scatter_add(1, dst, sa * keep.to(sa.dtype))
        if trace_source:
            source = self._merge_source(source, x, scores, hard, a_idx, b_idx)
        x = torch.cat([x[:, :p], xb / sb], dim=1)
        size = torch.cat([size[:, :p], sb], dim=1)
        return x, size, source

    @staticmethod
    def _hard_targets(scores: torch.Tensor, hard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each A token's destination (its best B token) and whether it merges (B×|A|×1 each): a row of the
        hard matrix is empty when the two best scores tie, and that A token is dropped, as in the official code."""
        return scores.argmax(dim=-1, keepdim=True), hard.amax(dim=-1, keepdim=True)

    def _merge_source(self, source: torch.Tensor | None, x: torch.Tensor, scores: torch.Tensor,
                      hard: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor) -> torch.Tensor:
        """Which input patches each kept token holds (B×N×N₀, 0/1), for visualisation."""
        p = self.protected
        if source is None:
            t = x.shape[1]
            source = torch.eye(t, device=x.device, dtype=x.dtype)[None].expand(x.shape[0], t, t)
        rest = source[:, p:]
        sa, sb = rest.index_select(1, a_idx), rest.index_select(1, b_idx)
        dst, keep = self._hard_targets(scores, hard)
        sb = sb.scatter_reduce(1, dst.expand(-1, -1, sb.shape[-1]), sa * keep.to(sa.dtype), reduce="amax")
        return torch.cat([source[:, :p], sb], dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grid={self.grid}, head_dim={self.head_dim}"


def fpet_schedule(grid: Grid, layers: list[int], depth: int) -> list[int]:
    """The ``merging.r`` of FPET layers at block indices ``layers`` of a ``depth``-block model on a ``grid``
    of patches: each one merges its whole checkerboard half of what the earlier ones kept."""
    stages, schedule = checkerboard_stages(grid), [0] * depth
    if len(layers) > len(stages):
        raise ValueError(f"{len(layers)} FPET layers, but a {grid[0]}x{grid[1]} grid splits {len(stages)} times")
    for stage, layer in zip(stages, sorted(layers)):
        schedule[layer] = len(stage.a)
    return schedule
