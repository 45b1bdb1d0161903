"""The token-reduction methods by name, without torch: config loading knows ``merging.method`` and the
``merging.<method>`` keys from this table before any model module is imported (``models.reduction``, which
re-exports it and adds to it with ``register_reduction``, describes the family).
"""
from __future__ import annotations

from typing import Any

__all__ = ["REDUCTION_METHODS"]

# name -> "module:Class" (imported when first used) or the class itself (register_reduction).
REDUCTION_METHODS: dict[str, Any] = {
    "tome": "models.tome:ToMe",
    "fpet": "models.fpet:FPET",
    "diffrate": "models.diffrate:DiffRate",
    "dtem": "models.dtem:DTEM",
    "pitome": "models.pitome:PiToMe",
    "tofu": "models.tofu:ToFu",
}
