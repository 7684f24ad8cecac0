"""Delta-LoRA layers (report §5.2.3), their injection into models, and checkpoint helpers."""

from raybranch.lora.inject import (
    PRESET_KINDS,
    PRESETS,
    conv_sites,
    delta_lora_layers,
    delta_lora_step,
    inject_delta_lora,
    linear_sites,
    load_lora_state,
    lora_anchor,
    lora_parameters,
    lora_state,
    merge_and_reinit_,
    merge_delta_lora,
    non_lora_parameters,
    reanchor,
)
from raybranch.lora.layer import (
    DeltaLoRAConv2d,
    DeltaLoRALinear,
    DeltaLoRAMultiheadAttention,
    default_rank,
    svd_factors,
)

__all__ = [
    "PRESETS",
    "PRESET_KINDS",
    "DeltaLoRAConv2d",
    "DeltaLoRALinear",
    "conv_sites",
    "DeltaLoRAMultiheadAttention",
    "default_rank",
    "delta_lora_layers",
    "delta_lora_step",
    "inject_delta_lora",
    "linear_sites",
    "load_lora_state",
    "lora_anchor",
    "lora_parameters",
    "lora_state",
    "merge_and_reinit_",
    "merge_delta_lora",
    "non_lora_parameters",
    "reanchor",
    "svd_factors",
]
