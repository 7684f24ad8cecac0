"""Data poisoning: label flips, BadNets-style backdoor triggers, attack success rate."""
from .attacks import (
    POSITIONS,
    PoisonConfigError,
    add_trigger,
    attack_success_rate,
    flip_labels,
    poison_backdoor,
    trigger_value,
)

__all__ = [
    "POSITIONS",
    "PoisonConfigError",
    "add_trigger",
    "attack_success_rate",
    "flip_labels",
    "poison_backdoor",
    "trigger_value",
]
