"""Token merging (ToMe, Bolya et al., ICLR 2023) as small pure functions, API-compatible with ``tome.merge``.

``bipartite_soft_matching`` decides *which* tokens merge and returns closures that apply that decision
to any tensor laid out like the tokens (features, sizes, source maps). PYRA hooks into ``merge``
through its ``pyra`` argument: the re-activation sees the size-weighted source tokens and the
destinations they are about to be summed into (formulas in models/README.md). :class:`ToMe` is the
method the merging blocks run by default (``merging.method: tome``), built on these functions.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from .reduction import TokenReduction, Tokens

__all__ = ["ToMe", "bipartite_soft_matching", "merge_wavg", "merge_source", "parse_r", "do_nothing", "max_merge"]

MergeFn = Callable[..., torch.Tensor]
ReactivateFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def do_nothing(x: torch.Tensor, mode: str | None = None, pyra: ReactivateFn | None = None) -> torch.Tensor:
    """The merge of a layer that removes no token (r clamped to 0)."""
    return x


def _fp32_scores(metric: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for the matching scores: in bf16/fp16 near-equal similarities tie, and the argsort
    would break the ties arbitrarily. The merge itself runs in the autocast dtype, as before."""
    device = metric.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def max_merge(num_tokens: int, protected: int) -> int:
    """ToMe's clamp: at most half of the unprotected tokens can merge (each source needs its own partner set)."""
    return max(0, (num_tokens - protected) // 2)


def bipartite_soft_matching(
        metric: torch.Tensor,
        r: int,
        class_token: bool = False,
        distill_token: bool = False,
        protected: int | None = None,
) -> tuple[MergeFn, MergeFn]:
    """Match the ``r`` most similar (even, odd) token pairs of ``metric`` (B×N×C); return (merge, unmerge).

    Even positions form set A, odd positions set B. Each A token picks its most similar B token
    (cosine); the ``r`` A tokens with the best scores merge into their picks, best first. The first
    ``protected`` tokens (default: the class token and a distillation token, as in ToMe; with visual
    prompts also the prompts that follow them) never merge and never receive: those in A get no
    score, those in B are never picked, so they take no part in the matching, and they keep their
    positions. The other tokens keep ToMe's split by absolute position (even → A, odd → B). ``r``
    is clamped to half the unprotected tokens; at 0 both closures are the identity. Output order:
    ``[unmerged A, B]``, or ``[protected, rest of A, rest of B]``. ``merge``'s ``mode`` is a
    ``scatter_reduce`` reduction, or ``"prune"``: the sources are dropped and B keeps its values.
    """
    if distill_token and not class_token:
        raise ValueError("a distillation token follows the class token: distill_token needs class_token")
    tome_protected = int(class_token) + int(distill_token)
    if protected is None:
        protected = tome_protected
    elif protected < tome_protected:
        raise ValueError(f"protected={protected} leaves the class/distillation token unprotected")
    r = min(r, max_merge(metric.shape[1], protected))
    if r <= 0:
        return do_nothing, do_nothing
    protected_a, protected_b = (protected + 1) // 2, protected // 2  # at even / odd positions

    with torch.no_grad(), _fp32_scores(metric):
        metric = metric.float()
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        scores[..., :protected_a, :] = -math.inf   # ToMe's class token: row 0
        scores[..., :, :protected_b] = -math.inf   # ToMe's distillation token: column 0
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]   # A tokens that stay
        src_idx = edge_idx[..., :r, :]   # A tokens that merge, best score first
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if protected:
            unm_idx = unm_idx.sort(dim=1)[0]  # keeps the protected A tokens first

    def merge(x: torch.Tensor, mode: str = "mean", pyra: ReactivateFn | None = None) -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        if mode != "prune":   # "prune" (ToFu's pruning layers): the sources are dropped, destinations unchanged
            src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
            if pyra is not None:
                src = pyra(src, dst.gather(dim=-2, index=dst_idx.expand(n, r, c)))
            dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if protected > 1:  # protected tokens lead unm and dst, untouched: put them back in their order
            return torch.cat([x[..., :protected, :], unm[..., protected_a:, :], dst[..., protected_b:, :]], dim=1)
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        lead, x = x[..., :protected, :], x[..., protected:, :]
        unm_len = unm_idx.shape[1] - protected_a
        unm = torch.cat([lead[..., ::2, :], x[..., :unm_len, :]], dim=1)   # merge's [unmerged A, B] layout
        dst = torch.cat([lead[..., 1::2, :], x[..., unm_len:, :]], dim=1)
        n, _, c = unm.shape
        src = dst.gather(dim=-2, index=dst_idx.expand(n, r, c))
        out = torch.zeros(n, metric.shape[1], c, device=x.device, dtype=x.dtype)
        out[..., 1::2, :] = dst
        out.scatter_(dim=-2, index=(2 * unm_idx).expand(n, unm_idx.shape[1], c), src=unm)
        out.scatter_(dim=-2, index=(2 * src_idx).expand(n, r, c), src=src)
        return out

    return merge, unmerge


def merge_wavg(
        merge: MergeFn,
        x: torch.Tensor,
        size: torch.Tensor | None = None,
        pyra: ReactivateFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge of ``x`` (B×N×C); returns the merged tokens and their sizes (B×N'×1).

    ``pyra`` (if given) re-activates the size-weighted source tokens before they are summed into
    their destinations; sizes always merge unmodified.
    """
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum", pyra=pyra)
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: MergeFn, x: torch.Tensor, source: torch.Tensor | None = None,
                 mode: str = "amax") -> torch.Tensor:
    """Track which input patches each token stands for: a B×N×N₀ 0/1 map, merged with ``amax`` (``"prune"``:
    a dropped token's patches leave the map)."""
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device, dtype=x.dtype)[None, ...].expand(n, t, t)
    return merge(source, mode=mode)


Schedule = int | Sequence[int] | tuple[int, float] | Mapping[str, float]


def parse_r(num_layers: int, r: Schedule) -> list[int]:
    """Expand a merging schedule to one ``r`` per layer (ToMe's convention).

    An int is constant. ``(r, inflection)`` (a tuple as in ToMe, or ``{"r": r, "inflection": f}`` as in YAML)
    goes linearly from ``int(r·(1−f))`` to ``2r − that`` over the depth; ``f`` in [−1, 1], negative
    for a decreasing schedule. A list is per layer, zero-padded to the depth.
    """
    if isinstance(r, Mapping):
        unknown = set(r) - {"r", "inflection"}
        if unknown or "r" not in r:
            raise ValueError(f"a merging mapping takes keys 'r' and 'inflection', got {dict(r)}")
        r = (r["r"], r.get("inflection", 0.0))
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"a merging tuple is (r, inflection), got {r}; give a per-layer schedule as a list")
        r, inflect = r
        if isinstance(inflect, bool) or not isinstance(inflect, (int, float)) or not -1.0 <= inflect <= 1.0:
            raise ValueError(f"merging inflection must be a number in [-1, 1], got {inflect!r}")
    elif isinstance(r, list):
        if any(isinstance(v, bool) or not isinstance(v, int) for v in r):
            raise ValueError(f"a per-layer merging schedule must hold integers, got {list(r)}")
        if len(r) > num_layers:
            raise ValueError(f"merging schedule has {len(r)} entries but the model has {num_layers} layers")
        if any(v < 0 for v in r):
            raise ValueError(f"merging schedule {list(r)} has a negative r")
        return list(r) + [0] * (num_layers - len(r))
    else:
        inflect = 0.0
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"merging r must be an integer >= 0, got {r!r}")
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / max(num_layers - 1, 1)
    return [int(min_val + step * i) for i in range(num_layers)]


class ToMe(TokenReduction):
    """ToMe's layer step: bipartite soft matching on the mean keys, then the size-weighted average merge.

    ``pyra`` (a re-activation module of ``models.pyra``, or None) modulates the source tokens just
    before they are summed into their destinations. ``r`` is clamped to half the unprotected tokens
    (:func:`max_merge`); the protected leading tokens take no part in the matching.
    """

    needs = frozenset({"metric"})

    def __init__(self, r: int, protected: int = 1, dim: int = 0, layer: int | None = None,
                 options: object = None, pyra: nn.Module | None = None) -> None:
        super().__init__(r, protected, dim, layer, options)
        self.register_module("pyra", pyra)

    def max_reduction(self, num_tokens: int) -> int:
        return max_merge(num_tokens, self.protected)

    def match(self, metric: torch.Tensor) -> MergeFn:
        """Which tokens merge into which: ToMe's bipartite soft matching (a method that only matches
        differently, PiToMe, overrides this and keeps the merge)."""
        return bipartite_soft_matching(metric, self.r, protected=self.protected)[0]

    def forward(self, x: torch.Tensor, size: torch.Tensor | None, source: torch.Tensor | None, *,
                trace_source: bool = False, metric: torch.Tensor | None = None) -> Tokens:
        if self.r <= 0:
            return x, size, source
        merge = self.match(metric)
        if trace_source:
            source = merge_source(merge, x, source)
        x, size = merge_wavg(merge, x, size, pyra=self.pyra)
        return x, size, source
