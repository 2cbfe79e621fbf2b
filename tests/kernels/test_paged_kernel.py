"""Pallas paged decode attention against NumPy float64 and against the contiguous kernel on the same contents.

Every case draws fresh random inputs and places each sequence's pages at random in the pool (a permuted block
table); every page no sequence uses, every row past a sequence's length, and every layer but the attended one
hold NaN, and so do (in "stale" cases) the pages that table entries past a sequence's length still name. The
kernel writes into NaN-poisoned outputs (``poison.poisoned_outputs``). Interpret mode on the CPU; the real
lowering on a GPU.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from arg_errors import assert_refusals, paged_check_errors
from conftest import REL_TOL, rel_err
from kernel_inputs import bench_paged_inputs, random_paged, run_jitted
from poison import poisoned_outputs
from reference import decode_attention_f64

import jkv
from jkv.caches import PagedKVCache, Plain
from pallas_kernels import backend, paged, reference

ON_GPU = backend.gpu_backend() == backend.TRITON

# Lengths named relative to the page size ps, the keys per block bk and the capacity S = M * ps.
LENGTHS = {
    "0": lambda ps, bk, s: 0,
    "1": lambda ps, bk, s: 1,
    "ps-1": lambda ps, bk, s: ps - 1,
    "ps": lambda ps, bk, s: ps,
    "ps+1": lambda ps, bk, s: ps + 1,
    "bk-1": lambda ps, bk, s: bk - 1,
    "bk": lambda ps, bk, s: bk,
    "bk+1": lambda ps, bk, s: bk + 1,
    "S-1": lambda ps, bk, s: s - 1,
    "S": lambda ps, bk, s: s,
}

# (id, batch, kv_heads, group, head_dim, page_size, max_pages, dtype, lengths, layers, pages_per_block, num_splits,
#  stale). layers: None for one-layer pools [P, K, ps, D], (L, layer) for all layers, layer "traced" under jit.
# stale: table entries past a sequence's pages name NaN pages instead of -1.
CASES = [
    ("g1_d64_f32_ps16_ppb1_splits3", 4, 2, 1, 64, 16, 6, "float32", ("1", "ps-1", "ps", "ps+1"), None, 1, 3, True),
    ("g4_d128_bf16_ps8_ppb4_splits2", 3, 2, 4, 128, 8, 12, "bfloat16", ("bk-1", "bk+1", "S"), None, 4, 2, False),
    ("g8_d64_bf16_ps32_one_split", 2, 1, 8, 64, 32, 4, "bfloat16", ("S", "1"), None, None, 1, True),
    ("g4_d64_f32_ps16_layer1_of3", 2, 2, 4, 64, 16, 4, "float32", ("S", "0"), (3, 1), None, None, False),
    ("g3_d128_f32_ps64_traced_layer", 2, 2, 3, 128, 64, 3, "float32", ("S", "ps+1"), (2, "traced"), None, 2, True),
    ("g1_d128_f16_ps4_default", 3, 4, 1, 128, 4, 16, "float16", ("ps-1", "bk", "S-1"), None, None, None, False),
    # head_dims read in power-of-two column chunks
    ("g4_d96_bf16_ps16_ppb2_splits2", 3, 2, 4, 96, 16, 8, "bfloat16", ("bk-1", "bk+1", "S"), None, 2, 2, True),
    ("g2_d80_f32_ps8_layer1_of3", 2, 2, 2, 80, 8, 6, "float32", ("S", "ps+1"), (3, 1), None, None, False),
]
IDS = [c[0] for c in CASES]
GPU_SCALE = 16  # the GPU class reruns the table with this many times more pages per sequence


def run_case(rng, case, *, scale_up=1, interpret=None, **launch):
    _, batch, kv_heads, group, head_dim, ps, max_pages, dtype, names, layers, ppb, splits, stale = case
    max_pages *= scale_up
    dtype = jnp.dtype(dtype)
    config = paged.paged_config(batch, kv_heads, max_pages, ps, head_dim, dtype)
    bk = (ppb or config.pages_per_block) * ps
    s = max_pages * ps
    names = [names[i % len(names)] for i in range(batch)]
    lengths = np.array([min(LENGTHS[name](ps, bk, s), s) for name in names], np.int32)
    q = rng.standard_normal((batch, kv_heads * group, head_dim))
    k_pages, v_pages, tables, (k_slab, v_slab) = random_paged(
        rng, batch, kv_heads, head_dim, ps, max_pages, lengths, layers, stale
    )
    rounded = lambda x: np.asarray(jnp.asarray(x, dtype)).astype(np.float64)
    ref = decode_attention_f64(rounded(q), rounded(k_slab), rounded(v_slab), lengths)

    args = [jnp.asarray(x, dtype) for x in (q, k_pages, v_pages)] + [jnp.asarray(tables), jnp.asarray(lengths)]
    options = {**dict(interpret=interpret, pages_per_block=ppb, num_splits=splits), **launch}
    with poisoned_outputs():
        if layers is None:
            out = run_jitted(paged.paged_decode_attention, *args, **options)
        elif layers[1] == "traced":
            fn = lambda *a: paged.paged_decode_attention(*a[:-1], layer=a[-1], **options)
            out = run_jitted(fn, *args, jnp.int32(1))
        else:
            out = run_jitted(paged.paged_decode_attention, *args, layer=layers[1], **options)
    assert out.shape == q.shape and out.dtype == dtype
    out = np.asarray(out).astype(np.float64)
    for b, n in enumerate(lengths):
        if n == 0:
            np.testing.assert_array_equal(out[b], 0.0)
    assert rel_err(out, ref) < REL_TOL[dtype.name], names


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_float64_interpret(rng, case):
    run_case(rng, case, interpret=True)


LAUNCH_VARIANTS = {
    "table_in_loop_ppb1": (CASES[0], dict(preload=False)),
    "table_in_loop_ppb4": (CASES[1], dict(preload=False)),
    "table_in_loop_traced_layer": (CASES[4], dict(preload=False)),
    "preload_one_split": (CASES[2], dict(preload=True, num_splits=2)),
    "fused_merge_ppb1": (CASES[0], dict(fused_merge=True)),  # the last split merges (decode.decode_attention's)
    "fused_merge_traced_layer": (CASES[4], dict(fused_merge=True)),
}


@pytest.mark.parametrize("case,launch", LAUNCH_VARIANTS.values(), ids=LAUNCH_VARIANTS.keys())
def test_launch_variants_interpret(rng, case, launch):
    """Table entries read block by block inside the loop instead of preloaded (and preloaded where the default
    does not)."""
    run_case(rng, case, interpret=True, **launch)


def test_preload_covers_every_split():
    """The preloaded window (a power of two, at most PRELOAD_MAX, inside the table) holds the longest split, and
    only splits of at most PRELOAD_KEYS positions preload; the table cases above preload by default (the window
    slides back at the table's end in the ppb4 case)."""
    for max_pages in range(1, 80):
        for ppb in (1, 2, 4, 8):
            for splits in (1, 2, 3, 7, 16, 66):
                for page_size in (4, 16, 64):
                    width = paged.preload_entries(max_pages, ppb, splits, page_size)
                    padded = -(-max_pages // ppb) * ppb
                    most = -(-(padded // ppb) // splits) * ppb
                    fits = 1 << (most - 1).bit_length() <= min(paged.PRELOAD_MAX, padded)
                    short = most * page_size <= paged.PRELOAD_KEYS
                    if width:
                        assert width & (width - 1) == 0 and most <= width <= min(paged.PRELOAD_MAX, padded)
                    assert bool(width) == (fits and short)
    assert paged.preload_entries(4096 // 16, 8, 16, 16) == 16  # 1 x 4096, pages of 16: 256 keys per split
    assert paged.preload_entries(32768 // 16, 8, 66, 16) == 0  # 1 x 32768: 512 keys per split, read in the loop
    assert paged.preload_entries(16384 // 64, 2, 9, 64) == 0  # 8 x 16384: 1920 keys per split
    for case in CASES[:2]:
        _, batch, kv_heads, _, head_dim, ps, max_pages, dtype, *_ = case
        assert paged.paged_config(batch, kv_heads, max_pages, ps, head_dim, jnp.dtype(dtype)).preload


def contract(rng, *, lengths=(1, 40, 97, 128), page_size=16, head_dim=64, dtype=jnp.float32):
    """The seeds' contract, |paged_attention(q, block_table) - incremental_attention(q, kv_cache)| < eps: the
    relative error between ``jkv.attend(impl="pallas")`` at T = 1 on a PagedKVCache and on the same contents in
    a contiguous KVCache (the paged kernel against the contiguous kernel)."""
    spec = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=head_dim, max_len=8 * page_size, dtype=dtype)
    k_pages, v_pages, tables, _ = random_paged(rng, len(lengths), 2, head_dim, page_size, 8, lengths, (2, 1), True)
    b = len(lengths)
    cache = PagedKVCache(
        (jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype)),
        jnp.asarray(tables),
        jnp.zeros(k_pages.shape[1], jnp.int32),  # refcounts: not used by attention
        jnp.zeros(k_pages.shape[1], jnp.int32),  # pins
        jnp.asarray(lengths, jnp.int32) - 1,  # the step's one new key sits at lengths - 1
        jnp.ones(b, jnp.int32),
        jnp.zeros(b, jnp.int32),
        spec=spec,
        format=Plain(jnp.dtype(dtype)),
    )
    flat = cache.to_contiguous().replace(counts=cache.counts)
    q = jnp.asarray(rng.standard_normal((b, 1, 8, head_dim)), dtype)
    attend = lambda q, cache: jkv.attend(q, cache, 1, impl="pallas")
    got, want = run_jitted(attend, q, cache), run_jitted(attend, q, flat)
    return rel_err(got.astype(jnp.float32), want.astype(jnp.float32))


def test_paged_equals_contiguous_kernel(rng):
    """Through jkv.attend: interpret mode here, the compiled kernels on a GPU."""
    assert contract(rng) < 1e-5


def test_reference_matches_float64(rng):
    """The module's gather-then-contiguous reference, on pools with NaN outside the valid region."""
    lengths = np.array([1, 33, 0])
    k_pages, v_pages, tables, (k_slab, v_slab) = random_paged(rng, 3, 2, 64, 16, 3, lengths, (2, 1), True)
    q = rng.standard_normal((3, 4, 64))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    args = (f32(q), f32(k_pages), f32(v_pages), jnp.asarray(tables), jnp.asarray(lengths))
    out = run_jitted(reference.paged_decode_attention_reference, *args, layer=1)
    assert rel_err(out, decode_attention_f64(q, k_slab, v_slab, lengths)) < REL_TOL["float32"]
    np.testing.assert_array_equal(np.asarray(out[2]), 0.0)


@pytest.mark.parametrize(
    "page_size,expected_ppb", [(4, 32), (16, 8), (64, 2), (256, 1)], ids=lambda x: str(x)
)  # fmt: skip
def test_config_counts_whole_pages(page_size, expected_ppb):
    """The default block is the contiguous kernel's 128 keys (D=128, bf16), rounded to whole pages."""
    config = paged.paged_config(8, 8, 4096 // page_size, page_size, 128, jnp.bfloat16)
    assert config.pages_per_block == expected_ppb and config.num_splits >= 1


def test_errors():
    """``paged.check_args``'s table (shared with the Mosaic GPU paged kernel's tests), then the launch options'."""
    pages_of_4 = jnp.zeros((6, 2, 4, 64), jnp.float32)
    launch = [
        (dict(pages_per_block=3), ValueError, "pages_per_block=3 must be a power of two"),
        (dict(k=pages_of_4, v=pages_of_4, pages_per_block=2), ValueError, "pages_per_block * page_size=4"),
        (dict(pages_per_block=1.0), TypeError, "pages_per_block must be an int, got 1.0"),
        (dict(num_splits=0), ValueError, "num_splits=0 must be >= 1"),
        (dict(num_warps=3), ValueError, "num_warps=3 must be one of"),
        (dict(num_stages=0), ValueError, "num_stages=0 must be >= 1"),
        (dict(scale="x"), TypeError, "scale must be a Python number"),
        (dict(preload=1), TypeError, "preload must be a bool, got 1"),
    ]
    assert_refusals(paged.paged_decode_attention, paged_check_errors() + launch)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
class TestOnGpu:
    """The same table with the real Triton lowering, with ``GPU_SCALE`` times more pages per sequence."""

    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_kernel_matches_float64(self, rng, case):
        run_case(rng, case, scale_up=GPU_SCALE, interpret=False)

    @pytest.mark.parametrize("launch", [dict(preload=False), dict(fused_merge=True)], ids=str)
    @pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
    def test_launch_variants(self, rng, case, launch):
        run_case(rng, case, scale_up=GPU_SCALE, interpret=False, **launch)

    @pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
    def test_preloaded_table_entries(self, rng, case):
        """Enough splits that each walks at most PRELOAD_KEYS positions, so every program preloads its split's
        table entries (the longer GPU tables above read them in the loop)."""
        _, batch, kv_heads, _, head_dim, ps, max_pages, dtype, _, _, ppb, _, _ = case
        default = paged.paged_config(batch, kv_heads, max_pages * GPU_SCALE, ps, head_dim, jnp.dtype(dtype))
        assert paged.preload_entries(max_pages * GPU_SCALE, ppb or default.pages_per_block, 48, ps) > 0
        run_case(rng, case, scale_up=GPU_SCALE, interpret=False, num_splits=48)

    @pytest.mark.parametrize("page_size", [16, 32, 64])
    def test_paged_equals_contiguous_kernel(self, rng, page_size):
        lengths = (1, 8 * page_size - 1, 3 * page_size + 5, 8 * page_size)
        assert contract(rng, page_size=page_size, lengths=lengths, head_dim=128) < 1e-5

    @pytest.mark.parametrize("batch,seq,page_size", [(1, 4096, 16), (8, 4096, 64)], ids=str)
    def test_bench_shapes_default_config(self, rng, batch, seq, page_size):
        """The benchmark's head layout (N=32, K=8, D=128, bf16) with its default launch parameters."""
        args, ref = bench_paged_inputs(rng, batch, seq, page_size)
        with poisoned_outputs():
            out = paged.paged_decode_attention(*args, interpret=False)
        assert rel_err(out.astype(jnp.float32), ref) < REL_TOL["bfloat16"]
