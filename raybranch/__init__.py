"""raybranch: compressed per-step checkpoints, clean and poisoned branches, rollback before a bad slice.

    import raybranch as rb
    store = rb.open_store("file:///tmp/ckpts")
    ckpt = rb.Checkpointer(store, run="exp1", branch="main")
    ckpt.save(step, model, optimizer)
    state = ckpt.restore(step)
"""
from .checkpoint.checkpointer import Checkpointer, open_checkpointer
from .checkpoint.restore import Reader
from .checkpoint.group import RetryPolicy
from .checkpoint.state import set_rng
from .checkpoint.training_state import TrainingState, collect
from .errors import CorruptBlobError, NonFiniteError, NotFoundError, RaybranchError, StoreError
from .store.store import Store, open_store

__all__ = [
    "Checkpointer",
    "CorruptBlobError",
    "NonFiniteError",
    "NotFoundError",
    "RaybranchError",
    "Reader",
    "RetryPolicy",
    "Store",
    "StoreError",
    "TrainingState",
    "collect",
    "open_checkpointer",
    "open_store",
    "set_rng",
]
