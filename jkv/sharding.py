"""Shardings for caches over a ``(dp, tp)`` mesh (``jkv.parallel``): kv heads over ``tp``, sequences over ``dp``.

Compiled steps keep caches sharded between calls (``shard_cache`` once, then donate): nothing is gathered to one
device. Pallas kernels are not partitioned by XLA, so inside ``jkv.parallel.use_mesh(mesh)`` the attention
dispatch runs them per shard on the local heads (``jkv.parallel.per_shard`` with ``attention_specs``). Weights
have their own rules (``jkv.models.llama.sharding``).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jkv.cache import KVCache
from jkv.parallel import DP, TP, mesh_sizes


# ---------------------------------------------------------------------------------------------- caches
def cache_specs(cache):
    """PartitionSpecs for every array of ``cache`` (a pytree of the cache's own type).

    Contiguous / Q8 caches: ``[L, B, K, S, ...]`` split over batch (dp) and kv heads (tp); lengths and error bits
    over batch. Paged caches: the page pool ``[L, P, K, page, D]`` over kv heads (pages are shared by all
    sequences, so the pool is not split by dp); block tables and lengths over batch; allocator state replicated.
    """
    kv5 = P(None, DP, TP, None, None)
    per_seq = P(DP)

    def spec_for(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim == 5 and ("pages" in name):
            return P(None, None, TP, None, None)
        if leaf.ndim == 5:
            return kv5
        if "block_tables" in name:
            return P(DP, None)
        if name.endswith(("lengths", "errors")) and leaf.ndim == 1:
            return per_seq
        return P()

    return jax.tree_util.tree_map_with_path(spec_for, cache)


def cache_sharding(cache, mesh: Mesh):
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), cache_specs(cache))


def shard_cache(cache, mesh: Mesh):
    """Place ``cache`` on ``mesh``: its kv heads split over tp, its sequences over dp."""
    dp, tp = mesh_sizes(mesh)
    k = cache.k_pages if hasattr(cache, "k_pages") else cache.k
    num_kv_heads = k.shape[2]
    if num_kv_heads % tp:
        raise ValueError(f"tp={tp} must divide the cache's num_kv_heads={num_kv_heads}")
    if cache.batch % dp:
        raise ValueError(f"dp={dp} must divide the cache's batch={cache.batch}")
    return jax.device_put(cache, cache_sharding(cache, mesh))


# ---------------------------------------------------------------------------------------------- kernels per shard
def attention_specs(cache) -> tuple:
    """``shard_map`` in_specs for the arrays a decode kernel takes from ``cache`` (see ``jkv.attention``)."""
    kv5 = P(None, DP, TP, None, None)
    if isinstance(cache, KVCache):
        return (kv5, kv5)
    if hasattr(cache, "k_scale"):
        return (kv5, kv5, kv5, kv5)
    return (P(None, None, TP, None, None), P(None, None, TP, None, None), P(DP, None))
