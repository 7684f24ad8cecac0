"""Part-wise checkpoints of a replicated state: W ranks of a data-parallel group each encode and
write their own part of every step, and one commit (rank 0's) names all the parts.

    parts = TorchParts()                                  # in each rank, after init_process_group
    ck = Checkpointer(store, run, branch, parts=parts)    # then save/flush/close as usual

Split. The layout (:meth:`raybranch.checkpoint.layout.LayoutRules.layout` with ``parts`` = W)
cuts each lossy group g of n tensors into W chunks g.0 … g.(W−1) at tensor boundaries: tensor
i, whose entries span [c_i, c_i + s_i) of the group's S entries, goes to chunk
⌊(c_i + s_i/2)·W / S⌋, so each chunk holds about S/W entries. Exact tensors go, largest first, to
the rank holding the fewest exact bytes. What DDP does not keep equal across ranks — buffers
(BatchNorm statistics: each rank's forward updates its own, DDP broadcasts rank 0's at the next
forward) and RNG states — is rank 0's to write, whole, as DDP's own rule has it. Rank r captures,
encodes and writes the chunks and exact tensors it owns (``layout["owners"]``), about 1/W of the state. The codec codes each tensor on
its own (per-tensor scales), so the reconstruction ũ is the same bit for bit as one writer's.

Agreement. Every decision that could differ between ranks is taken on values all ranks share:

* per step, after encoding, ``gather([refused, bytes of the open group, due])``: a delta refused
  by any rank's encoder (NaN/Inf) is refused on all; the group closes when the largest part
  reaches the byte cap, or rank 0's time window is up (there is no idle-time commit: the window
  is checked at the next step, at ``flush`` and at ``close``);
* per commit, ``gather([status, blob size, blob hash])`` after each rank wrote its blob, then
  rank 0 commits (parts named "0" … "W−1", ``world_size`` = W) and ``gather`` again shares its
  outcome, so every rank raises the same error class when the commit did not happen;
* when a writer loads the head, rank 0 registers (a fence) and the others read the branch after it.

A commit exists only once every part is written, so it is never visible half-written. A rank
that dies leaves the others blocked in a gather until its timeout (or until the training
framework tears the group down); the group then restarts from the last commit.
"""
from __future__ import annotations

from datetime import timedelta

import torch

from ..errors import ConflictError, FencedError, RaybranchError, StoreError

OK, STORE_ERROR, FENCED, CONFLICT, OTHER = range(5)
_ERRORS = {STORE_ERROR: StoreError, FENCED: FencedError, CONFLICT: ConflictError, OTHER: RaybranchError}


class Parts:
    """A single writer (rank 0 of 1): the default, for which nothing is gathered."""

    rank, world = 0, 1

    def gather(self, values: list[int]) -> list[list[int]]:
        """Every rank's ``values`` (int64), in rank order, on every rank."""
        return [list(values)]


class TorchParts(Parts):
    """The ranks of the default ``torch.distributed`` process group, gathering over a gloo group
    of their own (usable from the pipeline thread while training runs collectives on the default
    group, NCCL or gloo). Create it on every rank at the same point (``new_group`` is collective)."""

    def __init__(self, timeout_s: float = 300.0):
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def gather(self, values: list[int]) -> list[list[int]]:
        t = torch.tensor(values, dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._dist.all_gather(out, t, group=self.group)
        return [o.tolist() for o in out]


def rank0_only(name: str, buffers) -> bool:
    """What DDP does not keep equal across ranks, so rank 0 writes it: buffers (each rank's
    forward updates its own BatchNorm statistics; DDP broadcasts rank 0's at the next forward)
    and RNG states."""
    return name in buffers or name.startswith("rng/")


def split_groups(groups: dict[str, list[str]], sizes: dict[str, int], world: int,
                 whole: tuple[str, ...] = ("buffers",)) -> tuple[dict[str, list[str]], dict[str, int]]:
    """({chunk name: names}, {chunk name: owner rank}): each group cut into ``world`` chunks at
    tensor boundaries (see the module docstring); empty chunks are left out. A group in ``whole``
    stays one chunk, ``<group>.0``, rank 0's."""
    out: dict[str, list[str]] = {}
    owners: dict[str, int] = {}
    for g, names in groups.items():
        if g in whole:
            out[f"{g}.0"], owners[f"{g}.0"] = list(names), 0
            continue
        total = sum(sizes[n] for n in names)
        start = 0
        for n in names:
            j = min(world - 1, int((2 * start + sizes[n]) * world // (2 * total)))
            out.setdefault(f"{g}.{j}", []).append(n)
            owners[f"{g}.{j}"] = j
            start += sizes[n]
    return out, owners


def assign_exact(names: list[str], nbytes: dict[str, int], world: int, pinned=()) -> dict[str, int]:
    """{name: rank}: ``pinned`` names to rank 0; the others largest first, each to the rank holding
    the fewest bytes so far (ties: lowest rank)."""
    load = [0] * world
    owners = {n: 0 for n in names if n in pinned}
    for n in sorted((n for n in names if n not in owners), key=lambda n: (-nbytes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        owners[n] = r
        load[r] += nbytes[n]
    return owners


def own_view(layout: dict, rank: int) -> dict:
    """The layout restricted to the lossy groups ``rank`` encodes (the whole layout for one writer)."""
    owners = layout.get("owners")
    if not owners:
        return layout
    return {**layout, "groups": {g: v for g, v in layout["groups"].items() if owners[g] == rank}}


def owned_exact(layout: dict, names, rank: int) -> list[str]:
    owners = layout.get("owners")
    return list(names) if not owners else [n for n in names if owners[n] == rank]


def hash_ints(h: str) -> list[int]:
    """A sha256 hex digest as 4 signed int64 (what a gather carries)."""
    b = bytes.fromhex(h)
    return [int.from_bytes(b[i:i + 8], "big", signed=True) for i in range(0, 32, 8)]


def ints_hash(v: list[int]) -> str:
    return b"".join(int(x).to_bytes(8, "big", signed=True) for x in v).hex()


def status_of(exc: BaseException | None) -> int:
    if exc is None:
        return OK
    for code, cls in ((FENCED, FencedError), (CONFLICT, ConflictError), (STORE_ERROR, StoreError)):
        if isinstance(exc, cls):
            return code
    return OTHER


def raise_agreed(codes: list[int], own: BaseException | None, what: str) -> None:
    """Raise on every rank when any rank's code is not OK: a rank's own error as it is, the others
    an error of the first failed rank's class naming that rank."""
    bad = [(r, c) for r, c in enumerate(codes) if c != OK]
    if not bad:
        return
    if own is not None:
        raise own
    r, c = bad[0]
    raise _ERRORS[c](f"{what}: rank {r} failed ({_ERRORS[c].__name__}); see its log")


__all__ = ["Parts", "TorchParts", "assign_exact", "rank0_only", "hash_ints", "ints_hash", "own_view", "owned_exact", "raise_agreed",
           "split_groups", "status_of"]
