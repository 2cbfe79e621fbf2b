"""The multi-token attention kernel over contiguous Plain caches against NumPy float64 (interpret mode on CPU, the real
Triton lowering on a GPU), its argument checks, launch rule, Triton lowering and memory.

Every case draws fresh random inputs; cache positions no query reads (before each sequence's first window start,
past its last query, every layer but the attended one) hold NaN; query rows of no sequence (gaps) must come out 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from kernel_inputs import KERNEL_TOL, fast_jit, run_jitted
from multi_token_inputs import make_step, poisoned, random_counts, whole_cache
from reference import multi_token_attention_f64

from pallas_kernels import backend, multi_token, reference
from pallas_kernels.multi_token_args import MultiTokenConfig, multi_token_config

ON_GPU = backend.gpu_backend() == backend.TRITON

# (id, kv_heads, group, head_dim, S, dtype, counts, lengths, window, softcap, layers, (block_q, block_k))
# layers: None for one [B, K, S, D] layer, (L, layer) for a whole cache, layer "traced" under jit.
CASES = [
    ("ragged_g4_d64_f32", 2, 4, 64, 80, "float32", (5, 0, 1, 17), (0, 7, 40, 50), None, None, None, (3, 16)),
    ("window_softcap_g3_d128_bf16", 1, 3, 128, 100, "bfloat16", (9, 1, 4), (30, 98, 0), 20, 30.0, (3, 1), (4, 32)),
    ("mha_d256_f16_traced_layer", 2, 1, 256, 48, "float16", (16, 3), (20, 45), None, None, (2, "traced"), None),
    ("g8_d96_f32_window_tiny_cache", 1, 8, 96, 12, "float32", (12, 1), (0, 11), 7, None, None, None),
]
IDS = [c[0] for c in CASES]


def tolerance(dtype, interpret: bool) -> float:
    return KERNEL_TOL["float32-gpu" if dtype == jnp.float32 and ON_GPU else dtype.name]


def run_case(rng, case, *, interpret, scale_up=1):
    _, kv_heads, group, head_dim, max_len, dtype, counts, lengths, window, softcap, layers, launch = case
    dtype, max_len = jnp.dtype(dtype), max_len * scale_up
    lengths = np.asarray(lengths) * scale_up
    step = make_step(rng, counts, lengths, window)
    rounded = lambda x: np.asarray(jnp.asarray(x, dtype)).astype(np.float64)
    q = rounded(rng.standard_normal((step.tokens, kv_heads * group, head_dim)))
    k, v = (poisoned(rounded(rng.standard_normal((len(counts), kv_heads, max_len, head_dim))), step) for _ in "kv")
    ref = multi_token_attention_f64(q, k, v, *step[1:4], window=window, softcap=softcap)
    where = None if layers is None else (layers[0], 1 if layers[1] == "traced" else layers[1])
    args = [jnp.asarray(x, dtype) for x in (q, whole_cache(k, where), whole_cache(v, where))]
    args += [jnp.asarray(x) for x in step[1:4]]
    config = None if launch is None else MultiTokenConfig(*launch, 4, 1)
    options = dict(window=window, softcap=softcap)
    if layers is not None and layers[1] == "traced":
        fn = lambda *a: multi_token.multi_token_attention(*a[:-1], layer=a[-1], **options, config=config)
        out = run_jitted(fn, *args, jnp.int32(1))
    else:
        layer = None if layers is None else layers[1]
        kernel = multi_token.multi_token_attention
        out = run_jitted(kernel, *args, layer=layer, **options, config=config, interpret=interpret)
    assert out.shape == q.shape and out.dtype == dtype
    out = np.asarray(out).astype(np.float64)
    np.testing.assert_array_equal(out[~step.owned_rows()], 0.0)  # padding rows and rows of no sequence
    assert rel_err(out, ref) < tolerance(dtype, interpret), case[0]
    if layers is None:  # the same launch with every count 0 over a NaN cache: zeros
        nan = jnp.full(args[1].shape, jnp.nan, dtype)
        none = run_jitted(
            multi_token.multi_token_attention, args[0], nan, nan, args[3], args[4], jnp.zeros_like(args[5]),
            **options, config=config, interpret=interpret,
        )  # fmt: skip
        np.testing.assert_array_equal(np.asarray(none.astype(jnp.float32)), 0.0)
    return args, ref, where


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_float64_interpret(rng, case):
    args, ref, where = run_case(rng, case, interpret=True)
    window, softcap = case[8], case[9]
    layer = None if where is None else where[1]
    out = run_jitted(reference.multi_token_attention_reference, *args, layer=layer, window=window, softcap=softcap)
    assert rel_err(out.astype(jnp.float32), ref) < KERNEL_TOL[case[5]]


def test_random_steps_one_launch(rng):
    """Twenty random steps through one compiled launch (the step's values are traced): ragged counts with 0 and 1,
    random lengths and row gaps, a window and softcap, tiles of 3 queries over 16-key blocks."""
    tokens, batch, kv_heads, group, head_dim, max_len, window, softcap = 28, 4, 2, 2, 32, 64, 10, 20.0
    config = MultiTokenConfig(3, 16, 4, 1)
    options = dict(window=window, softcap=softcap, config=config, interpret=True)
    launch = fast_jit(lambda *a: multi_token.multi_token_attention(*a, **options))
    for _ in range(20):
        step = make_step(rng, *random_counts(rng, batch, tokens, 9, max_len), window, tokens)
        q = rng.standard_normal((tokens, kv_heads * group, head_dim))
        k, v = (poisoned(rng.standard_normal((batch, kv_heads, max_len, head_dim)), step) for _ in "kv")
        ref = multi_token_attention_f64(q, k, v, *step[1:4], window=window, softcap=softcap)
        args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)] + [jnp.asarray(x, jnp.int32) for x in step[1:4]]
        out = launch(*args)
        np.testing.assert_array_equal(np.asarray(out)[~step.owned_rows()], 0.0)
        assert rel_err(out, ref) < KERNEL_TOL["float32"], step


def test_tile_table():
    """Each sequence's queries cut into tiles of block_q, every tile once, the later (longer) tiles first; programs
    past the live tiles get -1."""
    tiles = np.asarray(multi_token.tile_table(jnp.array([5, 0, 1, 7]), 3, 8))
    assert sorted(map(tuple, tiles[:, :6].T)) == [(0, 0), (0, 3), (2, 0), (3, 0), (3, 3), (3, 6)]
    assert tuple(tiles[:, 0]) == (3, 6) and (tiles[0, 6:] == -1).all()


def test_empty_token_batch(rng):
    """No query rows at all: an empty output (every count 0 over a NaN cache: ``run_case``)."""
    k = jnp.full((2, 2, 32, 64), jnp.nan, jnp.float32)
    q = jnp.asarray(rng.standard_normal((0, 4, 64)), jnp.float32)
    zeros = jnp.zeros((2,), jnp.int32)
    empty = multi_token.multi_token_attention(q, k, k, zeros, zeros, zeros, interpret=True)
    assert empty.shape == (0, 4, 64) and empty.dtype == jnp.float32


def test_launch_rule():
    """About 128 rows per tile (64 for head_dim 256 or float32 values), never more tokens than asked for."""
    rule = lambda n, kh, d=128, dtype=jnp.bfloat16, **kw: multi_token_config(n, kh, d, dtype, **kw)
    assert rule(32, 8).block_q == 32 and rule(32, 32).block_q == 128 and rule(12, 4).block_q == 42
    assert rule(32, 8, 256).block_q == 16 and rule(32, 8, 128, jnp.float32).block_q == 16
    assert rule(32, 8, 128, jnp.int8).block_q == 32
    assert rule(32, 8, max_count=5).block_q == 5 and rule(64, 1).block_q == 2
    assert rule(32, 8).block_k == 64 and rule(32, 8, max_len=40).block_k == 32
    assert rule(32, 8).num_warps == 8 and rule(32, 8, max_count=5).num_warps == 4


BAD = [
    ("window=0", dict(window=0), ValueError, "window=0"),
    ("softcap=0", dict(softcap=0.0), ValueError, "softcap=0.0"),
    ("softcap=-1", dict(softcap=-1.0), ValueError, "softcap=-1.0"),
    ("negative count", dict(counts=[-1, 2]), ValueError, "counts"),
    ("rows past T", dict(q_starts=[0, 9]), ValueError, "must be <= T=10"),
    ("positions past S", dict(lengths=[0, 31]), ValueError, "must be <= S=32"),
    ("overlapping rows", dict(q_starts=[0, 2]), ValueError, "overlap"),
    ("head_dim 100", dict(head_dim=100), ValueError, "head_dim=100"),
    ("N % K", dict(num_heads=6), ValueError, "num_q_heads=6 must be a multiple of num_kv_heads=4"),
    ("layer missing", dict(layers=2), ValueError, "pass layer="),
    ("layer out of range", dict(layers=2, layer=2), ValueError, "layer=2 out of range"),
    ("int cache", dict(cache_dtype=jnp.int32), TypeError, "k and v must share a dtype"),
    ("counts shape", dict(counts=[1, 2, 3]), ValueError, r"counts must be int\[2\]"),
    ("config type", dict(config=(4, 16, 4, 1)), TypeError, "config must be a MultiTokenConfig"),
    ("block_k 24", dict(config=MultiTokenConfig(4, 24, 4, 1)), ValueError, "block_k=24"),
    ("block_k > S", dict(config=MultiTokenConfig(4, 64, 4, 1)), ValueError, "block_k=64 must be <= max"),
]


@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("fn", ["kernel", "reference"])
def test_bad_arguments_raise(bad, fn):
    _, change, error, match = bad
    head_dim, num_heads, layers = change.get("head_dim", 64), change.get("num_heads", 8), change.get("layers")
    shape = (2, 4, 32, head_dim) if layers is None else (layers, 2, 4, 32, head_dim)
    k = jnp.zeros(shape, change.get("cache_dtype", jnp.float32))
    q = jnp.zeros((10, num_heads, head_dim), jnp.float32)
    ints = lambda name, default: jnp.asarray(change.get(name, default), jnp.int32)
    args = (q, k, k, ints("q_starts", [0, 5]), ints("lengths", [0, 20]), ints("counts", [4, 5]))
    options = {n: change[n] for n in ("window", "softcap", "layer", "config") if n in change}
    if fn == "reference":
        if "config" in options:
            return  # launch arguments are the kernel's
        with pytest.raises(error, match=match):
            reference.multi_token_attention_reference(*args, **options)
        return
    with pytest.raises(error, match=match):
        multi_token.multi_token_attention(*args, **options, interpret=True)


LOWERED = {"plain": (jnp.bfloat16,), "q8": (jnp.int8, jnp.float16), "fp8": (jnp.float8_e4m3fn, jnp.float32)}


@pytest.mark.parametrize(
    "fmt,paged,group,head_dim",
    [(f, p, 4, 128) for f in LOWERED for p in (False, True)] + [("plain", False, 3, 96), ("q8", True, 8, 256)],
)
def test_kinds_lower_through_triton(fmt, paged, group, head_dim):
    """Every (layout, format) kind, with a window and softcap, lowers to a Triton kernel (no GPU needed), and the
    whole cache goes in whole: no copy of a layer in the HLO."""
    sds = jax.ShapeDtypeStruct
    ints = lambda *s: sds(s, jnp.int32)
    tokens, batch, kv_heads, max_len = 64, 3, 2, 256
    q = sds((tokens, kv_heads * group, head_dim), jnp.bfloat16)
    lead = (2, 40, kv_heads, 16) if paged else (2, batch, kv_heads, max_len)
    widths = (head_dim, head_dim // 32 if fmt == "q8" else 1)
    cache = tuple(sds((*lead, w), dt) for dt, w in zip(LOWERED[fmt], widths, strict=False)) * 2
    tables = ints(batch, 16) if paged else None
    traced = multi_token._launch.trace(
        q, cache, tables, ints(batch), ints(batch), ints(batch), ints(1), fmt=fmt, scale=0.1, window=100,
        softcap=30.0, config=MultiTokenConfig(8, 32, 4, 2), interpret=False,
    )  # fmt: skip
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text
    assert f"tensor<{batch}x{kv_heads}x{max_len}x{head_dim}x" not in text


def test_long_prefill_allocates_nothing_like_t_by_s():
    """A 32k-token prefill into an empty cache compiles with temporaries far below one T x S float32 matrix."""
    tokens = 32768
    sds = jax.ShapeDtypeStruct
    q, k = sds((tokens, 2, 64), jnp.bfloat16), sds((1, 1, tokens, 64), jnp.bfloat16)
    one = sds((1,), jnp.int32)
    fn = jax.jit(lambda q, k, v, a, b, c: multi_token.multi_token_attention(q, k, v, a, b, c, interpret=True))
    memory = fn.lower(q, k, k, one, one, one).compile().memory_analysis()
    temp = memory.temp_size_in_bytes
    io = 4 * tokens * 2 * 64 * 2  # q, k, v and the output
    assert temp < 4 * io and temp < tokens * tokens * 4 // 64, temp  # a T x S float32 matrix is 4 GiB


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
class TestOnGpu:
    """The interpret table at 8x the cache lengths, and a 2048-token prefill at the benchmark's heads."""

    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_kernel_matches_float64(self, rng, case):
        run_case(rng, case, interpret=False, scale_up=8)

    def test_long_prefill_memory_gpu(self):
        """The compiled Triton kernel's 32k-token prefill at the benchmark's heads: no T x S temporary."""
        tokens, sds = 32768, jax.ShapeDtypeStruct
        q, k = sds((tokens, 32, 128), jnp.bfloat16), sds((1, 8, tokens, 128), jnp.bfloat16)
        one = sds((1,), jnp.int32)
        fn = jax.jit(lambda q, k, v, a, b, c: multi_token.multi_token_attention(q, k, v, a, b, c, interpret=False))
        temp = fn.lower(q, k, k, one, one, one).compile().memory_analysis().temp_size_in_bytes
        assert temp < 2 * tokens * 32 * 128 * 2, temp  # at most about the output (T x S x N floats: 128 GiB)

    def test_prefill_2048_bf16(self, rng):
        tokens, num_heads, kv_heads, head_dim = 2048, 32, 8, 128
        bf = lambda x: jnp.asarray(x, jnp.bfloat16)
        f64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)
        shapes = [(tokens, num_heads, head_dim)] + [(1, kv_heads, tokens, head_dim)] * 2
        q, k, v = (bf(rng.standard_normal(s)) for s in shapes)
        ints = lambda x: jnp.asarray([x], jnp.int32)
        out = multi_token.multi_token_attention(q, k, v, ints(0), ints(0), ints(tokens), interpret=False)
        rows = np.arange(0, tokens, 61)  # a spread of query positions, each against float64
        one = lambda i: multi_token_attention_f64(f64(q[i : i + 1]), f64(k), f64(v), [0], [i], [1])[0]
        assert rel_err(f64(out[rows]), np.stack([one(i) for i in rows])) < KERNEL_TOL["bfloat16"]
