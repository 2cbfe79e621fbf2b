"""Every cache kind's attention steps lower to Triton kernels through the API, on a CPU: ``jkv.attend_write`` on
the Pallas path is traced as a GPU process would trace it (the Triton backend, not interpret mode) and lowered for
CUDA, at the head_dims the model families bring (Phi-3's 96, Gemma's 256), at T = 1 and T = 5, with and without a
window and soft cap. Interpret mode does not check what the lowering checks (power-of-two tiles, block shapes), so
a kernel the dispatch picks for such a step could otherwise first fail on a GPU."""

import jax
import jax.numpy as jnp
import pytest

import jkv
from pallas_kernels import backend

KINDS = jkv.kinds()
BATCH, KV_HEADS, GROUP, MAX_LEN = 2, 2, 2, 64


@pytest.fixture
def triton_backend(monkeypatch):
    """This process traces Pallas kernels for the Triton backend (Mosaic GPU stays off: no GPU to ask)."""
    monkeypatch.setattr(backend, "gpu_backend", lambda: backend.TRITON)


def _step(q, k, v, cache, counts, *, window, softcap):
    return jkv.attend_write(q, k, v, cache.begin(counts), 1, impl="pallas", window=window, softcap=softcap)


def _lowered(kind: str, head_dim: int, t: int, capped: bool, max_len: int) -> str:
    """The StableHLO text of ``_step`` (T = ``t`` tokens a sequence) over an abstract cache of ``kind``, for CUDA."""
    spec = jkv.CacheSpec(num_layers=2, num_kv_heads=KV_HEADS, head_dim=head_dim, max_len=max_len, dtype=jnp.bfloat16)
    paged = jkv.caches.kind(kind).paged
    cache = jax.eval_shape(lambda: jkv.make_cache(kind, spec, BATCH, **({"page_size": 16} if paged else {})))
    sds = jax.ShapeDtypeStruct
    q = sds((BATCH, t, KV_HEADS * GROUP, head_dim), jnp.bfloat16)
    kv = sds((BATCH, KV_HEADS, t, head_dim), jnp.bfloat16)
    options = dict(window=24, softcap=30.0) if capped else dict(window=None, softcap=None)
    traced = jax.jit(_step, static_argnames=("window", "softcap")).trace(
        q, kv, kv, cache, sds((BATCH,), jnp.int32), **options
    )
    return traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("capped", [False, True], ids=["plain", "window-softcap"])
@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("head_dim", [96, 256])
@pytest.mark.parametrize("kind", KINDS)
def test_attend_write_lowers_to_triton(triton_backend, kind, head_dim, t, capped):
    assert "xla.gpu.triton" in _lowered(kind, head_dim, t, capped, MAX_LEN)  # a kernel, not the reference


@pytest.fixture
def mosaic_backend(monkeypatch, triton_backend):
    """... and takes Mosaic GPU kernels where the dispatch would on a Hopper GPU (this machine's shared memory
    taken for a Hopper GPU's: ``backend.OFF_GPU_SHARED_MEMORY``)."""
    monkeypatch.setattr(backend, "mosaic_gpu_usable", lambda: True)


@pytest.mark.parametrize("capped", [False, True], ids=["plain", "window-softcap"])
@pytest.mark.parametrize("t", [5, 128], ids=["short-runs", "long-runs"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("kind", ["bf16", "paged"])
def test_multi_token_steps_lower_to_mosaic_gpu(mosaic_backend, kind, head_dim, t, capped):
    """The steps the dispatch sends to a Mosaic GPU multi-token kernel (short runs: one warpgroup; long runs: the
    warp-specialised one where it fits the shared memory) lower for CUDA with the launch it picks."""
    assert "mosaic_gpu" in _lowered(kind, head_dim, t, capped, 256)


@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_steps_lower_to_mosaic_gpu(mosaic_backend, head_dim, group):
    """``jkv.attend`` at T = 1 over a contiguous cache the dispatch gives the Mosaic GPU decode kernel (caches of
    64 MiB and more: abstract here, nothing is allocated)."""
    spec = jkv.CacheSpec(num_layers=2, num_kv_heads=8, head_dim=head_dim, max_len=16384, dtype=jnp.bfloat16)
    cache = jax.eval_shape(lambda: jkv.make_cache("bf16", spec, BATCH).begin(1))
    q = jax.ShapeDtypeStruct((BATCH, 1, 8 * group, head_dim), jnp.bfloat16)
    traced = jax.jit(lambda q, cache: jkv.attend(q, cache, 1, impl="pallas")).trace(q, cache)
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()
