"""Scale out with JAX's own SPMD machinery: a ``(dp, tp)`` device mesh, and kernels run per shard.

* ``dp`` (data parallel) splits the batch: each group of devices holds its own sequences.
* ``tp`` (tensor parallel) splits the heads: each device holds ``K / tp`` kv heads.

This module knows no cache and no model: caches give their own PartitionSpecs (``jkv.caches.sharding``), models theirs
(``jkv.models.llama.sharding``). Pallas kernels are not partitioned by XLA, so inside ``use_mesh(mesh)`` the
attention dispatch runs them per shard on the local batch and heads with ``per_shard`` (``shard_map``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

DP, TP = "dp", "tp"
# The meshes of the enclosing ``use_mesh`` blocks, innermost last (a context stack, not a switch).
_ACTIVE_MESH: list[Mesh] = []


def make_mesh(tp: int = 1, dp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(dp, tp)`` mesh over the first ``dp * tp`` devices (tp devices adjacent: they talk every layer)."""
    devices = list(jax.devices() if devices is None else devices)
    for name, value in (("tp", tp), ("dp", dp)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    tp, dp = int(tp), int(dp)
    if tp * dp > len(devices):
        raise ValueError(
            f"dp={dp} x tp={tp} needs {dp * tp} devices but only {len(devices)} are available"
            f"{f' ({devices[0].platform})' if devices else ''}; choose dp * tp <= {len(devices)}"
        )
    grid = np.array(devices[: dp * tp], dtype=object).reshape(dp, tp)
    return Mesh(grid, (DP, TP))


def mesh_sizes(mesh: Mesh) -> tuple[int, int]:
    """``(dp, tp)`` of ``mesh``; ``ValueError`` naming its axes when it lacks either (``make_mesh`` gives both)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"expected a jax.sharding.Mesh (jkv.parallel.make_mesh), got {type(mesh).__name__}")
    missing = [name for name in (DP, TP) if name not in mesh.shape]
    if missing:
        raise ValueError(
            f"the mesh's axes {tuple(mesh.axis_names)} lack {missing}: jkv shards over a mesh with axes "
            f"({DP!r}, {TP!r}) (jkv.parallel.make_mesh; size 1 for an unused one)"
        )
    return mesh.shape[DP], mesh.shape[TP]


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """Within this context, Pallas attention kernels run per shard of ``mesh`` (``shard_map`` over dp and tp)."""
    mesh_sizes(mesh)  # a mesh without both axes is refused here, not inside a traced kernel
    _ACTIVE_MESH.append(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE_MESH.pop()


def active_mesh() -> Mesh | None:
    """The mesh of the innermost ``use_mesh`` block, or None outside one."""
    return _ACTIVE_MESH[-1] if _ACTIVE_MESH else None


def per_shard(fn, mesh: Mesh, cache_arrays: tuple, cache_specs_: tuple, q, lengths, layer):
    """Run ``fn(q, *cache_arrays, lengths, layer)`` on each shard's local batch and heads.

    ``cache_specs_`` holds the PartitionSpec of each of ``cache_arrays`` (the cache's own rule); ``q`` is split
    over batch and heads, ``lengths`` over batch, ``layer`` replicated.
    """
    q_spec = P(DP, TP, None)
    body = jax.shard_map(
        lambda q, *rest: fn(q, *rest[:-2], rest[-2], rest[-1]),
        mesh=mesh,
        in_specs=(q_spec, *cache_specs_, P(DP), P()),
        out_specs=q_spec,
        check_vma=False,
    )
    return body(q, *cache_arrays, lengths, jnp.asarray(layer, jnp.int32))
