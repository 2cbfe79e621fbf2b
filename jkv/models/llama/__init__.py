"""The Llama family (Llama 2/3, SmolLM2, Qwen2, and by static options Qwen3, Mistral, Gemma 2/3, Phi-3) as pure
functions over a params pytree.

``config`` (hyperparameters and presets), ``params`` (weights, initialization, layouts), ``model`` (the block
and the entry points), ``fusions`` (options, and every fusion with its reason), ``sharding`` (tensor-parallel
rules for the weights).
"""

from jkv.attention.qkv import fuse_qkv, unfuse_qkv
from jkv.models.llama.config import PRESETS, LlamaConfig
from jkv.models.llama.fusions import DEFAULT_OPTIONS, MIN_MATMUL_ROWS, LlamaOptions
from jkv.models.llama.model import (
    block,
    decode_step,
    flat_hidden_states,
    forward,
    hidden_states,
    lm_head,
    prefill,
)
from jkv.models.llama.params import (
    LAYOUTS,
    LayerParams,
    LlamaParams,
    check_params,
    init_params,
    resolve_layout,
    with_layout,
)
from jkv.models.llama.sharding import PARAM_TP_AXIS, check_layout, init_params_sharded, param_specs, shard_params

__all__ = [
    "DEFAULT_OPTIONS",
    "LAYOUTS",
    "MIN_MATMUL_ROWS",
    "PARAM_TP_AXIS",
    "PRESETS",
    "LayerParams",
    "LlamaConfig",
    "LlamaOptions",
    "LlamaParams",
    "block",
    "check_layout",
    "check_params",
    "decode_step",
    "flat_hidden_states",
    "forward",
    "fuse_qkv",
    "hidden_states",
    "init_params",
    "init_params_sharded",
    "lm_head",
    "param_specs",
    "prefill",
    "resolve_layout",
    "shard_params",
    "unfuse_qkv",
    "with_layout",
]
