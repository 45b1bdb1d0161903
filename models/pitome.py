"""PiToMe, spectrum-preserving token merging (Tran et al., *Accelerating Transformers with Spectrum-Preserving
Token Merging*, NeurIPS 2024), as a method of the merging blocks (``merging.method: pitome``; models/README.md §9).

ToMe pairs tokens by position (even with odd), so a token that nothing resembles can be averaged away as
easily as one of a hundred near-copies. PiToMe first scores how redundant each token is: its *energy*, the
mean over all tokens of ``ELU(cos(i, j) − margin)``. Similarities above the margin count in full, those below
it only as a small negative (ELU saturates at ``−alpha``), so a token in a large cluster of similar tokens
has a high energy and an isolated one a low energy. The tokens are then ordered by energy, highest first,
and the split into the sets A and B alternates along that order, so each A token has a B token of about
the same energy next to it. Two layer kinds, as the official ViT code runs them:

- *protecting* (``pitome``): only the ``2r`` highest-energy tokens take part; A's ``r`` tokens each merge
  into their most similar B token, and the ``T − 2r`` lower-energy tokens are kept as they are;
- *bipartite* (``pitome_bsm``): every token takes part and ToMe's matching runs on the energy-ordered split
  (the ``r`` best-matched A tokens merge); the official ViT/DeiT patch uses it in the first half of the blocks.

The decision needs no gradient (it is made on the detached keys); tokens merge as ToMe's size-weighted
average, so the same code runs in training and evaluation, and PYRA can re-activate the merged sources.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tome import MergeFn, ToMe, _fp32_scores, max_merge

__all__ = ["PiToMe", "PiToMeOptions", "energy_score", "energy_matching", "pitome_schedule", "BIPARTITE_LAYERS"]

# Which blocks run the bipartite kind (the others protect): "first_half" is the official ViT/DeiT patch (the
# first ceil(depth / 2) blocks), "second_half" the official MAE patch (the rest), "all" and "none" one kind only.
BIPARTITE_LAYERS = ("first_half", "second_half", "all", "none")


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class PiToMeOptions:
    """PiToMe's own keys (``merging.pitome``); the defaults are the official ViT/DeiT patch's."""

    margin: float = 0.75                    # margin of the first block; block i of L uses margin·(1 − i/L)
    alpha: float = 1.0                      # ELU's alpha: the most a dissimilar pair lowers the energy
    bipartite_layers: str = "first_half"    # the blocks that run the bipartite kind (BIPARTITE_LAYERS)

    def __post_init__(self) -> None:
        if not _number(self.margin) or not -1.0 <= self.margin <= 1.0:
            raise ValueError(f"margin: expected a number in [-1, 1] (a cosine similarity), got {self.margin!r}")
        if not _number(self.alpha) or self.alpha < 0:
            raise ValueError(f"alpha: expected a number >= 0, got {self.alpha!r}")
        if self.bipartite_layers not in BIPARTITE_LAYERS:
            raise ValueError(f"bipartite_layers: expected one of {', '.join(BIPARTITE_LAYERS)}, "
                             f"got {self.bipartite_layers!r}")


def layer_margin(margin: float, layer: int, depth: int) -> float:
    """The margin of block ``layer`` of ``depth``: it falls linearly from ``margin`` to 0, as in the official code
    (later blocks hold fewer, more distinct tokens, so a lower bar counts them as similar)."""
    return margin - margin * (layer / depth)


def is_bipartite(bipartite_layers: str, layer: int, depth: int) -> bool:
    """Whether block ``layer`` runs the bipartite kind under the ``bipartite_layers`` rule."""
    first = math.ceil(depth * 0.5)
    return {"first_half": layer < first, "second_half": layer >= first,
            "all": True, "none": False}[bipartite_layers]


def energy_score(metric: torch.Tensor, margin: float, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's energy (B×T) and the cosine similarities it comes from (B×T×T), for ``metric`` B×T×C.

    The mean includes the token itself (``ELU(1 − margin)``), as the official code's does: a constant shift.
    """
    unit = F.normalize(metric, p=2, dim=-1)
    sim = unit @ unit.transpose(-1, -2)
    return F.elu(sim - margin, alpha=alpha).mean(dim=-1), sim


def _rows_cols(sim: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``sim[b, rows[b]][:, cols[b]]`` for every batch element ``b``."""
    t = sim.shape[-1]
    picked = sim.gather(1, rows[..., None].expand(-1, -1, t))
    return picked.gather(2, cols[:, None, :].expand(-1, rows.shape[1], -1))


def energy_matching(metric: torch.Tensor, r: int, margin: float, alpha: float = 1.0, bipartite: bool = False,
                    protected: int = 0) -> MergeFn:
    """Which tokens of ``metric`` (B×N×C) merge into which, as a ``merge(x, mode, pyra)`` closure (ToMe's contract).

    The first ``protected`` tokens take no part and lead the output unchanged. The others are ordered by energy
    (highest first) and split alternately into A and B. ``r`` is clamped to half of them; at 0 the closure is the
    identity. Output: ``[protected, kept, B]``, where ``kept`` is, for the protecting kind, the ``T − 2r``
    lowest-energy tokens in energy order and, for the bipartite kind, the A tokens that stay, best-matched first.
    """
    p = protected
    r = min(r, max_merge(metric.shape[1], p))
    if r <= 0:
        return lambda x, mode="mean", pyra=None: x
    with torch.no_grad(), _fp32_scores(metric):
        energy, sim = energy_score(metric[:, p:].float(), margin, alpha)
        order = torch.argsort(energy, dim=-1, descending=True)
        if bipartite:
            a_idx, b_idx = order[:, 0::2], order[:, 1::2]
            best, best_b = _rows_cols(sim, a_idx, b_idx).max(dim=-1)
            by_score = best.argsort(dim=-1, descending=True)
            src_idx, keep_idx = a_idx.gather(1, by_score[:, :r]), a_idx.gather(1, by_score[:, r:])
            dst_idx = best_b.gather(1, by_score[:, :r])
        else:
            src_idx, b_idx, keep_idx = order[:, 0:2 * r:2], order[:, 1:2 * r:2], order[:, 2 * r:]
            dst_idx = _rows_cols(sim, src_idx, b_idx).argmax(dim=-1)

    def merge(x: torch.Tensor, mode: str = "mean", pyra: nn.Module | None = None) -> torch.Tensor:
        rest, c = x[:, p:], x.shape[-1]

        def take(idx: torch.Tensor) -> torch.Tensor:
            return rest.gather(1, idx[..., None].expand(-1, -1, c))

        src, dst, to = take(src_idx), take(b_idx), dst_idx[..., None].expand(-1, -1, c)
        if pyra is not None:
            src = pyra(src, dst.gather(1, to))
        dst = dst.scatter_reduce(1, to, src, reduce=mode)
        return torch.cat([x[:, :p], take(keep_idx), dst], dim=1)

    return merge


def pitome_schedule(ratio: float, num_tokens: int, depth: int) -> list[int]:
    """The ``merging.r`` of the official keep ratio: each block removes ``⌊T − T·ratio⌋`` of the ``T`` unprotected
    tokens it receives (``num_tokens`` into the first block), so the counts fall geometrically."""
    if not _number(ratio) or not 0.5 <= ratio <= 1.0:
        raise ValueError(f"ratio: expected a keep ratio in [0.5, 1] (at most half the tokens merge), got {ratio!r}")
    schedule, t = [], int(num_tokens)
    for _ in range(depth):
        r = math.floor(t - t * ratio)
        schedule.append(r)
        t -= r
    return schedule


class PiToMe(ToMe):
    """One layer of PiToMe: the energy-ordered split of the unprotected tokens, then ToMe's size-weighted merge
    (ToMe's layer with its own ``match``).

    The layer's margin and kind (protecting or bipartite) follow from its position in the model (``depth``,
    told by the model: ``context``) and the options. ``r`` is clamped to half the unprotected tokens. ``pyra``
    (a ``models.pyra`` re-activation, or None) modulates the size-weighted sources before they are summed.
    """

    context = frozenset({"depth"})
    Options = PiToMeOptions

    def __init__(self, r: int, protected: int = 1, dim: int = 0, layer: int | None = None,
                 options: PiToMeOptions | None = None, pyra: nn.Module | None = None, *, depth: int) -> None:
        super().__init__(r, protected, dim, layer, options, pyra)
        self.depth = int(depth)
        position = 0 if layer is None else int(layer)
        self.margin = layer_margin(self.options.margin, position, self.depth)
        self.bipartite = is_bipartite(self.options.bipartite_layers, position, self.depth)

    def match(self, metric: torch.Tensor) -> MergeFn:
        return energy_matching(metric, self.r, self.margin, self.options.alpha, self.bipartite, self.protected)

    def extra_repr(self) -> str:
        kind = "bipartite" if self.bipartite else "protecting"
        return f"{super().extra_repr()}, margin={self.margin:.4g}, alpha={self.options.alpha}, {kind}"
