"""GGUF bytes to product, against gguf-py: random blocks of each format repacked (``jkv.loading.gguf_blocks``) and
multiplied by the kernel (interpret mode) and the reference, compared with float64 products of the matrix gguf-py's
own dequantizer reads from the same bytes. Row counts the kernel tests leave out (7: one padded dot tile; 300: three
row blocks, the last sliding back), float32 and bf16 activations, and the embedding as a tied LM head (reduced over
its axis 1, through ``jkv.models.quant.project``)."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REL_TOL, rel_err
from gguf import GGMLQuantizationType as Q
from kernel_inputs import fast_jit

from jkv.loading import gguf_blocks
from jkv.models import quant
from pallas_kernels import block_formats
from pallas_kernels import quantized_matmul as qmatmul

FORMATS = tuple(block_formats.FORMATS)
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}
N, K = 37, 256


def gguf_matrix(rng, fmt: str, n: int, k: int) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Random GGUF bytes of an ``n x k`` ``fmt`` matrix (every bit pattern; f16 fields of both signs) as planes, and
    the float64 matrix gguf-py dequantizes from them."""
    block, size = block_formats.FORMATS[fmt].block, gguf_blocks.BLOCK_BYTES[fmt]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for offset in F16_FIELDS[fmt]:
        raw[..., offset : offset + 2] = (
            (rng.standard_normal((n, k // block, 1)) * 0.1).astype(np.float16).view(np.uint8)
        )
    raw = raw.reshape(n, -1)
    dense = gguf.quants.dequantize(raw, Q[fmt]).reshape(n, k).astype(np.float64)
    return gguf_blocks.repack(raw, fmt, n, k), dense


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("m", [7, 300])
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_and_reference_match_gguf(rng, fmt, m, dtype):
    planes, dense = gguf_matrix(rng, fmt, N, K)
    x = jnp.asarray(rng.standard_normal((m, K)), dtype)
    want = np.asarray(x, np.float64) @ dense.T
    planes = tuple(map(jnp.asarray, planes))
    kernel = fast_jit(lambda x, p: qmatmul.qmatmul(x, p, fmt, interpret=True))(x, planes)
    ref = fast_jit(lambda x, p: block_formats.qmatmul_reference(x, p, fmt))(x, planes)
    for out in (kernel, ref):
        assert out.shape == (m, N) and out.dtype == jnp.float32
        assert rel_err(out, want) < REL_TOL[dtype]


@pytest.mark.parametrize("fmt", FORMATS)
def test_tied_lm_head_matches_gguf(rng, fmt):
    """A ``[V, H]`` embedding (``V`` odd) as the LM head: ``h @ E.T`` through the kernel, and its rows looked up."""
    planes, dense = gguf_matrix(rng, fmt, N, K)
    embed = quant.from_planes(fmt, tuple(map(jnp.asarray, planes)), (N, K), jnp.float32, reduce_axis=1)
    h = jnp.asarray(rng.standard_normal((2, 3, K)), jnp.float32)
    logits = fast_jit(lambda h, e: quant.project(h, e, "pallas", contract=1))(h, embed)
    assert logits.shape == (2, 3, N)
    assert rel_err(logits, np.asarray(h, np.float64) @ dense.T) < REL_TOL["float32"]
    ids = jnp.asarray([[0, N - 1], [5, 5]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(quant.take_rows(embed, ids)), dense[np.asarray(ids)].astype(np.float32))
