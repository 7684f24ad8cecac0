"""What every Delta-LoRA layer shares: factors, anchors, the closed-form W update, merges.

A Delta-LoRA layer holds a dense weight W that the optimizer never touches (a buffer) and
trainable factors A, B whose product P(B, A) has W's shape; the forward pass is

    h = op(x; W, b) + s · op_B(op_A(x))           with op(x; P(B, A)) = op_B(op_A(x))

so the effective weight is W + s·P(B, A). After every optimizer step, between two anchors
(creation, a branch point, a merge, ``reanchor_``), W follows the factors in closed form:

    W_t = W_a + λ · s · (P(B_t, A_t) − P(B_a, A_a))

Subclasses define the shapes and the product: B A for a Linear (d×r · r×k), and for a
Conv2d (peft's layout: A a conv with r output channels and the layer's kernel, B a 1×1 conv)
P(B, A) = (B₍d×r₎ · A₍r×(c·kh·kw)₎) reshaped to (d, c, kh, kw). The math of why the closed
form is recomputed rather than accumulated is in :mod:`raybranch.lora.linear`.

Merges are safe (as peft's ``safe_merge``): the merged weight W + s·P is checked for NaN/Inf
before anything is written, and a non-finite one raises ValueError with the layer unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_MAX_RANK = 8  # report §5.2.2.6: r = min(min(d, k), 8)
DEFAULT_SCALE = 0.5  # report Table 2: LoRA scaling 0.5
DEFAULT_LAM = 1.0  # report §5.2.3: W ← W + ΔAB, i.e. λ = 1
INITS = ("lora", "svd")


def check_hyper(rank: int, max_rank: int, scale: float, lam: float, init: str, delta: torch.Tensor | None, what: str) -> None:
    """One-line ValueErrors for bad rank, scale, λ or init arguments of a layer."""
    if not 1 <= rank <= max_rank:
        raise ValueError(f"rank {rank} outside [1, {max_rank}] for {what}")
    if not (math.isfinite(scale) and scale != 0):
        raise ValueError(f"scale must be finite and non-zero, got {scale}")
    if not math.isfinite(lam):
        raise ValueError(f"lam must be finite, got {lam}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "svd" and delta is None:
        raise ValueError("init='svd' needs a delta ΔW of the layer's weight shape")
    if init == "lora" and delta is not None:
        raise ValueError("delta is only used with init='svd'")


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


class DeltaLoRABase(nn.Module):
    """Anchors, the W update, init and merges of a Delta-LoRA layer (see the module docstring).

    A subclass registers the buffer ``weight`` (W), ``bias``, the Parameters ``lora_A`` and
    ``lora_B``, sets ``rank``, ``scale``, ``lam``, calls :meth:`_init_anchor_buffers`, and
    defines :meth:`product` (P(B, A) in W's shape) and :meth:`_svd_shape` (ΔW as a matrix).
    """

    rank: int
    scale: float
    lam: float

    def _init_anchor_buffers(self) -> None:
        like = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.register_buffer("anchor_weight", torch.empty(0, **like), persistent=False)
        self.register_buffer("anchor_A", torch.empty(0, **like), persistent=False)
        self.register_buffer("anchor_B", torch.empty(0, **like), persistent=False)
        self._anchor_b_zero = True

    def product(self, lora_B: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- initialisation and anchors -------------------------------------------------------

    @torch.no_grad()
    def init_lora_(self, init: str = "lora", delta: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> None:
        """(Re)initialise A, B ("lora": kaiming A, B = 0; "svd": from ΔW) and re-anchor.

        W is left as it is, so with "lora" the effective weight W + s·P(B, A) is unchanged.
        """
        if init == "lora":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
            self.lora_B.zero_()
        elif init == "svd":
            if delta is None or tuple(delta.shape) != tuple(self.weight.shape):
                got = None if delta is None else tuple(delta.shape)
                raise ValueError(f"svd init needs delta of shape {tuple(self.weight.shape)}, got {got}")
            b, a = svd_factors(delta.to(self.weight.device).reshape(self.weight.shape[0], -1), self.rank, self.scale)
            self.lora_B.copy_(b.reshape(self.lora_B.shape))
            self.lora_A.copy_(a.reshape(self.lora_A.shape))
        else:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.reanchor_()

    @torch.no_grad()
    def fold_out_(self) -> None:
        """W ← W − s·P(B, A) and re-anchor: the effective weight becomes the W the layer had
        before its factors were set (an SVD init that keeps the model's function)."""
        self.weight.sub_(self.get_delta_weight())
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
        """After an optimizer step: W ← W_a + λ·s·(P(B, A) − P(B_a, A_a)).

        ``lam`` must be None or the layer's λ (λ changes only at an anchor: ``reanchor_``).
        The products are separate matmuls so that A = A_a, B = B_a gives W = W_a exactly;
        with B_a = 0 (LoRA init, after ``merge_``) the anchor product is skipped.
        """
        if lam is not None and float(lam) != self.lam:
            raise ValueError(f"lam={lam} differs from the layer's λ={self.lam}; change λ with reanchor_(lam=...)")
        prod = self.product(self.lora_B, self.lora_A)
        if not self._anchor_b_zero:
            prod = prod - self.product(self.anchor_B, self.anchor_A)
        torch.add(self.anchor_weight, prod, alpha=self.lam * self.scale, out=self.weight)

    # ---- merge, export --------------------------------------------------------------------

    def get_delta_weight(self) -> torch.Tensor:
        """s·P(B, A), the low-rank part of the effective weight (W's shape)."""
        return self.scale * self.product(self.lora_B, self.lora_A)

    def merged_weight(self) -> torch.Tensor:
        """W + s·P(B, A), the effective dense weight (detached), checked for NaN/Inf first:
        a ValueError names the layer's shape when the adapter is broken."""
        with torch.no_grad():
            merged = self.weight + self.get_delta_weight()
        if not torch.isfinite(merged).all():
            raise ValueError(f"NaN or Inf in the merged weight of a {type(self).__name__} of shape "
                             f"{tuple(self.weight.shape)}: the adapter is broken; nothing was merged")
        return merged

    @torch.no_grad()
    def merge_(self, generator: torch.Generator | None = None) -> None:
        """Fold s·P(B, A) into W, re-initialise A (kaiming) and B = 0, and re-anchor there.

        The effective weight is unchanged; this is the report's "merge and re-initialise at a
        snapshot". The merged weight is checked for NaN/Inf before W is written (ValueError,
        layer unchanged). Optimizer state held for A, B no longer fits them: reset it.
        """
        self.weight.copy_(self.merged_weight())
        self.init_lora_("lora", generator=generator)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Load as usual, then make the loaded (W, A, B) the anchor (exact continuation)."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.reanchor_()
