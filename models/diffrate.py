"""DiffRate (Chen et al., ICCV 2023): token pruning and merging with per-layer counts learned by gradient.

Each layer, after attention (formulas and the search protocol in models/diffrate.md):

1. the unprotected tokens are sorted by the class token's attention, most attended first;
2. **prune**: only the first ``P`` of them stay;
3. **merge**: the tokens ranked ``M+1 .. P`` go into their most similar token among the first ``M`` (cosine of
   the token features; protected tokens never receive). A merged token is the plain mean of itself and
   its sources, and its size adds each source's size times its similarity (DiffRate's proportional-attention
   weight).

``P`` and ``M`` are the same for every image. They are fixed (``merging.diffrate.rates``: a file written by a
search, or ``prune_kept`` / ``merge_kept`` lists), or searched (``search: true``): each is the expectation of a
learned distribution over candidate counts, rounded up with a straight-through gradient. During the search
no token leaves the sequence: dropped tokens are masked out of later attention by a 0/1 mask that carries
the distribution's straight-through gradient, and a FLOPs penalty (``auxiliary_loss``) pulls the expected
cost to ``target_flops``. In evaluation, and whenever the counts are fixed, tokens really go.
"""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .reduction import TokenReduction, Tokens

__all__ = ["DiffRate", "DiffRateOptions", "RATES_FILE", "reduce_tokens", "relaxed_step", "keep_distribution",
           "kept_count", "sort_by_class_attention", "ste_ceil", "ste_min"]

RATES_FILE = "diffrate_rates"   # <run>/diffrate_rates.json: what a search writes, what ``rates:`` reads
# During the search a dropped token's size is multiplied by this: proportional attention (log size) then gives it
# no weight, while the gradient of its mask still flows (the mask is 0, the size is not).
DROPPED_SIZE = 1e-30
MIN_SIZE = 1e-6                 # floor of a merged token's size (only reached where the similarities are negative)


class _CeilSTE(torch.autograd.Function):
    """``ceil`` forward, identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.ceil(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _MinSTE(torch.autograd.Function):
    """``min(n, a, b)`` forward; backward: the whole gradient to both ``a`` and ``b``, none to ``n`` (DiffRate's
    FLOPs: each layer's two kept counts answer for the tokens that leave it)."""

    @staticmethod
    def forward(ctx: Any, n: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.minimum(n, a), b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor]:
        return None, grad, grad


def ste_ceil(x: torch.Tensor) -> torch.Tensor:
    return _CeilSTE.apply(x)


def ste_min(n: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _MinSTE.apply(n, a, b)


# --- options -------------------------------------------------------------------------------------------------

def _counts(key: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        raise ValueError(f"{key}: expected a per-layer list of token counts >= 1, got {value!r}")
    return tuple(value)


def _read_rates(path: str) -> dict[str, Any]:
    """A rates file of a search: its per-layer counts and the token count it was searched for."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"rates: expected a rates file written by a search ({RATES_FILE}.json in its run folder), "
                         f"got {path!r} (no such file)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"rates: expected a JSON rates file, got {path!r} ({e})") from None
    if not isinstance(data, dict) or data.get("method") != "diffrate" or not {"prune_kept", "merge_kept"} <= set(data):
        raise ValueError(f"rates: expected a DiffRate rates file (method, prune_kept, merge_kept), got {path!r}")
    for key in ("prune_kept", "merge_kept"):
        _counts(f"rates ({path}: {key})", data[key])
    if len(data["prune_kept"]) != len(data["merge_kept"]):
        raise ValueError(f"rates: expected as many prune_kept as merge_kept counts in {path!r}, got "
                         f"{len(data['prune_kept'])} and {len(data['merge_kept'])}")
    return data


@dataclass(frozen=True)
class DiffRateOptions:
    """``merging.diffrate``: the keys of ``merging.method: diffrate``.

    Counts are of unprotected tokens kept after a layer's pruning / merging (a merged token counts once);
    the official compression_rate.json counts the class token too (one more).
    """

    search: bool = False                      # learn the counts (only their parameters train)
    target_flops: float | None = None         # search: multiply-adds of one image the penalty pulls to (fvcore's unit)
    penalty: float = 5.0                      # search: weight of ((FLOPs - target) / 1e9)² (the official λ)
    granularity: int = 4                      # search: step between candidate counts (official default)
    rates: str | None = None                  # fixed: a search's diffrate_rates.json
    prune_kept: tuple[int, ...] | None = None  # fixed: per layer, tokens kept by pruning
    merge_kept: tuple[int, ...] | None = None  # fixed: per layer, tokens kept by merging

    def __post_init__(self) -> None:
        if not isinstance(self.search, bool):
            raise ValueError(f"search: expected true or false, got {self.search!r}")
        for key in ("target_flops", "penalty"):
            value = getattr(self, key)
            bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            if value is not None and (bad or value < 0 or (key == "target_flops" and value == 0)):
                raise ValueError(f"{key}: expected a {'positive' if key == 'target_flops' else 'non-negative'} "
                                 f"number, got {value!r}")
        if self.penalty is None:
            raise ValueError("penalty: expected a non-negative number, got None")
        if isinstance(self.granularity, bool) or not isinstance(self.granularity, int) or self.granularity < 1:
            raise ValueError(f"granularity: expected an integer >= 1, got {self.granularity!r}")
        if self.rates is not None and not isinstance(self.rates, str):
            raise ValueError(f"rates: expected the path of a rates file, got {self.rates!r}")
        prune, merge = _counts("prune_kept", self.prune_kept), _counts("merge_kept", self.merge_kept)
        given = [k for k in ("rates", "prune_kept", "merge_kept") if getattr(self, k) is not None]
        if self.search:
            if self.target_flops is None:
                raise ValueError("target_flops: expected the multiply-adds the search aims at (e.g. 5.1e9), got None")
            if given:
                raise ValueError(f"{given[0]}: a search learns the counts; expected none given, got "
                                 f"{getattr(self, given[0])!r}")
            return
        if self.target_flops is not None:
            raise ValueError(f"target_flops: only a search (search: true) has a target, got {self.target_flops!r}")
        if self.rates is not None:
            if prune is not None or merge is not None:
                raise ValueError(f"{'prune_kept' if prune is not None else 'merge_kept'}: the counts come from "
                                 f"rates ({self.rates}); expected none given here")
            data = _read_rates(self.rates)
            prune, merge = tuple(data["prune_kept"]), tuple(data["merge_kept"])
            object.__setattr__(self, "source", data)
        elif prune is None or merge is None:
            missing = "merge_kept" if prune is not None else "prune_kept" if merge is not None else "rates"
            raise ValueError(f"{missing}: expected the counts (rates: a search's {RATES_FILE}.json, or prune_kept and "
                             f"merge_kept lists), or search: true; got None")
        elif len(prune) != len(merge):
            raise ValueError(f"merge_kept: expected one count per layer as prune_kept ({len(prune)}), got {len(merge)}")
        object.__setattr__(self, "prune_kept", prune)
        object.__setattr__(self, "merge_kept", merge)


# --- the layer step ------------------------------------------------------------------------------------------

def sort_by_class_attention(cls_attn: torch.Tensor, protected: int) -> torch.Tensor:
    """B×N positions: the protected tokens in place, then the others by the class token's attention, highest first."""
    order = torch.argsort(cls_attn[:, protected:], dim=-1, descending=True) + protected
    lead = torch.arange(protected, device=order.device).expand(order.shape[0], protected)
    return torch.cat([lead, order], dim=1)


def _take(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dim() == 2:
        return t.gather(1, idx)
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def _match(metric: torch.Tensor, keep: int, protected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token after the first ``keep`` picks its most similar one among them (cosine; never a protected
    token): (similarity, index), each B×(T−keep)."""
    with torch.no_grad():
        metric = metric.float()
        metric = metric / metric.norm(dim=-1, keepdim=True)
        similarity = metric[:, keep:] @ metric[:, :keep].transpose(-1, -2)
        similarity[..., :protected] = -math.inf
        return similarity.max(dim=-1)


def _scatter(t: torch.Tensor, keep: int, index: torch.Tensor, mode: str) -> torch.Tensor:
    """The first ``keep`` rows of ``t`` with the later ones reduced into them (``mode``: mean counts the row itself)."""
    src = t[:, keep:]
    return t[:, :keep].scatter_reduce(1, index[..., None].expand(-1, -1, t.shape[-1]), src, reduce=mode)


def reduce_tokens(x: torch.Tensor, size: torch.Tensor | None, source: torch.Tensor | None, cls_attn: torch.Tensor,
                  protected: int, prune_kept: int, merge_kept: int) -> Tokens:
    """DiffRate's step with fixed counts: sort, keep ``prune_kept`` unprotected tokens, merge the ranks after
    ``merge_kept`` into the first ``merge_kept``. Returns ``[protected, kept]`` tokens, their sizes and sources."""
    idx = sort_by_class_attention(cls_attn, protected)
    size = torch.ones_like(x[..., :1], dtype=torch.float32) if size is None else size
    x, size, source = _take(x, idx), _take(size, idx), _take(source, idx)
    end = protected + min(x.shape[1] - protected, prune_kept)
    x, size = x[:, :end], size[:, :end]
    source = None if source is None else source[:, :end]
    keep = protected + merge_kept
    if keep < end:
        similarity, index = _match(x, keep, protected)
        x = _scatter(x, keep, index, "mean")
        size = torch.cat([size[:, :keep], size[:, keep:] * similarity[..., None].to(size.dtype)], dim=1)
        size = _scatter(size, keep, index, "sum").clamp_min(MIN_SIZE)
        if source is not None:
            source = _scatter(source, keep, index, "amax")
    return x, size, source


def _fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off: the rounded count must not depend on the AMP dtype."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()


def kept_count(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The expected candidate count, rounded up (straight-through): DiffRate's differentiable kept count."""
    with _fp32(logits.device):
        return ste_ceil(torch.dot(candidates, logits.float().softmax(dim=-1)))   # dot: the official matmul of vectors


def keep_distribution(logits: torch.Tensor, candidates: torch.Tensor, num_tokens: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept count (:func:`kept_count`) and, for each of ``num_tokens`` ranks, the probability that it is kept
    (that the drawn count exceeds the rank)."""
    with _fp32(logits.device):
        probs = logits.float().softmax(dim=-1)
        ranks = torch.arange(num_tokens, device=logits.device, dtype=candidates.dtype)
        keep_prob = probs @ (candidates[:, None] > ranks[None, :]).to(probs.dtype)
    return kept_count(logits, candidates), keep_prob


def _token_mask(num_tokens: int, protected: int, kept: int, upto: int, keep_prob: torch.Tensor) -> torch.Tensor:
    """1 except 0 at ranks ``kept .. upto`` of the unprotected tokens, with the keep probabilities' gradient."""
    hard = torch.ones(num_tokens - protected, device=keep_prob.device, dtype=keep_prob.dtype)
    hard[kept:upto] = 0
    soft = hard - keep_prob.detach() + keep_prob
    return torch.cat([soft.new_ones(protected), soft])


Rate = tuple[torch.Tensor, torch.Tensor]   # (kept count, per-rank keep probability) of keep_distribution


def relaxed_step(x: torch.Tensor, size: torch.Tensor, mask: torch.Tensor, cls_attn: torch.Tensor, protected: int,
                 prune: Rate | None, merge: Rate | None, source: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """DiffRate's step during the search: every token stays; ``mask`` (B×N, 0 for tokens already dropped) gains the
    0s of this layer's pruning and merging, with the straight-through gradient of the keep probabilities.

    Merged tokens take their sources as in :func:`reduce_tokens` (sizes floored at 1, as in training); the
    sources stay in place, masked. ``prune`` / ``merge`` None: the layer keeps everything (DiffRate's first layer).
    """
    idx = sort_by_class_attention(cls_attn, protected)
    x, size, mask, source = _take(x, idx), _take(size, idx), _take(mask, idx), _take(source, idx)
    alive = int(mask[0, protected:].detach().sum().round().item())
    if prune is None:
        return x, size, mask, source
    (prune_count, prune_prob), (merge_count, merge_prob) = prune, merge
    num_tokens = x.shape[1]
    if prune_count < alive:
        mask = mask * _token_mask(num_tokens, protected, int(prune_count), alive, prune_prob)
    mid = min(alive, int(prune_count))
    if merge_count < mid:
        kept, keep, end = int(merge_count), protected + int(merge_count), protected + mid
        merge_mask = _token_mask(num_tokens, protected, kept, mid, merge_prob)
        similarity, index = _match(x[:, :end].detach(), keep, protected)
        x = torch.cat([_scatter(x[:, :end], keep, index, "mean"), x[:, keep:]], dim=1)
        scaled = torch.cat([size[:, :keep], size[:, keep:end] * similarity[..., None]], dim=1).clamp(min=1)
        size = torch.cat([_scatter(scaled, keep, index, "sum"), scaled[:, keep:], size[:, end:]], dim=1)
        mask = mask * merge_mask
    return x, size, mask, source


def _encode(size: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The search's sizes as the next attention sees them: dropped tokens shrink to DROPPED_SIZE × their size."""
    return size * (mask + DROPPED_SIZE * (1 - mask.detach()))[..., None]


def _decode(encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_encode`: sizes (no gradient) and the 0/1 mask, which keeps the mask's gradient."""
    alive = encoded.detach()[..., 0] > 0.5           # sizes of live tokens are >= 1 during the search
    factor = torch.where(alive, 1.0, DROPPED_SIZE).to(encoded.dtype)
    size = encoded.detach() / factor[..., None]
    soft = (encoded / size)[..., 0]
    return size, soft - soft.detach() + alive.to(soft.dtype)


# --- the method ----------------------------------------------------------------------------------------------

class _Plan:
    """What the layers of one model share: the token counts, the cost of each block per token, the target."""

    def __init__(self, layers: Sequence[DiffRate], num_tokens: int, protected: int, costs: dict[str, Any],
                 options: DiffRateOptions) -> None:
        self.layers, self.num_tokens, self.protected = list(layers), num_tokens, protected
        self.costs, self.options = costs, options
        self._fixed: list[int] | None = None

    def counts(self) -> list[tuple[int, int]]:
        """Per layer, the unprotected tokens after its pruning and after its merging (evaluation)."""
        n, out = self.num_tokens - self.protected, []
        for layer in self.layers:
            prune, merge = layer.kept_counts()
            pruned = min(n, prune)
            n = min(pruned, merge)
            out.append((pruned, n))
        return out

    def removals(self) -> list[int]:
        """Per layer, the tokens it removes in evaluation (computed once for fixed counts)."""
        if self._fixed is not None:
            return self._fixed
        before = [self.num_tokens - self.protected] + [m for _, m in self.counts()]
        removals = [a - b for a, b in zip(before[:-1], before[1:])]
        if not self.options.search:
            self._fixed = removals
        return removals

    def flops(self, kept: Sequence[tuple[Any, Any]] | None = None) -> Any:
        """Multiply-adds of one image: the official formula with each block's linear costs read from the model.

        ``kept``: per layer the (pruned, merged) token counts with the protected ones, as tensors (the search:
        straight-through) or ints, or None for a layer that kept everything; default: the evaluation counts.
        """
        c = self.costs
        if kept is None:
            kept = [(p + self.protected, m + self.protected) for p, m in self.counts()]
        n = self.num_tokens
        tensors = [k[0] for k in kept if k is not None and isinstance(k[0], torch.Tensor)]
        if tensors:
            n = torch.tensor(float(n), device=tensors[0].device)
        total = c["stem"] + c["head"]
        for (attn, mlp), counts in zip(c["blocks"], kept):
            total = total + attn * n + c["attention"] * n * n
            if counts is not None:
                n = ste_min(n, *counts) if isinstance(n, torch.Tensor) else min(n, *counts)
            total = total + mlp * n
        return total


def _linear_macs(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _model_costs(model: nn.Module) -> dict[str, Any]:
    """Multiply-adds per token of each block's attention side (PEFT included) and MLP side, and the fixed parts."""
    blocks = [(_linear_macs(b.attn), _linear_macs(b.mlp) + _linear_macs(b.adapter)) for b in model.blocks]
    heads = [getattr(model, h) for h in ("head", "head_dist") if isinstance(getattr(model, h, None), nn.Module)]
    stem = model.patch_embed.num_patches * model.patch_embed.proj.weight.numel()
    attention = 2 * getattr(model.blocks[0].attn, "attn_dim", model.embed_dim)   # q·kᵀ and attn·v, per token pair
    return {"blocks": blocks, "attention": attention, "stem": stem, "head": sum(_linear_macs(h) for h in heads)}


class DiffRate(TokenReduction):
    """One layer of DiffRate: class-attention pruning, then merging into the most similar kept tokens.

    Built by ``create_model`` (``merging.method: diffrate``), which calls :meth:`setup` once the token count is
    known. ``r`` is the number of tokens the layer removes in evaluation (set by the counts, not by
    ``merging.r``); setting it to 0 switches the layer off (a benchmark's unmerged model) and back to the count
    switches it on. In a search the layers after the first have the parameters ``prune_logits`` /
    ``merge_logits`` (the official ``selected_probability``), one per candidate count.
    """

    needs = frozenset({"cls_attn"})
    Options = DiffRateOptions

    def __init__(self, r: int, protected: int = 1, dim: int = 0, layer: int | None = None,
                 options: DiffRateOptions | None = None) -> None:
        self._plan: _Plan | None = None
        self._off = False
        super().__init__(r, protected, dim, layer, options)
        self.register_buffer("candidates", torch.zeros(0), persistent=False)
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None

    # r: the tokens removed in evaluation; 0 switches the layer off
    @property
    def r(self) -> int:
        plan = self.__dict__.get("_plan")
        if plan is None:
            return self.__dict__.get("_r", 0)
        return 0 if self._off else plan.removals()[self.layer]

    @r.setter
    def r(self, value: int) -> None:
        value, plan = int(value), self.__dict__.get("_plan")
        if plan is None:
            self.__dict__["_r"] = value
            return
        planned = plan.removals()[self.layer]
        if value == planned:
            self._off = False
        elif value == 0:
            self._off = True
        else:
            raise ValueError(f"merging.r: layer {self.layer} of diffrate removes {planned} tokens by its counts "
                             f"(merging.diffrate); r can switch it off (0) or on ({planned}), not set {value}")

    @property
    def active(self) -> bool:
        if self._plan is None:
            return self.__dict__.get("_r", 0) > 0
        if self._off:
            return False
        return self.options.search or self._plan.removals()[self.layer] > 0

    @property
    def trains_alone(self) -> bool:
        return self.options.search

    def kept_counts(self) -> tuple[int, int]:
        """Unprotected tokens this layer keeps by pruning and by merging, as evaluation applies them."""
        if not self.options.search:
            return self.options.prune_kept[self.layer], self.options.merge_kept[self.layer]
        n = self._plan.num_tokens - self._plan.protected
        if "prune_logits" not in self._parameters:
            return n, n
        with torch.no_grad():
            return tuple(int(kept_count(logits, self.candidates).item()) for logits in (self.prune_logits,
                                                                                        self.merge_logits))

    def forward(self, x: torch.Tensor, size: torch.Tensor | None, source: torch.Tensor | None, *,
                trace_source: bool = False, cls_attn: torch.Tensor | None = None) -> Tokens:
        if self._plan is None:
            raise RuntimeError("a DiffRate layer sizes itself for the model's tokens: build the model with "
                               "models.create_model(..., method='diffrate') (or call DiffRate.setup)")
        if trace_source and source is None:
            source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
        if self.training and self.options.search:
            return self._search_step(x, size, source, cls_attn)
        prune, merge = self.kept_counts()
        return reduce_tokens(x, size, source, cls_attn, self.protected, prune, merge)

    def _search_step(self, x: torch.Tensor, size: torch.Tensor | None, source: torch.Tensor | None,
                     cls_attn: torch.Tensor) -> Tokens:
        if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type) and \
                torch.get_autocast_dtype(x.device.type) == torch.float16:
            raise ValueError("train.precision: the diffrate search needs fp32 or bf16 (in fp16 the masked tokens' "
                             "attention underflows and their gradient is lost)")
        if size is None:
            size, mask = torch.ones_like(x[..., :1], dtype=torch.float32), x.new_ones(x.shape[:2], dtype=torch.float32)
        else:
            size, mask = _decode(size)
        rates = None
        if "prune_logits" in self._parameters:
            n = x.shape[1] - self.protected
            rates = [keep_distribution(logits, self.candidates, n) for logits in (self.prune_logits, self.merge_logits)]
        x, size, mask, source = relaxed_step(x, size, mask, cls_attn, self.protected, *(rates or (None, None)),
                                             source=source)
        p = self.protected
        if rates is None:
            full = torch.tensor(float(x.shape[1]), device=x.device)
            self._kept = (full, full)
        else:
            self._kept = (rates[0][0] + p, rates[1][0] + p)
        return x, _encode(size, mask), source

    # --- model-level hooks (models.reduction) ---------------------------------------------------------------

    @classmethod
    def setup(cls, model: nn.Module, layers: Sequence[DiffRate]) -> list[int]:
        """Size the layers for the model's tokens: the search's candidates and parameters, or a check of the fixed
        counts; returns the tokens each layer removes in evaluation."""
        options = layers[0].options
        if getattr(model, "cls_token", None) is None:
            raise ValueError("merging.method: diffrate ranks tokens by the class token's attention; this model "
                             "has no class token")
        if options.search and not model.prop_attn:
            raise ValueError("merging.prop_attn: the diffrate search masks tokens through proportional attention; "
                             "set merging.prop_attn: true")
        protected, num_tokens = layers[0].protected, model._num_input_tokens()
        n = num_tokens - protected
        if not options.search:
            key = "rates" if options.rates is not None else "prune_kept"
            if len(options.prune_kept) != len(layers):
                raise ValueError(f"merging.diffrate.{key}: expected one count per layer ({len(layers)}), got "
                                 f"{len(options.prune_kept)}")
            searched = getattr(options, "source", {})
            shape = (searched.get("num_tokens", num_tokens), searched.get("protected", protected))
            if shape != (num_tokens, protected):
                raise ValueError(f"merging.diffrate.rates: {options.rates} was searched for {searched['num_tokens']} "
                                 f"tokens ({searched['protected']} protected); this model has {num_tokens} "
                                 f"({protected} protected)")
        device = model.blocks[0].norm1.weight.device
        plan = _Plan(layers, num_tokens, protected, _model_costs(model), options)
        for i, layer in enumerate(layers):
            layer._plan, layer.layer = plan, i
            if options.search and i > 0:   # the first layer keeps every token (as in the official search)
                layer.candidates = torch.arange(n, 0, -options.granularity, dtype=torch.float32, device=device)
                layer.prune_logits = nn.Parameter(torch.zeros(len(layer.candidates), device=device))
                layer.merge_logits = nn.Parameter(torch.zeros(len(layer.candidates), device=device))
        return plan.removals()

    @classmethod
    def auxiliary_loss(cls, layers: Sequence[DiffRate]) -> torch.Tensor | None:
        """The search's FLOPs penalty ``penalty · ((FLOPs − target) / 1e9)²`` of the layers' last training forward."""
        plan = layers[0]._plan
        if plan is None or not plan.options.search or not layers[0].training:
            return None
        kept = [layer._kept for layer in layers]   # None: a layer switched off (r = 0) kept everything
        if all(k is None for k in kept):
            return None
        for layer in layers:
            layer._kept = None
        flops = plan.flops(kept)
        plan.last_flops = float(flops.detach())
        return plan.options.penalty * (flops / 1e9 - plan.options.target_flops / 1e9) ** 2

    @classmethod
    def learned_record(cls, layers: Sequence[DiffRate]) -> dict[str, dict[str, Any]] | None:
        """After a search: its counts as ``diffrate_rates.json``, which ``merging.diffrate.rates`` loads."""
        plan = layers[0]._plan
        if plan is None or not plan.options.search:
            return None
        raw = [layer.kept_counts() for layer in layers]
        removals = plan.removals()
        tokens = [plan.num_tokens]
        for r in removals:
            tokens.append(tokens[-1] - r)
        return {RATES_FILE: {
            "method": "diffrate", "num_tokens": plan.num_tokens, "protected": plan.protected,
            "prune_kept": [p for p, _ in raw], "merge_kept": [m for _, m in raw],
            "r": removals, "tokens_per_layer": tokens, "flops_estimate": int(plan.flops()),
            "target_flops": plan.options.target_flops, "granularity": plan.options.granularity}}

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self._plan is not None:
            prune, merge = self.kept_counts()
            text += f", prune_kept={prune}, merge_kept={merge}" + (", search" if self.options.search else "")
        return text

