"""Sharded weights, caches and decode on 8 host CPU devices (``XLA_FLAGS`` set in tests/conftest.py): same
logits as unsharded, shards really split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from helpers_compile import FAST_COMPILE
from helpers_params import random_params

import jkv
from jkv import parallel
from jkv.caches import cache_sharding, shard_cache
from jkv.models import llama

CONFIG = llama.LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16
)
BATCH, MAX_LEN = 4, 32
pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS host device count)")


@pytest.fixture(scope="module")
def model():
    params = random_params(CONFIG, seed=3, scale=0.2)
    spec = jkv.CacheSpec(CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim, MAX_LEN, jnp.float32)
    prompt = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(BATCH, 6))
    cache = jkv.KVCache.init(spec, BATCH)
    prefill = jax.jit(lambda p, c, t: llama.prefill(p, c, t, config=CONFIG), compiler_options=FAST_COMPILE)
    _, cache = prefill(params, cache, jnp.asarray(prompt))
    tokens = jnp.asarray([3, 17, 99, 5], jnp.int32)
    return params, cache, tokens


def decode(params, cache, tokens, impl="xla"):
    return llama.decode_step(params, cache, tokens, config=CONFIG, options=llama.LlamaOptions(impl=impl))


@pytest.mark.parametrize("dp,tp", [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (2, 4)], ids=lambda x: str(x))
def test_sharded_decode_matches_unsharded(model, dp, tp):
    params, cache, tokens = model
    want_logits, want_cache = jax.jit(decode, compiler_options=FAST_COMPILE)(params, cache, tokens)
    mesh = parallel.make_mesh(tp=tp, dp=dp)
    sp = llama.shard_params(params, CONFIG, mesh)
    sc = shard_cache(jax.tree.map(jnp.copy, cache), mesh)  # the step donates it
    shardings = cache_sharding(sc, mesh)
    step = jax.jit(decode, donate_argnums=1, out_shardings=(None, shardings), compiler_options=FAST_COMPILE)
    logits, out = step(sp, sc, tokens)
    assert rel_err(logits, want_logits) < 1e-5
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(want_cache.lengths))
    assert rel_err(out.data[0], want_cache.data[0]) < 1e-6
    # The cache stays split between steps: each device holds its batch slice and kv heads only.
    assert out.data[0].sharding.is_equivalent_to(shardings.data[0], out.data[0].ndim)
    shapes = {s.data.shape for s in out.data[0].addressable_shards}
    assert shapes == {(CONFIG.num_layers, BATCH // dp, CONFIG.num_kv_heads // tp, MAX_LEN, CONFIG.head_dim)}
    assert len({s.device for s in out.data[0].addressable_shards}) == dp * tp


def test_param_shards_are_megatron_split(model):
    params, _, _ = model
    mesh = parallel.make_mesh(tp=4)
    sp = llama.shard_params(params, CONFIG, mesh)
    layer = sp.layers if sp.stacked else sp.layers[0]
    wo = layer.wo
    assert {s.data.shape[-2] for s in wo.addressable_shards} == {CONFIG.num_heads * CONFIG.head_dim // 4}
    assert {s.data.shape[-1] for s in layer.w_down.addressable_shards} == {CONFIG.hidden_size}
    assert sp.embed.sharding.is_fully_replicated


@pytest.mark.parametrize("dp,tp", [(2, 2), (1, 4)], ids=lambda x: str(x))
def test_pallas_kernel_runs_per_shard(model, dp, tp):
    """Inside use_mesh the Pallas decode kernel (interpret mode here) runs on each shard's local heads."""
    params, cache, tokens = model
    want, _ = jax.jit(decode, compiler_options=FAST_COMPILE)(params, cache, tokens)
    mesh = parallel.make_mesh(tp=tp, dp=dp)
    sp, sc = llama.shard_params(params, CONFIG, mesh), shard_cache(cache, mesh)
    with parallel.use_mesh(mesh):
        pallas = jax.jit(lambda p, c, t: decode(p, c, t, impl="pallas"), compiler_options=FAST_COMPILE)
        logits, _ = pallas(sp, sc, tokens)
    assert rel_err(logits, want) < 1e-5


def test_layout_errors_name_the_numbers(model):
    params, cache, _ = model
    with pytest.raises(ValueError, match=r"tp=3 must divide num_kv_heads=4 .* tp in \[1, 2, 4\] would work"):
        llama.shard_params(params, CONFIG, parallel.make_mesh(tp=3))
    with pytest.raises(ValueError, match=r"dp=3 must divide the cache's batch=4"):
        shard_cache(cache, parallel.make_mesh(dp=3))
    with pytest.raises(ValueError, match="dp=3 must divide the batch=4"):
        llama.check_layout(CONFIG, parallel.make_mesh(dp=3), batch=4)
    odd = llama.LlamaConfig(128, 64, 100, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="tp=8 must divide intermediate_size=100"):
        llama.check_layout(odd, parallel.make_mesh(tp=8))


MESH_PROMPTS = [np.random.default_rng(1).integers(0, CONFIG.vocab_size, size=n).tolist() for n in (3, 7, 5, 9, 4)]


def engine_tokens(params, mesh, temperature=0.0):
    """The tokens of 5 requests on 4 slots (one waits), and the engine. One token bucket: each engine's mixed step
    compiles once."""
    from jkv.serving import Engine, SamplingParams

    engine = Engine(
        params, CONFIG, num_slots=4, max_len=MAX_LEN, mesh=mesh, impl="xla", buckets=(16,), max_batch_tokens=16
    )
    for i, p in enumerate(MESH_PROMPTS):
        engine.submit(p, SamplingParams(max_new_tokens=6, temperature=temperature, seed=i))
    return [c.tokens for c in engine.run(show_progress=False)], engine


@pytest.fixture(scope="module")
def unsharded_tokens(model):
    return engine_tokens(model[0], None)[0]


@pytest.mark.parametrize("dp,tp", [(2, 2), (1, 4)], ids=lambda x: str(x))
def test_engine_on_a_mesh_matches_unsharded(model, unsharded_tokens, dp, tp):
    got, engine = engine_tokens(model[0], parallel.make_mesh(tp=tp, dp=dp))
    assert got == unsharded_tokens
    # The engine's default cache is paged: kv heads stayed split over tp, the slots' tables over dp.
    assert {s.data.shape[2] for s in engine.cache.pages[0].addressable_shards} == {CONFIG.num_kv_heads // tp}
    assert {s.data.shape[0] for s in engine.cache.block_tables.addressable_shards} == {4 // dp}
    # The first step's inputs are placed as the later steps' are: each step compiled once (private: the jits).
    assert [f._cache_size() for f in engine.steps._own.values()] == [1] * len(engine.steps._own)


def test_sampled_requests_on_a_mesh_draw_as_unsharded(model):
    """Sampling on a mesh: the sampling program takes the sharded step's logits, its ids feed the next sharded
    step; the same seeds draw the same tokens as on one device, and the sampling program compiles once."""
    from jkv.serving import mixed, steps

    sampler = steps._shared_jit(mixed.sample_step, (), (("truncate", False),))  # private: the process's jit of it
    want, _ = engine_tokens(model[0], None, temperature=1.0)
    before = sampler._cache_size()
    got, _ = engine_tokens(model[0], parallel.make_mesh(tp=2, dp=2), temperature=1.0)
    assert got == want
    assert sampler._cache_size() - before <= 1  # one compile for the mesh's logits, whatever the step
    greedy, _ = engine_tokens(model[0], None)
    assert got != greedy  # they did sample


@pytest.mark.parametrize("kind", ["q8", "paged", "fp8", "fp8-paged"])
def test_q8_and_paged_caches_shard_and_decode(kind):
    """Q8 caches split like contiguous ones; the paged pool splits over kv heads, block tables over batch."""
    config = llama.LlamaConfig(128, 64, 128, 2, 8, 4, 32)
    params = random_params(config, seed=4, scale=0.2)
    spec = jkv.CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, MAX_LEN, jnp.float32)
    cache = jkv.make_cache(kind, spec, BATCH, **({"page_size": 8} if kind == "paged" else {}))
    tokens = jnp.asarray([3, 17, 99, 5], jnp.int32)
    step = lambda p, c, t: llama.decode_step(p, c, t, config=config, options=llama.LlamaOptions(impl="xla"))
    want, _ = jax.jit(step, compiler_options=FAST_COMPILE)(params, cache, tokens)
    mesh = parallel.make_mesh(tp=2, dp=2)
    sc = shard_cache(cache, mesh)
    logits, out = jax.jit(step, out_shardings=(None, cache_sharding(sc, mesh)), compiler_options=FAST_COMPILE)(
        llama.shard_params(params, config, mesh), sc, tokens
    )
    assert rel_err(logits, want) < 1e-5
    pool = out.storage()[0]
    local = {s.data.shape for s in pool.addressable_shards}
    if kind in ("q8", "fp8"):
        assert local == {(config.num_layers, BATCH // 2, config.num_kv_heads // 2, MAX_LEN, config.head_dim)}
    else:
        assert {shape[2] for shape in local} == {config.num_kv_heads // 2}
        assert {s.data.shape for s in out.block_tables.addressable_shards} == {(BATCH // 2, out.max_pages)}


def test_users_of_a_mesh_without_dp_or_tp_name_its_axes(model):
    """shard_params, shard_cache, cache_sharding and the Engine refuse a mesh lacking an axis, naming its axes
    (they raised KeyError or a jax error)."""
    from jkv.serving import Engine

    params, cache, _ = model
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tp",))
    message = r"the mesh's axes \('tp',\) lack \['dp'\]"
    with pytest.raises(ValueError, match=message):
        llama.shard_params(params, CONFIG, mesh)
    with pytest.raises(ValueError, match=message):
        shard_cache(cache, mesh)
    with pytest.raises(ValueError, match=message):
        cache_sharding(cache, mesh)
    with pytest.raises(ValueError, match=message):
        Engine(params, CONFIG, num_slots=4, max_len=MAX_LEN, mesh=mesh, impl="xla", verbose=False)


def test_vocab_not_split_by_tp_is_refused_by_name():
    """The LM head's vocab columns split over tp: a vocab tp does not divide is refused naming it (was jax's
    IndivisibleError from device_put); a tied head (no lm_head) is not split, so any vocab fits."""
    config = llama.LlamaConfig(100, 64, 128, 2, 8, 8, 8)
    mesh = parallel.make_mesh(tp=8)
    with pytest.raises(ValueError, match=r"tp=8 must divide vocab_size=100; tp in \[1, 2, 4\] would work"):
        llama.shard_params(random_params(config, seed=0), config, mesh)
    with pytest.raises(ValueError, match="tp=8 must divide vocab_size=100"):
        llama.init_params_sharded(config, jax.random.key(0), mesh, jnp.float32)
    tied = llama.LlamaConfig(100, 64, 128, 2, 8, 8, 8, tie_embeddings=True)
    llama.check_layout(tied, mesh)


def test_suggested_tp_sizes_fit_every_split():
    """The sizes a refusal suggests fit every split axis, not only the failing one."""
    config = llama.LlamaConfig(128, 64, 100, 2, 8, 8, 8)  # kv heads 8 allow tp=8, intermediate 100 does not
    with pytest.raises(ValueError, match=r"tp=3 must divide num_kv_heads=8 .* tp in \[1, 2, 4\] would work"):
        llama.check_layout(config, parallel.make_mesh(tp=3))


def test_quantized_weights_are_refused_by_name():
    """Block-quantized weights have no split rule: the refusal names the weight and the way out (it named a
    plane, ``.lm_head.planes[0]``, as a parameter without a rule)."""
    from qweight_inputs import random_planes

    from jkv.models import quant

    planes = random_planes(np.random.default_rng(0), "Q8_0", CONFIG.vocab_size, CONFIG.hidden_size)
    head = quant.from_planes("Q8_0", planes, (CONFIG.hidden_size, CONFIG.vocab_size), jnp.float32)
    params = random_params(CONFIG, seed=0).replace(lm_head=head)
    with pytest.raises(ValueError, match=r"\.lm_head is block-quantized \(Q8_0\).*dequantize_params"):
        llama.shard_params(params, CONFIG, parallel.make_mesh(tp=2))
