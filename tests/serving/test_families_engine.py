"""The engine on each model family (tests/helpers_families.py: small random HF models saved by transformers and
loaded by jkv): greedy tokens identical to HF's for 4 prompts whose length plus 32 new tokens passes the window,
at concurrencies 1, 2 and 4 (4 requests on 3 slots: one waits for a slot), on a contiguous cache with prompt-lookup
drafts whose rejection rolls the cache back and on a paged cache without. A config with windows runs on the
engine's default per-layer cache plan (windowed layers on rings, which the prompts plus 32 tokens wrap;
tests/models/test_families_plan.py checks the plans step by step).

One engine per cache kind serves every concurrency (its step compiles once, for one token bucket; an engine with
drafts runs only its verifying step), so slots are reused across rounds. Mistral (a window on every layer) and
Gemma 2 (alternating windows, soft caps) run by default; the others are marked slow: the engine is family-blind,
and each decoder is checked step by step in tests/models/test_families.py."""

import numpy as np
import pytest
from helpers_families import FAMILIES, PROMPTS, STEPS, hf_greedy, hf_model

from jkv.caches import PlannedCache
from jkv.loading import load_safetensors
from jkv.serving import Engine, SamplingParams

FAST = ("mistral", "gemma2")


CONCURRENCY = (4, 1, 2)  # requests submitted together per round


@pytest.fixture(scope="module", params=[pytest.param(f, marks=() if f in FAST else pytest.mark.slow) for f in FAMILIES])
def family(request, tmp_path_factory):
    """(loaded jkv model, prompts, each prompt's HF greedy tokens)."""
    model = hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    loaded = load_safetensors(directory, "f32", progress=False)
    rng = np.random.default_rng(len(request.param) + 1)
    prompts = [rng.integers(3, loaded.config.vocab_size, n).tolist() for n in PROMPTS]
    return loaded, prompts, [tokens for tokens, _ in hf_greedy(model, prompts)]


@pytest.mark.parametrize("cache", ["default", "paged"])
def test_engine_matches_hf_greedy(family, cache):
    """HF's tokens at every concurrency; on the contiguous cache with 3 draft tokens a step, verified and rolled
    back past the window when rejected."""
    loaded, prompts, want = family
    drafts = 3 if cache == "default" else 0
    engine = Engine(
        loaded.params, loaded.config, num_slots=3, max_len=64, cache=cache, buckets=(16,), max_batch_tokens=16,
        speculative_tokens=drafts, verbose=False,
    )  # fmt: skip
    assert isinstance(engine.cache, PlannedCache) == (loaded.config.windows is not None)
    for concurrency in CONCURRENCY:
        got = {}
        for start in range(0, len(prompts), concurrency):
            batch = range(start, min(start + concurrency, len(prompts)))
            ids = {engine.submit(prompts[i], SamplingParams(max_new_tokens=STEPS)): i for i in batch}
            for done in engine.run(show_progress=False):
                got[ids[done.id]] = done.tokens
                assert done.finish_reason == "length", (concurrency, ids[done.id], done.finish_reason)
        assert [got[i] for i in range(len(prompts))] == want, concurrency
    engine.cache.check()  # no error bit recorded under jit (a ring or page table out of bounds)
    if drafts:
        assert engine.stats.accepted_tokens < engine.stats.drafted_tokens, "no draft was rejected: nothing rolled back"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma2"], indirect=True)
@pytest.mark.parametrize("cache", ["default", "paged"])
def test_engine_prefixes_and_drafts_on_plans(family, cache):
    """Rings under the engine's prefix cache (each prompt sent twice: the second time a hit of whole pages) and
    speculative verification (rejected drafts rolled back in every ring), on Gemma 2's plan (alternating windows):
    HF's greedy tokens (prompts of 20 and 18 tokens: the first chunk of a prompt fills the step of 16). The
    engines of the tests above in shape: their compiled steps serve."""
    loaded, _, _ = family
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, loaded.config.vocab_size, n).tolist() for n in (20, 18)]  # a page of 16 and more
    want = [tokens for tokens, _ in hf_greedy(hf_model("gemma2"), prompts, 24)]
    params = SamplingParams(max_new_tokens=24)
    engine = Engine(
        loaded.params, loaded.config, num_slots=3, max_len=64, cache=cache, buckets=(16,), max_batch_tokens=16,
        prefix_cache_bytes=1 << 20, speculative_tokens=3, verbose=False,
    )  # fmt: skip
    assert isinstance(engine.cache, PlannedCache)
    first = engine.generate(prompts, params, show_progress=False)
    again = engine.generate(prompts, params, show_progress=False)
    assert first == want and again == want
    assert engine.stats.prefix_hits >= 2 and engine.stats.verify_steps > 0
    engine.cache.check()
