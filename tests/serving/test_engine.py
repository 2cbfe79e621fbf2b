"""Engine: continuous batching equals generating alone; prefix cache; speculative decoding; no slot leaks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkv import KVCache
from jkv.caches import CacheSpec
from jkv.models import llama
from jkv.serving import Engine, SamplingParams
from jkv.serving.prefix import common_prefix_length

CONFIG = llama.LlamaConfig(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16
)
MAX_LEN = 64


@pytest.fixture(scope="module")
def params():
    # A larger init scale gives peaked next-token distributions: greedy ties are then far from rounding.
    return llama.init_params(CONFIG, jax.random.key(7), jnp.float32, scale=0.2)


_STEP = jax.jit(lambda p, c, t: llama.decode_step(p, c, t, config=CONFIG))


def greedy_alone(params, prompt, n):
    """Reference without the engine: feed the prompt one token at a time, then decode greedily (one sequence)."""
    cache = KVCache.init(CacheSpec(CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim, MAX_LEN), 1)
    for token in prompt:
        logits, cache = _STEP(params, cache, jnp.asarray([token], jnp.int32))
    out = [int(jnp.argmax(logits[0]))]
    while len(out) < n and len(prompt) + len(out) < MAX_LEN:
        logits, cache = _STEP(params, cache, jnp.asarray([out[-1]], jnp.int32))
        out.append(int(jnp.argmax(logits[0])))
    return out


def prompts(rng, count, lo=2, hi=12):
    return [rng.integers(0, CONFIG.vocab_size, size=rng.integers(lo, hi)).tolist() for _ in range(count)]


@pytest.mark.parametrize("num_slots,cache", [(1, "default"), (3, "default"), (8, "default"), (3, "paged")])
def test_batched_greedy_equals_alone(params, rng, num_slots, cache):
    ps = prompts(rng, 7)
    want = [greedy_alone(params, p, 10) for p in ps]
    engine = Engine(params, CONFIG, num_slots=num_slots, max_len=MAX_LEN, cache=cache)
    ids = [engine.submit(p, SamplingParams(max_new_tokens=10)) for p in ps[:4]]
    engine.step()  # requests arrive while others are mid-generation
    engine.step()
    ids += [engine.submit(p, SamplingParams(max_new_tokens=10)) for p in ps[4:]]
    done = engine.run(show_progress=False)
    assert [c.id for c in done] == ids
    assert [c.tokens for c in done] == want
    assert all(c.finish_reason == "length" for c in done)


def test_streaming_stop_tokens_and_max_len(params, rng):
    p = prompts(rng, 1)[0]
    alone = greedy_alone(params, p, 40)
    streamed = []
    engine = Engine(params, CONFIG, num_slots=2, max_len=MAX_LEN)
    stop = alone[5]
    engine.submit(p, SamplingParams(max_new_tokens=40, stop_tokens=(stop,)), on_token=lambda i, t: streamed.append(t))
    long_prompt = rng.integers(0, CONFIG.vocab_size, size=MAX_LEN - 3).tolist()
    engine.submit(long_prompt, SamplingParams(max_new_tokens=40))
    first, second = engine.run(show_progress=False)
    # The stop token ends the request and is neither returned nor streamed.
    assert first.finish_reason == "stop" and first.tokens == alone[: alone.index(stop)] == streamed
    assert second.finish_reason == "max_len" and len(second.tokens) == 3  # fills the row: 61 + 3 = 64 positions
    assert second.tokens == greedy_alone(params, long_prompt, 3)


def test_sampled_requests_do_not_depend_on_batching(params, rng):
    ps = prompts(rng, 5)
    sp = [SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=i) for i in range(5)]

    def run(num_slots):
        engine = Engine(params, CONFIG, num_slots=num_slots, max_len=MAX_LEN)
        for p, s in zip(ps, sp, strict=True):
            engine.submit(p, s)
        return [c.tokens for c in engine.run(show_progress=False)]

    one, four = run(1), run(4)
    assert one == four
    assert one != [greedy_alone(params, p, 8) for p in ps]  # it did sample


@pytest.mark.parametrize("cache", ["default", "paged"])
def test_prefix_cache_hits_match_misses_and_skip_prefill(params, rng, cache):
    system = rng.integers(0, CONFIG.vocab_size, size=20).tolist()
    ps = [system + tail for tail in prompts(rng, 4, 1, 5)]
    want = [greedy_alone(params, p, 6) for p in ps]
    engine = Engine(params, CONFIG, num_slots=2, max_len=MAX_LEN, prefix_cache_bytes=1 << 20, cache=cache)
    engine.submit(system, SamplingParams(max_new_tokens=1))  # warms the cache with the shared prefix
    engine.run(show_progress=False)
    before = engine.stats.prefill_tokens
    for p in ps:
        engine.submit(p, SamplingParams(max_new_tokens=6))
    done = engine.run(show_progress=False)
    assert [c.tokens for c in done] == want
    assert all(c.cached_prompt_tokens >= len(system) for c in done)
    seen, prefill = [system], 0  # each prompt reuses its longest common prefix with any earlier prompt
    for p in ps:
        prefill += len(p) - min(max(common_prefix_length(p, q) for q in seen), len(p) - 1)
        seen.append(p)
    assert engine.stats.prefill_tokens - before == prefill
    # The same prompt again restores everything but its last token.
    engine.submit(ps[0], SamplingParams(max_new_tokens=6))
    (again,) = engine.run(show_progress=False)
    assert again.tokens == want[0] and again.cached_prompt_tokens == len(ps[0]) - 1


@pytest.mark.parametrize("cache", ["default", "paged"])
def test_prompts_sharing_a_prefix_with_an_earlier_prompt_reuse_it(params, rng, cache):
    """No bare system prompt is ever submitted: the common prefix of two full prompts is what a later one reuses.
    With a paged cache, concurrent requests hold the shared pages once (pinned by the entry, refcounted)."""
    system = rng.integers(0, CONFIG.vocab_size, size=37).tolist()  # 2 full pages of 16 and 5 positions
    ps = [[*system, i, *tail] for i, tail in enumerate(prompts(rng, 5, 1, 5))]  # tails differ at their first token
    want = [greedy_alone(params, p, 5) for p in ps]
    engine = Engine(params, CONFIG, num_slots=4, max_len=MAX_LEN, prefix_cache_bytes=1 << 20, cache=cache)
    engine.submit(ps[0], SamplingParams(max_new_tokens=5))
    engine.step()  # admitted alone: a miss, which becomes an entry
    for p in ps[1:]:
        engine.submit(p, SamplingParams(max_new_tokens=5))
    engine.step()  # the other four are admitted from the entry while the first still runs
    if cache == "paged":
        tables = np.asarray(engine.cache.block_tables)
        assert len({int(t) for t in tables[:, 0]}) == 1 and len({int(t) for t in tables[:, 1]}) == 1  # shared
        assert len({int(t) for t in tables[:, 2]}) == 4  # the partly filled page: each slot has its own copy
        hist = np.bincount(tables[tables >= 0], minlength=engine.cache.num_pages)
        np.testing.assert_array_equal(np.asarray(engine.cache.refcounts), hist + np.asarray(engine.cache.pins))
    done = engine.run(show_progress=False)
    assert [c.tokens for c in done] == want
    assert [c.cached_prompt_tokens for c in done] == [0] + [len(system)] * 4
    assert engine.stats.prefill_tokens == len(ps[0]) + sum(len(p) - len(system) for p in ps[1:])
    if cache == "paged":  # every page still held is held by an entry; dropping the entries frees the pool
        assert (np.asarray(engine.cache.refcounts) == np.asarray(engine.cache.pins)).all()
        engine.prefix_cache.clear()
        assert int(engine.cache.num_free_pages()) == engine.cache.num_pages


@pytest.mark.parametrize("cache", ["default", "paged"])
def test_speculative_decoding_equals_greedy_and_rolls_back(params, rng, cache):
    pattern = rng.integers(0, CONFIG.vocab_size, size=6).tolist()
    ps = [pattern * 3, (pattern * 2)[:9], prompts(rng, 1)[0]]
    want = [greedy_alone(params, p, 24) for p in ps]
    engine = Engine(params, CONFIG, num_slots=2, max_len=MAX_LEN, speculative_tokens=4, cache=cache)
    for p in ps:
        engine.submit(p, SamplingParams(max_new_tokens=24))
    done = engine.run(show_progress=False)
    assert [c.tokens for c in done] == want
    st = engine.stats
    assert st.verify_steps > 0 and st.drafted_tokens > 0
    assert st.accepted_tokens < st.drafted_tokens  # some drafts rejected: the cache was rolled back past them
    assert not np.asarray(engine.cache.lengths).any()


def test_q8_slots_do_not_depend_on_batching_or_prefix_hits(rng):
    """Q8 slots (head_dim a multiple of 32): batched, prefix-cached and speculative runs all give the same tokens."""
    config = llama.LlamaConfig(96, 64, 128, 2, 4, 2, 32)
    q8_params = llama.init_params(config, jax.random.key(5), jnp.float32, scale=0.2)
    system = rng.integers(0, config.vocab_size, size=12).tolist()
    ps = [system] + [system + tail for tail in prompts(rng, 4, 1, 5)]  # the bare prefix first: later ones hit it

    def run(**kw):
        engine = Engine(q8_params, config, max_len=MAX_LEN, cache="q8", **kw)
        for p in ps:
            engine.submit(p, SamplingParams(max_new_tokens=8))
        out = [c.tokens for c in engine.run(show_progress=False)]
        return out, engine

    alone, _ = run(num_slots=1)
    batched, engine = run(num_slots=3, prefix_cache_bytes=1 << 20)
    assert batched == alone
    assert engine.stats.cached_prompt_tokens > 0  # later prompts restored the shared prefix from Q8 snapshots
    assert run(num_slots=2, speculative_tokens=3)[0] == alone


@pytest.mark.parametrize("cache", ["default", "paged"])
def test_no_slot_leaks_after_many_random_requests(params, cache):
    rng = np.random.default_rng(1)
    engine = Engine(params, CONFIG, num_slots=4, max_len=32, prefix_cache_bytes=1 << 16, prefill_bucket=8, cache=cache)
    finished = 0
    for _ in range(1000):
        prompt = rng.integers(0, CONFIG.vocab_size, size=rng.integers(1, 6)).tolist()
        stops = tuple(rng.integers(0, CONFIG.vocab_size, size=3).tolist())
        engine.submit(prompt, SamplingParams(max_new_tokens=int(rng.integers(1, 4)), stop_tokens=stops))
        if rng.random() < 0.5:
            engine.step()
            finished += len(engine.pop_finished())
    finished += len(engine.run(show_progress=False))
    assert finished == 1000
    assert engine.num_active == 0 and engine.num_pending == 0
    assert not np.asarray(engine.cache.lengths).any()
    assert not np.asarray(engine.cache.errors).any()
    if cache == "paged":  # only the prefix cache's entries hold pages; evicting them all frees the whole pool
        assert engine.prefix_cache.evictions > 0
        assert (np.asarray(engine.cache.refcounts) == np.asarray(engine.cache.pins)).all()
        engine.prefix_cache.clear()
        assert int(engine.cache.num_free_pages()) == engine.cache.num_pages


def test_default_slot_count_comes_from_memory_planner(params, capsys):
    engine = Engine(params, CONFIG, max_len=MAX_LEN)
    assert 1 <= engine.num_slots <= 64
    assert "slots of max_len=64" in capsys.readouterr().err


@pytest.mark.parametrize(
    "call, exc, text",
    [
        (lambda e: e.submit([]), ValueError, "at least one token"),
        (lambda e: e.submit(list(range(65))), ValueError, "prompt of 65 tokens does not fit max_len=64"),
        (lambda e: e.submit([1, 500]), ValueError, "token ids [500] outside the vocabulary [0, 96)"),
        (lambda e: e.submit([1], "greedy"), TypeError, "SamplingParams"),
        (lambda e: SamplingParams(max_new_tokens=0), ValueError, "max_new_tokens must be a positive int, got 0"),
        (lambda e: SamplingParams(temperature=-1.0), ValueError, "temperature must be a finite number >= 0, got -1.0"),
        (lambda e: SamplingParams(top_k=-2), ValueError, "top_k must be an int >= 0"),
        (lambda e: SamplingParams(top_p=0.0), ValueError, "top_p must lie in (0, 1], got 0.0"),
        (lambda e: Engine(e.params, CONFIG, num_slots=0), ValueError, "num_slots must be a positive int, got 0"),
        (lambda e: Engine(e.params, CONFIG, max_len=1), ValueError, "max_len must be an int >= 2, got 1"),
        (lambda e: Engine(e.params, CONFIG, num_slots=1, speculative_tokens=-1), ValueError, "speculative_tokens"),
        (lambda e: Engine(e.params, CONFIG, num_slots=1, prefill_bucket=0), ValueError, "prefill_bucket"),
        (lambda e: Engine(e.params, CONFIG, num_slots=1, cache="int4"), ValueError, "cache='int4' is not one of"),
        (lambda e: Engine(e.params, CONFIG, num_slots=1, max_len=40, cache="paged"), ValueError, "max_len=40"),
        (
            lambda e: Engine(e.params, CONFIG, num_slots=1, speculative_tokens=2).submit(
                [1], SamplingParams(temperature=0.5)
            ),
            ValueError,
            "use temperature=0 with speculative_tokens",
        ),
    ],
    ids=lambda x: None,
)
def test_engine_errors(params, call, exc, text):
    engine = Engine(params, CONFIG, num_slots=1, max_len=MAX_LEN)
    with pytest.raises(exc) as info:
        call(engine)
    assert text in str(info.value)
