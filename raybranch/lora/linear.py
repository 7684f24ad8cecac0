"""DeltaLoRALinear: a Linear whose dense weight follows its low-rank factors, and its init helpers.

Delta-LoRA (Zi et al. 2023; report §5.2.3) keeps a dense weight W (d×k) that the optimizer
never touches and trainable factors A (r×k), B (d×r):

    h = W x + b + s · B A x

After every optimizer step the dense weight moves by the change of the low-rank product,

    W ← W + λ · s · (B'A' − B A)                     (B A = product before the step)

so W gathers a high-rank update while only A, B (and whatever non-LoRA parameters the user
trains) are optimised and need to be checkpointed.

Closed form (what this module computes). Between two *anchors* (the layer's creation, a
branch point, a ``merge_()``, a ``reanchor_()``) the update telescopes:

    W_t = W_a + λ · s · (B_t A_t − B_a A_a)

with (W_a, A_a, B_a) the values at the anchor. ``delta_update()`` recomputes W from this
closed form instead of adding increments, for two reasons:

* a checkpoint needs only (A_t, B_t) per step plus the anchor once; rebuilding W from them
  runs the very same floating-point operations as training did, so the rebuilt W is
  bit-for-bit the live W (same device, dtype and BLAS). Adding increments step by step in
  float32 drifts away from the telescoped value by rounding and could not be rebuilt exactly;
* it costs the same one d×r×k matmul as the incremental form (two when B_a ≠ 0, e.g. after
  SVD initialisation), and it is idempotent: calling it twice, or after several optimizer
  steps, gives the W that per-step updates would have given, up to rounding.

The price: W must change only through this layer's methods. After writing W by hand call
``reanchor_()``. ``load_state_dict`` re-anchors at the loaded values automatically.

Storage choice: W is the buffer ``weight`` and the bias the buffer ``bias`` (or a Parameter
with ``train_bias=True``), so ``state_dict`` keys stay those of ``nn.Linear`` plus
``lora_A``/``lora_B``, ``model.parameters()`` never yields W (an optimizer built from it is
correct), and ``torch.save(state_dict)`` of a Delta-LoRA model is about the size of the plain
model — the honest baseline for a compression ratio. The anchor (W_a, A_a, B_a) lives in
non-persistent buffers: it moves with ``.to()`` but is not in ``state_dict``; the checkpoint
helpers in :mod:`raybranch.lora.inject` store it once per anchor. Under DDP, pass
``broadcast_buffers=False``: every rank computes the same W from the same A, B.

No dropout on the LoRA path: the W update assumes the gradient of the undropped product.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    DEFAULT_LAM,
    DEFAULT_MAX_RANK,
    DEFAULT_SCALE,
    INITS,
    DeltaLoRABase,
    check_hyper,
    svd_factors,
)


def default_rank(out_features: int, in_features: int, max_rank: int = DEFAULT_MAX_RANK) -> int:
    """Report §5.2.2.6: r = min(min(d, k), max_rank) for a d×k weight."""
    return min(out_features, in_features, max_rank)


class DeltaLoRALinear(DeltaLoRABase):
    """Delta-LoRA replacement for ``nn.Linear(k → d)``; see the module docstring for the math.

    Args:
        in_features, out_features: k and d.
        bias: whether the layer has a bias b.
        rank: r; default min(min(d, k), 8). Must satisfy 1 ≤ r ≤ min(d, k).
        scale: s in h = W x + b + s·B A x (default 0.5).
        lam: λ in W ← W + λ·s·(B'A' − BA) (default 1; 0 gives plain LoRA with frozen W).
        init: "lora" — A ~ kaiming-uniform(a=√5), B = 0, so s·BA = 0 at start (LoRA paper);
            "svd" — B, A from the truncated SVD of ``delta`` (ΔW, d×k): s·BA is its best
            rank-r approximation and the effective weight starts at W + s·BA (seed 002).
        delta: ΔW for init="svd".
        train_bias: bias as a trainable Parameter (True) or a frozen buffer (False, default).
        generator: RNG for the kaiming init of A.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rank: int | None = None,
        scale: float = DEFAULT_SCALE,
        lam: float = DEFAULT_LAM,
        init: str = "lora",
        delta: torch.Tensor | None = None,
        train_bias: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be ≥ 1, got {in_features}, {out_features}")
        rank = default_rank(out_features, in_features) if rank is None else int(rank)
        check_hyper(rank, min(in_features, out_features), scale, lam, init, delta,
                    f"a {out_features}×{in_features} weight")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.scale = float(scale)
        self.lam = float(lam)
        self.train_bias = train_bias
        self.register_buffer("weight", torch.empty(out_features, in_features, **factory))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5), generator=generator)  # nn.Linear's init
        if bias:
            b = torch.zeros(out_features, **factory)
            if train_bias:
                self.bias = nn.Parameter(b)
            else:
                self.register_buffer("bias", b)
        else:
            self.register_buffer("bias", None)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self._init_anchor_buffers()
        self.init_lora_(init, delta, generator)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int | None = None,
        scale: float = DEFAULT_SCALE,
        lam: float = DEFAULT_LAM,
        init: str = "lora",
        delta: torch.Tensor | None = None,
        train_bias: bool = False,
        generator: torch.Generator | None = None,
    ) -> DeltaLoRALinear:
        """A Delta-LoRA layer carrying ``linear``'s weight and bias as W and b."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, rank=rank,
            scale=scale, lam=lam, init=init, delta=delta, train_bias=train_bias,
            generator=generator, device=w.device, dtype=w.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(w)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.reanchor_()
        return layer

    def product(self, lora_B: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
        """B A (d×k)."""
        return lora_B @ lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = x Wᵀ + b + s·(x Aᵀ) Bᵀ; the d×k product BA is never formed."""
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with weight W + s·BA (checked finite) and this layer's bias."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_(self.merged_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, scale={self.scale}, lam={self.lam}")


__all__ = ["DEFAULT_LAM", "DEFAULT_MAX_RANK", "DEFAULT_SCALE", "INITS", "DeltaLoRALinear", "default_rank", "svd_factors"]
