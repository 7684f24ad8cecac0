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

DEFAULT_MAX_RANK = 8  # report §5.2.2.6: r = min(min(d, k), 8)
DEFAULT_SCALE = 0.5  # report Table 2: LoRA scaling 0.5
DEFAULT_LAM = 1.0  # report §5.2.3: W ← W + ΔAB, i.e. λ = 1
INITS = ("lora", "svd")


def default_rank(out_features: int, in_features: int, max_rank: int = DEFAULT_MAX_RANK) -> int:
    """Report §5.2.2.6: r = min(min(d, k), max_rank) for a d×k weight."""
    return min(out_features, in_features, max_rank)


def svd_factors(delta: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B, A) of the best rank-r approximation of ΔW / s (Eckart–Young).

    With ΔW / s = U Σ Vᵀ (singular values descending), B = U_r √Σ_r (d×r) and
    A = √Σ_r V_rᵀ (r×k), so s·B A is the best rank-r approximation of ΔW in Frobenius and
    spectral norm, and BᵀB = A Aᵀ = Σ_r (singular values split symmetrically). The SVD runs
    in float64 and the factors are returned in ΔW's dtype.
    """
    if delta.dim() != 2:
        raise ValueError(f"svd init needs a 2-D delta matrix, got shape {tuple(delta.shape)}")
    if not 1 <= rank <= min(delta.shape):
        raise ValueError(f"rank {rank} outside [1, {min(delta.shape)}] for delta of shape {tuple(delta.shape)}")
    if not torch.isfinite(delta).all():
        raise ValueError("svd init delta contains NaN or Inf")
    u, sig, vh = torch.linalg.svd(delta.detach().double() / scale, full_matrices=False)
    root = sig[:rank].sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * vh[:rank]
    return b.to(delta.dtype), a.to(delta.dtype)


class DeltaLoRALinear(nn.Module):
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
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} outside [1, {min(in_features, out_features)}] "
                             f"for a {out_features}×{in_features} weight")
        if not (math.isfinite(scale) and scale != 0):
            raise ValueError(f"scale must be finite and non-zero, got {scale}")
        if not math.isfinite(lam):
            raise ValueError(f"lam must be finite, got {lam}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if init == "svd" and delta is None:
            raise ValueError("init='svd' needs a delta matrix ΔW (out_features × in_features)")
        if init == "lora" and delta is not None:
            raise ValueError("delta is only used with init='svd'")
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
        self.register_buffer("anchor_weight", torch.empty(0, **factory), persistent=False)
        self.register_buffer("anchor_A", torch.empty(0, **factory), persistent=False)
        self.register_buffer("anchor_B", torch.empty(0, **factory), persistent=False)
        self._anchor_b_zero = True
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

    # ---- initialisation and anchors -------------------------------------------------------

    @torch.no_grad()
    def init_lora_(self, init: str = "lora", delta: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> None:
        """(Re)initialise A, B ("lora": kaiming A, B = 0; "svd": from ΔW) and re-anchor.

        W is left as it is, so with "lora" the effective weight W + s·BA is unchanged.
        """
        if init == "lora":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
            self.lora_B.zero_()
        elif init == "svd":
            if delta is None or tuple(delta.shape) != (self.out_features, self.in_features):
                got = None if delta is None else tuple(delta.shape)
                raise ValueError(f"svd init needs delta of shape {(self.out_features, self.in_features)}, got {got}")
            b, a = svd_factors(delta.to(self.weight.device), self.rank, self.scale)
            self.lora_B.copy_(b)
            self.lora_A.copy_(a)
        else:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.reanchor_()

    @torch.no_grad()
    def reanchor_(self, lam: float | None = None) -> None:
        """Make the current (W, A, B) the anchor (W_a, A_a, B_a); optionally set a new λ.

        W is not modified. Call at a branch point, or after changing W other than through
        this layer. λ may change only here, since the closed form assumes a constant λ.
        """
        if lam is not None:
            if not math.isfinite(lam):
                raise ValueError(f"lam must be finite, got {lam}")
            self.lam = float(lam)
        self.set_anchor_(self.weight, self.lora_A, self.lora_B)

    @torch.no_grad()
    def set_anchor_(self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Set the anchor (W_a, A_a, B_a) to copies of the given tensors; W is not touched."""
        for name, t, ref in (("weight", weight, self.weight), ("lora_A", lora_A, self.lora_A),
                             ("lora_B", lora_B, self.lora_B)):
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(f"anchor {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        like = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.anchor_weight = weight.detach().to(**like).clone()
        self.anchor_A = lora_A.detach().to(**like).clone()
        self.anchor_B = lora_B.detach().to(**like).clone()
        self._anchor_b_zero = not bool(self.anchor_B.any())

    # ---- the Delta-LoRA update ------------------------------------------------------------

    @torch.no_grad()
    def delta_update(self, lam: float | None = None) -> None:
        """After an optimizer step: W ← W_a + λ·s·(B A − B_a A_a), i.e. W += λ·s·(B'A' − BA).

        ``lam`` must be None or the layer's λ (λ changes only at an anchor: ``reanchor_``).
        The products are formed as separate matmuls so that A = A_a, B = B_a gives W = W_a
        exactly; with B_a = 0 (LoRA init, after ``merge_``) the anchor product is skipped.
        """
        if lam is not None and float(lam) != self.lam:
            raise ValueError(f"lam={lam} differs from the layer's λ={self.lam}; change λ with reanchor_(lam=...)")
        product = self.lora_B @ self.lora_A
        if not self._anchor_b_zero:
            product = product - self.anchor_B @ self.anchor_A
        torch.add(self.anchor_weight, product, alpha=self.lam * self.scale, out=self.weight)

    # ---- forward, merge, export -----------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = x Wᵀ + b + s·(x Aᵀ) Bᵀ; the d×k product BA is never formed."""
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def get_delta_weight(self) -> torch.Tensor:
        """s·B A (d×k), the low-rank part of the effective weight."""
        return self.scale * (self.lora_B @ self.lora_A)

    def merged_weight(self) -> torch.Tensor:
        """W + s·B A, the effective dense weight (detached)."""
        with torch.no_grad():
            return self.weight + self.get_delta_weight()

    @torch.no_grad()
    def merge_(self, generator: torch.Generator | None = None) -> None:
        """Fold s·BA into W, re-initialise A (kaiming) and B = 0, and re-anchor there.

        The effective weight is unchanged; this is the report's "merge and re-initialise at a
        snapshot". A new anchor must be checkpointed, and optimizer state held for A, B
        (momentum, Adam moments) no longer fits them: reset it.
        """
        self.weight.copy_(self.merged_weight())
        self.init_lora_("lora", generator=generator)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with weight W + s·BA and this layer's bias."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_(self.merged_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Load as usual, then make the loaded (W, A, B) the anchor (exact continuation)."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.reanchor_()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, scale={self.scale}, lam={self.lam}")
