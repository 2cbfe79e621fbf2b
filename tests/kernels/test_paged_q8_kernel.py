"""The paged Q8 kernel against NumPy float64 over the dequantized values, on randomly permuted pages with NaN
scales in every page and row no sequence uses (and stale table entries naming such pages); outputs start
NaN-poisoned. Interpret mode on the CPU; the real lowering on a GPU. (Q8 pages as a cache, and attention through
``jkv``: tests/caches/test_paged_q8_cache.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from kernel_inputs import COLUMN_FORMS, KERNEL_TOL, Q8_GPU_FORMS, Q8_OTHER_FORMS, kernel_query, q8_pools, run_jitted
from poison import poisoned_outputs
from reference import decode_attention_f64

from pallas_kernels import backend, decode_fp8, decode_q8, paged_q8, reference

ON_GPU = backend.gpu_backend() == backend.TRITON


# (id, batch, kv_heads, group, head_dim, page_size, max_pages, q dtype, lengths, layers, pages_per_block, splits,
#  preload). Lengths relative to the block bk = ppb * page_size and the capacity S; preload None: the default.
CASES = [
    ("g4_d128_bf16_ps16_splits2", 3, 2, 4, 128, 16, 8, "bfloat16", (63, 65, 128), (2, 1), None, 2, None),
    ("g1_d64_f32_ps8_ppb4_traced", 2, 2, 1, 64, 8, 6, "float32", (1, 48), (2, "traced"), 4, 3, None),
    ("g8_d64_f16_ps32_one_split", 2, 1, 8, 64, 32, 3, "float16", (96, 33), None, None, 1, None),
    ("g2_d128_bf16_ps64_splits2", 2, 2, 2, 128, 64, 2, "bfloat16", (0, 100), None, None, 2, None),
    ("g4_d64_bf16_ps16_table_in_loop", 2, 2, 4, 64, 16, 4, "bfloat16", (64, 7), None, None, None, False),
    # head_dims read in power-of-two column parts: each part's codes and scales through the block table
    ("g4_d96_bf16_ps16_splits2", 3, 2, 4, 96, 16, 8, "bfloat16", (63, 65, 128), (2, 1), None, 2, None),
    ("g2_d96_f32_ps8_table_in_loop", 2, 2, 2, 96, 8, 6, "float32", (1, 48), None, 2, None, False),
    ("g1_d160_f16_ps16_traced", 2, 1, 1, 160, 16, 3, "float16", (48, 17), (2, "traced"), None, 1, None),
]
IDS = [c[0] for c in CASES]


def run_case(rng, case, *, scale_up=1, interpret=None, **launch):
    _, batch, kv_heads, group, head_dim, ps, max_pages, dtype, lengths, layers, ppb, splits, preload = case
    dtype, max_pages = jnp.dtype(dtype), max_pages * scale_up
    lengths = np.array([min(n * scale_up, max_pages * ps) for n in lengths], np.int32)
    pools, tables, (k, v) = q8_pools(rng, batch, kv_heads, head_dim, ps, max_pages, lengths, layers, True)
    q = jnp.asarray(rng.standard_normal((batch, kv_heads * group, head_dim)), dtype)
    options = dict(interpret=interpret, pages_per_block=ppb, num_splits=splits, preload=preload, **launch)
    args = (q, *pools, jnp.asarray(tables), jnp.asarray(lengths))
    kernel = paged_q8.paged_q8_decode_attention
    with poisoned_outputs():
        if layers is None:
            out = run_jitted(kernel, *args, **options)
        elif layers[1] == "traced":
            out = run_jitted(lambda *a: kernel(*a[:-1], layer=a[-1], **options), *args, jnp.int32(1))
        else:
            out = run_jitted(kernel, *args, layer=layers[1], **options)
    assert out.shape == q.shape and out.dtype == dtype
    out = np.asarray(out).astype(np.float64)
    for b, n in enumerate(lengths):
        if n == 0:
            np.testing.assert_array_equal(out[b], 0.0)
    ref = decode_attention_f64(kernel_query(q), k, v, lengths)
    tol = KERNEL_TOL[dtype.name + ("-gpu" if dtype == jnp.float32 and jax.default_backend() == "gpu" else "")]
    assert rel_err(out, ref) < tol, lengths
    if layers is None:  # the kernel's own reference, on the same pools
        own = run_jitted(reference.paged_q8_decode_attention_reference, *args).astype(jnp.float32)
        assert rel_err(out, own) < max(tol, 2e-2)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_float64_interpret(rng, case):
    run_case(rng, case, interpret=True)


@pytest.mark.parametrize("form", Q8_OTHER_FORMS)
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]], ids=[IDS[0], IDS[1], IDS[4]])
def test_loop_forms_interpret(rng, case, form, monkeypatch):
    monkeypatch.setattr(decode_q8, "LOOP_FORM", form)
    run_case(rng, case, interpret=True)


PAD_CASES = [c for c in CASES if c[4] & (c[4] - 1)]  # head_dims that are not powers of two


@pytest.mark.parametrize("form", COLUMN_FORMS)
@pytest.mark.parametrize("case", PAD_CASES, ids=[c[0] for c in PAD_CASES])
def test_column_forms_interpret(rng, case, form, monkeypatch):
    """The "pad" form: each block's codes and scales read through the table as one power-of-two tile, the columns
    past the head masked; the "parts" form: in power-of-two column parts."""
    monkeypatch.setattr(decode_q8, "LOOP_FORM", form)
    run_case(rng, case, interpret=True)


@pytest.mark.parametrize("page_size,expected_ppb", [(4, 16), (16, 4), (64, 1), (256, 1)], ids=str)
def test_config_counts_whole_pages(page_size, expected_ppb):
    """The default block is the contiguous Q8 kernel's 64 keys, rounded to whole pages."""
    config = paged_q8.paged_q8_config(8, 8, 4096 // page_size, page_size, 128)
    assert config.pages_per_block == expected_ppb and config.num_splits >= 1


@pytest.mark.parametrize("batch,seq", [(1, 131072), (16, 8192), (1, 4096)], ids=str)
def test_config_adds_the_table_stages_where_the_table_is_read_in_the_loop(batch, seq):
    """Read inside the loop, the table's loads take two pipeline stages ahead of the K/V loads: five stages keep the
    contiguous kernel's two K/V buffers; preloaded entries (1 x 4096) take none."""
    for fmt in (decode_q8.Q8, decode_fp8.FP8):
        config = paged_q8.paged_q8_config(batch, 8, seq // 16, 16, 128, fmt)
        contiguous = fmt.config(batch, 8, seq, 128, block_k=config.pages_per_block * 16)
        added = 0 if config.preload else paged_q8.TABLE_STAGES
        assert config.num_stages == contiguous.num_stages + added, (fmt, config)
    assert paged_q8.paged_q8_config(1, 8, 4096 // 16, 16, 128).preload


def test_kernel_errors():
    codes, scales = jnp.zeros((6, 2, 16, 64), jnp.int8), jnp.zeros((6, 2, 16, 2), jnp.float16)
    q, tables, lengths = jnp.zeros((2, 4, 64), jnp.float32), jnp.zeros((2, 3), jnp.int32), jnp.ones(2, jnp.int32)

    def call(**kw):
        pools = [kw.pop(name, x) for name, x in (("k", codes), ("ks", scales), ("v", codes), ("vs", scales))]
        return paged_q8.paged_q8_decode_attention(kw.pop("q", q), *pools, kw.pop("t", tables), lengths, **kw)

    cases = [
        (dict(k=codes.astype(jnp.float32)), TypeError, "k_pages codes must be int8"),
        (dict(vs=scales.astype(jnp.bfloat16)), TypeError, "v_pages scales must be float16 or float32"),
        (dict(ks=jnp.zeros((6, 2, 16, 4), jnp.float16)), ValueError, "do not form a Q8 pair"),
        (dict(vs=scales.astype(jnp.float32)), ValueError, "same shape and scale dtype"),
        (dict(q=jnp.zeros((2, 3, 64))), ValueError, "num_q_heads=3 must be a multiple of num_kv_heads=2"),
        (dict(t=jnp.array([[6, 0, 0], [0, 0, 0]])), ValueError, "block_tables[0, 0]=6 must name a page"),
        (dict(layer=0), ValueError, "layer=0 needs pools of shape"),
        (dict(preload=1), TypeError, "preload must be a bool, got 1"),
        (dict(pages_per_block=3), ValueError, "pages_per_block=3 must be a power of two"),
        (dict(scale="x"), TypeError, "scale must be a Python number"),
    ]
    for kwargs, exc, text in cases:
        with pytest.raises(exc) as info:
            call(**kwargs)
        assert text in str(info.value), (text, str(info.value))


def test_fused_merge_interpret(rng):
    """The splits merged by the last to finish (fused_merge), a traced layer, table entries read in the loop."""
    run_case(rng, CASES[1], interpret=True, fused_merge=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
class TestOnGpu:
    """The same table with the Triton lowering and 8x longer sequences; the benchmark's shapes."""

    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_kernel_matches_float64(self, rng, case):
        run_case(rng, case, scale_up=8, interpret=False)

    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_fused_merge(self, rng, case):
        run_case(rng, case, scale_up=8, interpret=False, fused_merge=True)

    @pytest.mark.parametrize("form", Q8_GPU_FORMS)
    @pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4]], ids=[IDS[0], IDS[3], IDS[4]])
    def test_loop_forms(self, rng, case, form, monkeypatch):
        monkeypatch.setattr(decode_q8, "LOOP_FORM", form)
        run_case(rng, case, scale_up=8, interpret=False)

    @pytest.mark.parametrize("form", COLUMN_FORMS)
    @pytest.mark.parametrize("case", PAD_CASES, ids=[c[0] for c in PAD_CASES])
    def test_column_forms(self, rng, case, form, monkeypatch):
        monkeypatch.setattr(decode_q8, "LOOP_FORM", form)
        run_case(rng, case, scale_up=8, interpret=False)

    @pytest.mark.parametrize("batch,seq,page_size", [(1, 4096, 16), (8, 4096, 64)], ids=str)
    def test_bench_shapes_default_config(self, rng, batch, seq, page_size):
        """The benchmark's head layout (N=32, K=8, D=128, bf16 q) with the default launch parameters."""
        lengths = np.full((batch,), seq, np.int32)
        lengths[0] = seq - 77
        pools, tables, (k, v) = q8_pools(rng, batch, 8, 128, page_size, seq // page_size, lengths, None, True)
        q = jnp.asarray(rng.standard_normal((batch, 32, 128)), jnp.bfloat16)
        with poisoned_outputs():
            out = paged_q8.paged_q8_decode_attention(
                q, *pools, jnp.asarray(tables), jnp.asarray(lengths), interpret=False
            )
        ref = decode_attention_f64(kernel_query(q), k, v, lengths)
        assert rel_err(out.astype(jnp.float32), ref) < KERNEL_TOL["bfloat16"]
