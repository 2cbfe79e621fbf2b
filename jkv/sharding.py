"""Scale out with JAX's own SPMD machinery: a ``(dp, tp)`` device mesh, shardings for caches and weights.

* ``dp`` (data parallel) splits the batch: each group of devices holds its own sequences.
* ``tp`` (tensor parallel) splits the heads, Megatron style: each device holds ``K / tp`` kv heads of every cache
  and layer, the matching query heads and q/k/v columns, the matching rows of the output projection, and a
  ``1 / tp`` slice of the MLP's hidden columns (gate/up) and rows (down). XLA inserts the two all-reduces per layer
  (after the attention output and the MLP down projection) where the row-split matmuls meet.

Compiled steps keep caches sharded between calls (``jkv.caches.shard_cache`` once, then donate): nothing is
gathered to one device. Pallas kernels are not partitioned by XLA, so inside ``use_mesh(mesh)`` the attention
dispatch runs them per shard on the local heads with ``shard_map`` (see ``jkv.attention``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DP, TP = "dp", "tp"
_ACTIVE_MESH: list[Mesh] = []


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def make_mesh(tp: int = 1, dp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(dp, tp)`` mesh over the first ``dp * tp`` devices (tp devices adjacent: they talk every layer)."""
    devices = list(jax.devices() if devices is None else devices)
    for name, value in (("tp", tp), ("dp", dp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if tp * dp > len(devices):
        raise ValueError(
            f"dp={dp} x tp={tp} needs {dp * tp} devices but only {len(devices)} are available "
            f"({devices[0].platform}); choose dp * tp <= {len(devices)}"
        )
    grid = np.array(devices[: dp * tp], dtype=object).reshape(dp, tp)
    return Mesh(grid, (DP, TP))


def mesh_sizes(mesh: Mesh) -> tuple[int, int]:
    return mesh.shape[DP], mesh.shape[TP]


def check_layout(config, mesh: Mesh, batch: int | None = None) -> None:
    """Raise ``ValueError`` naming the numbers when ``config`` (a LlamaConfig) cannot be split over ``mesh``."""
    dp, tp = mesh_sizes(mesh)
    if config.num_kv_heads % tp:
        ok = [d for d in _divisors(config.num_kv_heads)]
        raise ValueError(
            f"tensor parallel size tp={tp} must divide num_kv_heads={config.num_kv_heads} "
            f"(each device holds whole kv heads); tp in {ok} would work"
        )
    if config.intermediate_size % tp:
        ok = [d for d in _divisors(math.gcd(config.intermediate_size, config.num_kv_heads))]
        raise ValueError(f"tp={tp} must divide intermediate_size={config.intermediate_size}; tp in {ok} would work")
    if batch is not None and batch % dp:
        raise ValueError(
            f"data parallel size dp={dp} must divide the batch={batch}; use a batch that is a multiple of {dp}"
        )


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """Within this context, Pallas attention kernels run per shard of ``mesh`` (``shard_map`` over dp and tp)."""
    _ACTIVE_MESH.append(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE_MESH.pop()


def active_mesh() -> Mesh | None:
    return _ACTIVE_MESH[-1] if _ACTIVE_MESH else None


# ---------------------------------------------------------------------------------------------- kernels per shard
def per_shard(fn, mesh: Mesh, cache_arrays: tuple, cache_specs_: tuple, q, lengths, layer):
    """Run ``fn(q, *cache_arrays, lengths, layer)`` on each shard's local batch and heads."""
    q_spec = P(DP, TP, None)
    body = jax.shard_map(
        lambda q, *rest: fn(q, *rest[:-2], rest[-2], rest[-1]),
        mesh=mesh,
        in_specs=(q_spec, *cache_specs_, P(DP), P()),
        out_specs=q_spec,
        check_vma=False,
    )
    return body(q, *cache_arrays, lengths, jax.numpy.asarray(layer, jax.numpy.int32))


# ---------------------------------------------------------------------------------------------- weights
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
}


def param_specs(params):
    """PartitionSpecs for a ``LlamaParams`` pytree (either layer layout)."""

    def spec_for(path, leaf):
        name = getattr(path[-1], "name", None)
        if name not in PARAM_TP_AXIS:
            raise ValueError(f"no tensor-parallel rule for parameter {jax.tree_util.keystr(path)}")
        axis = PARAM_TP_AXIS[name]
        spec = [None] * leaf.ndim
        if axis is not None:
            spec[axis] = TP
        return P(*spec)

    return jax.tree_util.tree_map_with_path(spec_for, params)


def shard_params(params, config, mesh: Mesh):
    """Place ``params`` on ``mesh`` Megatron style (replicated over dp)."""
    check_layout(config, mesh)
    return jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params)))


def init_params_sharded(config, key, mesh: Mesh, dtype=None, scale: float = 0.02):
    """Random weights generated directly in their shards (for benchmarks of models larger than one device).

    Each device draws only its own slice (JAX's partitionable threefry), so a 70B-shaped model never has to fit
    one device. Same distribution as ``llama.init_params``; not the same values.
    """
    import jax.numpy as jnp

    from jkv.models import llama

    check_layout(config, mesh)
    dtype = jnp.bfloat16 if dtype is None else dtype
    shapes = jax.eval_shape(lambda k: llama.init_params(config, k, dtype, scale, layout="layers"), key)
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
