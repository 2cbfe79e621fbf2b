"""``jkv.attend`` / ``attend_write`` over every registered cache kind against float64 NumPy: ragged counts, T = 1
(the Pallas kernels in interpret mode where the kind has one) and T > 1, padding queries zero, a layer out of range
NaN, NaN poison in every position no query may read."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from reference import attention_f64

import jkv
from jkv.caches import ERR_BAD_LAYER, ERR_WRITE_OVERFLOW

KINDS = jkv.kinds()
SPEC = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, max_len=32, dtype=jnp.float32)
TOL = {"bf16": 2e-2, "q8": 3e-2, "fp8": 8e-2}


def tol(kind):
    return next((v for k, v in TOL.items() if kind.startswith(k)), 1e-5)


def filled(kind, rng, lengths, poison=True):
    """A cache whose committed positions hold random K/V and whose others hold NaN."""
    k, v = (jnp.asarray(rng.standard_normal((2, len(lengths), 2, 32, 64)), jnp.float32) for _ in range(2))
    return _fill(k, v, jnp.asarray(lengths, jnp.int32), kind=kind, poison=poison)


@functools.partial(jax.jit, static_argnames=("kind", "poison"))  # one compile, not hundreds of eager ops
def _fill(k, v, lengths, *, kind, poison):
    paged = jkv.caches.kind(kind).paged
    cache = jkv.make_cache(kind, SPEC, lengths.shape[0], **({"page_size": 8} if paged else {}))
    if poison:  # every stored position NaN first: nothing past the lengths may be read
        nan = jnp.full((lengths.shape[0], 2, 32, 64), jnp.nan)
        cache = cache.begin(32)
        for layer in range(2):
            cache = cache.write(layer, nan, nan)
        cache = cache.commit().rollback(0)
    cache = cache.begin(lengths)
    for layer in range(2):
        cache = cache.write(layer, k[layer], v[layer])
    return cache.commit()


# The calls under test, jitted (the layer and options static, as a model's unrolled layers pass them): eager
# dispatch would compile every one of their operations separately.
attend = jax.jit(jkv.attend, static_argnums=2, static_argnames=("impl", "window", "softcap"))
attend_write = jax.jit(jkv.attend_write, static_argnums=4, static_argnames=("impl", "window", "softcap"))
decoded = jax.jit(lambda cache, layer: cache.layer(layer, jnp.float32), static_argnums=1)


def step_reference(q, cache, layer, counts):
    """float64 NumPy over the cache's own decoded values (the format's rounding is the cache's, not attention's)."""
    k, v = (np.asarray(x, np.float64) for x in decoded(cache, layer))
    lengths = np.asarray(cache.lengths)
    t = q.shape[1]
    pos = np.where(np.arange(t)[None] < np.asarray(counts)[:, None], lengths[:, None] + np.arange(t)[None], -1)
    k, v = np.nan_to_num(k), np.nan_to_num(v)
    return attention_f64(q, k, v, pos)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [1, 4])
def test_attend_write_matches_float64(rng, kind, impl, t):
    """T = 1 runs the decode kernel on the Pallas path, T = 4 the multi-token kernel (interpret mode here)."""
    cache = filled(kind, rng, [5, 0, 17])
    counts = jnp.asarray([t, max(t - 1, 1), 0 if t > 1 else 1], jnp.int32)
    q = jnp.asarray(rng.standard_normal((3, t, 8, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((3, 2, t, 64)), jnp.float32) for _ in range(2))
    cache = cache.begin(counts)
    out, cache = attend_write(q, k, v, cache, 1, impl=impl)
    assert out.shape == q.shape and out.dtype == q.dtype
    want = step_reference(np.asarray(q, np.float64), cache, 1, counts)
    live = np.arange(t)[None] < np.asarray(counts)[:, None]
    assert rel_err(np.asarray(out)[live], want[live]) < tol(kind)
    np.testing.assert_array_equal(np.asarray(out)[~live], 0.0)
    again = attend(q, cache, 1, impl=impl)
    np.testing.assert_allclose(again, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_impls_agree_and_bad_layer_is_nan(rng, kind):
    cache = filled(kind, rng, [3, 9]).begin(1)
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 64)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 2, 1, 64)), jnp.float32)
    outs = {impl: attend_write(q, x, x, cache, 0, impl=impl)[0] for impl in ("xla", "pallas")}
    assert rel_err(outs["pallas"], outs["xla"]) < tol(kind)
    for impl in ("xla", "pallas"):
        out, bad = jax.jit(lambda c, i, impl=impl: jkv.attend_write(q, x, x, c, i, impl=impl))(cache, jnp.int32(-1))
        assert np.isnan(np.asarray(out)).all()
        np.testing.assert_array_equal(bad.errors, [ERR_BAD_LAYER] * 2)
    with pytest.raises(ValueError, match="layer=2 out of range"):
        jkv.attend(q, cache, 2)


def test_reference_is_the_same_call(rng):
    cache = filled("q8", rng, [4, 6]).begin(jnp.asarray([2, 1]))
    q = jnp.asarray(rng.standard_normal((2, 2, 4, 64)), jnp.float32)
    np.testing.assert_array_equal(
        jkv.attend(q, cache, 0, impl="xla"),
        jnp.where(
            (jnp.arange(2)[None] < cache.counts[:, None])[:, :, None, None], jkv.attend_reference(q, cache, 0), 0
        ),
    )


def test_attention_errors(rng):
    cache = filled("f32", rng, [1, 1], poison=False).begin(1)
    with pytest.raises(ValueError, match=r"q must have shape \[B, T, N, D\] \(or flat \[T, N, D\]\)"):
        jkv.attend(jnp.zeros((4, 64)), cache, 0)
    with pytest.raises(ValueError, match=r"q.shape=\(3, 4, 32\) does not match the cache's batch=2, D=64"):
        jkv.attend(jnp.zeros((3, 4, 32)), cache, 0)
    with pytest.raises(ValueError, match="num_q_heads=3 must be a positive multiple"):
        jkv.attend(jnp.zeros((2, 1, 3, 64)), cache, 0)
    with pytest.raises(ValueError, match="impl='cuda'"):
        jkv.attend(jnp.zeros((2, 1, 4, 64)), cache, 0, impl="cuda")
    with pytest.raises(TypeError, match="q must be a floating array, got dtype int32"):
        jkv.attend(jnp.zeros((2, 1, 4, 64), jnp.int32), cache, 0)
    k = jnp.ones((2, 2, 1, 64))  # [B, K, T=1, D]
    with pytest.raises(ValueError, match="q has T=3 tokens but k has T=1"):
        jkv.attend_write(jnp.ones((2, 3, 4, 64)), k, k, cache, 0)
    with pytest.raises(ValueError, match=r"mix a padded \[B, ...\] and a flat step"):
        jkv.attend_write(jnp.ones((1, 4, 64)), k, k, cache, 0)


@pytest.mark.parametrize("kind", ["bf16", "f32", "q8", "paged"])
def test_attend_write_equals_write_then_attend(rng, kind):
    """``jkv.attend_write`` on the Pallas path (interpret mode here): the same output, cache contents, lengths and
    error bits as ``cache.write`` then ``jkv.attend``; a sequence whose cache is full gets count 0 at ``begin``
    (ERR_WRITE_OVERFLOW), its positions stay as they were and its output is zero. Contiguous plain caches take
    the fused append kernel."""
    dtype = jnp.float32 if kind == "f32" else jnp.bfloat16
    spec = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, max_len=48, dtype=dtype)
    options = {"page_size": 16, "num_pages": 12} if kind == "paged" else {}
    rand = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    kv = [(rand(3, 2, 48, 64), rand(3, 2, 48, 64)) for _ in range(2)]

    @jax.jit
    def fill(kv):
        cache = jkv.make_cache(kind, spec, 3, **options).begin(48)
        for layer, (k, v) in enumerate(kv):
            cache = cache.write(layer, k, v)
        return cache.commit().rollback(jnp.asarray([47, 48, 16]))  # sequence 1 is full: its step is refused

    cache = fill(kv)
    q, k_new, v_new = rand(3, 1, 8, 64).astype(dtype), rand(3, 2, 1, 64), rand(3, 2, 1, 64)
    step = jax.jit(lambda c: jkv.attend_write(q, k_new, v_new, c.begin(1), 1, impl="pallas"))
    out, got = step(cache)
    written = jax.jit(lambda c: c.begin(1).write(1, k_new, v_new))(cache)  # under jit: the full one is flagged
    want = attend(q, written, 1, impl="pallas")
    assert rel_err(out.astype(jnp.float32), want.astype(jnp.float32)) < 1e-6
    np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)
    np.testing.assert_array_equal(got.errors, [0, ERR_WRITE_OVERFLOW, 0])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(written), strict=True):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    if kind in ("bf16", "f32"):
        assert "jkv_decode_attention_append" in str(jax.make_jaxpr(step)(cache))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("kind", KINDS)
def test_flat_attend_equals_padded(rng, kind, impl):
    """A flat step (``jkv.caches.tokens``) gives each token what the padded step gives it; padding rows are 0."""
    counts = jnp.asarray([3, 0, 1], jnp.int32)
    cache = filled(kind, rng, [5, 2, 17])
    q = jnp.asarray(rng.standard_normal((3, 3, 8, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((3, 2, 3, 64)), jnp.float32) for _ in range(2))
    padded_out, padded = attend_write(q, k, v, cache.begin(counts), 1, impl=impl)
    rows = [(0, 0), (0, 1), (0, 2), (2, 0)]  # (sequence, token) of each live flat row
    flat_q = jnp.concatenate([jnp.stack([q[b, t] for b, t in rows]), q[1, :2]])  # two padding rows
    flat_k, flat_v = (jnp.concatenate([jnp.stack([x[b, :, t] for b, t in rows]), x[1, :, :2]]) for x in (k, v))
    out, _ = attend_write(flat_q, flat_k, flat_v, cache.begin(counts), 1, impl=impl)
    assert out.shape == flat_q.shape
    np.testing.assert_allclose(out[:4], jnp.stack([padded_out[b, t] for b, t in rows]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[4:], 0.0)
    want = step_reference(np.asarray(q, np.float64), padded, 1, counts)
    assert rel_err(np.asarray(out[:4]), np.stack([want[b, t] for b, t in rows])) < tol(kind)


@functools.partial(jax.jit, static_argnames="hidden")
def _hide(cache, rest, *, hidden):
    """``cache`` with NaN at each sequence's first ``hidden[b]`` positions and ``rest``'s values after them."""
    cache = cache.rollback(jnp.zeros(3, jnp.int32)).begin(jnp.asarray(hidden, jnp.int32))
    nan = jnp.full((3, 2, max(hidden), 64), jnp.nan)
    cache = cache.write(0, nan, nan).write(1, nan, nan).commit()
    cache = cache.rollback(jnp.asarray(hidden, jnp.int32))
    cache = cache.begin(jnp.asarray([9 - hidden[0], 2 - hidden[1], 20 - hidden[2]], jnp.int32))
    for layer in range(2):
        kl, vl = rest.layer(layer, jnp.float32)
        take = lambda x: jnp.stack([jnp.roll(x[b], -hidden[b], axis=1) for b in range(3)])
        cache = cache.write(layer, take(kl), take(vl))
    return cache.commit()


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("kind", ["f32", "paged", "q8", "fp8-paged"])
@pytest.mark.parametrize(("window", "softcap"), [(3, None), (None, 2.0), (6, 1.5)], ids=["w3", "cap2", "w6_cap1.5"])
def test_window_and_softcap_match_float64(rng, kind, window, softcap, impl):
    """Positions before the window are NaN-poisoned in the cache: a query must not read them."""
    cache = filled(kind, rng, [9, 2, 20])
    if window is not None:
        hidden = tuple(max(0, n - window + 1) for n in (9, 2, 20))  # positions no query of the step sees
        cache = _hide(cache, filled(kind, rng, [9, 2, 20]), hidden=hidden)
    counts = jnp.asarray([4, 1, 3], jnp.int32)
    q = jnp.asarray(rng.standard_normal((3, 4, 8, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((3, 2, 4, 64)), jnp.float32) for _ in range(2))
    out, cache = attend_write(q, k, v, cache.begin(counts), 0, window=window, softcap=softcap, impl=impl)
    kd, vd = (np.asarray(x, np.float64) for x in decoded(cache, 0))
    lengths, c = np.asarray(cache.lengths), np.asarray(counts)
    pos = np.where(np.arange(4)[None] < c[:, None], lengths[:, None] + np.arange(4)[None], -1)
    if window is not None:  # poison what the window hides (the reference must not read it either)
        for b in range(3):
            kd[b, :, : max(0, lengths[b] - window + 1)] = np.nan
    want = attention_f64(np.asarray(q, np.float64), kd, vd, pos, window=window, softcap=softcap)
    live = pos >= 0
    assert rel_err(np.asarray(out)[live], want[live]) < tol(kind)
    np.testing.assert_array_equal(np.asarray(out)[~live], 0.0)


def test_window_and_softcap_errors(rng):
    cache = filled("f32", rng, [3]).begin(1)
    q = jnp.ones((1, 1, 8, 64))
    for bad in (dict(window=0), dict(window=2.5), dict(softcap=0.0), dict(softcap=float("inf"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            jkv.attend(q, cache, 0, **bad)
