"""Engine: continuous batching equals a token-by-token reference; stop tokens and full rows; sampling independent
of batching; prefix cache; speculative decoding; cancellation; waiting for pages; no leak after 1,000 random
requests with cancellations (the API and accounting: test_engine_api.py)."""

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_serving import CONFIG, MAX_LEN, assert_nothing_held, engine, make_params, random_prompts

from jkv import KVCache
from jkv.caches import CacheSpec
from jkv.models import llama
from jkv.serving import Generator, SamplingParams


@pytest.fixture(scope="module")
def params():
    return make_params(7)


_STEP = jax.jit(lambda p, c, t: llama.decode_step(p, c, t, config=CONFIG))


def greedy_alone(params, prompt, n):
    """Reference without the engine: feed the prompt one token at a time, then decode greedily (one sequence)."""
    cache = KVCache.init(CacheSpec(CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim, MAX_LEN), 1)
    for token in prompt:
        logits, cache = _STEP(params, cache, jnp.asarray([token], jnp.int32))
    out = [int(jnp.argmax(logits[0]))]
    while len(out) < n and len(prompt) + len(out) - 1 < MAX_LEN:  # out[-1] is written at that position
        logits, cache = _STEP(params, cache, jnp.asarray([out[-1]], jnp.int32))
        out.append(int(jnp.argmax(logits[0])))
    return out


@pytest.mark.parametrize("cache, budget", [("f32", 16), ("paged", 5)])
def test_batched_greedy_equals_token_by_token(params, rng, cache, budget):
    ps = random_prompts(rng, 7, hi=20)
    want = [greedy_alone(params, p, 10) for p in ps]
    eng = engine(params, cache, max_batch_tokens=budget)
    ids = [eng.submit(p, SamplingParams(max_new_tokens=10)) for p in ps[:4]]
    eng.step()  # requests arrive while others are mid-generation
    eng.step()
    ids += [eng.submit(p, SamplingParams(max_new_tokens=10)) for p in ps[4:]]
    done = eng.run(show_progress=False)
    assert [c.id for c in done] == ids
    assert [c.tokens for c in done] == want
    assert all(c.finish_reason == "length" for c in done)
    assert eng.stats.prefill_tokens == sum(map(len, ps))
    assert_nothing_held(eng)


def test_streaming_stop_tokens_and_max_len(params, rng):
    p = random_prompts(rng, 1)[0]
    alone = greedy_alone(params, p, 40)
    streamed = []
    eng = engine(params)
    stop = alone[5]
    eng.submit(p, SamplingParams(max_new_tokens=40, stop_tokens=(stop,)), on_token=lambda i, t: streamed.append(t))
    long_prompt = rng.integers(0, CONFIG.vocab_size, size=MAX_LEN - 3).tolist()
    eng.submit(long_prompt, SamplingParams(max_new_tokens=40))
    first, second = eng.run(show_progress=False)
    # The stop token ends the request and is neither returned nor streamed.
    assert first.finish_reason == "stop" and first.tokens == alone[: alone.index(stop)] == streamed
    # Fills the row: 61 + 4 - 1 = 64 positions (the last token is never written).
    assert second.finish_reason == "max_len" and len(second.tokens) == 4
    assert second.tokens == greedy_alone(params, long_prompt, 4)
    assert_nothing_held(eng)


@pytest.mark.parametrize("front", ["engine", "generator"])
def test_prompt_and_new_tokens_fill_the_row_exactly(params, front):
    """prompt + max_new_tokens - 1 = max_len positions is accepted (the last token is never written), so all
    max_new_tokens come back ("length"); one more asked comes back one short ("max_len"). The row held one token
    fewer: 10 + 55 - 1 = 64 gave 54 tokens and "max_len"."""
    prompt = list(range(1, 11))
    if front == "engine":
        eng = engine(params, "paged")
        for n in (55, 56):
            eng.submit(prompt, SamplingParams(max_new_tokens=n))
        done = eng.run(show_progress=False)
        got = [(len(c.tokens), c.finish_reason) for c in done]
        assert done[0].tokens == done[1].tokens == greedy_alone(params, prompt, 55)
        assert_nothing_held(eng)
    else:
        gen = Generator(CONFIG, params, max_len=MAX_LEN, max_batch_tokens=16)
        result = gen.generate([prompt], max_new_tokens=55)
        got = [(len(result.tokens[0]), result.finish_reasons[0])]
        with pytest.raises(ValueError, match="needs 65 cache positions"):
            gen.generate([prompt], max_new_tokens=56)
    assert got == [(55, "length"), (55, "max_len")][: len(got)]


def test_sampled_requests_do_not_depend_on_batching(params, rng):
    ps = random_prompts(rng, 5)
    sp = [SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=i) for i in range(5)]

    def run(budget, together):
        eng = engine(params, max_batch_tokens=budget)
        out = []
        for p, s in zip(ps, sp, strict=True):
            eng.submit(p, s)
            if not together:
                out += [c.tokens for c in eng.run(show_progress=False)]
        return out + [c.tokens for c in eng.run(show_progress=False)]

    one = run(16, together=False)
    assert one == run(16, together=True) == run(7, together=True)
    assert one != [greedy_alone(params, p, 8) for p in ps]  # it did sample


@pytest.mark.parametrize("cache", ["f32", "paged"])
def test_prompts_sharing_a_prefix_reuse_it(params, rng, cache):
    """No bare system prompt is ever submitted: the common prefix of two full prompts is what a later one reuses
    (a paged cache reuses whole pages, held once, pinned by the entry and refcounted)."""
    system = rng.integers(0, CONFIG.vocab_size, size=37).tolist()  # 2 full pages of 16 and 5 positions
    ps = [[*system, i, *tail] for i, tail in enumerate(random_prompts(rng, 5, 1, 5))]  # tails differ at once
    want = [greedy_alone(params, p, 5) for p in ps]
    eng = engine(params, cache, prefix_cache_bytes=1 << 20, max_batch_tokens=16)
    eng.submit(ps[0], SamplingParams(max_new_tokens=5))
    while eng.stats.steps < 3:  # its prompt takes three steps of 16; then it is an entry
        eng.step()
    for p in ps[1:]:
        eng.submit(p, SamplingParams(max_new_tokens=5))
    eng.step()  # three more are admitted from the entry while the first still runs (one waits for a slot)
    reused = 32 if cache == "paged" else 37
    if cache == "paged":
        tables, lengths = np.asarray(eng.cache.block_tables), np.asarray(eng.cache.lengths)
        busy = lengths > 32
        assert busy.sum() >= 2
        assert len({int(t) for t in tables[busy, 0]}) == 1 and len({int(t) for t in tables[busy, 1]}) == 1  # shared
        assert len({int(t) for t in tables[busy, 2]}) == busy.sum()  # the third page: each its own
        hist = np.bincount(tables[tables >= 0], minlength=eng.cache.num_pages)
        np.testing.assert_array_equal(np.asarray(eng.cache.refcounts), hist + np.asarray(eng.cache.pins))
    done = eng.run(show_progress=False)
    assert [c.tokens for c in done] == want
    assert [c.cached_prompt_tokens for c in done] == [0] + [reused] * 4
    assert eng.stats.prefill_tokens == len(ps[0]) + sum(len(p) - reused for p in ps[1:])
    assert eng.stats.prefix_hits == 4
    # The same prompt again reuses all it can: every position but the last (whole pages when paged).
    eng.submit(ps[0], SamplingParams(max_new_tokens=5))
    (again,) = eng.run(show_progress=False)
    assert again.tokens == want[0]
    assert again.cached_prompt_tokens == (32 if cache == "paged" else len(ps[0]) - 1)
    assert_nothing_held(eng)
    # A dropped engine goes at once, its prefix entries and cache with it: no cycle through the prefix cache
    # holds its device memory until Python's cycle collector runs (a second engine built then ran out of it).
    gone = weakref.ref(eng)
    gc.disable()
    try:
        del eng
        assert gone() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("cache", ["f32", "paged"])
def test_speculative_decoding_equals_greedy_and_rolls_back(params, cache):
    rng = np.random.default_rng(4)  # the same prompts for both kinds: some drafts are accepted, some not
    pattern = rng.integers(0, CONFIG.vocab_size, size=6).tolist()
    ps = [pattern * 3, (pattern * 2)[:9], random_prompts(rng, 1)[0]]
    want = [greedy_alone(params, p, 24) for p in ps]
    eng = engine(params, cache, speculative_tokens=4, max_batch_tokens=8)
    for p in ps:
        eng.submit(p, SamplingParams(max_new_tokens=24))
    done = eng.run(show_progress=False)
    assert [c.tokens for c in done] == want
    st = eng.stats
    assert st.verify_steps > 0 and st.drafted_tokens > 0
    assert 0 < st.accepted_tokens < st.drafted_tokens  # some drafts rejected: the cache was rolled back past them
    assert 0 < eng.summary().acceptance_rate < 1
    assert_nothing_held(eng)


def test_cancel_frees_the_slot_and_keeps_the_tokens_so_far(params, rng):
    ps = random_prompts(rng, 6)
    eng = engine(params, "paged", max_batch_tokens=16)
    ids = [eng.submit(p, SamplingParams(max_new_tokens=30)) for p in ps]
    for _ in range(4):
        eng.step()
    assert eng.cancel(ids[0]) and eng.cancel(ids[5]) and not eng.cancel(99)
    assert not eng.cancel(ids[0])  # already gone
    cancelled = {c.id: c for c in eng.pop_finished()}
    assert set(cancelled) == {ids[0], ids[5]}
    assert cancelled[ids[0]].finish_reason == "cancelled" and 1 <= len(cancelled[ids[0]].tokens) < 30
    assert cancelled[ids[5]].tokens == []  # never admitted: 4 slots
    rest = eng.run(show_progress=False)
    assert [c.id for c in rest] == ids[1:5] and all(len(c.tokens) == 30 for c in rest)
    assert_nothing_held(eng)


@pytest.mark.parametrize("speculative", [0, 3], ids=["plain", "speculative"])
def test_a_request_cancelled_from_a_stream_callback_streams_no_more(params, speculative):
    """A client that goes away is cancelled from inside ``on_token`` (its own or another request's): no token of
    it is streamed after, and its completion holds the tokens streamed before (a verify step handed over the rest
    of its accepted drafts, and a request cancelled by another's callback its token of that step)."""
    eng = engine(params, "paged", speculative_tokens=speculative)
    prompt = [5, 6, 7] * 4  # repeats itself: prompt-lookup drafts
    streamed, late, ids = {}, [], []

    def on_token(rid, token):
        if rid in cancelled:
            late.append((rid, token))
        streamed.setdefault(rid, []).append(token)
        if rid == ids[0] and len(streamed[rid]) == 4:
            cancelled.update(ids)
            assert eng.cancel(ids[1]) and eng.cancel(ids[0])

    cancelled = set()
    ids += [eng.submit(p, SamplingParams(max_new_tokens=20), on_token) for p in (prompt, prompt[1:])]
    done = {c.id: c for c in eng.run(show_progress=False)}
    assert late == [] and all(done[i].finish_reason == "cancelled" for i in ids)
    assert all(done[i].tokens == streamed.get(i, []) for i in ids) and len(done[ids[0]].tokens) == 4
    assert_nothing_held(eng)


def test_requests_wait_for_pages_and_all_finish(params, rng):
    """A pool of 6 pages of 16: at most two requests of 33..48 positions run at once; the others wait."""
    ps = [rng.integers(0, CONFIG.vocab_size, size=30).tolist() for _ in range(5)]
    want = [greedy_alone(params, p, 10) for p in ps]
    eng = engine(params, "paged", num_pages=6)
    for p in ps:
        eng.submit(p, SamplingParams(max_new_tokens=10))
    done, most = [], 0
    while eng.has_work():
        eng.step()
        most = max(most, eng.num_active)
        done += eng.pop_finished()
    assert most == 2
    assert [c.tokens for c in done] == want
    assert eng.summary().peak_pages_in_use <= 6
    assert_nothing_held(eng)
    with pytest.raises(ValueError, match="request 0: 64 positions need 4 pages, the pool has 3"):
        engine(params, "paged", num_pages=3).submit(list(range(60)), SamplingParams(max_new_tokens=40))


@pytest.mark.parametrize("cache", ["f32", "paged"])
def test_no_leak_after_1000_random_requests_with_cancellations(params, cache):
    rng = np.random.default_rng(1)
    systems = [rng.integers(0, CONFIG.vocab_size, size=16).tolist() for _ in range(2)]
    # A pool of 6 pages of 16 (requests of 1 or 2 pages, entries of 1): requests wait, entries are evicted.
    eng = engine(
        params, cache, prefix_cache_bytes=2 << 14, max_batch_tokens=8, num_pages=6 if cache == "paged" else None
    )
    live, finished = [], 0
    for _ in range(1000):
        if rng.random() < 0.5:  # a shared 16-token prefix (a whole page) and a short tail
            prompt = systems[int(rng.integers(2))] + rng.integers(0, 8, size=rng.integers(0, 4)).tolist()
        else:
            prompt = rng.integers(0, CONFIG.vocab_size, size=rng.integers(1, 12)).tolist()
        stops = tuple(rng.integers(0, CONFIG.vocab_size, size=3).tolist())
        live.append(eng.submit(prompt, SamplingParams(max_new_tokens=int(rng.integers(1, 6)), stop_tokens=stops)))
        if rng.random() < 0.1:
            finished += eng.cancel(live[int(rng.integers(len(live)))])
        if rng.random() < 0.5:
            eng.step()
            done = eng.pop_finished()
            finished += sum(c.finish_reason != "cancelled" for c in done)
            gone = {c.id for c in done}
            live = [i for i in live if i not in gone]
    finished += sum(c.finish_reason != "cancelled" for c in eng.run(show_progress=False))
    assert finished == 1000
    assert eng.stats.prefix_hits > 0 and eng.prefix_cache.evictions > 0
    if cache == "paged":
        assert eng.summary().peak_pages_in_use <= 6
    assert_nothing_held(eng, entries_allowed=False)
