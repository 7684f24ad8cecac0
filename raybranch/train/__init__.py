"""The Ray-free training loop: one data slice, checkpointed every step (:mod:`.loop`)."""
from .loop import (
    NAN_POLICIES,
    SETTLE_TAG,
    NonFiniteLossError,
    SliceResult,
    batch_order,
    checkpoint_state,
    evaluate_accuracy,
    load_checkpoint,
    train_slice,
)

__all__ = [
    "NAN_POLICIES",
    "SETTLE_TAG",
    "NonFiniteLossError",
    "SliceResult",
    "batch_order",
    "checkpoint_state",
    "evaluate_accuracy",
    "load_checkpoint",
    "train_slice",
]
