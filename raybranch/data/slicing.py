"""Training-set slices (report §7.2, §8.2): disjoint, covering, every class in every slice.

``split_spec("4x25")`` → [0.25, 0.25, 0.25, 0.25]; ``make_slices(labels, fractions, seed)``
cuts each class's shuffled indices in those proportions and gives slice j the j-th cut of
every class.

Per-class counts (systematic rounding with a random start): for class c with n_c samples
and fractions f_1..f_k, cut points are t_j = ⌊n_c·(f_1+…+f_j) + u_c⌋ with u_c ~ U[0, 1)
(seeded), t_0 = 0, t_k = n_c. Slice j gets t_j − t_{j−1} ∈ {⌊n_c f_j⌋, ⌈n_c f_j⌉} samples of
class c, and the random start spreads the rounding over slices instead of always favouring
the same ones, so slice sizes stay within about ±(number of classes) of n·f_j. Where
n_c·f_j < 1 gives a slice no sample of class c, one sample moves to it from the largest
slice of that class; a class with fewer samples than slices is an error.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..errors import DataError

SPLIT_SPECS = ("4x25", "20x5", "80x1.25", "70/10/10/10")
_REPEAT = re.compile(r"^\s*(\d+)\s*[x×*]\s*(\d+(?:\.\d*)?|\.\d+)\s*%?\s*$")
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%?\s*$")


def split_spec(spec: str) -> list[float]:
    """Parse "KxP" (K slices of P %) or "P1/P2/…" (percentages) into fractions summing to 1.

    The percentages must be positive and sum to 100 within 1e-6.
    """
    m = _REPEAT.match(spec)
    if m:
        count, percent = int(m.group(1)), float(m.group(2))
        percents = [percent] * count
    else:
        parts = spec.split("/")
        matches = [_NUMBER.match(p) for p in parts]
        if not all(matches):
            raise DataError(f"bad split spec {spec!r}: use K×P like '4x25' or percentages like '70/10/10/10'")
        percents = [float(mm.group(1)) for mm in matches]
    if not percents or min(percents) <= 0:
        raise DataError(f"bad split spec {spec!r}: needs at least one slice, each of positive size")
    total = sum(percents)
    if abs(total - 100.0) > 1e-6:
        raise DataError(f"split spec {spec!r} sums to {total:g} %, not 100 %")
    return [p / 100.0 for p in percents]


def make_slices(labels: torch.Tensor, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """Stratified disjoint slices of ``range(len(labels))``: a list of sorted int64 index tensors.

    ``fractions`` must be positive and sum to 1 (within 1e-6). Every class present in
    ``labels`` appears in every slice; together the slices cover every index exactly once.
    """
    labels = torch.as_tensor(labels).reshape(-1).to(torch.int64)
    frac = torch.tensor(list(fractions), dtype=torch.float64)
    k = frac.numel()
    if k == 0 or bool((frac <= 0).any()) or abs(float(frac.sum()) - 1.0) > 1e-6:
        raise DataError(f"fractions must be positive and sum to 1, got {list(fractions)}")
    if labels.numel() == 0:
        raise DataError("cannot slice an empty label vector")
    if bool((labels < 0).any()):
        raise DataError("labels must be non-negative class ids")
    gen = torch.Generator().manual_seed(seed)
    cum = torch.cumsum(frac, 0)
    cum = cum / cum[-1]  # exact 1 at the end
    slice_of = torch.empty_like(labels)  # slice id of every sample
    for c in torch.unique(labels).tolist():  # loop over classes, vectorised within one
        members = torch.nonzero(labels == c).flatten()
        n_c = members.numel()
        if n_c < k:
            raise DataError(
                f"class {c} has {n_c} samples, fewer than the {k} slices: slice {n_c} (0-based) would lack it"
            )
        start = torch.rand((), generator=gen, dtype=torch.float64)
        cuts = torch.floor(n_c * cum + start).to(torch.int64)
        cuts[-1] = n_c
        counts = torch.diff(cuts, prepend=torch.zeros(1, dtype=torch.int64))
        while bool((counts == 0).any()):  # at most k moves; only when n_c·f_j < 1
            counts[int(torch.argmax(counts))] -= 1
            counts[int(torch.nonzero(counts == 0)[0])] += 1
        perm = members[torch.randperm(n_c, generator=gen)]
        slice_of[perm] = torch.repeat_interleave(torch.arange(k), counts)
    order = torch.argsort(slice_of, stable=True)  # indices grouped by slice, ascending within
    sizes = torch.bincount(slice_of, minlength=k).tolist()
    return list(torch.split(order, sizes))
