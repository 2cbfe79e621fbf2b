"""Mosaic GPU decode-attention kernel against NumPy float64 on a Hopper GPU; launch heuristic, argument errors and
the CUDA lowering everywhere.

Mosaic GPU has no interpret mode that runs this kernel (JAX's GPU interpreter takes neither a transposed MMA
operand nor one held in registers), so the value tests need the real GPU and skip elsewhere. Every case draws
fresh random inputs and fills cache positions past each sequence's length (and every layer but the one attended
to) with NaN. Unlike the Triton kernel's tests, the outputs are not NaN-poisoned first: ``plgpu.kernel`` has no
input/output aliasing to hand the kernel a prefilled buffer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from arg_errors import DECODE_MGPU_INPUT_ERRORS, DECODE_MGPU_LAUNCH_ERRORS, parametrize
from conftest import REL_TOL, rel_err
from reference import decode_attention_f64
from test_decode_kernel import LENGTHS, nan_filled_cache

import jkv
from pallas_kernels import backend, decode, decode_mgpu, dispatch

ON_HOPPER = backend.mosaic_gpu_usable()

# (id, batch, kv_heads, group, head_dim, max_len, dtype, lengths, layers, block_k, num_splits, num_stages)
# layers: None for a one-layer [B, K, S, D] cache, (L, layer) for a whole cache, layer "traced" under jit.
# None in the last three columns: the default launch parameters. Lengths are named relative to S and bk.
CASES = [
    ("g1_d128_bf16_splits3", 4, 2, 1, 128, 1000, "bfloat16", ("1", "bk-1", "bk", "bk+1"), None, 64, 3, None),
    ("g4_d128_bf16_default", 3, 2, 4, 128, 4096, "bfloat16", ("S", "bk+1", "S-1"), None, None, None, None),
    ("g8_d64_f16_one_split", 2, 1, 8, 64, 2000, "float16", ("S", "1"), None, 64, 1, 2),
    ("g4_d128_bf16_traced_layer", 2, 2, 4, 128, 3000, "bfloat16", ("S", "2bk+1"), (2, "traced"), 64, 4, 2),
    ("g2_d256_bf16_splits2", 2, 2, 2, 256, 600, "bfloat16", ("S-1", "bk"), None, 64, 2, 2),
    ("g3_d128_bf16_layer1_of3", 2, 2, 3, 128, 500, "bfloat16", ("S", "0"), (3, 1), None, None, None),
    ("g5_d128_f16_deep_ring", 3, 1, 5, 128, 1500, "float16", ("bk-1", "S", "2bk+1"), None, 64, 2, 4),
    ("g4_d128_bf16_more_splits_than_blocks", 3, 2, 4, 128, 200, "bfloat16", ("S", "1", "0"), None, 64, 8, 2),
    ("g8_d64_bf16_tiny_cache", 2, 1, 8, 64, 40, "bfloat16", ("S", "1"), None, None, None, None),
]
IDS = [c[0] for c in CASES]


def run_case(rng, case, q_dtype=None):
    _, batch, kv_heads, group, head_dim, max_len, dtype, length_names, layers, block_k, num_splits, stages = case
    dtype = jnp.dtype(dtype)
    q_dtype = jnp.dtype(q_dtype or dtype)
    bk = block_k or decode_mgpu.mgpu_config(batch, kv_heads, max_len, head_dim, dtype).block_k
    names = [length_names[i % len(length_names)] for i in range(batch)]
    lengths = np.array([min(LENGTHS[name](max_len, bk), max_len) for name in names], np.int32)
    q = rng.standard_normal((batch, kv_heads * group, head_dim))
    k, k_slab = nan_filled_cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers)
    v, v_slab = nan_filled_cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers)
    rounded = lambda x, t: np.asarray(jnp.asarray(x, t)).astype(np.float64)
    ref = decode_attention_f64(rounded(q, dtype), rounded(k_slab, dtype), rounded(v_slab, dtype), lengths)

    args = [jnp.asarray(q, q_dtype)] + [jnp.asarray(x, dtype) for x in (k, v)] + [jnp.asarray(lengths)]
    options = dict(block_k=block_k, num_splits=num_splits, num_stages=stages)
    if layers is None:
        out = decode_mgpu.decode_attention_mgpu(*args, **options)
    elif layers[1] == "traced":
        fn = jax.jit(lambda q, k, v, n, layer: decode_mgpu.decode_attention_mgpu(q, k, v, n, layer=layer, **options))
        out = fn(*args, jnp.int32(1))
    else:
        out = decode_mgpu.decode_attention_mgpu(*args, layer=layers[1], **options)
    assert out.shape == q.shape and out.dtype == q_dtype
    out = np.asarray(out).astype(np.float64)
    for b, n in enumerate(lengths):
        if n == 0:
            np.testing.assert_array_equal(out[b], 0.0)
    assert rel_err(out, ref) < REL_TOL[dtype.name], names


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason=f"needs Mosaic GPU: {backend.mosaic_gpu_unavailable_reason()}")
class TestOnHopper:
    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_kernel_matches_float64(self, rng, case):
        run_case(rng, case)

    def test_float32_queries_over_bf16_cache(self, rng):
        """q keeps its dtype in the output; the kernel rounds it to the cache's dtype for the MMA."""
        run_case(rng, CASES[0], q_dtype="float32")

    @pytest.mark.parametrize("batch,seq", [(1, 4096), (8, 4096), (1, 32768)], ids=["B=1_T=4k", "B=8_T=4k", "B=1_T=32k"])
    def test_bench_shapes_default_config(self, rng, batch, seq):
        """The benchmark's head layout (N=32, K=8, D=128, bf16) with its default launch parameters."""
        lengths = np.full((batch,), seq, np.int32)
        lengths[0] = seq - 77
        q, k, v = (rng.standard_normal(s) for s in ((batch, 32, 128), (batch, 8, seq, 128), (batch, 8, seq, 128)))
        bf = lambda x: jnp.asarray(x, jnp.bfloat16)
        ref = decode_attention_f64(*(np.asarray(bf(x).astype(jnp.float32), np.float64) for x in (q, k, v)), lengths)
        out = decode_mgpu.decode_attention_mgpu(bf(q), bf(k), bf(v), jnp.asarray(lengths))
        assert rel_err(out.astype(jnp.float32), ref) < REL_TOL["bfloat16"]

    @pytest.mark.parametrize("batch,seq", [(8, 4096), (1, 4096)], ids=["B=8_T=4k_mgpu", "B=1_T=4k_triton"])
    def test_dispatch_and_three_splits(self, rng, batch, seq):
        """jkv.attend at T = 1 over a KVCache (the shape-based kernel choice), and the Mosaic GPU kernel with
        three splits (partials merged by ``merge_partials``), against float64."""
        lengths = np.full((batch,), seq - 1, np.int32)
        lengths[0] = seq - 78
        q, k, v = (rng.standard_normal(s) for s in ((batch, 32, 128), (1, batch, 8, seq, 128), (1, batch, 8, seq, 128)))
        bf = lambda x: jnp.asarray(x, jnp.bfloat16)
        f64 = lambda x: np.asarray(bf(x).astype(jnp.float32), np.float64)
        ref = decode_attention_f64(f64(q), f64(k[0]), f64(v[0]), lengths + 1)
        cache = one_step_cache(bf(k), bf(v), jnp.asarray(lengths))
        assert dispatch.prefer_mgpu(batch, 8, seq, 128, 4, jnp.bfloat16) == (batch == 8)
        out = jax.jit(lambda q, c: jkv.attend(q[:, None], c, 0, impl="pallas")[:, 0])(bf(q), cache)
        assert rel_err(out.astype(jnp.float32), ref) < REL_TOL["bfloat16"]
        out = decode_mgpu.decode_attention_mgpu(bf(q), bf(k[0]), bf(v[0]), jnp.asarray(lengths + 1), num_splits=3)
        assert rel_err(out.astype(jnp.float32), ref) < REL_TOL["bfloat16"]

    @pytest.mark.parametrize("group", [1, 3, 5])
    @pytest.mark.parametrize("splits", [1, 3])
    def test_head_dim_64_groups_off_the_8_row_tile(self, rng, splits, group):
        """head_dim 64 with kv heads whose query rows start inside an 8-row tile, over many blocks: wrong while
        the query tile was the first MMA's register operand (docs/notes/decode_kernel.md, v6 and v7)."""
        batch, kv_heads, d, seq = 3, 3, 64, 2048
        lengths = np.array([2000, 1, 777], np.int32)
        q = rng.standard_normal((batch, kv_heads * group, d))
        k, v = (rng.standard_normal((1, batch, kv_heads, seq, d)) for _ in range(2))
        bf = lambda x: jnp.asarray(x, jnp.bfloat16)
        f64 = lambda x: np.asarray(bf(x).astype(jnp.float32), np.float64)
        ref = decode_attention_f64(f64(q), f64(k[0]), f64(v[0]), lengths)
        config = decode_mgpu.MgpuConfig(decode_mgpu.BLOCK_K, splits, decode_mgpu.DEFAULT_STAGES)
        out = decode_mgpu._decode(
            bf(q), bf(k), bf(v), jnp.asarray(lengths), jnp.zeros(1, jnp.int32), scale=d**-0.5, config=config
        )
        assert rel_err(out.astype(jnp.float32), ref) < REL_TOL["bfloat16"]

    def test_dispatch_under_vmap(self, rng):
        """A stack of two caches at a shape where the dispatch picks the Mosaic GPU kernel, under jit(vmap)."""
        batch, seq = 8, 4096
        assert dispatch.prefer_mgpu(batch, 8, seq, 128, 4, jnp.bfloat16)
        lengths = np.stack([np.full((batch,), seq - 1), rng.integers(0, seq, batch)]).astype(np.int32)
        q = rng.standard_normal((2, batch, 32, 128))
        k, v = (rng.standard_normal((2, 1, batch, 8, seq, 128)) for _ in range(2))
        bf = lambda x: jnp.asarray(x, jnp.bfloat16)
        caches = one_step_cache(bf(k), bf(v), jnp.asarray(lengths))
        out = jax.jit(jax.vmap(lambda q, c: jkv.attend(q[:, None], c, 0, impl="pallas")[:, 0]))(bf(q), caches)
        for i in range(2):
            f64 = lambda x: np.asarray(bf(x).astype(jnp.float32), np.float64)
            ref = decode_attention_f64(f64(q[i]), f64(k[i, 0]), f64(v[i, 0]), lengths[i] + 1)
            assert rel_err(out[i].astype(jnp.float32), ref) < REL_TOL["bfloat16"]


@pytest.mark.parametrize(
    "batch,seq,want",
    [(1, 4096, False), (1, 32768, True), (8, 4096, True), (8, 16384, True), (32, 4096, True), (64, 8192, False)],
    ids=str,
)
def test_dispatch_rule_on_the_benchmark_shapes(batch, seq, want):
    """The shapes where the Mosaic GPU kernel measured faster than the Triton one on an H100 (132 SMs)."""
    assert dispatch.prefer_mgpu(batch, 8, seq, 128, 4, jnp.bfloat16, num_multiprocessors=132) == want
    assert not dispatch.prefer_mgpu(batch, 8, seq, 128, 4, jnp.float32, num_multiprocessors=132)  # no f32 MMA here
    assert not dispatch.prefer_mgpu(batch, 8, seq + 4, 128, 4, jnp.bfloat16, num_multiprocessors=132)  # would pad
    # head_dim 64: the Triton kernel, whatever the size (it measured faster there)
    for group in (3, 8):
        assert not dispatch.prefer_mgpu(batch, 8, 4 * seq, 64, group, jnp.bfloat16, num_multiprocessors=132)


@pytest.mark.skipif(ON_HOPPER, reason="checks the fallback where Mosaic GPU cannot run")
def test_dispatch_falls_back_to_the_triton_kernel(rng):
    """Off Hopper the dispatch runs the Triton kernel (interpret mode on a CPU) even where the rule prefers MGPU."""
    q = jnp.asarray(rng.standard_normal((1, 4, 64)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((1, 1, 2048, 64)), jnp.bfloat16) for _ in range(2))
    lengths = jnp.asarray([2000], jnp.int32)
    got = dispatch.decode_attention_auto(q, k, v, lengths)
    want = decode.decode_attention(q, k, v, lengths)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


@pytest.mark.parametrize(
    "batch,kv_heads,max_len,want",
    [(1, 8, 32768, (16, 2)), (8, 8, 4096, (2, 2)), (64, 8, 8192, (1, 2)), (1, 8, 4096, (16, 2)), (2, 1, 40, (1, 2))],
    ids=["B=1_T=32k", "B=8_T=4k", "B=64_T=8k", "B=1_T=4k", "B=2_T=40"],
)
def test_launch_heuristic(batch, kv_heads, max_len, want):
    """About one program per multiprocessor of an H100, equal shares of at least two blocks each."""
    config = decode_mgpu.mgpu_config(batch, kv_heads, max_len, 128, jnp.bfloat16, num_multiprocessors=132)
    assert config.block_k == 64
    assert (config.num_splits, config.num_stages) == want
    assert decode_mgpu._ring_bytes(config.block_k, 128, 2, config.num_stages) <= decode_mgpu.smem_budget() // 2


def _args(batch=2, kv_heads=2, group=4, head_dim=128, max_len=256, dtype=jnp.bfloat16):
    q = jnp.zeros((batch, kv_heads * group, head_dim), dtype)
    k = jnp.zeros((batch, kv_heads, max_len, head_dim), dtype)
    return q, k, k, jnp.full((batch,), 3, jnp.int32)


@parametrize("change,error,match", DECODE_MGPU_INPUT_ERRORS)
def test_argument_errors(change, error, match):
    with pytest.raises(error, match=match):
        decode_mgpu.decode_attention_mgpu(*_args(**change))


@parametrize("options,error,match", DECODE_MGPU_LAUNCH_ERRORS)
def test_launch_parameter_errors(monkeypatch, options, error, match):
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)  # reach the checks that follow it
    with pytest.raises(error, match=match):
        decode_mgpu.decode_attention_mgpu(*_args(), **options)


@pytest.mark.skipif(ON_HOPPER, reason="checks the refusal where Mosaic GPU cannot run")
def test_refuses_to_run_without_mosaic_gpu():
    with pytest.raises(RuntimeError, match="the Mosaic GPU decode kernel cannot run here: "):
        decode_mgpu.decode_attention_mgpu(*_args())


@pytest.mark.parametrize("num_splits", [1, 3], ids=["one_split", "three_splits"])
def test_lowers_for_cuda_without_slicing_the_layer(num_splits):
    """The kernel lowers to a Mosaic GPU custom call on any host (lowering for CUDA needs no GPU), and the whole
    [L, B, K, S, D] cache goes to it: no layer-sized copy in the module."""
    num_layers, batch, kv_heads, max_len, head_dim = 3, 2, 2, 256, 128
    k = jax.ShapeDtypeStruct((num_layers, batch, kv_heads, max_len, head_dim), jnp.bfloat16)
    q = jax.ShapeDtypeStruct((batch, 8, head_dim), jnp.bfloat16)
    args = (q, k, k, jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    config = decode_mgpu.MgpuConfig(block_k=64, num_splits=num_splits, num_stages=3)
    text = decode_mgpu._decode.trace(*args, scale=0.1, config=config).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert f"tensor<{batch}x{kv_heads}x{max_len}x{head_dim}xbf16>" not in text


def test_dispatch_takes_mosaic_gpu_by_the_rule_unless_told_not_to(rng, monkeypatch):
    """Where Mosaic GPU can run and ``prefer_mgpu`` holds, the dispatch calls it; ``allow_mgpu=False`` keeps the
    Triton kernel (the Mosaic GPU call is replaced by a marker: it cannot run here)."""
    q = jnp.asarray(rng.standard_normal((1, 4, 64)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((1, 1, 2048, 64)), jnp.bfloat16) for _ in range(2))
    lengths = jnp.asarray([2000], jnp.int32)
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)
    monkeypatch.setattr(dispatch, "prefer_mgpu", lambda *a, **kw: True)
    monkeypatch.setattr(decode_mgpu, "decode_attention_mgpu", lambda *a, **kw: "mgpu")
    assert dispatch.decode_attention_auto(q, k, v, lengths) == "mgpu"
    got = dispatch.decode_attention_auto(q, k, v, lengths, allow_mgpu=False)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(decode.decode_attention(q, k, v, lengths)))


def one_step_cache(k, v, lengths):
    """A contiguous cache over ``k``, ``v`` ``[..., L, B, K, S, D]`` in a step of one token per sequence (its query
    at ``lengths[b]`` attends to ``lengths[b] + 1`` positions)."""
    num_layers, _, kv_heads, seq, head_dim = k.shape[-5:]
    spec = jkv.CacheSpec(num_layers, kv_heads, head_dim, seq, k.dtype)
    ones, zeros = jnp.ones_like(lengths), jnp.zeros_like(lengths)
    return jkv.KVCache((k, v), lengths, ones, zeros, spec=spec, format=jkv.Plain(k.dtype))
