"""Model definitions as pure functions over params pytrees."""

from jkv.models.llama import (
    LayerParams,
    LlamaConfig,
    LlamaOptions,
    LlamaParams,
    check_params,
    decode_step,
    forward,
    hidden_states,
    init_params,
    lm_head,
    prefill,
)

__all__ = [
    "LayerParams",
    "LlamaConfig",
    "LlamaOptions",
    "LlamaParams",
    "check_params",
    "decode_step",
    "forward",
    "hidden_states",
    "init_params",
    "lm_head",
    "prefill",
]
