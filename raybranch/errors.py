"""Errors raybranch raises on bad input or a damaged store; each message is one line."""


class RaybranchError(Exception):
    """Base class: the CLI prints ``raybranch: error: <message>`` and exits non-zero."""


class NotFoundError(RaybranchError, LookupError):
    """An unknown run, branch, step or blob."""


class CorruptBlobError(RaybranchError):
    """A blob or manifest whose bytes do not match its checksum, or cannot be parsed."""


class NonFiniteError(RaybranchError, ValueError):
    """A tensor holds NaN or Inf; nothing is encoded or written."""


class StoreError(RaybranchError):
    """The store URI is malformed or the store cannot be reached."""


class ConflictError(RaybranchError):
    """A conditional write lost: the object it would create exists, or the one it would replace changed."""


class FencedError(ConflictError):
    """A writer's commit was refused because a newer writer registered for the branch."""
