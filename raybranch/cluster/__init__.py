"""The Ray layer around the core: the checkpoint actor and its client.

``AsyncCheckpointer`` has Checkpointer's ``save``/``save_state`` signature; the branch's
``CheckpointActor`` runs the save pipeline (encode, group commit) in its own process (see
:mod:`.actor` for the client, :mod:`.service` for the actor, :mod:`.handoff` for the transport).
Importing this package imports Ray; the core (``raybranch.checkpoint`` …) never does.
"""
from .actor import AsyncCheckpointer
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
]
