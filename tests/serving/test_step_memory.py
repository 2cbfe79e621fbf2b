"""The serving step updates its donated cache in place: the compiled mixed step holds no copy of the page pool,
whatever the pool's size, and hands the pool back in the donated buffers. On a GPU its attention runs the Pallas
kernels (their operands are the whole pool); elsewhere the reference."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jkv.models import llama
from jkv.serving import Engine

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Llama-3-8B's attention heads (32 / 8, head_dim 128: the Mosaic GPU kernels take them), two small layers.
CONFIG = llama.LlamaConfig(512, 256, 512, 2, 32, 8, 128)


@functools.cache
def _params():
    # bf16 on a GPU (the Mosaic GPU kernels take 16-bit caches); float32 elsewhere: XLA's CPU backend scatters into
    # a bf16 array through float32 copies of the whole operand
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    return llama.init_params(CONFIG, jax.random.key(0), dtype, scale=0.05)


def _compiled_memory(kind: str, tokens: int, *, num_pages: int | None = None, num_slots: int = 8):
    """``(memory analysis, cache bytes)`` of the engine's mixed step of ``tokens`` tokens over a cache of ``kind``
    (``num_pages`` pages for a paged kind)."""
    engine = Engine(
        _params(), CONFIG, num_slots=num_slots, max_len=1024, cache=kind, num_pages=num_pages, buckets=(tokens,),
        max_batch_tokens=tokens, verbose=False,
    )  # fmt: skip
    inputs = engine.empty_step_inputs(tokens)
    stats = engine.steps.mixed_executable(engine.params, engine.cache, *inputs).memory_analysis()
    return stats, sum(x.nbytes for x in engine.cache.storage())


def check_no_copy_of_the_pool(kind: str, tokens: int) -> None:
    small, pool = _compiled_memory(kind, tokens, num_pages=256)
    large, large_pool = _compiled_memory(kind, tokens, num_pages=1024)
    assert large_pool > 3.9 * pool  # (the pages, and a few small arrays)
    # four times the pages, the same scratch: a copy of even one layer's K pages would add large_pool / 4
    grown = large.temp_size_in_bytes - small.temp_size_in_bytes
    assert grown < large_pool // 16, (grown, large_pool)
    assert large.alias_size_in_bytes >= large_pool  # the pool comes back in the donated buffers


@pytest.mark.parametrize("tokens", [64, 2048])
@pytest.mark.parametrize("kind", ["paged", "q8-paged"])
def test_mixed_step_holds_no_copy_of_the_pool(kind, tokens):
    check_no_copy_of_the_pool(kind, tokens)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the flags are options of XLA's GPU compiler")
@pytest.mark.parametrize("kind", ["paged", "q8-paged"])
def test_mixed_step_holds_no_copy_of_the_pool_under_the_cli_xla_flags(kind):
    """The same under the XLA flags ``jkv generate`` and ``jkv serve`` run with (``jkv.xla_flags``: command
    buffers); in a process of its own, as XLA reads its flags once."""
    code = (
        "from jkv import xla_flags; xla_flags.apply_recommended(warn=False); import test_step_memory; "
        f"test_step_memory.check_no_copy_of_the_pool({kind!r}, 2048)"
    )
    path = os.pathsep.join(
        [REPO, os.path.join(REPO, "tests"), os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="off a GPU the reference's scratch grows with the cache")
@pytest.mark.parametrize("tokens", [64, 2048])
def test_mixed_step_holds_no_copy_of_a_contiguous_cache(tokens):
    """The contiguous cache in the weights' dtype, four times the slots: the kernels' scratch stays the same."""
    small, cache = _compiled_memory("default", tokens, num_slots=8)
    large, large_cache = _compiled_memory("default", tokens, num_slots=32)
    assert large_cache > 3.9 * cache
    grown = large.temp_size_in_bytes - small.temp_size_in_bytes
    assert grown < large_cache // 16, (grown, large_cache)
    assert large.alias_size_in_bytes >= large_cache


# Weight-dominated shapes of each family's options (per-layer windows and rope bases make the layers differ, so the
# model traces one block per layer; head_dim 256 takes the one-warpgroup Mosaic GPU kernel).
FAMILIES = {
    "llama": llama.LlamaConfig(512, 1024, 4096, 4, 16, 4, 128),
    "mistral": llama.LlamaConfig(512, 1024, 4096, 4, 16, 4, 128, windows=(96,) * 4),
    "gemma2": llama.LlamaConfig(
        512,
        1024,
        4096,
        4,
        8,
        4,
        256,
        tie_embeddings=True,
        architecture="gemma2",
        windows=(96, None, 96, None),
        attn_softcap=50.0,
        final_softcap=30.0,
        query_scale=256**-0.5,
        sandwich_norms=True,
        activation="gelu_tanh",
        embed_scale=1024**0.5,
    ),
    "gemma3": llama.LlamaConfig(
        512,
        1024,
        4096,
        4,
        8,
        4,
        256,
        tie_embeddings=True,
        architecture="gemma3",
        qk_norm=True,
        windows=(96, 96, 96, None),
        query_scale=256**-0.5,
        sandwich_norms=True,
        activation="gelu_tanh",
        embed_scale=1024**0.5,
        rope_local_theta=10000.0,
        rope_theta=1e6,
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mixed_step_holds_no_copy_of_the_weights(family, tokens=256):
    """The step reads each layer's weights where they lie: its scratch is far below the layers' matrices (a copy
    of each layer's weights in the step would be all of them). Contiguous cache, as ``Generator`` makes."""
    config = FAMILIES[family]
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    params = llama.init_params(config, jax.random.key(1), dtype, scale=0.05)
    engine = Engine(
        params, config, num_slots=2, max_len=512, cache="default", buckets=(tokens,), max_batch_tokens=tokens,
        verbose=False,
    )  # fmt: skip
    stats = engine.steps.mixed_executable(engine.params, engine.cache, *engine.empty_step_inputs(tokens))
    stats = stats.memory_analysis()
    layers = sum(x.nbytes for x in jax.tree_util.tree_leaves(engine.params.layers) if x.ndim >= 2)
    assert stats.temp_size_in_bytes < layers // 4, (stats.temp_size_in_bytes, layers)
