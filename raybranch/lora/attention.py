"""DeltaLoRAMultiheadAttention: ``nn.MultiheadAttention`` with its projections as Linear modules.

A stock ``nn.MultiheadAttention`` reads its projection weights as raw Parameters, so a
:class:`~raybranch.lora.linear.DeltaLoRALinear` put in it would be ignored; this module
recomputes the same attention with explicit in/out projection submodules (the math is in
the class docstring) and holds the helpers it needs: the effective dense weight of a
projection and the merge of attention/key-padding masks into one additive mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .linear import DeltaLoRALinear


class DeltaLoRAMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its in-projection exposed as a Linear module.

    torchvision's ViT uses ``nn.MultiheadAttention``, whose query/key/value projection is a
    raw Parameter ``in_proj_weight`` (3E×E) read directly by ``F.multi_head_attention_forward``
    (so is ``out_proj.weight``: putting a DeltaLoRALinear in ``out_proj`` of a stock
    MultiheadAttention would silently ignore BA). This module recomputes the same attention
    with explicit submodules:

        [Q K V] = in_proj(x)            in_proj: Linear(E → 3E) or DeltaLoRALinear
        head_i  = softmax(Q_i K_iᵀ / √(E/H) + mask) V_i
        out     = out_proj(concat_i head_i)   out_proj: Linear(E → E) or DeltaLoRALinear

    so "MSA" Delta-LoRA covers all four projections (Q, K, V as one 3E×E factorisation of
    rank r, plus the output). Supported: kdim = vdim = E, no bias_k/bias_v, no add_zero_attn,
    batch_first either way, batched or unbatched input, ``attn_mask`` / ``key_padding_mask``
    (bool: True = masked out, or additive float), ``need_weights`` (explicit softmax path;
    otherwise ``F.scaled_dot_product_attention``). When query, key and value are not the same
    tensor the in-projection runs on each of them and keeps its third (3× the projection cost).
    ``to_multihead_attention()`` converts back to a stock module with merged weights.
    """

    def __init__(self, embed_dim: int, num_heads: int, in_proj: nn.Module, out_proj: nn.Module,
                 dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.in_proj = in_proj
        self.out_proj = out_proj

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention) -> DeltaLoRAMultiheadAttention:
        """Same weights, plain ``nn.Linear`` in- and out-projections (to be replaced by LoRA)."""
        if not mha._qkv_same_embed_dim:
            raise ValueError("MultiheadAttention with kdim/vdim ≠ embed_dim is not supported")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
        w = mha.in_proj_weight
        e = mha.embed_dim
        in_proj = nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            in_proj.weight.copy_(w)
            if mha.in_proj_bias is not None:
                in_proj.bias.copy_(mha.in_proj_bias)
        in_proj.weight.requires_grad_(w.requires_grad)
        if mha.in_proj_bias is not None:
            in_proj.bias.requires_grad_(mha.in_proj_bias.requires_grad)
        return cls(e, mha.num_heads, in_proj, mha.out_proj, dropout=mha.dropout, batch_first=mha.batch_first)

    @torch.no_grad()
    def to_multihead_attention(self) -> nn.MultiheadAttention:
        """A stock ``nn.MultiheadAttention`` with the merged in/out projection weights."""
        w = _dense_weight(self.in_proj)
        has_bias = self.in_proj.bias is not None
        if (self.out_proj.bias is not None) != has_bias:
            raise ValueError("in_proj and out_proj must both have a bias or both have none")
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, bias=has_bias,
                                    batch_first=self.batch_first, device=w.device, dtype=w.dtype)
        mha.in_proj_weight.copy_(w)
        mha.out_proj.weight.copy_(_dense_weight(self.out_proj))
        if has_bias:
            mha.in_proj_bias.copy_(self.in_proj.bias)
            mha.out_proj.bias.copy_(self.out_proj.bias)
        return mha

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """Same contract as ``nn.MultiheadAttention.forward``; returns (output, weights | None)."""
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            batch_first = False
        else:
            batch_first = self.batch_first
        if not batch_first:  # → (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        e = self.embed_dim
        if query is key and key is value:
            q, k, v = self.in_proj(query).split(e, dim=-1)
        else:
            q = self.in_proj(query)[..., :e]
            k = self.in_proj(key)[..., e:2 * e]
            v = self.in_proj(value)[..., 2 * e:]
        n, lq, _ = q.shape
        ls = k.shape[1]
        q, k, v = (t.reshape(n, -1, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        mask = _additive_mask(attn_mask, key_padding_mask, n, self.num_heads, lq, ls, q.dtype)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                future = torch.ones(lq, ls, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            weights = F.dropout(scores.softmax(dim=-1), p=p, training=p > 0)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                 is_causal=is_causal and mask is None)
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(n, lq, e))
        if not batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """Effective dense weight of an nn.Linear or a DeltaLoRALinear."""
    if isinstance(module, DeltaLoRALinear):
        return module.merged_weight()
    return module.weight.detach()


def _additive_mask(attn_mask, key_padding_mask, n, heads, lq, ls, dtype):
    """Combine MultiheadAttention-style masks into one additive float mask (N, H, Lq, Ls) or None.

    Bool masks follow nn.MultiheadAttention: True = not allowed to attend (→ −inf).
    """
    def additive(m):
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        am = additive(attn_mask)
        mask = am.reshape(n, heads, lq, ls) if am.dim() == 3 else am.reshape(1, 1, lq, ls)
    if key_padding_mask is not None:
        kp = additive(key_padding_mask).reshape(n, 1, 1, ls)
        mask = kp if mask is None else mask + kp
    return mask
