"""The multi-token kernel dispatch (``pallas_kernels.dispatch``): the rule that picks a Mosaic GPU kernel, and the
auto entries the attention API registers for plain caches, against float64 on NaN-poisoned steps: on a CPU they
run the Triton kernel in interpret mode; on a Hopper GPU (``gpu`` tests) the Mosaic GPU kernels they pick, with
the Triton kernel forced beside them (``allow_mgpu=False``) on the same inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from kernel_inputs import KERNEL_TOL
from multi_token_inputs import make_step, page_table, paginate, poisoned, random_counts
from reference import multi_token_attention_f64

from pallas_kernels import backend, dispatch

ON_HOPPER = backend.mosaic_gpu_usable()


@pytest.mark.parametrize(
    "rows,batch,heads,want",
    [
        (8192, 1, (32, 8, 128), "ws"),  # one long prompt
        (2048, 64, (32, 8, 128), "ws"),  # the engine's largest mixed step: 32 tokens a slot on average
        (64, 64, (32, 8, 128), "plain"),  # a decode-only step
        (320, 64, (32, 8, 128), "plain"),  # verification, T = 5
        (1024, 4, (9, 3, 64), "ws"),  # G = 3: one head a tile, 64 tokens
        (256, 4, (9, 3, 64), "plain"),
        (4096, 1, (32, 8, 96), None),  # head_dim 96: no Mosaic GPU kernel
        (8192, 1, (16, 8, 256), "plain"),  # head_dim 256: two warpgroups' buffers pass a Hopper's shared memory
        (512, 4, (8, 4, 256), "plain"),
    ],
    ids=str,
)
def test_rule(rows, batch, heads, want):
    assert dispatch.multi_token_mgpu_kind(rows, batch, *heads, jnp.bfloat16) == want
    assert dispatch.multi_token_mgpu_kind(rows, batch, *heads, jnp.float32) is None  # no float32 MMA operands
    if want == "ws":
        assert dispatch.ws_config(*heads, jnp.bfloat16).pingpong  # the schedule measured faster


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_the_picked_launch_fits_the_shared_memory(head_dim, out_dtype):
    """Whatever the rule picks, its launch fits this device's shared memory (off a GPU: a Hopper's), for every
    group size and run length: a kernel the rule picks never fails to launch."""
    from pallas_kernels import multi_token_mgpu as mgpu
    from pallas_kernels.multi_token_mgpu_ws import CONSUMERS

    for group in range(1, 9):
        for rows, batch in [(64, 64), (2048, 4), (8192, 1)]:
            kind = dispatch.multi_token_mgpu_kind(rows, batch, 2 * group, 2, head_dim, jnp.bfloat16, out_dtype)
            if kind is None:
                continue
            if kind == "ws":
                config = dispatch.ws_config(2 * group, 2, head_dim, jnp.bfloat16, out_dtype)
            else:
                config = mgpu.mgpu_multi_token_config(2 * group, 2, head_dim, jnp.bfloat16)
            consumers = CONSUMERS if kind == "ws" else 1
            mgpu.resolve_config(config, 2 * group, 2, head_dim, jnp.bfloat16, out_dtype, consumers=consumers)


def test_ws_block_is_the_largest_that_fits_the_layout():
    """The warp-specialised launch takes 128-key blocks (measured faster) where they fit the shared memory and the
    caller's layout, else 64: a contiguous cache shorter than 128 positions, pages that do not divide 128."""
    heads = (32, 8, 128)
    assert dispatch.ws_config(*heads, jnp.bfloat16).block_k == 128
    assert dispatch.ws_config(*heads, jnp.bfloat16, block_ok=lambda bk: 100 >= bk).block_k == 64
    assert dispatch.ws_config(*heads, jnp.bfloat16, block_ok=lambda bk: bk % 256 == 0).block_k == 64  # refused later
    # float32 outputs: both consumers' output tiles and a 128-key ring pass a Hopper's shared memory
    from pallas_kernels import multi_token_mgpu as mgpu
    from pallas_kernels.multi_token_mgpu_ws import CONSUMERS

    config = dispatch.ws_config(*heads, jnp.bfloat16, jnp.float32)
    assert mgpu.fits(config, 128, jnp.bfloat16, jnp.float32, CONSUMERS) or config.block_k == 64


def _step(rng, *, tokens, batch, kv_heads, group, head_dim, max_len, window):
    step = make_step(rng, *random_counts(rng, batch, tokens, tokens // 2, max_len), window, tokens)
    q = rng.standard_normal((tokens, kv_heads * group, head_dim))
    k, v = (poisoned(rng.standard_normal((batch, kv_heads, max_len, head_dim)), step) for _ in "kv")
    ref = multi_token_attention_f64(q, k, v, *step[1:4], window=window)
    return step, q, k, v, ref


def _check(out, ref, step, dtype):
    out = np.asarray(jnp.asarray(out, jnp.float32))
    np.testing.assert_array_equal(out[~step.owned_rows()], 0.0)
    assert rel_err(out, ref) < KERNEL_TOL[dtype], step


CASES = [  # (id, tokens, batch, kv_heads, group, head_dim, max_len, window, softcap, page_size)
    ("contiguous_g4", 64, 3, 2, 4, 64, 128, None, None, None),
    ("paged16_g2_window", 64, 3, 2, 2, 64, 128, 20, None, 16),
    ("contiguous_g8_softcap", 48, 2, 1, 8, 128, 96, None, 25.0, None),
    ("contiguous_g4_ws", 192, 2, 2, 4, 64, 256, None, None, None),  # the warp-specialised kernels (GPU)
    ("paged16_g2_ws_window", 256, 2, 2, 2, 64, 384, 40, None, 16),
    ("paged16_g2_d256_long", 256, 1, 1, 2, 256, 320, None, 30.0, 16),  # long rows, but one warpgroup fits
]


@pytest.mark.parametrize("case", [c for c in CASES if c[0].endswith(("_ws", "_ws_window"))], ids=lambda c: c[0])
def test_gpu_cases_reach_the_warp_specialised_kernels(case):
    """The GPU cases below include steps the rule sends to the warp-specialised kernels."""
    _, tokens, batch, kv_heads, group, head_dim, *_ = case
    assert dispatch.multi_token_mgpu_kind(tokens, batch, kv_heads * group, kv_heads, head_dim, jnp.bfloat16) == "ws"


def _run(rng, case, dtype, *, allow_mgpu=True):
    _, tokens, batch, kv_heads, group, head_dim, max_len, window, softcap, page_size = case
    step, q, k, v, ref = _step(
        rng, tokens=tokens, batch=batch, kv_heads=kv_heads, group=group, head_dim=head_dim, max_len=max_len,
        window=window,
    )  # fmt: skip
    ints = lambda x: jnp.asarray(x, jnp.int32)
    cast = lambda x: jnp.asarray(x, dtype)
    options = dict(window=window, softcap=softcap, allow_mgpu=allow_mgpu)
    if softcap is not None:
        ref = multi_token_attention_f64(q, k, v, *step[1:4], window=window, softcap=softcap)
    if page_size is None:
        out = dispatch.multi_token_attention_auto(cast(q), cast(k), cast(v), *(ints(x) for x in step[1:4]), **options)
    else:
        tables, owned, num_pages = page_table(rng, step, page_size, max_len // page_size)
        pools = [cast(paginate(x, tables, owned, num_pages, page_size)) for x in (k, v)]
        out = dispatch.paged_multi_token_attention_auto(
            cast(q), *pools, ints(tables), *(ints(x) for x in step[1:4]), **options
        )
    _check(out, ref, step, jnp.dtype(dtype).name)


@pytest.mark.skipif(ON_HOPPER, reason="checks the fallback where Mosaic GPU cannot run")
@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: c[0])
def test_falls_back_to_the_triton_kernel(rng, case):
    """Off Hopper the auto entries run the Triton kernel (interpret mode on a CPU), even where the rule picks a
    Mosaic GPU kernel."""
    _run(rng, case, jnp.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU with Mosaic GPU")
@pytest.mark.parametrize("allow_mgpu", [True, False], ids=["mgpu", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_auto_entries_gpu(rng, case, allow_mgpu):
    _run(rng, case, jnp.bfloat16, allow_mgpu=allow_mgpu)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU with Mosaic GPU")
def test_auto_entry_under_vmap_gpu(rng):
    """Two steps over two caches stacked, under jit(vmap), where the rule picks the warp-specialised kernel."""
    _, tokens, batch, kv_heads, group, head_dim, max_len, window, _, _ = CASES[3]
    shape = dict(tokens=tokens, batch=batch, kv_heads=kv_heads, group=group, head_dim=head_dim, max_len=max_len)
    steps = [_step(rng, **shape, window=window) for _ in range(2)]
    stack = lambda i, dtype: jnp.stack([jnp.asarray(s[i], dtype) for s in steps])
    ints = [jnp.stack([jnp.asarray(s[0][j], jnp.int32) for s in steps]) for j in (1, 2, 3)]
    out = jax.jit(jax.vmap(dispatch.multi_token_attention_auto))(
        stack(1, jnp.bfloat16), stack(2, jnp.bfloat16), stack(3, jnp.bfloat16), *ints
    )
    for i, (step, *_, ref) in enumerate(steps):
        _check(out[i], ref, step, "bfloat16")
