"""Bad inputs to the integration layers and helpers: a clear error naming the value and what was expected, at
construction where the setting is known then; never a silently wrong result."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jkv
from jkv.integrations import common
from jkv.integrations import eqx as jeqx
from jkv.integrations import nnx as jnnx

H, N, K, D = 32, 4, 2, 16
SPEC = jkv.CacheSpec(2, K, D, 16, jnp.float32)


def eqx_layer(**options):
    return jeqx.Attention.init(H, N, K, D, key=jax.random.key(0), **options)


def nnx_layer(**options):
    return nnx.eval_shape(lambda: jnnx.Attention(H, N, K, D, rngs=nnx.Rngs(0), **options))


def test_unstack_caches_refuses_a_count_that_is_not_the_stack():
    stacked = common.stack_caches([jkv.make_cache("f32", SPEC, 1) for _ in range(2)])
    assert len(common.unstack_caches(stacked, 2)) == 2
    with pytest.raises(ValueError, match=r"n=5\): the stack holds 2 caches"):
        common.unstack_caches(stacked, 5)  # indexing past the stack would clamp: copies of the last cache


def test_stack_caches_refuses_nothing_and_mixed_kinds():
    with pytest.raises(ValueError, match="no caches"):
        common.stack_caches([])
    spec = jkv.CacheSpec(2, K, 32, 16, jnp.float32)
    with pytest.raises(ValueError, match=r"caches\[1\] .*int8.* differs from caches\[0\]"):
        common.stack_caches([jkv.make_cache("f32", spec, 1), jkv.make_cache("q8", spec, 1)])
