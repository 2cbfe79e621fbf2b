"""Windowed families on per-layer cache plans (full layers keep every position, windowed layers a ring) against HF
transformers (float32, CPU, random weights; the helpers of test_families): logits after a ragged prefill and
over 32 decode steps, greedy tokens, a speculative-style rollback after the rings have wrapped, with contiguous
and paged plans, and through the engine at concurrency 1 and 3."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from helpers_families import loaded_family
from test_families import STEPS, WINDOW

import jkv
from jkv.models import llama

SLACK = 12  # the padded prefill writes max(PROMPTS) = 11 tokens per sequence in one step
PAGE = 4  # small pages: a ring of window - 1 + slack = 19 positions is 6 pages, reused every few steps
XLA = llama.LlamaOptions(impl="xla")


@pytest.fixture(scope="module", params=["mistral", "gemma2", "gemma3"])
def family(request, tmp_path_factory):
    return loaded_family(request.param, tmp_path_factory)


def plan_cache(kind, config, batch, max_len=64):
    spec = jkv.CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, max_len)
    return jkv.make_cache(kind, spec, batch, windows=config.windows, slack=SLACK, page_size=PAGE)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f32", "paged"])
def test_matches_hf(family, kind):
    """Ragged prefill, 32 decode steps fed HF's greedy tokens, and at step 20 (rings wrapped) a 3-token step whose
    last token is wrong, rolled back by one across the wrap: logits and argmax against HF's."""
    name, loaded, prompts, refs = family
    if (name, kind) in (("gemma2", "paged"), ("gemma3", "f32")):
        pytest.skip("both layouts on Mistral; one each on Gemma 2 and 3 (CI time)")
    c = loaded.config
    lengths = np.array([len(p) for p in prompts], np.int32)
    padded = np.full((len(prompts), lengths.max()), 5, np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    cache = plan_cache(kind, c, len(prompts))
    assert isinstance(cache, jkv.caches.PlannedCache) and [w for w, _ in cache.plan.groups] == sorted(
        set(c.windows), key=lambda w: -1 if w is None else w
    )
    prefill = jax.jit(functools.partial(llama.prefill, config=c, options=XLA))
    logits, cache = prefill(loaded.params, cache, jnp.asarray(padded), jnp.asarray(lengths - 1))
    cache = cache.rollback(jnp.asarray(lengths))
    want = np.stack([ref[n - 1] for n, (_, ref) in zip(lengths, refs, strict=True)])
    assert rel_err(logits, want) < 1e-5
    step = jax.jit(functools.partial(llama.decode_step, config=c, options=XLA))
    forward = jax.jit(functools.partial(llama.forward, config=c, options=XLA))
    tokens = np.array([t for t, _ in refs])  # (B, STEPS)
    assert (np.asarray(logits).argmax(-1) == tokens[:, 0]).all()
    j = 0
    while j < STEPS - 1:
        if j == 20:  # two right tokens and a wrong one, then roll the wrong one back
            three = np.concatenate([tokens[:, j : j + 2], tokens[:, j : j + 1] + 1], axis=1)
            logits, cache = forward(loaded.params, cache, jnp.asarray(three, jnp.int32))
            for t in range(2):
                want = np.stack([ref[n + j + t] for n, (_, ref) in zip(lengths, refs, strict=True)])
                assert rel_err(logits[:, t], want) < 1e-5, (j, t)
            cache = cache.rollback(cache.lengths - 1)
            j += 2
            continue
        logits, cache = step(loaded.params, cache, jnp.asarray(tokens[:, j], jnp.int32))
        want = np.stack([ref[n + j] for n, (_, ref) in zip(lengths, refs, strict=True)])
        assert rel_err(logits, want) < 1e-5, j
        assert (np.asarray(logits).argmax(-1) == tokens[:, j + 1]).all(), j
        j += 1
    cache.check()
    assert int(cache.lengths.min()) > WINDOW - 1 + SLACK  # every ring wrapped


# test_families' engine tests run plans too (the engine's default for a config with windows): Mistral at 1 and 3,
# Gemma 2 at 1 (contiguous) and 3 (paged). These add Gemma 2 contiguous at 3 and Gemma 3.
ENGINE_RUNS = {("gemma2", 3, "default"), ("gemma3", 3, "paged")}


@pytest.mark.slow
@pytest.mark.parametrize("num_slots,cache", [(1, "default"), (3, "default"), (3, "paged")])
def test_engine_greedy(family, num_slots, cache):
    """Continuous batching on plans (chosen by default for a config with windows) gives HF's greedy tokens."""
    from jkv.serving import Engine, SamplingParams

    name, loaded, prompts, refs = family
    if (name, num_slots, cache) not in ENGINE_RUNS:
        pytest.skip("the engine is family-blind: a uniform and an alternating window at two concurrencies suffice")
    engine = Engine(loaded.params, loaded.config, num_slots=num_slots, max_len=64, cache=cache, verbose=False)
    assert isinstance(engine.cache, jkv.caches.PlannedCache)
    ids = [engine.submit(p, SamplingParams(max_new_tokens=STEPS)) for p in prompts]
    done = engine.run(show_progress=False)
    assert [c.id for c in done] == ids
    assert [c.tokens for c in done] == [t for t, _ in refs]
    engine.cache.check()


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["default", "paged"])
def test_engine_prefixes_and_drafts(family, cache):
    """Rings under the engine's prefix cache (each prompt sent twice: the second time a hit of whole pages) and
    speculative verification (rejected drafts rolled back in every ring): the tokens of full caches (which
    test_families checks against HF)."""
    from jkv.serving import Engine, SamplingParams

    name, loaded, _, _ = family
    if name != "gemma2":
        pytest.skip("one alternating-window family covers the engine's prefix and draft paths")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, loaded.config.vocab_size, n).tolist() for n in (20, 18)]  # a page of 16 and more
    params = SamplingParams(max_new_tokens=24)
    common = dict(num_slots=2, max_len=64, cache=cache, verbose=False)
    full = Engine(loaded.params, loaded.config, windowed=False, **common).generate(prompts, params, show_progress=False)
    engine = Engine(loaded.params, loaded.config, prefix_cache_bytes=1 << 20, speculative_tokens=2, **common)
    assert isinstance(engine.cache, jkv.caches.PlannedCache)
    first = engine.generate(prompts, params, show_progress=False)
    again = engine.generate(prompts, params, show_progress=False)
    assert first == full and again == full
    assert engine.stats.prefix_hits >= 2 and engine.stats.verify_steps > 0
    engine.cache.check()
