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


def test_eqx_layer_checks_every_weight_at_construction():
    layer = eqx_layer(qkv_bias=True)
    w = {n: getattr(layer, n) for n in ("wq", "wk", "wv", "wo", "bq", "bk", "bv")}
    settings = (N, K, D, layer.inv_freq)
    bad = {
        "wo": (w["wq"], r"wo.shape=\(32, 64\) must be \[64, 32\]"),  # [N*D, H]: the transpose of wq
        "bq": (jnp.zeros(3), r"bq.shape=\(3,\) must be \(64,\)"),
        "wk": (w["wk"][:5], r"wk.shape=\(5, 32\) must be \[32, 32\]"),  # hidden size of wq
    }
    for name, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            jeqx.Attention(*{**w, name: value}.values(), *settings)
    with pytest.raises(ValueError, match=r"inv_freq has 3 frequencies, expected 8 for head_dim=16"):
        jeqx.Attention(*w.values(), N, K, D, (1.0,) * 3)


@pytest.mark.parametrize("make", [eqx_layer, nnx_layer], ids=["eqx", "nnx"])
def test_layer_settings_are_checked_at_construction(make):
    for options, message in (
        (dict(rope_style="bogus"), r"rope_style='bogus' must be one of \('neox', 'norm'\)"),
        (dict(window=0), r"window=0 must be a positive int"),
        (dict(softcap=-1.0), r"softcap=-1.0"),
        (dict(impl="bogus"), r"impl='bogus' is not one of"),
    ):
        with pytest.raises(ValueError, match=message):
            make(**options)


@pytest.mark.parametrize("make", [eqx_layer, nnx_layer], ids=["eqx", "nnx"])
def test_layer_input_shape_is_named(make):
    layer = make()
    cache = jkv.make_cache("f32", SPEC, 2).begin(3)
    with pytest.raises(ValueError, match=r"x.shape=\(3, 32\) must be \[B, T, 32\]"):
        layer(jnp.ones((3, H)), cache, 0)
    with pytest.raises(ValueError, match=r"x.shape=\(2, 3, 33\) must be \[B, T, 32\]"):
        layer(jnp.ones((2, 3, H + 1)), cache, 0)


@pytest.mark.parametrize("make", [eqx_layer, nnx_layer], ids=["eqx", "nnx"])
def test_layer_names_a_cache_of_another_batch_or_not_a_cache(make):
    layer, x = make(), jnp.ones((2, 3, H))
    with pytest.raises(ValueError, match=r"x.shape=\(2, 3, 32\) has batch 2, the cache has batch 3"):
        layer(x, jkv.make_cache("f32", SPEC, 3).begin(3), 0)
    with pytest.raises(TypeError, match=r"cache must be a jkv cache .*got dict"):
        layer(x, {"k": jnp.zeros(3)}, 0)
