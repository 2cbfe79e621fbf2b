"""Tensor- and data-parallel rules for Llama weights over a ``(dp, tp)`` mesh (``jkv.parallel.make_mesh``).

``tp`` splits the heads Megatron style: each device holds ``K / tp`` kv heads' q/k/v columns, the matching rows of
the output projection, and ``1 / tp`` of the MLP's gate/up columns and down rows; XLA inserts the two all-reduces
per layer (after the attention output and the MLP down projection) where the row-split matmuls meet. Weights are
replicated over ``dp``. Caches have their own rules (``jkv.caches.sharding``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jkv.models import quant
from jkv.models.llama.config import LlamaConfig
from jkv.models.llama.params import LlamaParams, init_params
from jkv.parallel import TP, mesh_sizes


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_layout(config: LlamaConfig, mesh: Mesh, batch: int | None = None) -> None:
    """Raise ``ValueError`` naming the numbers when ``config`` cannot be split over ``mesh``."""
    dp, tp = mesh_sizes(mesh)
    # Sizes tp splits: whole kv heads, the MLP's columns, and the LM head's vocab columns (a tied head is not split).
    split = {"num_kv_heads": config.num_kv_heads, "intermediate_size": config.intermediate_size}
    if not config.tie_embeddings:
        split["vocab_size"] = config.vocab_size
    ok = _divisors(math.gcd(*split.values()))
    for name, size in split.items():
        if size % tp:
            why = " (each device holds whole kv heads)" if name == "num_kv_heads" else ""
            raise ValueError(f"tensor parallel size tp={tp} must divide {name}={size}{why}; tp in {ok} would work")
    if batch is not None and batch % dp:
        raise ValueError(
            f"data parallel size dp={dp} must divide the batch={batch}; use a batch that is a multiple of {dp}"
        )


# Which axis of each weight tensor parallelism splits, counted from the end (None: replicated). Column-split
# weights (q/k/v, gate/up, LM head) produce head- or column-local activations; row-split weights (attention
# output, MLP down) consume them and end in an all-reduce. Stacked layers carry a leading L axis, which the
# negative axes skip.
PARAM_TP_AXIS = {
    "embed": None,
    "norm": None,
    "lm_head": -1,
    "attn_norm": None,
    "wqkv": -3,  # [H, K, G + 2, D]: whole kv groups per device
    "bqkv": -3,
    "wo": -2,
    "mlp_norm": None,
    "w_gate_up": -1,  # [H, 2, F]: each device keeps its F columns of both gate and up
    "w_down": -2,
    "q_norm": None,
    "k_norm": None,
    "post_attn_norm": None,
    "post_mlp_norm": None,
}


def param_specs(params):
    """PartitionSpecs for a ``LlamaParams`` pytree (either layer layout)."""

    def spec_for(path, leaf):
        if quant.is_quantized(leaf):
            raise ValueError(
                f"parameter {jax.tree_util.keystr(path)} is block-quantized ({leaf.format}): quantized weights run "
                "on one device; dequantize them (jkv.models.quant.dequantize_params) to shard them"
            )
        name = getattr(path[-1], "name", None)
        if name not in PARAM_TP_AXIS:
            raise ValueError(f"no tensor-parallel rule for parameter {jax.tree_util.keystr(path)}")
        axis = PARAM_TP_AXIS[name]
        spec = [None] * leaf.ndim
        if axis is not None:
            spec[axis] = TP
        return P(*spec)

    return jax.tree_util.tree_map_with_path(spec_for, params, is_leaf=quant.is_quantized)


def shard_params(params: LlamaParams, config: LlamaConfig, mesh: Mesh) -> LlamaParams:
    """Place ``params`` on ``mesh`` Megatron style (replicated over dp)."""
    check_layout(config, mesh)
    return jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params)))


def init_params_sharded(config: LlamaConfig, key, mesh: Mesh, dtype=None, scale: float = 0.02) -> LlamaParams:
    """Random weights generated directly in their shards (for benchmarks of models larger than one device).

    Each device draws only its own slice (JAX's partitionable threefry), so a 70B-shaped model never has to fit
    one device. Same distribution as ``init_params``; not the same values.
    """
    check_layout(config, mesh)
    dtype = jnp.bfloat16 if dtype is None else dtype
    shapes = jax.eval_shape(lambda k: init_params(config, k, dtype, scale, layout="layers"), key)
    specs = param_specs(shapes)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    generators = {}
    out = []
    for i, ((path, leaf), spec) in enumerate(zip(leaves, spec_leaves, strict=True)):
        name = getattr(path[-1], "name", "")
        std, mean = (0.1, 1.0) if name.endswith("norm") else (1.0 if name == "embed" else scale, 0.0)
        gen_key = (leaf.shape, spec, std, mean)
        if gen_key not in generators:
            generators[gen_key] = jax.jit(
                lambda k, shape=leaf.shape, std=std, mean=mean: (mean + std * jax.random.normal(k, shape)).astype(
                    dtype
                ),
                out_shardings=NamedSharding(mesh, spec),
            )
        out.append(generators[gen_key](jax.random.fold_in(key, i)))
    return jax.tree_util.tree_unflatten(treedef, out)
