"""Token merging (ToMe, Bolya et al. 2023) as small pure functions, API-compatible with ``tome.merge``.

``bipartite_soft_matching`` decides *which* tokens merge and returns closures that apply that decision
to any tensor laid out like the tokens (features, sizes, source maps). PYRA hooks into ``merge`` through
its ``pyra`` argument: the re-activation sees the size-weighted source tokens and their destinations
before the scatter-sum (facts §2).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["bipartite_soft_matching", "merge_wavg", "merge_source", "parse_r", "do_nothing"]

MergeFn = Callable[..., torch.Tensor]
ReactivateFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def do_nothing(x: torch.Tensor, mode: Optional[str] = None, pyra: Optional[ReactivateFn] = None) -> torch.Tensor:
    """The merge of a layer that removes no token (r clamped to 0)."""
    return x


def bipartite_soft_matching(
        metric: torch.Tensor,
        r: int,
        class_token: bool = False,
        distill_token: bool = False,
) -> Tuple[MergeFn, MergeFn]:
    """Match the ``r`` most similar (even, odd) token pairs of ``metric`` (B×N×C) and return (merge, unmerge).

    Even positions form set A, odd positions set B. Each A token picks its most similar B token; the
    ``r`` A tokens with the best scores merge into their picks. The class token (position 0) never
    merges and a distillation token (position 1) never receives. ``r`` is clamped so that at most half
    of the unprotected tokens merge; when it reaches 0 both closures are the identity.
    """
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return do_nothing, do_nothing

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf

        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]   # A tokens that stay
        src_idx = edge_idx[..., :r, :]   # A tokens that merge, best score first
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]  # keeps the class token first

        # Where each output token comes from and where each source lands, as token positions: the
        # merged layout is one row gather (index_select) plus one row sum (index_add) over the
        # flattened B·N×C tokens. Output order: [unmerged A, all of B], or [cls, dist, rest of A, rest of B].
        unm_len = unm_idx.shape[1]
        odd = torch.arange(1, t, 2, device=metric.device).view(1, -1, 1).expand(metric.shape[0], -1, 1)
        if distill_token:
            keep_idx = torch.cat([2 * unm_idx[:, :1], odd[:, :1], 2 * unm_idx[:, 1:], odd[:, 1:]], dim=1)
            dst_pos = torch.where(dst_idx == 0, 1, unm_len + dst_idx)
        else:
            keep_idx = torch.cat([2 * unm_idx, odd], dim=1)
            dst_pos = unm_len + dst_idx
        src_pos, dst_in_x = 2 * src_idx, 2 * dst_idx + 1
        keep_len = keep_idx.shape[1]
        # The same, as rows of the flattened B·N×C input / B·N'×C output, for x of metric's batch.
        n0 = metric.shape[0]
        in_rows = (torch.cat([keep_idx, src_pos, dst_in_x], dim=1)[..., 0]
                   + torch.arange(0, n0 * t, t, device=metric.device).view(n0, 1))
        cached = (in_rows[:, :keep_len].reshape(-1), in_rows[:, keep_len:keep_len + r].reshape(-1),
                  in_rows[:, keep_len + r:].reshape(-1), _flat_rows(dst_pos, n0, keep_len))

    def rows_of(n: int, t_in: int) -> Tuple[torch.Tensor, ...]:
        if n == n0 and t_in == t:
            return cached
        return (_flat_rows(keep_idx, n, t_in), _flat_rows(src_pos, n, t_in), _flat_rows(dst_in_x, n, t_in),
                _flat_rows(dst_pos, n, keep_len))

    def merge(x: torch.Tensor, mode: str = "mean", pyra: Optional[ReactivateFn] = None) -> torch.Tensor:
        n, t_in, c = x.shape
        keep_rows, src_rows, dst_rows, out_rows = rows_of(n, t_in)
        rows = x.reshape(n * t_in, c)
        out = rows.index_select(0, keep_rows).view(n, keep_len, c)
        src = rows.index_select(0, src_rows).view(n, r, c)
        if pyra is not None:
            src = pyra(src, rows.index_select(0, dst_rows).view(n, r, c))
        # In place on the fresh gather (autograd saved x and the index, not it): destinations plus sources.
        if mode == "sum":
            out.view(n * keep_len, c).index_add_(0, out_rows, src.reshape(n * r, c))
            return out
        return out.scatter_reduce_(-2, dst_pos.expand(n, r, c), src, reduce=mode)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        unm_len = unm_idx.shape[1]
        unm, dst = x[..., :unm_len, :], x[..., unm_len:, :]
        n, _, c = unm.shape
        src = dst.gather(dim=-2, index=dst_idx.expand(n, r, c))
        out = torch.zeros(n, metric.shape[1], c, device=x.device, dtype=x.dtype)
        out[..., 1::2, :] = dst
        out.scatter_(dim=-2, index=(2 * unm_idx).expand(n, unm_len, c), src=unm)
        out.scatter_(dim=-2, index=(2 * src_idx).expand(n, r, c), src=src)
        return out

    return merge, unmerge


def _flat_rows(idx: torch.Tensor, n: int, t: int) -> torch.Tensor:
    """Token positions ``idx`` (B×K×1, B = n or 1) as row numbers of the flattened n·t×C tokens."""
    offsets = torch.arange(0, n * t, t, device=idx.device).view(n, 1)
    return (idx[..., 0] + offsets).reshape(-1)


def merge_wavg(
        merge: MergeFn,
        x: torch.Tensor,
        size: Optional[torch.Tensor] = None,
        pyra: Optional[ReactivateFn] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge of ``x`` (B×N×C); returns the merged tokens and their sizes (B×N'×1).

    ``pyra`` (if given) re-activates the size-weighted source tokens before they are summed into their
    destinations; sizes always merge unmodified.
    """
    ones = size is None
    if ones:
        size = torch.ones_like(x[..., 0, None])
    if merge is do_nothing:
        return x, size
    x = merge(x if ones else x * size, mode="sum", pyra=pyra)  # x·1 is x: skip that pass
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: MergeFn, x: torch.Tensor, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Track which input patches each token stands for: a B×N×N₀ 0/1 map, merged with ``amax``."""
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device, dtype=x.dtype)[None, ...].expand(n, t, t)
    return merge(source, mode="amax")


def parse_r(num_layers: int, r: Union[List[int], Tuple[int, float], int]) -> List[int]:
    """Expand a merging schedule to one ``r`` per layer (ToMe's convention).

    An int is constant; ``(r, inflection)`` goes linearly from ``int(r·(1−inflection))`` to
    ``2r − that`` over the depth; a list is per layer, zero-padded to the depth.
    """
    if isinstance(r, (list, tuple)) and not _is_inflection_pair(r):
        r = [int(v) for v in r]
        if len(r) > num_layers:
            raise ValueError(f"merging schedule has {len(r)} entries but the model has {num_layers} layers")
        if any(v < 0 for v in r):
            raise ValueError(f"merging schedule {r} has a negative r")
        return r + [0] * (num_layers - len(r))
    inflect = 0.0
    if isinstance(r, (list, tuple)):
        r, inflect = r
    if r < 0:
        raise ValueError(f"merging r must be >= 0, got {r}")
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / max(num_layers - 1, 1)
    return [int(min_val + step * i) for i in range(num_layers)]


def _is_inflection_pair(r: Sequence) -> bool:
    """``(r, inflection)``: a 2-tuple as in ToMe, or a 2-list ending in a float (YAML has no tuples)."""
    return len(r) == 2 and (isinstance(r, tuple) or isinstance(r[1], float))
