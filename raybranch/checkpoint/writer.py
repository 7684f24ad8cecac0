"""Becoming a branch's writer: create the branch, register with a new epoch, or rejoin under the
epoch held before a failed commit (:mod:`raybranch.ledger` has the fencing rules); and reading the
head the writer's encoders continue from."""
from __future__ import annotations

from ..errors import ConflictError, FencedError, LapsedWriterFenced, NotFoundError
from ..ledger.branch import BranchLog, BranchWriter
from ..ledger.lineage import Lineage, create_branch
from ..ledger.refs import read_branch_ref
from ..store.store import Store
from .restore import Reader



def acquire_writer(store: Store, run: str, branch: str, page_size: int, lapsed: tuple | None) -> BranchWriter:
    """The branch's writer for this process: the branch created if it is new (or taken over when
    another process created it just now), else a registration with a new epoch; after a failed
    commit (``lapsed`` = (epoch, writer id, branch id) held then) the same epoch again, since a
    store error is no reason to take the branch back from a newer writer that came meanwhile."""
    ref = read_branch_ref(store, run, branch)
    if ref is None or not ref.live:
        try:
            return create_branch(store, run, branch, page_size=page_size)
        except ConflictError:  # created by another process just now: take it over
            ref = read_branch_ref(store, run, branch)
    if lapsed is not None:
        return _rejoin(store, run, branch, ref, lapsed)
    return BranchWriter.register(BranchLog(store, run, ref.doc["branch_id"], branch))


def _rejoin(store: Store, run: str, branch: str, ref, lapsed: tuple) -> BranchWriter:
    epoch, writer_id, bid = lapsed
    if ref is None or not ref.live or ref.doc["branch_id"] != bid:
        raise FencedError(f"branch {branch!r} of run {run!r} was replaced while this writer (epoch {epoch}) was cut off")
    log = BranchLog(store, run, bid, branch).open()
    if log.head["epoch"] > epoch:
        raise LapsedWriterFenced(f"branch {branch!r} of run {run!r}: writer epoch {epoch} was fenced by epoch "
                                 f"{log.head['epoch']} while its commit failed")
    return BranchWriter(log, epoch, writer_id)


def read_head(store: Store, run: str, writer, reader: Reader, attempts: int = 8) -> tuple[Reader, tuple | None]:
    """(the reader to keep, None for an empty branch, else the head's (ũ per group, exact tensors,
    layout, entry, exact base entry, its state, key frames since its snapshot, its exact tensors)). A page not found
    is read again with a fresh reader: the writer just fenced may still be sealing it."""
    lin = Lineage(store, run, log=writer.log)
    if lin.head_step is None:
        return reader, None
    for attempt in range(attempts):
        try:
            acc, exact, layout, last = reader.recon(lin, lin.head_step)
            base, base_state, keys, base_exact = reader.exact_base(lin, lin.head_step)
            return reader, (acc, exact, layout, last, base, base_state, keys, base_exact)
        except NotFoundError:
            if attempt == attempts - 1:
                raise
            writer.log.open()
            reader = Reader(store, run)
            lin = Lineage(store, run, log=writer.log)
    return reader, None


__all__ = ["LapsedWriterFenced", "acquire_writer", "read_head"]
