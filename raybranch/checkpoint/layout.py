"""What one save holds: named tensors, the lossy groups they fall into, and the layout document.

Floating-point model tensors are the lossy groups: "model" (parameters), "buffers" (float
buffers such as BatchNorm running statistics, whose scale has nothing to do with the weights'),
"optim" (optimizer state, opt-in). Integer buffers, tensors under ``min_lossy_numel`` entries,
names matching an ``exact`` pattern, RNG states and extras are stored losslessly.

With ``parts`` = W > 1 (a data-parallel group writing part-wise, :mod:`raybranch.checkpoint.parts`)
each lossy group is cut into chunks ``<group>.<rank>`` and ``owners`` names the rank that writes
each chunk and each exact tensor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from . import state as st
from .parts import assign_exact, rank0_only, split_groups
from .training_state import GROUPS

RESERVED = GROUPS[1:]


@dataclass(frozen=True)
class LayoutRules:
    exact_patterns: tuple[re.Pattern, ...] = ()
    min_lossy_numel: int = 8
    optimizer_codec: str = "exact"
    save_rng: bool | None = None
    parts: int = 1

    def is_lossy(self, name: str, t: torch.Tensor) -> bool:
        if not t.is_floating_point() or t.numel() < self.min_lossy_numel:
            return False
        if name.startswith(("rng/", "extra/")):
            return False
        if name.startswith("optim/") and self.optimizer_codec != "lc":
            return False
        return not any(p.search(name) for p in self.exact_patterns)

    def layout(self, tensors: dict[str, torch.Tensor], buffers: set[str]) -> tuple[dict, dict[str, list[str]], list[str]]:
        """(layout document, lossy groups {group: names}, exact names)."""
        groups: dict[str, list[str]] = {}
        exact: list[str] = []
        for n, t in tensors.items():
            if self.is_lossy(n, t):
                g = "optim" if n.startswith("optim/") else "buffers" if n in buffers else "model"
                groups.setdefault(g, []).append(n)
            else:
                exact.append(n)
        owners: dict[str, int] = {}
        if self.parts > 1:  # rank 0 writes buffers and RNG states whole (raybranch.checkpoint.parts)
            groups, owners = split_groups(groups, {n: tensors[n].numel() for n in tensors}, self.parts)
            owners.update(assign_exact(exact, {n: tensors[n].numel() * tensors[n].element_size() for n in exact}, self.parts,
                                       pinned={n for n in exact if rank0_only(n, buffers)}))
        doc = {
            "groups": {
                g: {
                    "names": names,
                    "shapes": [list(tensors[n].shape) for n in names],
                    "dtypes": [st.dtype_name(tensors[n].dtype) for n in names],
                    "sizes": [tensors[n].numel() for n in names],
                }
                for g, names in groups.items()
            },
            "exact": exact,
            "model_keys": [n for n in tensors if not n.startswith(tuple(p + "/" for p in RESERVED))],
            **({"parts": self.parts, "owners": owners} if self.parts > 1 else {}),
        }
        return doc, groups, exact
