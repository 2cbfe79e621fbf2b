"""The decode kernel that writes the step's new K/V row and attends in one launch, against NumPy float64.

``decode_attention_append`` must equal "write the row at ``lengths[b] - 1``, then attend": the row the cache held
there before is garbage (NaN or another value) so a kernel that reads it instead of the new row fails, every
output buffer is NaN-poisoned (``poison.poisoned_outputs``), and the updated cache must equal the expected one
exactly (only the new rows changed, NaN elsewhere preserved). Interpret mode on CPU; the real lowering on a GPU.
``decode_attention_packed`` (each kv head's queries, new key and new value as one array's rows) must do the same.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REL_TOL, rel_err
from kernel_inputs import fast_jit
from poison import poisoned_outputs
from reference import decode_attention_f64
from test_decode_kernel import CASES, GPU_SCALE, IDS, LENGTHS, ON_GPU

from pallas_kernels import common, decode, reference


def run_append_case(rng, case, *, scale_up=1, interpret=None, donate=False, kernel=None, **launch):
    _, batch, kv_heads, group, head_dim, max_len, dtype, length_names, layers, block_k, num_splits = case
    max_len *= scale_up
    dtype = jnp.dtype(dtype)
    bk = block_k or common.decode_config(batch, kv_heads, max_len, head_dim, dtype).block_k
    names = [length_names[i % len(length_names)] for i in range(batch)]
    lengths = np.array([min(LENGTHS[name](max_len, bk), max_len) for name in names], np.int32)
    append = rng.integers(0, 2, batch).astype(bool)
    append[0] = True
    num_layers, layer = (1, 0) if layers is None else (layers[0], 1)
    shape = (num_layers, batch, kv_heads, max_len, head_dim)
    cast = lambda x: np.asarray(x).astype(dtype)  # in NumPy (ml_dtypes): no eager conversion to compile per shape
    rounded = lambda x: cast(x).astype(np.float64)
    q = rng.standard_normal((batch, kv_heads * group, head_dim))
    new = {name: rng.standard_normal((batch, kv_heads, head_dim)) for name in "kv"}
    caches, expected, slabs = {}, {}, {}
    for name in "kv":
        cache = np.full(shape, np.nan)
        cache[layer] = rng.standard_normal(shape[1:])
        for b, n in enumerate(lengths):
            cache[layer, b, :, n:] = np.nan
            if n and append[b]:  # what the cache held at the new position must not be read
                cache[layer, b, :, n - 1] = np.nan if b % 2 else 1e3
        caches[name] = rounded(cache)
        want = caches[name].copy()
        for b, n in enumerate(lengths):
            if n and append[b]:
                want[layer, b, :, n - 1] = rounded(np.float32(new[name][b]))  # the kernel gets float32 rows
        expected[name], slabs[name] = want, want[layer]
    ref = decode_attention_f64(rounded(q), slabs["k"], slabs["v"], lengths)

    args = [jnp.asarray(cast(x)) for x in (q, caches["k"], caches["v"])]
    args += [jnp.asarray(lengths), jnp.asarray(new["k"], jnp.float32), jnp.asarray(new["v"], jnp.float32)]
    options = dict(interpret=interpret, block_k=block_k, num_splits=num_splits, **launch)
    kernel = kernel or decode.decode_attention_append
    call = lambda *a, **layer: kernel(*a, append=jnp.asarray(append), **options, **layer)
    jitted = fast_jit(call, donate_argnums=(1, 2) if donate else ())
    with poisoned_outputs():
        if layers is None:
            args[1], args[2] = args[1][0], args[2][0]  # a one-layer [B, K, S, D] cache
            out, k, v = jitted(*args)
        elif donate or layers[1] == "traced":
            out, k, v = jitted(*args, layer=jnp.int32(layer))
        else:  # a static layer
            out, k, v = fast_jit(lambda *a: call(*a, layer=layer))(*args)
    assert out.shape == q.shape and out.dtype == dtype
    out = np.asarray(out).astype(np.float64)
    assert rel_err(out, ref) < REL_TOL[dtype.name], names
    for name, got in (("k", k), ("v", v)):
        got = np.asarray(got).astype(np.float64).reshape(shape)
        np.testing.assert_array_equal(got, expected[name], err_msg=f"{name} cache after the append")


# Interpret mode on CPU: the table less the rows that repeat another's path at another batch or launch default
# (splits3 ~ splits3_batch5, more_splits_than_blocks ~ more_splits_batch3, g3_d128_f32_default ~ g1_d128_bf16_default;
# test_decode_kernel.py runs every row without the append). The GPU class runs every row.
SKIPPED_ON_CPU = ("g1_d64_f32_splits3", "g2_d64_f16_more_splits_than_blocks", "g3_d128_f32_default")
CPU_CASES = [c for c in CASES if c[0] not in SKIPPED_ON_CPU]


@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_append_matches_float64_interpret(rng, case):
    run_append_case(rng, case, interpret=True)


def packed(q, k, v, lengths, k_new, v_new, **options):
    """``decode_attention_packed`` on the same inputs: the queries and new rows in one float32 array (exact for
    every cache dtype: the kernel casts each row to the cache's dtype, as the unpacked kernel does)."""
    b, kh, d = k_new.shape
    qkv = jnp.concatenate([q.astype(jnp.float32).reshape(b, kh, -1, d), k_new[:, :, None], v_new[:, :, None]], axis=2)
    out, k, v = decode.decode_attention_packed(qkv, k, v, lengths, **options)
    return out.astype(q.dtype), k, v


# The packed layout in interpret mode: one layer, a static and a traced layer of a whole cache, G = 1, 4 and 8,
# head_dim 64 / 96 / 80 (a padded tile), several splits and one, a tiny cache (the unpacked fallback)
PACKED_CASES = [c for c in CASES if c[0] in ("g1_d64_f32_splits3_batch5", "g4_d64_f32_layer1_of3",
                                             "g8_d128_f32_traced_layer", "g4_d96_bf16_splits3",
                                             "g2_d80_f32_splits2_traced_layer", "g4_d64_bf16_tiny_cache")]  # fmt: skip


@pytest.mark.parametrize("case", PACKED_CASES, ids=[c[0] for c in PACKED_CASES])
def test_packed_matches_float64_interpret(rng, case):
    run_append_case(rng, case, interpret=True, kernel=packed)


@pytest.mark.parametrize("kernel", ["append", "packed"])
def test_fused_merge_matches_float64_interpret(rng, kernel):
    """The splits merged by the last to finish (fused_merge), the cache written by the program holding the new row."""
    case = next(c for c in CASES if c[0] == "g8_d128_f32_traced_layer")
    run_append_case(rng, case, interpret=True, kernel=packed if kernel == "packed" else None, fused_merge=True)


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[6]], ids=[IDS[0], IDS[4], IDS[6]])
def test_reference_matches_float64(rng, case):
    """The pure-jnp reference with the kernel's signature (one layer, a whole cache, a traced layer)."""
    run_append_case(rng, case, kernel=reference.decode_attention_append_reference)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU with the Pallas Triton lowering")
class TestAppendOnGpu:
    """The same table with the real Triton lowering, longer caches, and the cache donated (updated in place)."""

    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_append_matches_float64(self, rng, case):
        run_append_case(rng, case, scale_up=GPU_SCALE, interpret=False, donate=True)

    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_packed_matches_float64(self, rng, case):
        run_append_case(rng, case, scale_up=GPU_SCALE, interpret=False, donate=True, kernel=packed)

    @pytest.mark.parametrize("case", CASES[:4], ids=IDS[:4])
    def test_fused_merge_matches_float64(self, rng, case):
        run_append_case(rng, case, scale_up=GPU_SCALE, interpret=False, donate=True, kernel=packed, fused_merge=True)


def test_append_argument_errors(rng):
    q = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 2, 32, 64)), jnp.float32)
    new = jnp.asarray(rng.standard_normal((2, 2, 64)), jnp.float32)
    n = jnp.array([3, 32], jnp.int32)
    with pytest.raises(ValueError, match=r"k_new must have shape \[B, K, D\]"):
        decode.decode_attention_append(q, k, k, n, new[:, :1], new)
    with pytest.raises(TypeError, match="v_new must be a floating array"):
        decode.decode_attention_append(q, k, k, n, new, new.astype(jnp.int32))
    with pytest.raises(ValueError, match="append must be bool or int"):
        decode.decode_attention_append(q, k, k, n, new, new, append=jnp.ones((3,), bool))
    with pytest.raises(ValueError, match=r"lengths=\[ 3 33\] must lie in"):
        decode.decode_attention_append(q, k, k, jnp.array([3, 33]), new, new)


def test_packed_argument_errors(rng):
    k = jnp.asarray(rng.standard_normal((2, 2, 32, 64)), jnp.float32)
    n = jnp.array([3, 32], jnp.int32)
    with pytest.raises(ValueError, match=r"qkv must have shape \[B, K, G \+ 2, D\] with G >= 1"):
        decode.decode_attention_packed(jnp.ones((2, 2, 2, 64)), k, k, n)
    with pytest.raises(ValueError, match=r"must have shape"):
        decode.decode_attention_packed(jnp.ones((2, 3, 6, 64)), k, k, n)  # three kv heads, the cache's two
