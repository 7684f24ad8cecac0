"""The Ray layer around the core: the checkpoint actor and its client.

``AsyncCheckpointer`` has Checkpointer's ``save`` signature but returns at once; the branch's
``CheckpointActor`` encodes, writes and commits off the training path (see :mod:`.actor`).
Importing this package imports Ray; the core (``raybranch.checkpoint`` …) never does.
"""
from .actor import (
    AsyncCheckpointer,
    BackgroundCompactor,
    CheckpointActor,
    CheckpointActorError,
    CheckpointService,
    RetryPolicy,
    SaveSkippedError,
    actor_name,
    pack_state,
    unpack_state,
)

__all__ = [
    "AsyncCheckpointer",
    "BackgroundCompactor",
    "CheckpointActor",
    "CheckpointActorError",
    "CheckpointService",
    "RetryPolicy",
    "SaveSkippedError",
    "actor_name",
    "pack_state",
    "unpack_state",
]
