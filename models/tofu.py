"""ToFu, Token Fusion (Kim et al., *Token Fusion: Bridging the Gap between Token Pruning and Token Merging*,
WACV 2024, arXiv 2312.01026) as a method of the merging blocks (``merging.method: tofu``; models/README.md §10).

ToFu keeps ToMe's bipartite soft matching on the mean keys and changes what happens to a matched pair,
depending on where the layer sits. In the early blocks a matched source is *pruned*: it is dropped and its
destination keeps its value and size, because averaging there feeds the block an interpolation it responds to
far from linearly. From block ``merge_from`` on the pair is *merged* with MLERP: the size-weighted average of
the group gives the direction, and the largest norm in the group gives the length. A plain average of
non-parallel vectors is shorter than the longest of them, and the paper traces part of average merging's loss
to that shift of the norm distribution; MLERP keeps the norms where the unmerged tokens have them.

No official code exists; this follows the paper's definitions (models/README.md §10 lists what is taken from
where and each choice the paper leaves open). ``r`` per layer is ToMe's ``merging.r`` schedule, and the clamp is
ToMe's (half the unprotected tokens), so ToFu at ToMe's schedule keeps the same tokens per layer and FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .reduction import TokenReduction, Tokens
from .tome import MergeFn, bipartite_soft_matching, max_merge, merge_source, merge_wavg

__all__ = ["ToFu", "ToFuOptions", "mlerp", "mlerp_merge"]

_NORM_EPS = 1e-12   # an average of opposite vectors has no direction: it stays (near) zero instead of dividing by 0


@dataclass(frozen=True)
class ToFuOptions:
    """ToFu's own keys (``merging.tofu``).

    ``merge_from``: the first block (0-based) that merges; blocks before it prune. None: half the depth (block 6
    of ViT-B/16), the half-and-half split of the public re-implementation; the paper's own split could not be
    confirmed (models/README.md §10). ``mlerp``: merge layers use MLERP (the paper); False uses ToMe's
    size-weighted average there (prune + average, to isolate MLERP's effect).
    """

    merge_from: int | None = None
    mlerp: bool = True

    def __post_init__(self) -> None:
        m = self.merge_from
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"merge_from: expected an integer >= 0 (a block index) or null, got {m!r}")
        if not isinstance(self.mlerp, bool):
            raise ValueError(f"mlerp: expected true or false, got {self.mlerp!r}")


def mlerp(vectors: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """MLERP of a group of vectors (G×C, weights G): the weighted mean's direction at the group's largest norm.

    ``MLERP(x_1..x_G) = x̄ / ‖x̄‖ · max_i ‖x_i‖`` with ``x̄ = Σ w_i x_i / Σ w_i``. For two vectors of equal norm
    and equal weight it is SLERP at t = ½; for parallel vectors of equal norm it is their plain average.
    A reference form for one group (tests, notebooks); the layers use :func:`mlerp_merge`.
    """
    w = torch.ones(vectors.shape[0], dtype=vectors.dtype) if weights is None else weights.to(vectors.dtype)
    mean = (w[:, None] * vectors).sum(0) / w.sum()
    return mean / mean.norm().clamp_min(_NORM_EPS) * vectors.norm(dim=-1).max()


def mlerp_merge(merge: MergeFn, x: torch.Tensor, size: torch.Tensor | None = None,
                pyra: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``merge`` (a matching's closure) to ``x`` (B×N×C) with MLERP; returns the tokens and their sizes.

    Direction: ToMe's size-weighted average (``merge_wavg``, with PYRA re-activating the sources if given).
    Length: the largest norm among each destination and its sources (``amax`` merge of the input norms,
    taken before any re-activation). Tokens that received nothing are returned exactly as they came.
    """
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    target = merge(x.float().norm(dim=-1, keepdim=True), mode="amax")
    received = merge(torch.ones_like(size), mode="sum") > 1  # destinations that took at least one source
    avg, size = merge_wavg(merge, x, size, pyra=pyra)
    scale = target / avg.float().norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    scale = torch.where(received, scale, torch.ones_like(scale)).to(avg.dtype)
    return avg * scale, size


class ToFu(TokenReduction):
    """One layer of ToFu: ToMe's matching, then prune (blocks before ``merge_from``) or MLERP-merge (from it on).

    Prune layers drop the ``r`` matched sources; every other token, sizes included, passes unchanged (and the
    layer has no ``pyra`` slot: PYRA re-activates merged sources, and a pruned one is gone). Merge layers
    expose ToMe's ``pyra`` slot: the re-activation modulates the size-weighted sources before they are averaged
    into their destinations, and MLERP then restores the group's largest norm.
    """

    needs = frozenset({"metric"})
    context = frozenset({"depth"})
    Options = ToFuOptions

    def __init__(self, r: int, protected: int = 1, dim: int = 0, layer: int | None = None,
                 options: ToFuOptions | None = None, pyra: nn.Module | None = None, *, depth: int) -> None:
        super().__init__(r, protected, dim, layer, options)
        self.depth = int(depth)
        merge_from = self.options.merge_from
        if merge_from is None:
            merge_from = self.depth // 2
        elif merge_from > self.depth:
            raise ValueError(f"merging.tofu.merge_from: expected a block index of the {self.depth}-block model "
                             f"(0..{self.depth}; {self.depth} prunes everywhere), got {merge_from}")
        self.merge_from = merge_from
        self.prunes = layer is not None and layer < merge_from
        if not self.prunes:
            self.register_module("pyra", pyra)

    @property
    def mode(self) -> str:
        """What this layer does with a matched source: ``"prune"``, ``"mlerp"`` or ``"average"`` (ToMe's)."""
        return "prune" if self.prunes else ("mlerp" if self.options.mlerp else "average")

    def max_reduction(self, num_tokens: int) -> int:
        return max_merge(num_tokens, self.protected)

    def forward(self, x: torch.Tensor, size: torch.Tensor | None, source: torch.Tensor | None, *,
                trace_source: bool = False, metric: torch.Tensor | None = None) -> Tokens:
        if self.r <= 0:
            return x, size, source
        merge, _ = bipartite_soft_matching(metric, self.r, protected=self.protected)
        if self.prunes:
            if trace_source:   # a pruned source's patches leave the map with it
                source = merge_source(merge, x, source, mode="prune")
            size = None if size is None else merge(size, mode="prune")
            return merge(x, mode="prune"), size, source
        if trace_source:
            source = merge_source(merge, x, source)
        if self.options.mlerp:
            x, size = mlerp_merge(merge, x, size, pyra=self.pyra)
        else:
            x, size = merge_wavg(merge, x, size, pyra=self.pyra)
        return x, size, source

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}, merge_from={self.merge_from}"
