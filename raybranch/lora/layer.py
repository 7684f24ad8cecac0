"""The Delta-LoRA layer types, in one place: the Linear layer and the attention wrapper.

* :mod:`raybranch.lora.linear`: :class:`DeltaLoRALinear` (h = W x + b + s·B A x, with W
  following the factors: W_t = W_a + λ·s·(B_t A_t − B_a A_a); the math is in its module
  docstring), its defaults and init helpers (:func:`default_rank`, :func:`svd_factors`);
* :mod:`raybranch.lora.conv`: :class:`DeltaLoRAConv2d` (peft's Conv2d layout; the shared
  anchor and update logic is :class:`~raybranch.lora.base.DeltaLoRABase`);
* :mod:`raybranch.lora.attention`: :class:`DeltaLoRAMultiheadAttention`, an
  ``nn.MultiheadAttention`` whose in/out projections are (Delta-LoRA) Linear modules.

This module re-exports them, under the names :mod:`raybranch.lora` and
:mod:`raybranch.lora.inject` import from it.
"""

from __future__ import annotations

from .attention import DeltaLoRAMultiheadAttention
from .conv import DeltaLoRAConv2d
from .linear import (
    DEFAULT_LAM,
    DEFAULT_MAX_RANK,
    DEFAULT_SCALE,
    INITS,
    DeltaLoRALinear,
    default_rank,
    svd_factors,
)

__all__ = [
    "DEFAULT_LAM",
    "DEFAULT_MAX_RANK",
    "DEFAULT_SCALE",
    "INITS",
    "DeltaLoRAConv2d",
    "DeltaLoRALinear",
    "DeltaLoRAMultiheadAttention",
    "default_rank",
    "svd_factors",
]
