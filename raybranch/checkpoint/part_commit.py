"""The steps of a part-wise writer that all ranks take together (:mod:`raybranch.checkpoint.parts`
has the protocol): agreeing on a step, committing a group from every rank's blob, and becoming
the branch's writer (rank 0) or following it (the others)."""
from __future__ import annotations


from ..errors import NonFiniteError
from ..ledger.branch import BranchLog
from ..ledger.lineage import create_branch
from ..ledger.refs import read_branch_ref
from ..store.blob import write_blob
from ..store.store import Store
from .group import MAX_GROUP_BYTES, OpenGroup, RetryPolicy, write_layouts
from .parts import FENCED, OK, Parts, hash_ints, ints_hash, raise_agreed, status_of
from .writer import acquire_writer


class Follower:
    """What a rank other than 0 knows of the branch's writer: the branch and rank 0's epoch (it
    commits nothing itself)."""

    def __init__(self, log: BranchLog, epoch: int):
        self.log, self.bid, self.epoch, self.writer_id = log, log.bid, epoch, f"rank-follower-{epoch}"
        self.found_committed = 0


def agree_step(parts: Parts, step: int, refused: BaseException | None, nbytes: int, due: bool) -> bool:
    """After encoding ``step``: raise on every rank when any rank's encoder refused it; else
    whether the group closes (the largest part at the byte cap, or rank 0's window is up)."""
    votes = parts.gather([0 if refused is None else 1, int(nbytes), int(due)])
    if any(v[0] for v in votes):
        if refused is not None:
            raise refused
        r = next(i for i, v in enumerate(votes) if v[0])
        raise NonFiniteError(f"step {step}: rank {r}'s encoder refused its part (NaN/Inf); nothing was saved")
    return max(v[1] for v in votes) >= MAX_GROUP_BYTES or bool(votes[0][2])


def commit_parts(store: Store, run: str, writer, group: OpenGroup, retry: RetryPolicy, parts: Parts,
                 on_retry=lambda: None) -> None:
    """Each rank writes its rows as one blob; rank 0 writes the layouts and, once every part is
    in the store, the commit naming them all (``world_size`` = W). Raises on every rank when any
    part or the commit failed."""
    steps = group.steps
    own: BaseException | None = None
    h, size = "00" * 32, 0
    if group.rows:
        try:
            blob = write_blob(group.rows, {"run": run, "branch_id": writer.bid, "steps": [steps[0], steps[-1]],
                                           "part": parts.rank, "world_size": parts.world})
            h, size = retry.run(lambda: store.put_blob(run, blob), on_retry, "writing the part")
            if parts.rank == 0:
                retry.run(lambda: write_layouts(store, run, group.layouts), on_retry, "writing the layouts")
        except BaseException as exc:  # noqa: BLE001 - shared with the other ranks first
            own = exc
    votes = parts.gather([status_of(own), int(size), *hash_ints(h)])
    raise_agreed([v[0] for v in votes], own, f"steps {steps[0]}..{steps[-1]} not committed: a part was not written")
    if parts.rank == 0:
        named = [{"name": str(r), "blob": [ints_hash(v[2:]), int(v[1])]} for r, v in enumerate(votes) if v[1] > 0]
        slices = sorted({k for e in group.entries for k in e["slices"]})
        try:
            retry.run(lambda: writer.commit(group.entries, named, world_size=parts.world, slices=slices), on_retry)
        except BaseException as exc:  # noqa: BLE001 - shared with the other ranks first
            own = exc
    codes = parts.gather([status_of(own)])
    raise_agreed([codes[0][0]], own if parts.rank == 0 else None, f"steps {steps[0]}..{steps[-1]} not committed by rank 0")


def load_writer(store: Store, run: str, branch: str, page_size: int, lapsed: tuple | None, parts: Parts):
    """Rank 0: the branch's writer (:func:`~raybranch.checkpoint.writer.acquire_writer`); the
    others, once it registered: a :class:`Follower` of the branch at its epoch."""
    own, writer = None, None
    if parts.rank == 0:
        try:
            writer = acquire_writer(store, run, branch, page_size, lapsed)
        except BaseException as exc:  # noqa: BLE001 - shared with the other ranks first
            own = exc
    code = parts.gather([status_of(own), -1 if writer is None else writer.epoch])[0]
    raise_agreed([code[0]], own if parts.rank == 0 else None, f"branch {branch!r} of run {run!r}: rank 0 could not become its writer")
    if parts.rank == 0:
        return writer
    ref = read_branch_ref(store, run, branch)
    log = BranchLog(store, run, ref.doc["branch_id"], branch).open()
    if log.head["epoch"] != code[1]:
        raise_agreed([FENCED], None, f"branch {branch!r}: epoch {log.head['epoch']} is not rank 0's {code[1]}")
    return Follower(log, code[1])


def create_fork(store: Store, run: str, branch: str, fork: dict, page_size: int, parts: Parts) -> None:
    """The fork's branch created once, by rank 0, before any rank goes on."""
    own = None
    if parts.rank == 0:
        try:
            create_branch(store, run, branch, fork=fork, page_size=page_size)
        except BaseException as exc:  # noqa: BLE001 - shared with the other ranks first
            own = exc
    code = parts.gather([status_of(own)])[0][0]
    raise_agreed([code], own if parts.rank == 0 else None, f"fork {branch!r} of run {run!r} not created by rank 0")


__all__ = ["Follower", "OK", "agree_step", "commit_parts", "create_fork", "load_writer"]
