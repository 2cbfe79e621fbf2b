"""A page pool (or a contiguous cache's batch) sized from the free memory that the device cannot place in one
piece (fragmented free memory) is retried smaller; sizes the caller gave, or less than a sequence, are errors."""

import jax
import numpy as np
import pytest
from helpers_serving import BUCKETS, CONFIG, MAX_LEN, SLOTS, assert_nothing_held, make_params, random_prompts

from jkv.serving import Engine, SamplingParams, storage

FULL = SLOTS * MAX_LEN // 16  # the default pool: every slot can fill its row


def engine(params, cache="paged", **knobs):
    knobs = {"num_slots": SLOTS, "max_len": MAX_LEN, "buckets": BUCKETS, "max_batch_tokens": 16, **knobs}
    return Engine(params, CONFIG, cache=cache, **knobs)


@pytest.fixture
def pool_limit(monkeypatch):
    """Pools of more than ``limit[0]`` pages fail as the GPU allocator fails (asked for: ``asked``)."""
    limit, asked, slots = [FULL], [], [8]
    make = storage.steps.make_cache

    def make_cache(kind, spec, batch, *, num_pages=None, **kw):
        asked.append(num_pages)
        if (num_pages is not None and num_pages > limit[0]) or (kind == "f32" and batch > slots[0]):
            raise jax.errors.JaxRuntimeError(f"RESOURCE_EXHAUSTED: Out of memory while trying to allocate {num_pages}")
        return make(kind, spec, batch, num_pages=num_pages, **kw)

    monkeypatch.setattr(storage.steps, "make_cache", make_cache)
    return limit, asked, slots


def test_an_unplaceable_pool_is_retried_smaller(pool_limit, capsys):
    limit, asked, _ = pool_limit
    limit[0] = FULL - 5  # 11 of 16 pages: each try an eighth fewer (at least one) until 11
    params = make_params()
    eng = engine(params, verbose=True)
    assert [n for n in asked if n is not None] == [16, 14, 13, 12, 11]
    n = 11
    assert eng.stats.num_pages == n == eng.cache.num_pages and eng.scheduler.pages.num_pages == n
    err = capsys.readouterr().err
    assert f"a pool of {FULL} pages did not fit" in err and f"trying {n}" in err
    prompts = random_prompts(np.random.default_rng(0), 6, 4, 30)
    got = eng.generate(prompts, SamplingParams(max_new_tokens=6), show_progress=False)
    want = engine(params, num_pages=n, verbose=False).generate(prompts, SamplingParams(max_new_tokens=6))
    assert got == want
    assert_nothing_held(eng)


def test_a_pool_sized_by_the_caller_is_not_shrunk(pool_limit):
    limit, _, _ = pool_limit
    limit[0] = 8
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        engine(make_params(), num_pages=12, verbose=False)


def test_below_one_sequence_of_pages_it_gives_up(pool_limit):
    limit, _, _ = pool_limit
    limit[0] = MAX_LEN // 16 - 1
    with pytest.raises(MemoryError, match=f"fewer than {MAX_LEN // 16} .one sequence of max_len={MAX_LEN}"):
        engine(make_params(), verbose=False)


def test_an_unplaceable_contiguous_batch_is_retried_with_fewer_slots(pool_limit, capsys):
    _, _, slots = pool_limit
    slots[0] = 5
    params = make_params()
    eng = engine(params, cache="f32", num_slots=None, verbose=True)
    err = capsys.readouterr().err
    start = int(err.split(" slots of max_len")[0].split()[-1])  # what the free memory fits (the CPU's cap)
    assert start > 5 and eng.num_slots == eng.cache.batch == 5 == len(eng.scheduler.slots)
    assert f"a cache of {start} slots did not fit the device's free memory in one piece" in err
    prompts = random_prompts(np.random.default_rng(1), 7, 4, 30)
    got = eng.generate(prompts, SamplingParams(max_new_tokens=5), show_progress=False)
    want = engine(params, cache="f32", num_slots=5, verbose=False).generate(prompts, SamplingParams(max_new_tokens=5))
    assert got == want
    assert_nothing_held(eng)
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        engine(params, cache="f32", num_slots=6, verbose=False)  # a batch the caller sized is not shrunk
