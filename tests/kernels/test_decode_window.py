"""The decode kernels with a window and a soft cap against NumPy float64: contiguous and paged, plain, Q8 and FP8
(and the fused append), interpret mode on the CPU and the real Triton lowering on a GPU.

Every case draws fresh random inputs; cache positions before each sequence's window and past its length hold NaN
(Q8: NaN scales; FP8: NaN values and scales), so a kernel that reads one there gives NaN. Paged cases drop the
table entries of pages wholly before the window to -1, as a ring releases them, and point some entries past the
length at a NaN page. Lengths cover shorter than the window, the window's start inside a block and on a block edge,
and the capacity. Outputs start NaN-poisoned (``poison.poisoned_outputs``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from kernel_inputs import KERNEL_TOL, Q8_GPU_FORMS, Q8_OTHER_FORMS, fp8_arrays, kernel_query, run_jitted
from poison import poisoned_outputs
from reference import decode_attention_f64

from jkv.caches.formats import dequantize, quantize
from pallas_kernels import backend, decode, decode_fp8, decode_q8, paged, paged_q8, reference

ON_GPU = backend.gpu_backend() == backend.TRITON

# (id, kernel, batch, kv_heads, group, head_dim, max_len, dtype, lengths, window, softcap, block, num_splits)
# block: block_k (contiguous) or (page_size, pages_per_block) (paged); None: the default launch. With blocks of
# 16 and a window of 20: length 1 and 16 see everything, 37 starts its window inside a block (17), 52 on a block
# edge (32), 96 is the capacity.
CASES = [
    ("decode_f32_w20_cap2_splits3", "decode", 5, 2, 4, 64, 96, "float32", (1, 16, 37, 52, 96), 20, 2.0, 16, 3),
    ("decode_bf16_g1_w32_one_split", "decode", 3, 2, 1, 64, 80, "bfloat16", (31, 50, 80), 32, None, 16, 1),
    ("decode_bf16_g8_cap_default_launch", "decode", 2, 1, 8, 128, 200, "bfloat16", (200, 17), None, 1.5, None, None),
    ("decode_f32_w24_default_launch", "decode", 2, 2, 2, 64, 200, "float32", (200, 23), 24, None, None, None),
    ("append_f32_w20_cap2_splits2", "append", 4, 2, 4, 64, 96, "float32", (1, 21, 52, 96), 20, 2.0, 16, 2),
    ("decode_d96_bf16_w20_cap2_splits2", "decode", 4, 2, 2, 96, 96, "bfloat16", (1, 37, 52, 96), 20, 2.0, 16, 2),
    ("append_d96_f32_w20_splits2", "append", 3, 2, 4, 96, 96, "float32", (21, 52, 96), 20, None, 16, 2),
    ("paged_d96_f32_ps8_ppb2_w20_cap2", "paged", 4, 2, 4, 96, 96, "float32", (1, 37, 52, 96), 20, 2.0, (8, 2), 2),
    ("paged_f32_ps8_ppb2_w20_cap2", "paged", 5, 2, 4, 64, 96, "float32", (1, 16, 37, 52, 96), 20, 2.0, (8, 2), 2),
    ("paged_bf16_ps16_w40_default", "paged", 3, 2, 2, 64, 128, "bfloat16", (17, 71, 128), 40, None, (16, None), None),
    ("q8_f32_w20_cap2_splits2", "q8", 4, 2, 4, 64, 96, "float32", (5, 37, 52, 96), 20, 2.0, 16, 2),
    ("paged_q8_bf16_ps16_w40_cap2", "paged_q8", 3, 2, 2, 64, 96, "bfloat16", (17, 63, 96), 40, 2.0, (16, 1), 2),
    ("fp8_f32_w20_cap2_splits2", "fp8", 4, 2, 4, 64, 96, "float32", (5, 37, 52, 96), 20, 2.0, 16, 2),
    ("paged_fp8_f32_ps8_ppb2_w20_cap2", "paged_fp8", 4, 2, 4, 64, 96, "float32", (1, 37, 52, 96), 20, 2.0, (8, 2), 2),
    # head_dims with a 16-column chunk, read as one padded tile (common.column_tiles)
    ("append_d80_f32_w20_splits2", "append", 3, 2, 4, 80, 96, "float32", (21, 52, 96), 20, None, 16, 2),
    ("paged_d48_bf16_ps8_ppb2_w20_cap2", "paged", 3, 2, 2, 48, 96, "bfloat16", (1, 37, 96), 20, 2.0, (8, 2), 2),
]
IDS = [c[0] for c in CASES]
GPU_SCALE = 4  # the GPU class scales lengths, windows and capacities (blocks stay): edges stay edges


def hidden(lengths, window, max_len):
    """``[B, S]``: the positions no query reads (before the window, past the length)."""
    pos = np.arange(max_len)[None, :]
    n = np.asarray(lengths)[:, None]
    return (pos >= n) | (pos < (0 if window is None else n - window))


def poisoned(slab, hide):
    return np.where(hide[:, None, :, None], np.nan, slab)


def to_pages(rng, caches, lengths, window, page_size):
    """Contiguous ``[B, K, S, X]`` caches as permuted pools ``[P, K, page_size, X]`` and a table: pages wholly
    before the window are -1 (released, as a ring does), entries past the length -1 or (odd b) a NaN page."""
    batch, _, max_len, _ = caches[0].shape
    first = [0 if window is None else max(n - window, 0) // page_size for n in lengths]
    need = [-(-n // page_size) for n in lengths]
    num_pages = sum(e - f for f, e in zip(first, need, strict=True)) + 2
    order = rng.permutation(num_pages)
    fill = lambda c: 0 if c.dtype == np.int8 else np.nan  # Q8 codes: the NaN scales poison
    pools = [np.full((num_pages, c.shape[1], page_size, c.shape[3]), fill(c), c.dtype) for c in caches]
    tables = np.full((batch, max_len // page_size), -1, np.int32)
    used = 0
    for b in range(batch):
        if b % 2:
            tables[b, need[b] :] = order[-1]  # a page no sequence fills: NaN
        for j in range(first[b], need[b]):
            tables[b, j] = page = order[used]
            used += 1
            for pool, cache in zip(pools, caches, strict=True):
                pool[page] = cache[b, :, j * page_size : (j + 1) * page_size]
    return pools, tables


def q8_pair(slab, hide):
    """Codes and scales of ``slab`` with NaN scales where ``hide``, and the dequantized values (float64)."""
    codes, scales = (np.array(x) for x in quantize(jnp.asarray(slab, jnp.float32), scale_dtype=jnp.float16))
    values = np.asarray(dequantize(jnp.asarray(codes), jnp.asarray(scales)), np.float64)
    return codes, np.where(hide[:, None, :, None], np.nan, scales).astype(np.float16), values


def run_case(rng, case, *, scale_up=1, interpret=None, fn=None):
    """Run ``case`` through its kernel (or ``fn``, a reference with the kernel's signature) and check it."""
    _, kind, batch, kv_heads, group, head_dim, max_len, dtype, lengths, window, softcap, block, splits = case
    max_len, lengths = max_len * scale_up, np.array(lengths, np.int32) * scale_up
    window = None if window is None else window * scale_up
    dtype = jnp.dtype(dtype)
    hide = hidden(lengths, window, max_len)
    q = jnp.asarray(rng.standard_normal((batch, kv_heads * group, head_dim)), dtype)
    slabs = [rng.standard_normal((batch, kv_heads, max_len, head_dim)) for _ in range(2)]
    options = dict(window=window, softcap=softcap, interpret=interpret, num_splits=splits)
    n = jnp.asarray(lengths)
    if kind in ("q8", "paged_q8"):
        (kc, ks, k_vals), (vc, vs, v_vals) = (q8_pair(s, hide) for s in slabs)
        arrays = [kc, ks, vc, vs]
    elif kind in ("fp8", "paged_fp8"):
        (kv, ks, k_vals), (vv, vs, v_vals) = (fp8_arrays(poisoned(s, hide)) for s in slabs)
        arrays = [kv, ks, vv, vs]
    else:
        k_vals, v_vals = (np.asarray(jnp.asarray(s, dtype).astype(jnp.float32), np.float64) for s in slabs)
        arrays = [poisoned(s, hide) for s in slabs]
    if kind == "append":  # position n - 1 comes from k_new / v_new: the cache holds NaN there
        new = [jnp.asarray(vals[np.arange(batch), :, np.maximum(lengths - 1, 0)], dtype) for vals in (k_vals, v_vals)]
        for x in arrays:
            x[np.arange(batch), :, np.maximum(lengths - 1, 0)] = np.nan
    if kind.startswith("paged"):
        page_size, ppb = block
        pools, tables = to_pages(rng, arrays, lengths, window, page_size)
        args = [*(jnp.asarray(x, dtype if x.dtype == np.float64 else x.dtype) for x in pools), jnp.asarray(tables)]
        options["pages_per_block"] = ppb
    else:
        args = [jnp.asarray(x, dtype if x.dtype == np.float64 else x.dtype) for x in arrays]
        options["block_k"] = block
    fn = (
        fn
        or {
            "decode": decode.decode_attention,
            "append": lambda *a, **o: decode.decode_attention_append(*a, *new, **o)[0],
            "paged": paged.paged_decode_attention,
            "q8": decode_q8.q8_decode_attention,
            "paged_q8": paged_q8.paged_q8_decode_attention,
            "fp8": decode_fp8.fp8_decode_attention,
            "paged_fp8": decode_fp8.paged_fp8_decode_attention,
        }[kind]
    )
    with poisoned_outputs():
        out = run_jitted(fn, q, *args, n, **options)
    assert out.shape == q.shape and out.dtype == dtype
    out = np.asarray(out.astype(jnp.float32), np.float64)
    q64 = kernel_query(q, int8_codes=kind in ("q8", "paged_q8"))
    want = decode_attention_f64(q64, k_vals, v_vals, lengths, window=window, softcap=softcap)
    gpu = "-gpu" if dtype == jnp.float32 and jax.default_backend() == "gpu" else ""
    assert rel_err(out, want) < KERNEL_TOL[dtype.name + gpu], lengths


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_window_softcap_match_float64_interpret(rng, case):
    run_case(rng, case, interpret=True)


QUANT_CASES = [c for c in CASES if c[1] in ("q8", "paged_q8", "fp8", "paged_fp8")]


@pytest.mark.parametrize("form", Q8_OTHER_FORMS)
@pytest.mark.parametrize("case", QUANT_CASES, ids=[c[0] for c in QUANT_CASES])
def test_q8_loop_forms_interpret(rng, case, form, monkeypatch):
    """The Q8 body's loop forms (decode_q8.LOOP_FORMS) with a window (a masked head block) and a soft cap."""
    monkeypatch.setattr(decode_q8, "LOOP_FORM", form)
    run_case(rng, case, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
class TestOnGpu:
    """The same table with the real Triton lowering, at lengths, windows and capacities ``GPU_SCALE`` times longer."""

    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_window_softcap_match_float64(self, rng, case):
        run_case(rng, case, scale_up=GPU_SCALE, interpret=False)

    @pytest.mark.parametrize("form", Q8_GPU_FORMS)
    @pytest.mark.parametrize("case", QUANT_CASES[:2], ids=[c[0] for c in QUANT_CASES[:2]])
    def test_q8_loop_forms(self, rng, case, form, monkeypatch):
        monkeypatch.setattr(decode_q8, "LOOP_FORM", form)
        run_case(rng, case, scale_up=GPU_SCALE, interpret=False)


REFERENCES = {
    "decode": reference.decode_attention_reference,
    "paged": reference.paged_decode_attention_reference,
    "q8": reference.q8_decode_attention_reference,
    "paged_q8": reference.paged_q8_decode_attention_reference,
    "fp8": reference.fp8_decode_attention_reference,
    "paged_fp8": reference.paged_fp8_decode_attention_reference,
}
REFERENCE_CASES = [CASES[0], CASES[5], CASES[7], CASES[8], CASES[9], CASES[10]]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=[c[1] for c in REFERENCE_CASES])
def test_kernel_references_take_window_and_softcap(rng, case):
    """Each kernel's pure-jnp reference (``pallas_kernels.reference``) on the same NaN-poisoned inputs."""
    run_case(rng, case, fn=REFERENCES[case[1]])


def test_mosaic_dispatch_sends_window_and_softcap_to_triton(monkeypatch):
    """``dispatch.decode_attention_auto`` never hands a window or a soft cap to the Mosaic GPU kernel."""
    from pallas_kernels import decode_mgpu, dispatch

    calls = []
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)
    monkeypatch.setattr(dispatch, "prefer_mgpu", lambda *a, **k: True)
    monkeypatch.setattr(decode_mgpu, "decode_attention_mgpu", lambda *a, **k: calls.append("mgpu"))
    monkeypatch.setattr(decode, "decode_attention", lambda *a, **k: calls.append(("triton", k["window"], k["softcap"])))
    q, k = jnp.zeros((1, 2, 64)), jnp.zeros((1, 1, 32, 64))
    n = jnp.array([5], jnp.int32)
    dispatch.decode_attention_auto(q, k, k, n)
    dispatch.decode_attention_auto(q, k, k, n, window=4)
    dispatch.decode_attention_auto(q, k, k, n, softcap=3.0)
    assert calls == ["mgpu", ("triton", 4, None), ("triton", None, 3.0)]


@pytest.mark.parametrize(
    "kwargs, exc, text",
    [
        (dict(window=0), ValueError, "window=0 must be None or an int >= 1"),
        (dict(window=2.5), ValueError, "window=2.5"),
        (dict(softcap=0.0), ValueError, "softcap=0.0 must be > 0"),
        (dict(softcap="x"), TypeError, "softcap must be None or a Python number"),
    ],
    ids=["window-0", "window-float", "softcap-0", "softcap-type"],
)
def test_errors(kwargs, exc, text):
    q, k = jnp.zeros((1, 2, 64)), jnp.zeros((1, 1, 32, 64))
    n = jnp.array([5], jnp.int32)
    tables = jnp.zeros((1, 2), jnp.int32)
    for call in (
        lambda: decode.decode_attention(q, k, k, n, **kwargs),
        lambda: paged.paged_decode_attention(q, k[0][None], k[0][None], tables, n, **kwargs),
    ):
        with pytest.raises(exc, match=text):
            call()
