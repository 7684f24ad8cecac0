"""The Ray layer around the core: the checkpoint actor and its client.

``AsyncCheckpointer`` has Checkpointer's ``save`` signature but returns at once; the branch's
``CheckpointActor`` encodes, writes and commits off the training path (see :mod:`.actor` for
the client, :mod:`.service` for the actor, :mod:`.handoff` for what crosses between them).
Importing this package imports Ray; the core (``raybranch.checkpoint`` …) never does.
"""
from .actor import AsyncCheckpointer
from .handoff import pack_state, unpack_state
from .service import (
    CheckpointActor,
    CheckpointActorError,
    CheckpointService,
    RetryPolicy,
    SaveSkippedError,
    actor_name,
)

__all__ = [
    "AsyncCheckpointer",
    "CheckpointActor",
    "CheckpointActorError",
    "CheckpointService",
    "RetryPolicy",
    "SaveSkippedError",
    "actor_name",
    "pack_state",
    "unpack_state",
]
