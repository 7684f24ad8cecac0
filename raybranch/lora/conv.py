"""DeltaLoRAConv2d: a Conv2d whose dense kernel follows its low-rank factors (peft's layout).

For a convolution with c input and d output channels and a kh×kw kernel (groups = 1), the
factors are, as in peft's LoRA ``Conv2d``,

    A: (r, c, kh, kw)   a convolution to r channels with the layer's kernel, stride, padding, dilation
    B: (d, r, 1, 1)     a 1×1 convolution back to d channels

and the forward pass is h = conv(x; W, b) + s · conv₁ₓ₁(conv(x; A); B). Convolution is linear
in its kernel, so the adapted path equals one convolution with the kernel

    P(B, A) = reshape(B₍d×r₎ · A₍r×(c·kh·kw)₎, (d, c, kh, kw))

which is a rank-r matrix when the kernel is read as a d × (c·kh·kw) matrix. The Delta-LoRA
update is then the one of :mod:`raybranch.lora.base`: W_t = W_a + λ·s·(P(B_t, A_t) − P(B_a, A_a)),
and a merge folds s·P(B, A) into W. The rank is at most min(d, c·kh·kw).

Per step a checkpoint stores A and B: r·(c·kh·kw + d) numbers instead of d·c·kh·kw. For
AlexNet-small's 3×3 conv 192→384 at r = 8 that is 16 896 instead of 663 552 (39×).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import DEFAULT_LAM, DEFAULT_SCALE, DeltaLoRABase, check_hyper


class DeltaLoRAConv2d(DeltaLoRABase):
    """Delta-LoRA replacement for an ``nn.Conv2d`` with groups = 1 and zero padding.

    Build it with :meth:`from_conv2d`; arguments as for :class:`~raybranch.lora.linear.DeltaLoRALinear`
    (rank r ≤ min(d, c·kh·kw); default min(that, 8)).
    """

    def __init__(self, conv: nn.Conv2d, rank: int | None = None, scale: float = DEFAULT_SCALE,
                 lam: float = DEFAULT_LAM, init: str = "lora", delta: torch.Tensor | None = None,
                 train_bias: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"DeltaLoRAConv2d wraps an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str) and conv.padding != "valid":
            raise ValueError(f"DeltaLoRAConv2d supports groups=1 and numeric zero padding, got groups={conv.groups}, "
                             f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")
        w = conv.weight
        d, c, kh, kw = w.shape
        fan_in = c * kh * kw
        rank = min(d, fan_in, 8) if rank is None else int(rank)
        check_hyper(rank, min(d, fan_in), scale, lam, init, delta, f"a {d}×{c}×{kh}×{kw} kernel")
        self.in_channels, self.out_channels, self.kernel_size = c, d, (kh, kw)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.rank, self.scale, self.lam, self.train_bias = rank, float(scale), float(lam), train_bias
        factory = {"device": w.device, "dtype": w.dtype}
        self.register_buffer("weight", w.detach().clone())
        if conv.bias is None:
            self.register_buffer("bias", None)
        elif train_bias:
            self.bias = nn.Parameter(conv.bias.detach().clone())
        else:
            self.register_buffer("bias", conv.bias.detach().clone())
        self.lora_A = nn.Parameter(torch.empty(rank, c, kh, kw, **factory))
        self.lora_B = nn.Parameter(torch.zeros(d, rank, 1, 1, **factory))
        self._init_anchor_buffers()
        self.init_lora_(init, delta, generator)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, **kwargs) -> DeltaLoRAConv2d:
        """A Delta-LoRA layer carrying ``conv``'s kernel and bias as W and b."""
        return cls(conv, **kwargs)

    def product(self, lora_B: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
        """P(B, A) = reshape(B₍d×r₎ · A₍r×(c·kh·kw)₎) to (d, c, kh, kw)."""
        return (lora_B.flatten(1) @ lora_A.flatten(1)).view(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = conv(x; W, b) + s·conv₁ₓ₁(conv(x; A); B); the dense kernel P(B, A) is never formed."""
        h = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        low = F.conv2d(F.conv2d(x, self.lora_A, None, self.stride, self.padding, self.dilation), self.lora_B)
        return h + self.scale * low

    @torch.no_grad()
    def to_conv2d(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with kernel W + s·P(B, A) (checked finite) and this layer's bias."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, bias=self.bias is not None,
                         device=self.weight.device, dtype=self.weight.dtype)
        conv.weight.copy_(self.merged_weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, rank={self.rank}, scale={self.scale}, lam={self.lam}")


__all__ = ["DeltaLoRAConv2d"]
