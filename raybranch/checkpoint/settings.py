"""The Checkpointer's settings: their defaults, their checks, and the keywords a fork repeats.

:func:`check_settings` checks the keyword arguments of
:class:`~raybranch.checkpoint.checkpointer.Checkpointer` that are not checked where they are
used (the codec's are checked by :func:`raybranch.codec.modes.make_params`), resolves the
key-frame interval and returns the arguments as :meth:`Checkpointer.fork` passes them on.

Key frames: ``key_every`` (deltas between key frames) defaults to ``snapshot_every`` (its old
name), else :data:`DEFAULT_KEY_EVERY`. ``restore_budget_s`` (seconds) replaces it by a time
budget and excludes both: the encoder (:class:`~raybranch.checkpoint.encode.StateEncoder`)
then sets key_every = ⌊budget / median decode time of its first deltas⌋, and a fork repeats
the budget, not an interval.
"""
from __future__ import annotations

from ..errors import RaybranchError
from ..ledger.records import PAGE_SIZE

DEFAULT_KEY_EVERY = 256  # deltas between key frames (docs/DECISIONS.md: the ratio/restore frontier)
DEFAULT_FLUSH_EVERY = 64  # steps per group commit (docs/DECISIONS.md: the durability window)
DEFAULT_FLUSH_SECONDS = 5.0
DEFAULT_MAX_PENDING = 8  # captures queued behind the training thread before save() blocks


def check_settings(*, codec, residual, bits, granularity, value, key_every, restore_budget_s, standalone_every,
                   snapshot_every, segment_size, exact, min_lossy_numel, optimizer_codec, save_rng, device,
                   flush_every, flush_seconds, background, max_pending, retry) -> tuple[int, dict]:
    """(key_every, settings): the key-frame interval in deltas (``DEFAULT_KEY_EVERY``, which the
    encoder ignores, under a ``restore_budget_s``) and the keyword arguments for a fork.

    Raises RaybranchError, naming the argument and the value given, for the first bad one.
    """
    if restore_budget_s is not None:
        if key_every is not None or snapshot_every is not None:
            raise RaybranchError("give key_every (deltas) or restore_budget_s (seconds), not both")
        if not isinstance(restore_budget_s, (int, float)) or not restore_budget_s > 0:
            raise RaybranchError(f"restore_budget_s must be a positive number of seconds, got {restore_budget_s!r}")
    if key_every is None:
        key_every = snapshot_every if snapshot_every is not None else DEFAULT_KEY_EVERY
    if not isinstance(key_every, int) or key_every < 1:
        raise RaybranchError(f"key_every must be a positive number of checkpoints, got {key_every!r}")
    if not isinstance(standalone_every, int) or standalone_every < 1:
        raise RaybranchError(f"standalone_every must be a positive number of exact checkpoints, got {standalone_every!r}")
    if segment_size < 0:
        raise RaybranchError(f"segment_size must be >= 0 (0 = pages of {PAGE_SIZE} commits, never compacted), got {segment_size}")
    if optimizer_codec not in ("exact", "lc"):
        raise RaybranchError(f"optimizer_codec must be 'exact' or 'lc', got {optimizer_codec!r}")
    if not isinstance(flush_every, int) or flush_every < 1:
        raise RaybranchError(f"flush_every must be a positive number of saves per commit, got {flush_every!r}")
    if flush_seconds is not None and (not isinstance(flush_seconds, (int, float)) or not flush_seconds > 0):
        raise RaybranchError(f"flush_seconds must be a positive number of seconds or None, got {flush_seconds!r}")
    if not isinstance(max_pending, int) or max_pending < 1:
        raise RaybranchError(f"max_pending must be a positive number of captures, got {max_pending!r}")
    settings = dict(codec=codec, residual=residual, bits=bits, granularity=granularity, value=value,
                    key_every=None if restore_budget_s is not None else key_every,
                    restore_budget_s=restore_budget_s, standalone_every=standalone_every, segment_size=segment_size,
                    exact=list(exact), min_lossy_numel=min_lossy_numel, optimizer_codec=optimizer_codec,
                    save_rng=save_rng, device=device, flush_every=flush_every, flush_seconds=flush_seconds,
                    background=background, max_pending=max_pending, retry=retry)
    return key_every, settings
