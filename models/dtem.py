"""DTEM (Lee & Hong, *Learning to Merge Tokens via Decoupled Embedding for Efficient Vision Transformers*,
NeurIPS 2024) as a method of the merging blocks (``merging.method: dtem``; models/README.md §11).

ToMe matches tokens by their attention keys, which the task also shapes. DTEM gives the matching an embedding of
its own: a linear layer on the block's attention input (``norm1(x)``, detached, so the embedding learns without
pulling on the backbone), whose output replaces the keys as the matching metric. To let the task loss reach that
embedding, training relaxes ToMe's hard choice of the ``r`` best pairs: each source keeps its ``top_k`` best
candidates, an iterated softmax picks ``r`` (source, candidate) entries softly (a relaxed top-r), and the chosen
weights merge sources into destinations as a weighted average. Nothing is dropped in training: merged-away
tokens keep a size near 0, the tokens are sorted by size, and the next layer matches only the first ``n`` (what
evaluation would still hold), while proportional attention makes the rest all but invisible. In evaluation the
same embedding drives ToMe's hard bipartite matching and the tokens are really removed.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .reduction import TokenReduction, Tokens
from .tome import bipartite_soft_matching, max_merge, merge_source, merge_wavg

__all__ = ["DTEM", "DTEMOptions", "DecoupledEmbedding", "soft_top_r", "default_embed_dim"]

# A merged-away token's size in training is clamped to this in the forward only (straight through in the
# backward): proportional attention takes log(size), whose gradient at an exact 0 would be 0 · ∞ = NaN. The
# official attention multiplies by the size instead, for which 0 is harmless; the gradients are the same.
MIN_TRAIN_SIZE = 1e-12


def _positive(name: str, value: object, kind: type = float) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if not ok or value <= 0:
        what = "a number > 0" if kind is float else "an integer >= 1"
        raise ValueError(f"{name}: expected {what}, got {value!r}")


@dataclass(frozen=True)
class DTEMOptions:
    """DTEM's own keys (``merging.dtem``); the defaults are the official code's (``train.py``'s arguments)."""

    embed_dim: int | None = None   # width of the decoupled embedding (official feat_dim); None: the official rule
    top_k: int = 3                 # candidates each source keeps in the relaxation (official k2)
    tau1: float = 0.1              # temperature on the candidates' scores (official tau1)
    tau2: float = 0.1              # temperature of each soft selection step (official tau2)

    def __post_init__(self) -> None:
        if self.embed_dim is not None:
            _positive("embed_dim", self.embed_dim, int)
        _positive("top_k", self.top_k, int)
        _positive("tau1", self.tau1)
        _positive("tau2", self.tau2)


def default_embed_dim(dim: int, head_dim: int) -> int:
    """The official width: one head's width, two heads' for models of width 1024 and more (ViT-L)."""
    return head_dim if dim < 1024 else 2 * head_dim


class DecoupledEmbedding(nn.Linear):
    """DTEM's embedding for the matching (a plain linear layer, as the official ``metric_layer``); its parameters
    train as the reduction's (``TokenReduction.param_category``)."""


def _fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for the embedding, the scores and the selection (the official selection runs in fp32; in bf16
    near-ties would flip the hard matching)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def soft_top_r(scores: torch.Tensor, r: int, top_k: int, tau1: float, tau2: float) -> torch.Tensor:
    """The relaxed choice of the ``r`` best (source, destination) pairs: a B×|A|×|B| matrix of merge weights.

    Each source row keeps its ``top_k`` best scores (÷ ``tau1``). Then ``r`` times: a softmax (÷ ``tau2``) over all
    the kept entries of the image is added to the k-hot sum, and the log of what that step left unchosen is added
    to the logits, so the next step picks another entry. Rows whose weights sum above 1 are scaled back to 1 (the
    scale is detached), so a source gives away at most its whole size. The official ``DTEMBlock._select``.
    """
    eps = torch.finfo(torch.float32).eps
    scores = scores.float()
    idx = scores.argsort(dim=-1, descending=True)[..., :top_k]
    logits = scores.gather(dim=-1, index=idx) / tau1
    B, N, M = logits.shape
    khot = torch.zeros_like(logits)
    for _ in range(r):
        onehot = F.softmax(logits.view(B, -1) / tau2, dim=-1).view(B, N, M)
        khot = khot + onehot
        logits = logits + torch.log(torch.clamp(1 - onehot.sum(dim=-1, keepdim=True), min=eps))
    khot = khot / (torch.clamp(khot.sum(dim=-1, keepdim=True).detach() - 1, min=0.0) + 1.0)
    return torch.zeros_like(scores).scatter_reduce(-1, idx, khot, reduce="sum")


class DTEM(TokenReduction):
    """One layer of DTEM: match on a learned decoupled embedding of the attention input, then merge ``r`` tokens.

    Eval mode: ToMe's hard bipartite matching and size-weighted average (``r`` tokens removed). Training mode:
    the soft relaxation on the first ``n`` tokens (``n``: what evaluation would still hold here), all tokens kept
    and sorted by size. ``r`` is clamped to half the unprotected tokens, as in ToMe; the leading ``protected`` tokens
    take no part. A layer built with ``r = 0`` has no embedding.
    """

    needs = frozenset({"features"})
    context = frozenset({"head_dim"})
    Options = DTEMOptions

    def __init__(self, r: int, protected: int = 1, dim: int = 0, layer: int | None = None,
                 options: DTEMOptions | None = None, *, head_dim: int) -> None:
        super().__init__(r, protected, dim, layer, options)
        self.embed_dim = self.options.embed_dim or default_embed_dim(self.dim, int(head_dim))
        # The official code gives every block one; here only a layer built to merge learns one (as FPET).
        self.embed = DecoupledEmbedding(self.dim, self.embed_dim) if self.r > 0 else None
        self._earlier: tuple[DTEM, ...] | None = None   # the model's DTEM layers before this one (setup)

    def max_reduction(self, num_tokens: int) -> int:
        return max_merge(num_tokens, self.protected)

    @classmethod
    def setup(cls, model: nn.Module, layers: Sequence[TokenReduction]) -> None:
        """Let each layer know the layers before it: training keeps every token, so a layer finds the count it
        matches among (``active_tokens``) from their ``r``, read at forward time (a changed schedule holds)."""
        for i, layer in enumerate(layers):
            layer._earlier = tuple(layers[:i])
        return None

    def active_tokens(self, num_tokens: int) -> int:
        """Of ``num_tokens`` input tokens, those evaluation would still hold here (the first ones in training)."""
        if self._earlier is None:
            raise ValueError(f"DTEM layer {self.layer}: training needs the model's earlier DTEM layers; build with "
                             f"models.create_model, or call models.reduction.setup_reductions(model)")
        for layer in self._earlier:
            num_tokens -= layer.effective_r(num_tokens)
        return num_tokens

    def _metric(self, features: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            raise ValueError(f"DTEM layer {self.layer} was built with r = 0 and has no embedding; rebuild the "
                             f"model with this merging schedule")
        with _fp32(features.device):
            metric = self.embed(features.detach().float())
            return metric / metric.norm(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor, size: torch.Tensor | None, source: torch.Tensor | None, *,
                trace_source: bool = False, features: torch.Tensor | None = None) -> Tokens:
        if self.r <= 0:
            return x, size, source
        metric = self._metric(features)
        if not self.training:
            merge, _ = bipartite_soft_matching(metric, self.r, protected=self.protected)
            if trace_source:
                source = merge_source(merge, x, source)
            x, size = merge_wavg(merge, x, size)
            return x, size, source
        if trace_source:
            raise ValueError("trace_source follows hard merges: DTEM's training relaxation has none (use eval mode)")
        x, size = self._relaxed(x, size, metric)
        return x, size, source

    def _relaxed(self, x: torch.Tensor, size: torch.Tensor | None,
                 metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The training step (the official ``DTEMBlock._merge_train``, with ``protected`` leading tokens)."""
        p, n = self.protected, self.active_tokens(x.shape[1])
        r = min(self.r, max_merge(n, p))
        if r <= 0:
            return x, size
        if size is None:
            size = torch.ones_like(x[..., :1])
        w = size[..., 0]
        xa, xb = x[:, p:n:2], x[:, p + 1:n:2]
        wa, wb = w[:, p:n:2], w[:, p + 1:n:2]
        o = self.options
        with _fp32(x.device):    # the sizes too: bf16 would round a size of 100 to a multiple of 0.5
            scores = metric[:, p:n:2] @ metric[:, p + 1:n:2].transpose(-1, -2)
            assign = soft_top_r(scores, r, o.top_k, o.tau1, o.tau2)
            wa, wb = wa.float(), wb.float()
            xb = wb[..., None].to(xb.dtype) * xb
            wb = wb + (assign.transpose(-1, -2) @ wa[..., None])[..., 0]
            left = 1 - assign.sum(dim=-1)                   # what each source keeps; clipped to [0, 1] forward only
            wa_new = wa * (left + (left.clamp(0.0, 1.0) - left).detach())
        xb = xb + assign.to(x.dtype).transpose(-1, -2) @ (wa[..., None].to(xa.dtype) * xa)   # autocast dtype
        wa = wa_new
        xb = xb / wb[..., None].to(xb.dtype)
        w_new, x_new = torch.cat([wa, wb], dim=-1), torch.cat([xa, xb], dim=1)
        order = w_new.argsort(dim=-1, descending=True)      # merged-away tokens (size ~0) go last
        w_new = w_new.gather(dim=-1, index=order)
        x_new = x_new.gather(dim=-2, index=order[..., None].expand_as(x_new))
        w_new = w_new + (w_new.clamp_min(MIN_TRAIN_SIZE) - w_new).detach()
        x = torch.cat([x[:, :p], x_new, x[:, n:]], dim=1)
        size = torch.cat([size[:, :p], w_new[..., None], size[:, n:]], dim=1)
        return x, size

    def extra_repr(self) -> str:
        o = self.options
        return f"{super().extra_repr()}, embed_dim={self.embed_dim}, top_k={o.top_k}, tau1={o.tau1}, tau2={o.tau2}"
