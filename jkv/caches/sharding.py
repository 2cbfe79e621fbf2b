"""Caches on a device mesh: each cache kind gives its arrays' ``PartitionSpec`` s (``Cache.partition_specs``):
kv heads over the ``tp`` axis, sequences over ``dp``; a paged pool is split over kv heads only (its pages are
shared by every sequence). Compiled steps keep caches sharded between calls: ``shard_cache`` once, then donate."""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding

from jkv.parallel import DP, TP, mesh_sizes  # noqa: F401 (the cache kinds import DP, TP from here)


def cache_specs(cache):
    """PartitionSpecs for every array of ``cache`` (a pytree of the cache's own type)."""
    return cache.partition_specs()


def cache_sharding(cache, mesh: Mesh):
    """``NamedSharding`` s on ``mesh`` for every array of ``cache`` (a compiled step's ``out_shardings``)."""
    mesh_sizes(mesh)  # a mesh without both axes is refused naming its axes
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), cache_specs(cache))


def shard_cache(cache, mesh: Mesh):
    """Place ``cache`` on ``mesh``: its kv heads split over tp, its sequences over dp."""
    dp, tp = mesh_sizes(mesh)
    if cache.spec.num_kv_heads % tp:
        raise ValueError(f"tp={tp} must divide the cache's num_kv_heads={cache.spec.num_kv_heads}")
    if cache.batch % dp:
        raise ValueError(f"dp={dp} must divide the cache's batch={cache.batch}")
    return jax.device_put(cache, cache_sharding(cache, mesh))


def storage_specs(cache) -> tuple:
    """``shard_map`` in_specs of ``cache.storage()`` (what a kernel reads), from the cache's own specs."""
    specs = cache.partition_specs()
    return tuple(jax.tree.leaves(specs.storage(), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
