"""``jkv.attend`` / ``attend_write`` over every registered cache kind against float64 NumPy: ragged counts, T = 1
(the Pallas kernels in interpret mode where the kind has one) and T > 1, padding queries zero, a layer out of range
NaN, NaN poison in every position no query may read."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from kernel_inputs import fast_jit
from reference import attention_f64

import jkv
from jkv.caches import ERR_BAD_LAYER, ERR_WRITE_OVERFLOW

KINDS = jkv.kinds()
SPEC = jkv.CacheSpec(num_layers=2, num_kv_heads=2, head_dim=64, max_len=32, dtype=jnp.float32)
TOL = {"bf16": 2e-2, "q8": 3e-2, "fp8": 8e-2}
# Every test's cache holds 3 sequences and its steps run at layer 1 with 8 query heads, so that tests of equal
# step shapes share one compiled program per kind (compiling the interpret-mode kernels is most of the time).
BATCH, HEADS, LAYER = 3, 8, 1


def tol(kind):
    return next((v for k, v in TOL.items() if kind.startswith(k)), 1e-5)


def rand(rng, *shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def queries(rng, kind, *shape):
    """Random queries in the dtype a model of the kind's cache computes in."""
    return rand(rng, *shape, dtype=jnp.bfloat16 if kind == "bf16" else jnp.float32)


def counts_of(*counts):
    return jnp.asarray(counts, jnp.int32)


def filled(kind, rng, lengths, hidden=(0, 0, 0)):
    """A cache of 3 sequences whose committed positions hold random K/V, except the first ``hidden[b]`` of each, and
    whose others hold NaN."""
    assert len(lengths) == BATCH
    k, v = (rng.standard_normal((2, BATCH, 2, 32, 64)) for _ in range(2))
    for b, n in enumerate(hidden):
        k[:, b, :, :n] = v[:, b, :, :n] = np.nan
    past = (np.arange(32)[None, :] >= np.asarray(lengths)[:, None])[None, :, None, :, None]  # nothing there is read
    k, v = (np.where(past, np.nan, x).astype(np.float32) for x in (k, v))
    return _fill(k, v, counts_of(*lengths), kind=kind)


@functools.partial(fast_jit, static_argnames="kind")  # one compile, not hundreds of eager ops
def _fill(k, v, lengths, *, kind):
    """Every position of every layer written (NaN past the lengths), then rolled back to the lengths."""
    paged = jkv.caches.kind(kind).paged
    cache = jkv.make_cache(kind, SPEC, BATCH, **({"page_size": 8} if paged else {})).begin(32)
    for layer in range(2):
        cache = cache.write(layer, k[layer], v[layer])
    return cache.commit().rollback(lengths)


# The calls under test, jitted with the layer and options static (as a model's unrolled layers pass them): eager
# dispatch would compile every one of their operations separately.
def step_fn(q, k, v, cache, counts, *, impl, window=None, softcap=None):
    """``attend_write`` in a step of ``counts`` tokens, and ``attend`` again over the cache it returns."""
    options = dict(impl=impl, window=window, softcap=softcap)
    out, cache = jkv.attend_write(q, k, v, cache.begin(counts), LAYER, **options)
    return out, cache, jkv.attend(q, cache, LAYER, **options)


step = functools.partial(fast_jit, static_argnames=("impl", "window", "softcap"))(step_fn)


@functools.partial(fast_jit, static_argnames="impl")
def decode_step(q, k, v, cache, counts, layer, *, impl):
    """``step`` (at the static ``LAYER``) and ``attend_write`` of the same step at the traced ``layer``: one program
    for the T = 1 tests, whose kernels then compile once for both layers."""
    return *step_fn(q, k, v, cache, counts, impl=impl), jkv.attend_write(q, k, v, cache.begin(counts), layer, impl=impl)


begin = fast_jit(lambda cache, counts: cache.begin(counts))
write = fast_jit(lambda cache, counts, k, v: cache.begin(counts).write(LAYER, k, v))
decoded = fast_jit(lambda cache: cache.layer(LAYER, jnp.float32))


def step_reference(q, cache, counts):
    """float64 NumPy over the cache's own decoded values (the format's rounding is the cache's, not attention's)."""
    k, v = (np.asarray(x, np.float64) for x in decoded(cache))
    lengths = np.asarray(cache.lengths)
    t = q.shape[1]
    pos = np.where(np.arange(t)[None] < np.asarray(counts)[:, None], lengths[:, None] + np.arange(t)[None], -1)
    k, v = np.nan_to_num(k), np.nan_to_num(v)
    return attention_f64(q, k, v, pos)


# The XLA path is one reference over the cache's decoded layer for every kind: a plain, a Q8 and a paged FP8 one.
XLA_KINDS = ("bf16", "q8", "fp8-paged")
MATCHES = [(kind, "pallas") for kind in KINDS] + [(kind, "xla") for kind in XLA_KINDS]


@pytest.mark.parametrize(("kind", "impl"), MATCHES, ids=[f"{k}-{i}" for k, i in MATCHES])
def test_attend_write_matches_float64(rng, kind, impl):
    """T = 1 runs the decode kernel on the Pallas path (interpret mode here; T > 1 and flat steps:
    ``test_padded_and_flat_steps_match_float64``); ``attend`` over the written cache gives the same."""
    cache = filled(kind, rng, [5, 0, 17])
    counts = counts_of(1, 1, 0)
    q = queries(rng, kind, BATCH, 1, HEADS, 64)
    k, v = (rand(rng, BATCH, 2, 1, 64) for _ in range(2))
    out, cache, again, (at_layer, _) = decode_step(q, k, v, cache, counts, jnp.int32(LAYER), impl=impl)
    np.testing.assert_allclose(np.asarray(at_layer, np.float32), np.asarray(out, np.float32), rtol=1e-5, atol=1e-5)
    assert out.shape == q.shape and out.dtype == q.dtype
    want = step_reference(np.asarray(q, np.float64), cache, counts)
    live = np.asarray(counts)[:, None] > 0
    assert rel_err(np.asarray(out)[live], want[live]) < tol(kind)
    np.testing.assert_array_equal(np.asarray(out, np.float32)[~live], 0.0)
    np.testing.assert_allclose(np.asarray(again, np.float32), np.asarray(out, np.float32), rtol=1e-5, atol=1e-5)


# Out-of-range layers on the Pallas path of every kind (the fused append, the decode kernels); the XLA path's
# handling is the same for every kind: one contiguous and one paged.
BAD_LAYER = [(kind, "pallas") for kind in KINDS] + [("bf16", "xla"), ("fp8-paged", "xla")]


@pytest.mark.parametrize(("kind", "impl"), BAD_LAYER, ids=[f"{k}-{i}" for k, i in BAD_LAYER])
def test_traced_layer_and_bad_layer_is_nan(rng, kind, impl):
    """A layer traced under ``jit`` gives what the static layer gives; out of range, NaN and ERR_BAD_LAYER (and a
    static one out of range is refused)."""
    cache = filled(kind, rng, [3, 9, 30])
    ones = counts_of(1, 1, 1)
    q = queries(rng, kind, BATCH, 1, HEADS, 64)
    x = rand(rng, BATCH, 2, 1, 64)
    want, _, _, (out, _) = decode_step(q, x, x, cache, ones, jnp.int32(LAYER), impl=impl)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), rtol=1e-5, atol=1e-5)
    _, _, _, (out, bad) = decode_step(q, x, x, cache, ones, jnp.int32(-1), impl=impl)
    assert np.isnan(np.asarray(out, np.float32)).all()
    np.testing.assert_array_equal(bad.errors, [ERR_BAD_LAYER] * BATCH)
    with pytest.raises(ValueError, match="layer=2 out of range"):
        jkv.attend(q, bad, 2)


def test_reference_is_the_same_call(rng):
    cache = begin(filled("q8", rng, [4, 6, 1]), counts_of(2, 1, 0))
    q = rand(rng, BATCH, 2, 4, 64)
    by_attend = fast_jit(lambda q, cache: jkv.attend(q, cache, 0, impl="xla"))
    by_reference = fast_jit(
        lambda q, cache: jnp.where(
            (jnp.arange(2)[None] < cache.counts[:, None])[:, :, None, None], jkv.attend_reference(q, cache, 0), 0
        )
    )
    np.testing.assert_array_equal(by_attend(q, cache), by_reference(q, cache))


def test_attention_errors(rng):
    cache = begin(filled("f32", rng, [1, 1, 1]), counts_of(1, 1, 1))
    with pytest.raises(ValueError, match=r"q must have shape \[B, T, N, D\] \(or flat \[T, N, D\]\)"):
        jkv.attend(jnp.zeros((4, 64)), cache, 0)
    with pytest.raises(ValueError, match=r"q.shape=\(4, 4, 32\) does not match the cache's batch=3, D=64"):
        jkv.attend(jnp.zeros((4, 4, 32)), cache, 0)
    with pytest.raises(ValueError, match="num_q_heads=3 must be a positive multiple"):
        jkv.attend(jnp.zeros((3, 1, 3, 64)), cache, 0)
    with pytest.raises(ValueError, match="impl='cuda'"):
        jkv.attend(jnp.zeros((3, 1, 4, 64)), cache, 0, impl="cuda")
    with pytest.raises(TypeError, match="q must be a floating array, got dtype int32"):
        jkv.attend(jnp.zeros((3, 1, 4, 64), jnp.int32), cache, 0)
    k = jnp.ones((3, 2, 1, 64))  # [B, K, T=1, D]
    with pytest.raises(ValueError, match="q has T=3 tokens but k has T=1"):
        jkv.attend_write(jnp.ones((3, 3, 4, 64)), k, k, cache, 0)
    with pytest.raises(ValueError, match=r"mix a padded \[B, ...\] and a flat step"):
        jkv.attend_write(jnp.ones((1, 4, 64)), k, k, cache, 0)


@pytest.mark.parametrize("kind", ["bf16", "f32", "q8", "paged"])
def test_attend_write_equals_write_then_attend(rng, kind):
    """``jkv.attend_write`` on the Pallas path (interpret mode here): the same output, cache contents, lengths and
    error bits as ``cache.write`` then ``jkv.attend``; a sequence whose cache is full gets count 0 at ``begin``
    (ERR_WRITE_OVERFLOW), its positions stay as they were and its output is zero. Contiguous plain caches take
    the fused append kernel."""
    cache = filled(kind, rng, [31, 32, 16])  # sequence 1 is full: its step is refused
    ones = counts_of(1, 1, 1)
    q, k_new, v_new = queries(rng, kind, BATCH, 1, HEADS, 64), rand(rng, BATCH, 2, 1, 64), rand(rng, BATCH, 2, 1, 64)
    out, got, again, _ = decode_step(q, k_new, v_new, cache, ones, jnp.int32(LAYER), impl="pallas")
    written = write(cache, ones, k_new, v_new)  # under jit: the full one is flagged
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(written), strict=True):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    # the same cache: attending over it (the decode kernel, never the fused one) is attending over ``written``
    assert rel_err(out.astype(jnp.float32), again.astype(jnp.float32)) < 1e-6
    np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)
    np.testing.assert_array_equal(got.errors, [0, ERR_WRITE_OVERFLOW, 0])
    if kind in ("bf16", "f32"):
        jaxpr = step.trace(q, k_new, v_new, cache, ones, impl="pallas").jaxpr  # the static layer's step alone
        assert "jkv_decode_attention_append" in str(jaxpr)


@functools.partial(fast_jit, static_argnames="impl")
def padded_and_flat(q, k, v, flat_q, flat_k, flat_v, cache, counts, *, impl):
    """``step`` of the same tokens as a padded ``[B, T, ...]`` and as a flat ``[T, ...]`` step: one program."""
    return step_fn(q, k, v, cache, counts, impl=impl), step_fn(flat_q, flat_k, flat_v, cache, counts, impl=impl)


@pytest.mark.parametrize(("kind", "impl"), MATCHES, ids=[f"{k}-{i}" for k, i in MATCHES])
def test_padded_and_flat_steps_match_float64(rng, kind, impl):
    """T = 4 runs the multi-token kernel on the Pallas path (interpret mode here), padded as B * T rows or flat
    (``jkv.caches.tokens``: sequences' tokens back to back, a sequence of count 0 in the middle): each token gets
    what float64 gives it and the padded step gives it; padding queries and padding rows are 0; ``attend`` over the
    written cache gives the same. Sequence 0 starts empty, so its first token attends to itself alone."""
    counts = counts_of(4, 0, 3)
    cache = filled(kind, rng, [0, 2, 14])  # sequence 2 steps over a page boundary (pages of 8)
    q = queries(rng, kind, BATCH, 4, HEADS, 64)
    k, v = (rand(rng, BATCH, 2, 4, 64) for _ in range(2))
    rows = [(0, 0), (0, 1), (0, 2), (0, 3), (2, 0), (2, 1), (2, 2)]  # (sequence, token) of each live flat row
    flat_q = jnp.concatenate([jnp.stack([q[b, t] for b, t in rows]), q[1, :2]])  # two padding rows
    flat_k, flat_v = (jnp.concatenate([jnp.stack([x[b, :, t] for b, t in rows]), x[1, :, :2]]) for x in (k, v))
    (out, padded, again), (flat_out, _, flat_again) = padded_and_flat(
        q, k, v, flat_q, flat_k, flat_v, cache, counts, impl=impl
    )
    assert out.shape == q.shape and out.dtype == q.dtype and flat_out.shape == flat_q.shape
    want = step_reference(np.asarray(q, np.float64), padded, counts)
    live = np.arange(4)[None] < np.asarray(counts)[:, None]
    assert rel_err(np.asarray(out)[live], want[live]) < tol(kind)
    out, again, flat_out, flat_again = (np.asarray(x, np.float32) for x in (out, again, flat_out, flat_again))
    np.testing.assert_array_equal(out[~live], 0.0)
    np.testing.assert_allclose(again, out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flat_out[:7], np.stack([out[b, t] for b, t in rows]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(flat_out[7:], 0.0)
    np.testing.assert_allclose(flat_again, flat_out, rtol=1e-5, atol=1e-6)
    assert rel_err(flat_out[:7], np.stack([want[b, t] for b, t in rows])) < tol(kind)


# Window and soft cap together for each layout and format, each alone once (the window inside pages, the cap on
# Q8), on the Pallas path; the XLA path's reference applies them alike for every kind: each combination once.
WINDOWS = [(kind, 6, 1.5) for kind in ("f32", "paged", "q8", "fp8-paged")] + [("paged", 3, None), ("q8", None, 2.0)]
WINDOWS = [(*w, "pallas") for w in WINDOWS] + [("fp8-paged", 6, 1.5, "xla"), ("paged", 3, None, "xla")]
WINDOWS += [("q8", None, 2.0, "xla")]


@pytest.mark.parametrize(("kind", "window", "softcap", "impl"), WINDOWS, ids=["-".join(map(str, w)) for w in WINDOWS])
def test_window_and_softcap_match_float64(rng, kind, window, softcap, impl):
    """Positions before the window are NaN-poisoned in the cache: a query must not read them."""
    hidden = [0 if window is None else max(0, n - window + 1) for n in (9, 2, 20)]  # no query of the step sees
    cache = filled(kind, rng, [9, 2, 20], hidden)
    counts = counts_of(4, 1, 3)
    q = rand(rng, BATCH, 4, HEADS, 64)
    k, v = (rand(rng, BATCH, 2, 4, 64) for _ in range(2))
    out, cache, again = step(q, k, v, cache, counts, window=window, softcap=softcap, impl=impl)
    np.testing.assert_allclose(again, out, rtol=1e-5, atol=1e-6)
    kd, vd = (np.asarray(x, np.float64) for x in decoded(cache))
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
    cache = begin(filled("f32", rng, [3, 3, 3]), counts_of(1, 1, 1))
    q = jnp.ones((3, 1, 8, 64))
    for bad in (dict(window=0), dict(window=2.5), dict(softcap=0.0), dict(softcap=float("inf"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            jkv.attend(q, cache, 0, **bad)
    for bad in (dict(scale=float("nan")), dict(scale=-0.125), dict(scale=0.0), dict(scale=True)):
        with pytest.raises(ValueError, match=r"scale=.* must be a positive finite number \(or None: 1/sqrt\(D\)\)"):
            jkv.attend(q, cache, 0, **bad)  # NaN gave NaN outputs, a negative scale inverted the attention
        with pytest.raises(ValueError, match="scale="):
            jkv.attend_write(q, jnp.ones((3, 2, 1, 64)), jnp.ones((3, 2, 1, 64)), cache, 0, **bad)
    # NumPy scalars are numbers, as a model's config may hold them
    good = dict(window=np.int64(2), softcap=np.float32(30.0), scale=np.float32(0.125))
    ref = jkv.attend(q, cache, 0, window=2, softcap=30.0, scale=0.125)
    np.testing.assert_array_equal(jkv.attend(q, cache, 0, **good), ref)


# T = 1 with a window and a soft cap runs each kind's decode kernel (contiguous plain: the fused append in
# attend_write, the decode kernel in attend), never the multi-token kernel: the kernels' names in the step's jaxpr.
DECODE_NAMES = {"f32": "jkv_decode_attention", "q8": "jkv_q8_decode_attention", "paged": "jkv_paged_attention"}
DECODE_NAMES |= {"q8-paged": "jkv_paged_q8_attention", "fp8": "jkv_fp8_decode_attention"}
DECODE_NAMES["fp8-paged"] = "jkv_paged_fp8_attention"
DECODE_WINDOWS = [("f32", 6, 1.5), ("q8", 6, None), ("paged", 3, 1.5), ("q8-paged", 6, 2.0), ("fp8", 6, 1.5)]
DECODE_WINDOWS += [("fp8-paged", 3, None)]


def kernel_names(jaxpr) -> list[str]:
    return sorted(set(re.findall(r"name=(jkv_\w+)", str(jaxpr))))


@pytest.mark.parametrize(
    ("kind", "window", "softcap"), DECODE_WINDOWS, ids=["-".join(map(str, w)) for w in DECODE_WINDOWS]
)
def test_decode_step_window_and_softcap_take_the_decode_kernel(rng, kind, window, softcap):
    """Positions before each query's window hold NaN in the cache."""
    lengths = [9, 2, 20]
    cache = filled(kind, rng, lengths, [max(0, n - window + 1) for n in lengths])
    counts = counts_of(1, 1, 0)
    q = queries(rng, kind, BATCH, 1, HEADS, 64)
    k, v = (rand(rng, BATCH, 2, 1, 64) for _ in range(2))
    names = kernel_names(step.trace(q, k, v, cache, counts, window=window, softcap=softcap, impl="pallas").jaxpr)
    fused = ["jkv_decode_attention_append"] if kind == "f32" else []
    assert names == sorted({DECODE_NAMES[kind], *fused} | ({"jkv_merge_splits"} & set(names))), names
    out, cache, again = step(q, k, v, cache, counts, window=window, softcap=softcap, impl="pallas")
    np.testing.assert_allclose(np.asarray(again, np.float32), np.asarray(out, np.float32), rtol=1e-5, atol=1e-6)
    kd, vd = (np.asarray(x, np.float64) for x in decoded(cache))
    pos = np.where(np.asarray(counts) > 0, lengths, -1)[:, None]
    for b, n in enumerate(lengths):  # what the window hides (the reference must not read it either)
        kd[b, :, : max(0, n - window + 1)] = np.nan
    want = attention_f64(np.asarray(q, np.float64), kd, vd, pos, window=window, softcap=softcap)
    assert rel_err(np.asarray(out)[:2], want[:2]) < tol(kind)
    np.testing.assert_array_equal(np.asarray(out)[2], 0.0)


@functools.partial(fast_jit, static_argnames=("layout", "steps"))
def _planned(k, v, lengths, *, layout, steps):
    """A plan of a full layer 0 and a ring (window 6, slack 4, pages of 4) at layer 1, filled 4 tokens a step."""
    cache = jkv.make_cache(
        "paged" if layout == "paged" else "f32", SPEC, BATCH, windows=(None, 6), slack=4, page_size=4
    )

    def fill_step(i, cache):  # a loop, not unrolled: the step's operations compile once
        cache = cache.begin(jnp.clip(lengths - 4 * i, 0, 4))
        new_k, new_v = (jax.lax.dynamic_slice_in_dim(x, 4 * i, 4, axis=2) for x in (k, v))
        for layer in range(2):
            cache = cache.write(layer, new_k, new_v)
        return cache.commit()

    return jax.lax.fori_loop(0, steps, fill_step, cache)


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_ring_decode_step_takes_the_paged_decode_kernel(rng, layout):
    """The windowed layer of a per-layer plan is a ring: its block table names pages from the window's first page
    on (the released ones are -1), in position order, so the paged decode kernel reads it as it reads any paged
    cache. Positions before each query's window hold NaN."""
    window, softcap, lengths = 6, 1.5, np.array([13, 3, 22])
    k, v = (rng.standard_normal((BATCH, 2, 24, 64)) for _ in range(2))
    kp, vp = k.copy(), v.copy()
    for b, n in enumerate(lengths):
        kp[b, :, : max(0, n - window + 1)] = vp[b, :, : max(0, n - window + 1)] = np.nan
    cache = _planned(*(jnp.asarray(x, jnp.float32) for x in (kp, vp)), jnp.asarray(lengths), layout=layout, steps=6)
    assert (np.asarray(cache.groups[1].block_tables)[2, :3] == -1).all()  # pages that fell out of the ring
    ones = counts_of(1, 1, 1)
    q = rand(rng, BATCH, 1, HEADS, 64)
    k_new, v_new = (rand(rng, BATCH, 2, 1, 64) for _ in range(2))
    names = kernel_names(step.trace(q, k_new, v_new, cache, ones, window=window, softcap=softcap, impl="pallas").jaxpr)
    assert "jkv_paged_attention" in names and not any("multi_token" in n for n in names), names
    out, _, again = step(q, k_new, v_new, cache, ones, window=window, softcap=softcap, impl="pallas")
    np.testing.assert_allclose(np.asarray(again), np.asarray(out), rtol=1e-5, atol=1e-6)
    for x, new in ((k, k_new), (v, v_new)):
        x[np.arange(BATCH), :, lengths] = np.asarray(new)[:, :, 0]
    want = attention_f64(np.asarray(q, np.float64), k, v, lengths[:, None], window=window, softcap=softcap)
    assert rel_err(out, want) < 1e-5


@fast_jit
def _full_layer_step(q, k, v, cache, counts):
    """``attend_write`` at a plan's full layer 0, and ``write`` then ``attend`` of the same step: one program."""
    cache = cache.begin(counts)
    out, got = jkv.attend_write(q, k, v, cache, 0, impl="pallas")
    written = cache.write(0, k, v)
    return out, got, jkv.attend(q, written, 0, impl="pallas"), written


def test_plan_full_layer_takes_the_fused_append(rng):
    """A per-layer plan's full layer (a plain contiguous group) at T = 1: ``attend_write`` takes the fused append
    kernel, with the output, cache and error bits of ``write`` then ``attend``, and float64's output."""
    lengths = np.array([13, 3, 22])
    k, v = (rng.standard_normal((BATCH, 2, 24, 64)) for _ in range(2))
    cache = _planned(*(jnp.asarray(x, jnp.float32) for x in (k, v)), jnp.asarray(lengths), layout="contiguous", steps=6)
    ones = counts_of(1, 1, 1)
    q = rand(rng, BATCH, 1, HEADS, 64)
    k_new, v_new = (rand(rng, BATCH, 2, 1, 64) for _ in range(2))
    assert "jkv_decode_attention_append" in kernel_names(_full_layer_step.trace(q, k_new, v_new, cache, ones).jaxpr)
    out, got, want_out, want = _full_layer_step(q, k_new, v_new, cache, ones)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for x, new in ((k, k_new), (v, v_new)):
        x[np.arange(BATCH), :, lengths] = np.asarray(new)[:, :, 0]
    assert rel_err(out, attention_f64(np.asarray(q, np.float64), k, v, lengths[:, None])) < 1e-5
