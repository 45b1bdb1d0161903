"""PYRA: parallel yielding re-activation of the tokens about to be merged (models/README.md §2)."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["PYRA"]


class PYRA(nn.Module):
    """Modulates the ``r`` source tokens of one layer's merge with a channel-wise and a token-wise weight.

    From each (source, destination) pair it yields, in parallel, ``δ_D = W_rᵀ·M`` (B×1×D, mixing the
    pairs) and ``δ_r = M·W_Dᵀ`` (B×r×1, mixing the channels) with ``M = LayerNorm(X_s + X_t)``, and
    returns ``X_s + (X_s ⊙ 2σ(δ_D)) ⊙ (2σ(δ_r) − 1)``. ``weight_d`` starts at zero, so the module
    starts as the exact identity and the model as plain ToMe.
    """

    def __init__(self, r: int, dim: int, layer: int | None = None) -> None:
        super().__init__()
        if r <= 0 or dim <= 0:
            raise ValueError(f"PYRA needs r > 0 and dim > 0, got r={r}, dim={dim}")
        self.layer = layer
        self.weight_r = nn.Parameter(torch.empty(r, 1))
        self.weight_d = nn.Parameter(torch.zeros(1, dim))
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # kaiming_uniform(a=√5) on an r×1 tensor is uniform(−1, 1), as in the official code.
        nn.init.kaiming_uniform_(self.weight_r, a=5 ** 0.5)
        nn.init.zeros_(self.weight_d)
        self.norm.reset_parameters()

    def forward(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """``src``: the size-weighted source tokens (B×r×D); ``dst``: their matched destinations."""
        r = src.shape[-2]
        rows = self.weight_r.shape[0]
        if r > rows:
            where = "" if self.layer is None else f" in layer {self.layer}"
            raise ValueError(f"PYRA{where} was built for r <= {rows} but the merge removes {r} tokens; "
                             f"rebuild the model with this merging schedule")
        m = self.norm(src + dst)
        # A clamped merge (fewer tokens than the schedule expects) uses the first r rows.
        delta_d = self.weight_r[:r].transpose(0, 1) @ m       # B×1×D
        delta_r = m @ self.weight_d.transpose(0, 1)           # B×r×1
        return src + src * (2 * torch.sigmoid(delta_d)) * (2 * torch.sigmoid(delta_r) - 1)

    def extra_repr(self) -> str:
        return f"r={self.weight_r.shape[0]}, dim={self.weight_d.shape[1]}, layer={self.layer}"
