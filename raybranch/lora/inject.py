"""Model surgery and model-level helpers for Delta-LoRA.

* ``inject_delta_lora`` swaps the ``nn.Linear`` layers whose qualified names match a pattern
  for :class:`DeltaLoRALinear`, the ``nn.Conv2d`` ones for :class:`DeltaLoRAConv2d` (and a
  matching ``nn.MultiheadAttention`` for :class:`DeltaLoRAMultiheadAttention`);
  ``merge_delta_lora`` turns a copy back into plain modules for export.
* ``delta_lora_step`` is the per-step W update; ``lora_parameters`` / ``non_lora_parameters``
  build the optimizer (W is a buffer and is never handed to it).
* Checkpointing. Between anchors W_t = W_a + λ·s·(B_t A_t − B_a A_a) exactly as the layer
  computes it, so a checkpoint is

      anchor (once per branch point / merge):  W_a, A_a, B_a, s, λ of every Delta-LoRA layer
      state  (every step):                     state_dict minus the Delta-LoRA ``weight``s
                                               (A, B, biases, every non-LoRA param/buffer)

  and ``load_lora_state(model, anchor, state)`` rebuilds the live model bit for bit (same
  device, dtype and BLAS as training). At VGG/AlexNet scale the per-step state is a few
  percent of the model; the W's are stored only with the anchor.

Qualified names. A Linear is named as in ``model.named_modules()``. The in-projection of an
``nn.MultiheadAttention`` at ``p`` (a Parameter, not a module) is named ``p.in_proj``: the
name it has after the attention is replaced by :class:`DeltaLoRAMultiheadAttention`; its
output projection is ``p.out_proj`` as usual. A pattern matching either replaces the whole
attention module (a stock one would ignore a LoRA ``out_proj``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from raybranch.lora.base import DeltaLoRABase
from raybranch.lora.conv import DeltaLoRAConv2d
from raybranch.lora.layer import (
    DEFAULT_LAM,
    DEFAULT_SCALE,
    DeltaLoRALinear,
    DeltaLoRAMultiheadAttention,
)

# Regexes, searched (re.search) in qualified module names.
_CLASSIFIER = r"(^|\.)(classifier|fc\d*|head|heads)(\.|$)"
_VIT_MSA = r"(^|\.)self_attention\.(in_proj|out_proj)$"
_VIT_MLP = r"(^|\.)mlp\.(0|3)$"
_ANY = r".*"
PRESETS: dict[str, tuple[str, ...]] = {
    # Linear layers of a classifier head: `classifier.*` (AlexNet, VGG), `fc`, `fc1..fc3`
    # (LeNet-5, ResNet), `head`, `heads.*` (torchvision ViT).
    "classifier": (_CLASSIFIER,),
    # torchvision VisionTransformer attention: Q/K/V in-projection (3E×E) and out_proj (E×E).
    "vit-msa": (_VIT_MSA,),
    # torchvision VisionTransformer encoder MLP: mlp.0 (E→mlp_dim) and mlp.3 (mlp_dim→E).
    "vit-mlp": (_VIT_MLP,),
    "vit-msa-mlp": (_VIT_MSA, _VIT_MLP),
    # By layer type: every Linear (and attention in-projection), every Conv2d (peft's
    # Conv2d adapter), or both.
    "linear": (_ANY,),
    "conv": (_ANY,),
    "all": (_ANY,),
}
# Which kinds of site a preset may match (a plain regex matches Linear and Conv2d sites).
PRESET_KINDS: dict[str, frozenset[str]] = {"linear": frozenset({"linear"}), "conv": frozenset({"conv"})}
_KINDS = frozenset({"linear", "conv"})

_LORA_PARAM_NAMES = ("lora_A", "lora_B")
_ANCHOR_SCALARS = ("lora_scale", "delta_lam")


def _patterns(pattern: str | Iterable[str]) -> list[re.Pattern]:
    if isinstance(pattern, str):
        raw = list(PRESETS.get(pattern, (pattern,)))
    else:
        raw = list(pattern)
        if not raw or not all(isinstance(p, str) for p in raw):
            raise ValueError(f"pattern must be a preset name, a regex or a non-empty list of regexes, got {pattern!r}")
    try:
        return [re.compile(p) for p in raw]
    except re.error as exc:
        raise ValueError(f"bad regex in pattern {pattern!r}: {exc}") from None


def linear_sites(model: nn.Module) -> list[str]:
    """Qualified names that patterns are matched against: every ``nn.Linear`` (not yet
    wrapped) and ``p.in_proj`` for every stock ``nn.MultiheadAttention`` at ``p``."""
    sites = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            sites.append(f"{name}.in_proj" if name else "in_proj")
        elif isinstance(mod, nn.Linear):
            sites.append(name)
    return sites


def conv_sites(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Conv2d`` that a Conv2d adapter can wrap (groups = 1, zero
    padding); matched against patterns like Linear sites."""
    return [name for name, mod in model.named_modules()
            if type(mod) is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros" and name]


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("cannot replace the root module; wrap it in a container first")
    parent, child = _split(name)
    setattr(model.get_submodule(parent), child, new)


def inject_delta_lora(
    model: nn.Module,
    pattern: str | Iterable[str],
    rank: int | None = None,
    scale: float = DEFAULT_SCALE,
    init: str = "lora",
    lam: float = DEFAULT_LAM,
    deltas: Mapping[str, torch.Tensor] | None = None,
    train_bias: bool = False,
    generator: torch.Generator | None = None,
    min_saving: float | None = None,
    keep_function: bool = False,
) -> list[str]:
    """Replace, in place, every Linear or Conv2d site whose name matches ``pattern`` by a
    DeltaLoRALinear / DeltaLoRAConv2d.

    ``pattern``: a key of ``PRESETS``, a regex, or a list of regexes (a site matches if any
    regex ``re.search``-es its name; the presets ``linear`` and ``conv`` match one kind only).
    Each layer gets rank min(d, k, rank or 8) — the report's r = min(min(d, k), 8), k = c·kh·kw
    for a kernel — scale s, λ, and keeps the original W and bias. ``min_saving`` m leaves dense
    every site whose factors would not be m times smaller than its weight: d·k < m · r·(d + k)
    (m = 1: where the adapter is no smaller; m = 2 keeps LeNet-5's 10 × 84 output layer dense).
    ``init="svd"`` needs ``deltas[name]`` (ΔW of the weight's shape) for every replaced site;
    with ``keep_function`` W becomes W − s·BA so the effective weight (and the model's output)
    is unchanged. Returns the replaced site names in model order; ValueError if none matched.
    """
    regexes = _patterns(pattern)
    kinds = PRESET_KINDS.get(pattern, _KINDS) if isinstance(pattern, str) else _KINDS
    candidates = ([(s, "linear") for s in linear_sites(model)] if "linear" in kinds else []) + \
                 ([(s, "conv") for s in conv_sites(model)] if "conv" in kinds else [])
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    matched = sorted(((s, k) for s, k in candidates if any(r.search(s) for r in regexes)),
                     key=lambda sk: order.get(sk[0], order.get(_split(sk[0])[0], -1)))
    if min_saving is not None:
        matched = [(s, k) for s, k in matched if _saves(model, s, rank, min_saving)]
    if not matched:
        raise ValueError(f"pattern {pattern!r} matched no nn.Linear or nn.Conv2d in {type(model).__name__} "
                         f"(with min_saving {min_saving}); sites are e.g. "
                         f"{(linear_sites(model) + conv_sites(model))[:6]}")
    names = [s for s, _ in matched]
    if init == "svd":
        missing = [s for s in names if deltas is None or s not in deltas]
        if missing:
            raise ValueError(f"init='svd' needs deltas for every matched layer; missing {missing[:4]}")
    elif deltas is not None:
        raise ValueError("deltas are only used with init='svd'")
    # Stock attention modules with a matching projection become DeltaLoRAMultiheadAttention.
    for attn in dict.fromkeys(_split(s)[0] for s in names if s.endswith(("in_proj", "out_proj"))):
        mod = model.get_submodule(attn)
        if isinstance(mod, nn.MultiheadAttention):
            _replace(model, attn, DeltaLoRAMultiheadAttention.from_multihead_attention(mod))
    for site, kind in matched:
        mod = model.get_submodule(site)
        kw = dict(scale=scale, lam=lam, init=init, delta=None if deltas is None else deltas[site],
                  train_bias=train_bias, generator=generator)
        d, k = _dims(mod)
        r = min(d, k, 8 if rank is None else rank)
        layer = DeltaLoRAConv2d.from_conv2d(mod, rank=r, **kw) if kind == "conv" else DeltaLoRALinear.from_linear(mod, rank=r, **kw)
        if keep_function and init == "svd":
            layer.fold_out_()
        _replace(model, site, layer)
    return names


def _dims(mod: nn.Module) -> tuple[int, int]:
    """(d, k) of a weight read as a matrix: out × in features, or out × c·kh·kw channels."""
    if isinstance(mod, nn.Conv2d):
        return mod.out_channels, mod.weight[0].numel()
    if isinstance(mod, nn.MultiheadAttention):  # the in-projection site
        return 3 * mod.embed_dim, mod.embed_dim
    return mod.out_features, mod.in_features


def _site_module(model: nn.Module, site: str) -> nn.Module:
    """The module a site names: a stock attention for ``p.in_proj``, else the submodule."""
    if site.endswith("in_proj"):
        parent = _split(site)[0]
        mod = model.get_submodule(parent) if parent else model
        if isinstance(mod, nn.MultiheadAttention):
            return mod
    return model.get_submodule(site)


def _saves(model: nn.Module, site: str, rank: int | None, factor: float) -> bool:
    """Whether rank-r factors of ``site`` hold ``factor`` times fewer numbers than its weight,
    d·k ≥ factor · r·(d + k) (strictly fewer for factor 1)."""
    d, k = _dims(_site_module(model, site))
    r = min(d, k, 8 if rank is None else rank)
    return d * k > r * (d + k) if factor <= 1 else d * k >= factor * r * (d + k)


def delta_lora_layers(model: nn.Module) -> dict[str, DeltaLoRABase]:
    """Every Delta-LoRA layer (Linear or Conv2d) in ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DeltaLoRABase)}


def _require_layers(model: nn.Module) -> dict[str, DeltaLoRABase]:
    layers = delta_lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Delta-LoRA layer; call inject_delta_lora first")
    return layers


@torch.no_grad()
def delta_lora_step(model: nn.Module, lam: float | None = None) -> int:
    """Apply ``delta_update`` (W ← W_a + λ·s·(BA − B_aA_a)) to every Delta-LoRA layer; call it
    after each ``optimizer.step()``. Returns the number of layers updated."""
    layers = delta_lora_layers(model)
    for layer in layers.values():
        layer.delta_update(lam)
    return len(layers)


def reanchor(model: nn.Module, lam: float | None = None) -> None:
    """Make the current state of every Delta-LoRA layer its anchor (e.g. at a branch point)."""
    for layer in _require_layers(model).values():
        layer.reanchor_(lam)


def merge_and_reinit_(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """``merge_()`` every Delta-LoRA layer: W ← W + s·BA, A re-initialised, B = 0, new anchor.
    Every layer's merged weight is checked for NaN/Inf first: a broken adapter anywhere raises
    ValueError with no layer merged."""
    layers = _require_layers(model)
    for layer in layers.values():
        layer.merged_weight()
    for layer in layers.values():
        layer.merge_(generator)


def merge_delta_lora(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with plain modules only: each DeltaLoRALinear → nn.Linear and
    DeltaLoRAConv2d → nn.Conv2d (weight W + s·BA, checked finite first), each DeltaLoRAMultiheadAttention → nn.MultiheadAttention. The copy's
    state_dict has the keys of the model before injection."""
    plain = copy.deepcopy(model)
    for name in [n for n, m in plain.named_modules() if isinstance(m, DeltaLoRAMultiheadAttention)]:
        _replace(plain, name, plain.get_submodule(name).to_multihead_attention())
    for name, layer in list(delta_lora_layers(plain).items()):
        _replace(plain, name, layer.to_conv2d() if isinstance(layer, DeltaLoRAConv2d) else layer.to_linear())
    return plain


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable factors A, B of every Delta-LoRA layer."""
    return [p for layer in delta_lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]


def non_lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters other than the LoRA factors (W is a buffer, never among them)."""
    lora = {id(p) for p in lora_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in lora]


def _weight_keys(layers: Mapping[str, DeltaLoRABase]) -> set[str]:
    return {f"{name}.weight" if name else "weight" for name in layers}


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What changes per step: ``model.state_dict()`` without the Delta-LoRA ``weight`` entries
    (A, B, biases and every non-LoRA parameter and buffer). Detached references, like
    ``state_dict()``: clone them to keep a copy."""
    drop = _weight_keys(_require_layers(model))
    return {k: v for k, v in model.state_dict().items() if k not in drop}


def lora_anchor(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of each layer's anchor, keyed ``<layer>.weight`` (W_a), ``<layer>.lora_A`` (A_a),
    ``<layer>.lora_B`` (B_a), ``<layer>.lora_scale`` (s) and ``<layer>.delta_lam`` (λ, both
    0-d float64). Store it once per anchor (branch point, merge)."""
    out = {}
    for name, layer in _require_layers(model).items():
        out[_key(name, "weight")] = layer.anchor_weight.clone()
        out[_key(name, "lora_A")] = layer.anchor_A.clone()
        out[_key(name, "lora_B")] = layer.anchor_B.clone()
        out[_key(name, "lora_scale")] = torch.tensor(layer.scale, dtype=torch.float64)
        out[_key(name, "delta_lam")] = torch.tensor(layer.lam, dtype=torch.float64)
    return out


def _check_keys(what: str, got: Iterable[str], expected: Iterable[str]) -> None:
    got, expected = set(got), set(expected)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise ValueError(f"{what} keys do not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")


@torch.no_grad()
def load_lora_state(model: nn.Module, anchor: Mapping[str, torch.Tensor],
                    state: Mapping[str, torch.Tensor]) -> None:
    """Rebuild the model in place from an anchor and a per-step state:
    every Delta-LoRA layer gets W = W_a + λ·s·(B A − B_a A_a) by the same operations training
    used, the rest comes from ``state``. Keys must match exactly (ValueError otherwise)."""
    layers = _require_layers(model)
    weights = _weight_keys(layers)
    _check_keys("anchor", anchor, [_key(n, k) for n in layers
                                   for k in ("weight", "lora_A", "lora_B", *_ANCHOR_SCALARS)])
    _check_keys("state", state, [k for k in model.state_dict() if k not in weights])
    full = dict(state)
    full.update({k: anchor[k] for k in weights})
    model.load_state_dict(full, strict=True)
    for name, layer in layers.items():
        layer.scale = float(anchor[_key(name, "lora_scale")])
        layer.lam = float(anchor[_key(name, "delta_lam")])
        layer.set_anchor_(anchor[_key(name, "weight")], anchor[_key(name, "lora_A")], anchor[_key(name, "lora_B")])
        layer.delta_update()
