"""Every error raybranch raises on bad input, a damaged store or a failed run; each message is
one line. The CLI prints ``raybranch: error: <message>`` and exits 2 for any of them.

By layer: the store and ledger (:class:`NotFoundError`, :class:`CorruptBlobError`,
:class:`StoreError`, :class:`ConflictError`, :class:`FencedError`, :class:`LapsedWriterFenced`),
checkpoints and training (:class:`NonFiniteError`, :class:`NonFiniteLossError`), inputs
(:class:`ConfigError`, :class:`DataError`, :class:`DatasetNotFoundError`,
:class:`ModelConfigError`, :class:`WeightsNotFoundError`, :class:`PoisonConfigError`), runs in
the store (:class:`RunError`), the Ray layer (:class:`SaveSkippedError`,
:class:`CheckpointActorError`, :class:`BranchTrainingError`) and the local S3 server used by
tests (:class:`SeaweedError`). This module imports nothing, so every layer can use it.
"""


class RaybranchError(Exception):
    """Base class: the CLI prints ``raybranch: error: <message>`` and exits non-zero."""


# -- the store and the ledger ---------------------------------------------------------------------
class NotFoundError(RaybranchError, LookupError):
    """An unknown run, branch, step or blob."""


class CorruptBlobError(RaybranchError):
    """A blob or manifest whose bytes do not match its checksum, or cannot be parsed."""


class StoreError(RaybranchError):
    """The store URI is malformed or the store cannot be reached."""


class ConflictError(RaybranchError):
    """A conditional write lost: the object it would create exists, or the one it would replace changed."""


class FencedError(ConflictError):
    """A writer's commit was refused because a newer writer registered for the branch."""


class LapsedWriterFenced(FencedError):
    """A newer writer registered while this one's commit failed: it stays fenced."""


# -- checkpoints and training ---------------------------------------------------------------------
class NonFiniteError(RaybranchError, ValueError):
    """A tensor holds NaN or Inf; nothing is encoded or written."""


class NonFiniteLossError(RaybranchError, FloatingPointError):
    """A NaN/Inf loss under ``nan_policy="raise"``, or too many rollbacks in one slice."""


# -- inputs ---------------------------------------------------------------------------------------
class ConfigError(RaybranchError, ValueError):
    """A config file or override that names an unknown key or holds a value of the wrong type."""


class DataError(RaybranchError, ValueError):
    """A bad data set name, split spec, fraction or slicing request."""


class DatasetNotFoundError(RaybranchError, FileNotFoundError):
    """A data set's files are missing from the data directory."""


class ModelConfigError(RaybranchError, ValueError):
    """An unknown model name or a size/channel/weights request the model cannot meet."""


class WeightsNotFoundError(RaybranchError, FileNotFoundError):
    """Pretrained weights are not in the local torch hub cache (raybranch never downloads them)."""


class PoisonConfigError(RaybranchError, ValueError):
    """A bad fraction, rate, mapping, trigger size/position or target class."""


# -- runs in the store ----------------------------------------------------------------------------
class RunError(RaybranchError, ValueError):
    """An operation a run's state does not allow: a slice out of range or not yet arrived, a
    mark contradicting an earlier one, a run initialised with another config."""


# -- the Ray layer --------------------------------------------------------------------------------
class SaveSkippedError(RaybranchError):
    """A save the actor refused because an earlier save of the branch failed."""


class CheckpointActorError(RaybranchError):
    """The checkpoint actor died or could not be reached."""


class BranchTrainingError(RaybranchError):
    """A branch's Ray Train run failed for good (its FailureConfig budget spent)."""


# -- test infrastructure --------------------------------------------------------------------------
class SeaweedError(RaybranchError, RuntimeError):
    """The SeaweedFS server could not be found, started or reached."""
