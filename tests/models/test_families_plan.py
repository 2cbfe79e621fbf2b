"""Windowed families on per-layer cache plans (full layers keep every position, windowed layers a ring) against HF
transformers (float32, CPU, random weights; the helpers of test_families): logits after a ragged prefill and
over 32 decode steps, greedy tokens, a speculative-style rollback after the rings have wrapped, with contiguous
and paged plans, and through the engine at concurrency 1 and 3."""

import numpy as np
import pytest
from conftest import rel_err
from helpers_families import hf_greedy, hf_model, loaded_family, padded_prompts, teacher_forced
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
    """Ragged prefill, decode steps fed HF's greedy tokens (one compiled scan), and at step 20 (rings wrapped) a
    3-token step whose last token is wrong, rolled back by one across the wrap: logits and argmax against HF's."""
    name, loaded, prompts, refs = family
    if (name, kind) in (("gemma2", "paged"), ("gemma3", "f32")):
        pytest.skip("both layouts on Mistral; one each on Gemma 2 and 3 (CI time)")
    c = loaded.config
    padded, lengths = padded_prompts(prompts)
    cache = plan_cache(kind, c, len(prompts))
    assert isinstance(cache, jkv.caches.PlannedCache) and [w for w, _ in cache.plan.groups] == sorted(
        set(c.windows), key=lambda w: -1 if w is None else w
    )
    tokens = np.array([t for t, _ in refs])  # (B, STEPS)
    logits, steps, cache = teacher_forced(
        loaded.params, cache, padded, lengths, tokens[:, :-1], config=c, options=XLA, wrong_at=20
    )
    logits, steps = np.asarray(logits), np.asarray(steps)
    want = np.stack([ref[n - 1] for n, (_, ref) in zip(lengths, refs, strict=True)])
    assert rel_err(logits, want) < 1e-5
    assert (logits.argmax(-1) == tokens[:, 0]).all()
    for j in range(STEPS - 1):  # columns 20 and 21: the 3-token step's first two rows
        want = np.stack([ref[n + j] for n, (_, ref) in zip(lengths, refs, strict=True)])
        assert rel_err(steps[:, j], want) < 1e-5, j
        assert (steps[:, j].argmax(-1) == tokens[:, j + 1]).all(), j
    np.testing.assert_array_equal(cache.lengths, lengths + STEPS - 1)
    cache.check()
    assert int(cache.lengths.min()) > WINDOW - 1 + SLACK  # every ring wrapped


# test_families' engine tests run plans too (the engine's default for a config with windows): Mistral at 1 and 3,
# Gemma 2 at 1 (contiguous) and 3 (paged). These add Gemma 2 contiguous at 3 and Gemma 3.
ENGINE_RUNS = {("gemma2", 3, "default"), ("gemma3", 3, "paged")}
# One token bucket: the mixed step compiles once per engine, and a contiguous plan's slack (max_batch_tokens) leaves
# rings of window - 1 + 16 positions, which the prompts plus 32 tokens wrap.
ONE_BUCKET = dict(max_len=64, buckets=(16,), max_batch_tokens=16, verbose=False)


@pytest.mark.slow
@pytest.mark.parametrize("num_slots,cache", [(1, "default"), (3, "default"), (3, "paged")])
def test_engine_greedy(family, num_slots, cache):
    """Continuous batching on plans (chosen by default for a config with windows) gives HF's greedy tokens."""
    from jkv.serving import Engine, SamplingParams

    name, loaded, prompts, refs = family
    if (name, num_slots, cache) not in ENGINE_RUNS:
        pytest.skip("the engine is family-blind: a uniform and an alternating window at two concurrencies suffice")
    engine = Engine(loaded.params, loaded.config, num_slots=num_slots, cache=cache, **ONE_BUCKET)
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
    speculative verification (rejected drafts rolled back in every ring): HF's greedy tokens (prompts of 20 and 18
    tokens: the first chunk of a prompt fills the step of 16)."""
    from jkv.serving import Engine, SamplingParams

    name, loaded, _, _ = family
    if name != "gemma2":
        pytest.skip("one alternating-window family covers the engine's prefix and draft paths")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, loaded.config.vocab_size, n).tolist() for n in (20, 18)]  # a page of 16 and more
    want = [tokens for tokens, _ in hf_greedy(hf_model(name), prompts, 24)]
    params = SamplingParams(max_new_tokens=24)
    engine = Engine(
        loaded.params, loaded.config, num_slots=2, cache=cache, prefix_cache_bytes=1 << 20, speculative_tokens=2,
        **ONE_BUCKET,
    )  # fmt: skip
    assert isinstance(engine.cache, jkv.caches.PlannedCache)
    first = engine.generate(prompts, params, show_progress=False)
    again = engine.generate(prompts, params, show_progress=False)
    assert first == want and again == want
    assert engine.stats.prefix_hits >= 2 and engine.stats.verify_steps > 0
    engine.cache.check()
