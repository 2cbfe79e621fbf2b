"""Pallas decode-attention kernel against NumPy float64: interpret mode on CPU, the real lowering on a GPU.

Every case draws fresh random inputs, fills cache positions past each sequence's length (and every layer but the
one attended to) with NaN, and has the kernel write into NaN-poisoned output buffers (``poison.poisoned_outputs``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REL_TOL, rel_err
from kernel_inputs import LENGTHS, fast_jit, run_jitted
from poison import poisoned_outputs
from reference import decode_attention_f64

import jkv
from pallas_kernels import backend, common, decode, reference

ON_GPU = backend.gpu_backend() == backend.TRITON

# (id, batch, kv_heads, group, head_dim, max_len, dtype, lengths, layers, block_k, num_splits)
# layers: None for a one-layer [B, K, S, D] cache, (L, layer) for a whole cache, layer "traced" under jit.
# None in the last two columns: the default launch parameters.
CASES = [
    ("g1_d64_f32_splits3", 4, 2, 1, 64, 96, "float32", ("1", "bk-1", "bk", "bk+1"), None, 16, 3),
    ("g1_d64_f32_splits3_batch5", 5, 2, 1, 64, 96, "float32", ("1", "bk-1", "bk", "bk+1", "S"), None, 16, 3),
    ("g4_d128_bf16_splits2", 3, 2, 4, 128, 200, "bfloat16", ("bk-1", "bk+1", "S"), None, 64, 2),
    ("g8_d64_bf16_one_split", 2, 1, 8, 64, 130, "bfloat16", ("S", "1"), None, 32, 1),
    ("g4_d64_f32_layer1_of3", 2, 2, 4, 64, 64, "float32", ("S", "0"), (3, 1), None, None),
    ("g3_d128_f32_default", 2, 2, 3, 128, 100, "float32", ("S", "2bk+1"), None, None, None),
    ("g8_d128_f32_traced_layer", 2, 1, 8, 128, 600, "float32", ("S", "bk+1"), (2, "traced"), 128, 4),
    ("g1_d128_bf16_default", 3, 4, 1, 128, 256, "bfloat16", ("bk-1", "bk", "S-1"), None, None, None),
    ("g2_d64_f16_more_splits_than_blocks", 2, 2, 2, 64, 48, "float16", ("S", "1", "0"), None, 16, 8),
    ("g2_d64_f16_more_splits_batch3", 3, 2, 2, 64, 48, "float16", ("S", "1", "0"), None, 16, 8),
    ("g4_d64_bf16_tiny_cache", 2, 1, 4, 64, 8, "bfloat16", ("S", "1"), None, None, None),
    # head_dims read in power-of-two column chunks (96 = 64 + 32, 80 = 64 + 16, 48 = 32 + 16)
    ("g4_d96_bf16_splits3", 3, 2, 4, 96, 200, "bfloat16", ("bk-1", "bk+1", "S"), None, 64, 3),
    ("g1_d96_f32_default_layer1_of3", 2, 3, 1, 96, 100, "float32", ("S", "2bk+1"), (3, 1), None, None),
    ("g2_d80_f32_splits2_traced_layer", 3, 2, 2, 80, 96, "float32", ("1", "bk", "S"), (2, "traced"), 16, 2),
    ("g8_d48_f16_one_split", 2, 1, 8, 48, 130, "float16", ("S", "1"), None, 32, 1),
]
IDS = [c[0] for c in CASES]
# The GPU class reruns the table with caches this many times longer (block edges stay relative to bk).
GPU_SCALE = 32


def nan_filled_cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers):
    """K or V, float64, NaN past each length and in every layer but the attended one; returns (cache, slab)."""
    slab = rng.standard_normal((batch, kv_heads, max_len, head_dim))
    valid = slab.copy()
    for b, n in enumerate(lengths):
        valid[b, :, n:] = np.nan
    if layers is None:
        return valid, slab
    num_layers, _ = layers
    cache = np.full((num_layers, batch, kv_heads, max_len, head_dim), np.nan)
    cache[1] = valid
    return cache, slab


def run_case(rng, case, *, scale_up=1, interpret=None, **launch):
    _, batch, kv_heads, group, head_dim, max_len, dtype, length_names, layers, block_k, num_splits = case
    max_len *= scale_up
    dtype = jnp.dtype(dtype)
    bk = block_k or common.decode_config(batch, kv_heads, max_len, head_dim, dtype).block_k
    names = [length_names[i % len(length_names)] for i in range(batch)]
    lengths = np.array([min(LENGTHS[name](max_len, bk), max_len) for name in names], np.int32)
    q = rng.standard_normal((batch, kv_heads * group, head_dim))
    k, k_slab = nan_filled_cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers)
    v, v_slab = nan_filled_cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers)
    # The reference sees the values the kernel sees: inputs rounded to the test dtype first.
    rounded = lambda x: np.asarray(jnp.asarray(x, dtype)).astype(np.float64)
    ref = decode_attention_f64(rounded(q), rounded(k_slab), rounded(v_slab), lengths)

    args = [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(lengths)]
    options = dict(interpret=interpret, block_k=block_k, num_splits=num_splits, **launch)
    with poisoned_outputs():
        if layers is None:
            out = run_jitted(decode.decode_attention, *args, **options)
        elif layers[1] == "traced":
            out = run_jitted(lambda *a: decode.decode_attention(*a[:-1], layer=a[-1], **options), *args, jnp.int32(1))
        else:
            out = run_jitted(decode.decode_attention, *args, layer=layers[1], **options)
    assert out.shape == q.shape and out.dtype == dtype
    out = np.asarray(out).astype(np.float64)
    for b, n in enumerate(lengths):
        if n == 0:
            np.testing.assert_array_equal(out[b], 0.0)
    assert rel_err(out, ref) < REL_TOL[dtype.name], names


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_float64_interpret(rng, case):
    run_case(rng, case, interpret=True)


# The splits merged by the last of them to finish (fused_merge): every length name, a traced layer, more splits than
# blocks (splits that see nothing), a column-chunked head. The GPU class runs every row with several splits.
FUSED_CASES = [c for c in CASES if c[0] in ("g1_d64_f32_splits3_batch5", "g8_d128_f32_traced_layer",
                                            "g2_d64_f16_more_splits_batch3", "g4_d96_bf16_splits3")]  # fmt: skip
SPLIT_CASES = [c for c in CASES if c[-1] != 1]


@pytest.mark.parametrize("case", FUSED_CASES, ids=[c[0] for c in FUSED_CASES])
def test_fused_merge_matches_float64_interpret(rng, case):
    run_case(rng, case, interpret=True, fused_merge=True)


def test_fused_merge_is_one_launch():
    """With fused_merge the splits' partials are merged inside the kernel: one Triton call, no merge launch; the
    count it takes is zeroed by XLA each call."""
    config = common.decode_config(1, 8, 4096, 128, jnp.bfloat16, num_multiprocessors=132)._replace(fused_merge=True)
    q, k = jax.ShapeDtypeStruct((1, 32, 128), jnp.bfloat16), jax.ShapeDtypeStruct((1, 1, 8, 4096, 128), jnp.bfloat16)
    args = (q, k, k, jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    for fused, launches in ((True, 1), (False, 2)):
        traced = decode._decode.trace(*args, scale=0.125, config=config._replace(fused_merge=fused), interpret=False)
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("xla.gpu.triton") == launches, fused
        assert ("jkv_merge_splits" in text) == (not fused)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
class TestOnGpu:
    """The same table with the real Triton lowering, at cache lengths ``GPU_SCALE`` times longer."""

    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_kernel_matches_float64(self, rng, case):
        run_case(rng, case, scale_up=GPU_SCALE, interpret=False)

    @pytest.mark.parametrize("case", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
    def test_fused_merge_matches_float64(self, rng, case):
        run_case(rng, case, scale_up=GPU_SCALE, interpret=False, fused_merge=True)

    def test_fused_merge_repeated_calls_agree(self, rng):
        """The last split's merge races no other program: many calls of the 1 x 4096 launch (16 splits a kv head)
        and a batch of ragged lengths each equal the two-launch merge's output bit for bit."""
        for batch, seq in ((1, 4096), (6, 2048)):
            q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
                       for s in ((batch, 32, 128), (batch, 8, seq, 128), (batch, 8, seq, 128)))  # fmt: skip
            fused = jax.jit(lambda *a: decode.decode_attention(*a, interpret=False, fused_merge=True))
            plain = jax.jit(lambda *a: decode.decode_attention(*a, interpret=False))
            for _ in range(50):
                lengths = jnp.asarray(rng.integers(1, seq + 1, batch), jnp.int32)
                np.testing.assert_array_equal(np.asarray(fused(q, k, v, lengths)), np.asarray(plain(q, k, v, lengths)))

    @pytest.mark.parametrize("batch,seq", [(1, 4096), (8, 4096)], ids=["B=1_T=4096", "B=8_T=4096"])
    def test_bench_shapes_default_config(self, rng, batch, seq):
        """The benchmark's head layout (N=32, K=8, D=128, bf16) with its default launch parameters."""
        lengths = np.full((batch,), seq, np.int32)
        lengths[0] = seq - 77
        q, k, v = (rng.standard_normal(s) for s in ((batch, 32, 128), (batch, 8, seq, 128), (batch, 8, seq, 128)))
        bf = lambda x: jnp.asarray(x, jnp.bfloat16)
        ref = decode_attention_f64(*(np.asarray(bf(x).astype(jnp.float32), np.float64) for x in (q, k, v)), lengths)
        with poisoned_outputs():
            out = decode.decode_attention(bf(q), bf(k), bf(v), jnp.asarray(lengths), interpret=False)
        assert rel_err(out.astype(jnp.float32), ref) < REL_TOL["bfloat16"]


def test_reference_matches_float64(rng):
    """The module's own pure-jnp reference, on a whole cache with NaN outside the valid region."""
    batch, kv_heads, group, head_dim, max_len, names, layers = 3, 2, 4, 64, 40, ("1", "S", "0"), (2, 1)
    lengths = np.array([LENGTHS[n](max_len, 16) for n in names], np.int32)
    q = rng.standard_normal((batch, kv_heads * group, head_dim))
    k, k_slab = nan_filled_cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers)
    v, v_slab = nan_filled_cache(rng, batch, kv_heads, max_len, head_dim, lengths, layers)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    out = run_jitted(reference.decode_attention_reference, f32(q), f32(k), f32(v), jnp.asarray(lengths), layer=1)
    assert rel_err(out, decode_attention_f64(q, k_slab, v_slab, lengths)) < REL_TOL["float32"]
    np.testing.assert_array_equal(np.asarray(out[2]), 0.0)


def test_combine_splits_matches_one_pass(rng):
    """Softmax over S computed in 3 pieces and merged equals the softmax over all of S; empty pieces drop out."""
    scores = rng.standard_normal((2, 12)) * 4  # (G, S)
    values = rng.standard_normal((12, 8))  # (S, D)
    pieces = [slice(0, 5), slice(5, 5), slice(5, 12)]
    m = np.stack([scores[:, p].max(axis=1, initial=-np.inf) for p in pieces])  # (P, G)
    denom = np.stack([np.exp(scores[:, p] - m[i][:, None]).sum(axis=1) for i, p in enumerate(pieces)])
    acc = np.stack([np.exp(scores[:, p] - m[i][:, None]) @ values[p] for i, p in enumerate(pieces)])  # (P, G, D)
    combine = fast_jit(reference.combine_splits)
    out = combine(jnp.asarray(m, jnp.float32), jnp.asarray(denom, jnp.float32), jnp.asarray(acc, jnp.float32))
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    assert rel_err(out, (p / p.sum(axis=1, keepdims=True)) @ values) < REL_TOL["float32"]
    empty = combine(jnp.full((3, 2), -jnp.inf), jnp.zeros((3, 2)), jnp.zeros((3, 2, 8)))
    np.testing.assert_array_equal(np.asarray(empty), 0.0)


@pytest.mark.parametrize(
    "batch,kv_heads,max_len,want_splits",
    [(1, 8, 4096, 16), (1, 8, 32768, 66), (64, 8, 8192, 2), (4, 2, 64, 1)],
    ids=["B=1_T=4k", "B=1_T=32k", "B=64_T=8k", "B=4_T=64"],
)
def test_launch_heuristic(batch, kv_heads, max_len, want_splits):
    """About four programs per multiprocessor of an H100, never splits shorter than two blocks."""
    config = common.decode_config(batch, kv_heads, max_len, 128, jnp.bfloat16, num_multiprocessors=132)
    assert config.block_k == min(128, max_len)
    assert config.num_splits == want_splits


@pytest.mark.parametrize("head_dim,width", [(128, 128), (96, 96), (80, 128), (48, 64)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("block_k", [64, 128, 256])
def test_pipeline_stages_fit_shared_memory(dtype, block_k, head_dim, width):
    """Asked-for stages are capped so the resident K/V blocks fit (seen on an H100: 3 stages of f32 128x128 did not),
    a padded tile's buffers at its padded width (80 reads as a 128-column tile)."""
    itemsize = jnp.dtype(dtype).itemsize
    assert common.tile_width(head_dim) == width
    default = common.decode_config(2, 2, 1024, head_dim, dtype)
    options = dict(block_k=block_k, num_splits=None, num_warps=None, num_stages=8)
    config = common.resolve_config(default, 1024, head_dim, itemsize, **options)
    assert config.block_k == block_k and config.num_stages >= 1
    assert (config.num_stages - 1) * 2 * block_k * width * itemsize <= common.smem_budget()


@pytest.mark.parametrize("head_dim,stages", [(128, 3), (64, 3), (96, 3), (80, 4), (48, 4)])
def test_padded_tiles_keep_more_blocks_in_flight(head_dim, stages):
    """Two blocks of the tile's width in flight: a padded tile holds fewer real bytes, so it takes more stages."""
    assert common.decode_config(1, 8, 131072, head_dim, jnp.bfloat16).num_stages == stages


def test_whole_cache_layer_is_not_sliced_in_xla():
    """On the GPU lowering the [L, B, K, S, D] cache goes to the kernel whole: no layer-sized copy in the HLO."""
    num_layers, batch, kv_heads, max_len, head_dim = 4, 2, 2, 256, 64
    k = jax.ShapeDtypeStruct((num_layers, batch, kv_heads, max_len, head_dim), jnp.bfloat16)
    q = jax.ShapeDtypeStruct((batch, 8, head_dim), jnp.bfloat16)
    config = common.decode_config(batch, kv_heads, max_len, head_dim, jnp.bfloat16)
    args = (q, k, k, jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    traced = decode._decode.trace(*args, scale=0.125, config=config, interpret=False)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text
    assert f"tensor<{batch}x{kv_heads}x{max_len}x{head_dim}xbf16>" not in text


def test_jkv_dispatch_uses_the_kernel(rng):
    """jkv.attend(impl="pallas") at T = 1 on a KVCache agrees with impl="xla" (kernel in interpret mode here)."""
    spec = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, max_len=80, dtype=jnp.float32)
    new = lambda t: jnp.asarray(rng.standard_normal((2, 2, t, 64)), jnp.float32)

    def both(q, k, v, k_new, v_new):  # one program: eager cache operations would compile one by one
        cache = jkv.KVCache.init(spec, 2).begin(37).write(1, k, v).commit()
        cache = cache.begin(1).write(1, k_new, v_new)
        return jkv.attend(q, cache, 1, impl="pallas"), jkv.attend(q, cache, 1, impl="xla")

    q = jnp.asarray(rng.standard_normal((2, 1, 8, 64)), jnp.float32)
    out, ref = run_jitted(both, q, new(37), new(37), new(1), new(1))
    assert rel_err(out, ref) < REL_TOL["float32"]


def _error_args(rng):
    q = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 2, 32, 64)), jnp.float32)
    return q, k, jnp.array([3, 32], jnp.int32)


@pytest.mark.parametrize(
    "call, exc, text",
    [
        (lambda q, k, n: decode.decode_attention(q[0], k, k, n), ValueError, "q must have shape [B, N, D]"),
        (lambda q, k, n: decode.decode_attention(q, k[0], k[0], n), ValueError, "[L, B, K, S, D], got (2, 32, 64)"),
        (lambda q, k, n: decode.decode_attention(q, k, k[:, :1], n), ValueError, "k and v must both have shape"),
        (lambda q, k, n: decode.decode_attention(q, k[None], k[None], n), ValueError, "pass layer="),
        (lambda q, k, n: decode.decode_attention(q, k, k, n, layer=0), ValueError, "layer=0 needs a whole"),
        (lambda q, k, n: decode.decode_attention(q, k[None], k[None], n, layer=1), ValueError, "layer=1 out of"),
        (lambda q, k, n: decode.decode_attention(q, k[None], k[None], n, layer=0.0), TypeError, "layer must be"),
        (lambda q, k, n: decode.decode_attention(q, k[None], k[None], n, layer=n), ValueError, "must be a scalar"),
        (lambda q, k, n: decode.decode_attention(q, k, k.astype(jnp.bfloat16), n), TypeError, "share a dtype"),
        (lambda q, k, n: decode.decode_attention(q.astype(jnp.int32), k, k, n), TypeError, "q must be a floating"),
        (lambda q, k, n: decode.decode_attention(q[:1], k, k, n), ValueError, "batch and head_dim must agree"),
        (lambda q, k, n: decode.decode_attention(q[:, :3], k, k, n), ValueError, "num_q_heads=3"),
        (lambda q, k, n: decode.decode_attention(q[..., :40], k[..., :40], k[..., :40], n), ValueError, "head_dim=40"),
        (
            lambda q, k, n: decode.decode_attention(*(jnp.tile(x, 5)[..., :272] for x in (q, k, k)), n),
            ValueError,
            "head_dim=272 is not supported; expected a multiple of 16 in [16, 256]",
        ),
        (lambda q, k, n: decode.decode_attention(q, k, k, n[:1]), ValueError, "lengths must be int[2]"),
        (lambda q, k, n: decode.decode_attention(q, k, k, n + 30), ValueError, "must lie in [0, S=32]"),
        (lambda q, k, n: decode.decode_attention(q, k, k, n, block_k=24), ValueError, "block_k=24 must be"),
        (lambda q, k, n: decode.decode_attention(q, k, k, n, block_k=64), ValueError, "block_k=64 must be"),
        (lambda q, k, n: decode.decode_attention(q, k, k, n, block_k=16.0), TypeError, "block_k must be an int"),
        (lambda q, k, n: decode.decode_attention(q, k, k, n, num_splits=0), ValueError, "num_splits=0"),
        (lambda q, k, n: decode.decode_attention(q, k, k, n, num_warps=3), ValueError, "num_warps=3"),
        (lambda q, k, n: decode.decode_attention(q, k, k, n, num_stages=0), ValueError, "num_stages=0"),
        (lambda q, k, n: decode.decode_attention(q, k, k, n, fused_merge=1), TypeError, "fused_merge must be a bool"),
        (lambda q, k, n: decode.decode_attention(q, k, k, n, scale="x"), TypeError, "scale must be"),
        (lambda q, k, n: decode.decode_attention(q, k, k, n, interpret=1), TypeError, "interpret must be"),
    ],
    ids=[
        "q-rank",
        "kv-rank",
        "kv-mismatch",
        "missing-layer",
        "layer-without-cache",
        "layer-range",
        "layer-float",
        "layer-vector",
        "kv-dtype",
        "q-dtype",
        "batch",
        "gqa",
        "head-dim",
        "head-dim-too-wide",
        "lengths-shape",
        "lengths-range",
        "block-k-pow2",
        "block-k-too-big",
        "block-k-type",
        "splits",
        "warps",
        "stages",
        "fused-merge-type",
        "scale",
        "interpret-type",
    ],
)
def test_errors(rng, call, exc, text):
    with pytest.raises(exc) as info:
        call(*_error_args(rng))
    assert text in str(info.value)


@pytest.mark.skipif(ON_GPU, reason="checks the refusal off GPU")
def test_compiled_mode_needs_a_gpu(rng):
    q, k, lengths = _error_args(rng)
    with pytest.raises(ValueError, match="interpret=False needs a GPU"):
        decode.decode_attention(q, k, k, lengths, interpret=False)


def test_column_tiles():
    """Power-of-two chunks, widest first, except where one would be 16 columns (80, 48: one padded tile)."""
    spans = lambda d, pad=None: [
        (0, d) if isinstance(c, slice) else (c.start, c.size) for c in common.column_tiles(d, pad)
    ]
    assert spans(128) == [(0, 128)] and spans(16) == [(0, 16)]
    assert spans(96) == [(0, 64), (64, 32)] and spans(224) == [(0, 128), (128, 64), (192, 32)]
    assert spans(80) == [(0, 128)] and spans(48) == [(0, 64)] and spans(240) == [(0, 256)]
    assert spans(96, pad=True) == [(0, 128)] and spans(80, pad=False) == [(0, 64), (64, 16)]
