"""Engine, its API and accounting: few compiled step variants, greedy against sampling steps, the run summary and
per-request figures, argument errors, NumPy integers, the default slot count, the prefix length rule."""

import contextlib
import math
import signal

import jax.numpy as jnp
import numpy as np
import pytest
from helpers_serving import CONFIG, MAX_LEN, assert_nothing_held, engine, make_params, random_prompts

from jkv.serving import Engine, SamplingParams
from jkv.serving.options import default_max_batch_tokens, default_max_slots
from jkv.serving.prefix import common_prefix_length
from jkv.serving.scheduler import token_buckets


@pytest.fixture(scope="module")
def params():
    return make_params(7)


def test_few_step_variants_compile():
    """The default configuration has at most 8 token buckets (on a GPU and on a CPU); an engine compiles one step
    per bucket at start-up and none afterwards, whatever the mix of requests (the shared shape with buckets of 8 and
    16 tokens: the 16-token step is the other tests')."""
    for backend in ("gpu", "cpu"):
        assert len(token_buckets(default_max_batch_tokens(backend), default_max_slots(backend))) <= 8
    eng = engine(make_params(1), buckets=(8, 16))
    assert eng.compile_all(progress=False) == 4  # a step per bucket, the sampling programs (with top-k / top-p or not)
    steps = lambda: {key for key in eng.steps.compiled if key[0] in ("mixed", "sample")}  # not retire's program
    compiled = steps()
    assert eng.steps.mixed_variants() == [(8, 1), (16, 1)] and len(compiled) == 4
    rng = np.random.default_rng(0)
    greedy, sampled = SamplingParams(max_new_tokens=5), SamplingParams(max_new_tokens=5, temperature=0.8, seed=3)
    prompts = random_prompts(rng, 12, 1, 40)
    eng.generate(prompts[:6], greedy, show_progress=False)
    eng.generate(prompts[6:], sampled, show_progress=False)
    eng.generate(prompts[6:], SamplingParams(max_new_tokens=5, temperature=0.8, top_p=0.9), show_progress=False)
    for i, p in enumerate(prompts[:4]):  # greedy and sampling requests side by side
        eng.submit(p, sampled if i % 2 else greedy)
    eng.run(show_progress=False)
    assert steps() == compiled
    assert_nothing_held(eng)


def test_greedy_steps_take_the_argmax_and_sampling_steps_draw():
    """While every slot is greedy the step's argmax is the token (the sampling program never runs); once a slot
    samples, the sampling program draws its tokens from the step's logits, and greedy rows beside it keep their
    argmax."""
    eng = engine(make_params(1), buckets=(16,))
    rng = np.random.default_rng(1)
    prompts = random_prompts(rng, 3, 2, 12)
    alone = [eng.generate([p], SamplingParams(max_new_tokens=6), show_progress=False)[0] for p in prompts]
    names = lambda: sorted(name for name, _ in eng.steps.compiled if name != "retire")
    assert names() == ["mixed"]
    sampled = SamplingParams(max_new_tokens=6, temperature=1.5, seed=11)
    ids = [eng.submit(p, sampled if i == 1 else SamplingParams(max_new_tokens=6)) for i, p in enumerate(prompts)]
    done = {c.id: c.tokens for c in eng.run(show_progress=False)}
    assert names() == ["mixed", "sample"]
    assert done[ids[0]] == alone[0] and done[ids[2]] == alone[2]
    assert done[ids[1]] != alone[1]  # it did sample (six tokens at temperature 1.5 of a random model)
    again = eng.generate([prompts[1]], sampled, show_progress=False)[0]
    assert again == done[ids[1]]  # a sampled request's tokens depend on its seed only, not on its neighbours
    truncating = lambda: sorted(key[1][1] for key in eng.steps.compiled if key[0] == "sample")
    assert truncating() == [False]  # no top-k / top-p: the program without the sort
    # top-k = 1 at a high temperature: the truncating program, whose one token left is the argmax
    top1 = SamplingParams(max_new_tokens=6, temperature=1.5, top_k=1, seed=11)
    assert eng.generate([prompts[1]], top1, show_progress=False)[0] == alone[1]
    assert truncating() == [False, True]
    assert_nothing_held(eng)


def test_run_summary_and_per_request_figures(params, rng):
    eng = engine(params, "paged", prefix_cache_bytes=1 << 20)
    system = rng.integers(0, CONFIG.vocab_size, size=20).tolist()
    for tail in random_prompts(rng, 6, 1, 4):
        eng.submit(system + tail, SamplingParams(max_new_tokens=6))
    done = eng.run(show_progress=False)
    assert all(c.time_to_first_token > 0 and c.inter_token_latency > 0 for c in done)
    s = eng.summary()
    assert s.requests == 6 and s.generated_tokens == 36 and s.tokens_per_s > 0
    assert s.prefill_tokens == eng.stats.prefill_tokens and s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0
    assert s.prefix_hits >= 1 and s.cached_prompt_tokens >= 16 and math.isnan(s.acceptance_rate)
    assert s.peak_pages_in_use > s.pages_in_use > 0 and s.num_pages == eng.cache.num_pages
    between = eng.steps.compile_s_between  # compiling is no part of the summary's latencies
    assert math.isclose(
        s.mean_ttft_s, np.mean([c.time_to_first_token - between(c.submitted, c.first_token) for c in done])
    )
    # 6 requests in 4 slots: every one waited for its slot before its first token, the last two for a finish
    assert all(c.submitted <= c.admitted <= c.first_token for c in done)
    assert math.isclose(s.mean_queue_s, np.mean([c.queue_wait - between(c.submitted, c.admitted) for c in done]))
    by_id = sorted(done, key=lambda c: c.id)
    assert min(c.queue_wait for c in by_id[4:]) > max(c.queue_wait for c in by_id[:4])
    assert min(c.admitted for c in by_id[4:]) >= min(c.finished for c in by_id[:4])
    text = s.format()
    assert "6 requests, 36 tokens" in text and "prefix hits" in text and "pages in use" in text
    assert "waiting for a slot" in text
    eng.reset_stats()
    assert eng.summary().requests == 0


@pytest.mark.parametrize(
    "call, exc, text",
    [
        (lambda e: e.submit([]), ValueError, "at least one token"),
        (lambda e: e.submit(list(range(65))), ValueError, "prompt of 65 tokens does not fit max_len=64"),
        (lambda e: e.submit([1, 500]), ValueError, "token ids [500] outside the vocabulary [0, 96)"),
        (lambda e: e.submit([1], "greedy"), TypeError, "SamplingParams"),
        (lambda e: e.submit("123"), TypeError, "prompt must be token ids, got the text '123'"),
        (lambda e: e.submit([1.7, 2.2]), TypeError, "prompt token ids must be ints, got 1.7 (float)"),
        (lambda e: e.submit([2, True]), TypeError, "prompt token ids must be ints, got True (bool)"),
        (lambda e: e.submit(np.array([1.0, 2.0])), TypeError, "got shape (2,) and dtype float64"),
        (lambda e: e.submit(np.ones((2, 2), int)), TypeError, "got shape (2, 2) and dtype int64"),
        (lambda e: e.submit(5), TypeError, "prompt must be a sequence of token ids, got int"),
        (lambda e: e.submit([1], None, 5), TypeError, "on_token must be a callable on_token(id, token), got 5"),
        (lambda e: SamplingParams(max_new_tokens=0), ValueError, "max_new_tokens must be a positive int, got 0"),
        (lambda e: SamplingParams(temperature=-1.0), ValueError, "temperature must be a finite number >= 0, got -1.0"),
        (lambda e: SamplingParams(top_k=-2), ValueError, "top_k must be an int >= 0"),
        (lambda e: SamplingParams(top_p=0.0), ValueError, "top_p must lie in (0, 1], got 0.0"),
        (lambda e: Engine(e.params, CONFIG, num_slots=0), ValueError, "num_slots must be a positive int, got 0"),
        (lambda e: Engine(e.params, CONFIG, max_len=1), ValueError, "max_len must be an int >= 2, got 1"),
        (lambda e: Engine(e.params, CONFIG, num_slots=1, speculative_tokens=-1), ValueError, "speculative_tokens"),
        (lambda e: Engine(e.params, CONFIG, num_slots=1, max_batch_tokens=0), ValueError, "max_batch_tokens"),
        (
            lambda e: Engine(e.params, CONFIG, num_slots=1, speculative_tokens=8, max_batch_tokens=8),
            ValueError,
            "speculative_tokens=8 must be below max_batch_tokens=8: a step carries at most that many tokens",
        ),
        (
            lambda e: Engine(e.params, CONFIG, num_slots=1, max_batch_tokens=32, buckets=(8, 16)),
            ValueError,
            "the largest of buckets=(8, 16) must hold max_batch_tokens=32",
        ),
        (lambda e: Engine(e.params, CONFIG, num_slots=1, buckets=()), ValueError, "buckets=() names no step shape"),
        (lambda e: Engine(e.params, CONFIG, num_slots=1, buckets=16), TypeError, "buckets must be a tuple of ints"),
        (lambda e: Engine(e.params, CONFIG, num_slots=1.0), ValueError, "num_slots must be a positive int, got 1.0"),
        (lambda e: Engine(e.params, CONFIG, num_slots=1, cache="int4"), ValueError, "cache='int4' is not one of"),
        (lambda e: Engine(e.params, CONFIG, num_slots=1, max_len=40, cache="paged"), ValueError, "max_len=40"),
        (
            lambda e: Engine(e.params, CONFIG, num_slots=1, cache="f32", num_pages=8),
            ValueError,
            "num_pages=8 sizes a paged cache's pool; cache='f32' is not paged",
        ),
        (lambda e: Engine(e.params, CONFIG, num_slots=1, cache="paged", num_pages=0), ValueError, "num_pages"),
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
    eng = Engine(params, CONFIG, num_slots=1, max_len=MAX_LEN, verbose=False)
    with pytest.raises(exc) as info:
        call(eng)
    assert text in str(info.value)


def test_generate_returns_the_answers_of_its_own_prompts(params):
    """A request submitted before ``generate`` runs with it, but its completion stays for ``pop_finished``: it is
    not one of the answers ``generate`` returns (it was, ahead of them)."""
    eng = engine(params, "f32")
    sampling = SamplingParams(max_new_tokens=3)
    alone = eng.generate([[7, 8, 9]], sampling, show_progress=False)
    other = eng.submit([1, 2, 3], SamplingParams(max_new_tokens=5))
    assert eng.generate([[7, 8, 9]], sampling, show_progress=False) == alone
    (left,) = eng.pop_finished()
    assert left.id == other and len(left.tokens) == 5 and eng.pop_finished() == []


def test_numpy_integers_are_token_ids_and_sizes(params):
    """Integer arrays and NumPy integers are what a caller's own code often holds: taken as the ints they are."""
    eng = Engine(params, CONFIG, num_slots=np.int64(2), max_len=np.int32(MAX_LEN), cache="f32", verbose=False)
    assert eng.num_slots == 2 and type(eng.options.num_slots) is int and type(eng.options.max_len) is int
    sampling = SamplingParams(max_new_tokens=3)
    for prompt in ([5, 6, 7], np.array([5, 6, 7], np.int32), jnp.array([5, 6, 7]), (np.int64(5), 6, 7)):
        eng.submit(prompt, sampling)
    outs = eng.run(show_progress=False)
    assert all(c.prompt == [5, 6, 7] and type(c.prompt[0]) is int for c in outs)
    assert all(c.tokens == outs[0].tokens for c in outs)


def test_default_slot_count_comes_from_memory_planner(params, capsys):
    eng = Engine(params, CONFIG, max_len=MAX_LEN)
    assert 1 <= eng.num_slots <= 64
    assert "slots of max_len=64" in capsys.readouterr().err


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2 and common_prefix_length([], [1]) == 0


@contextlib.contextmanager
def fail_after(seconds: int):
    """A TimeoutError after ``seconds`` (the main thread's alarm): without the guard, a nested step wedges the
    engine and its run never ends; the test then fails instead of hanging the suite."""

    def ring(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("call", ["step", "admit", "run", "generate"])
def test_a_step_from_a_stream_callback_is_refused(params, call):
    """A callback may submit and cancel; a step inside a step would read the outer step's tokens as its own."""
    eng = engine(params, "paged")
    calls = {"step": eng.step, "admit": eng.admit, "run": eng.run, "generate": lambda: eng.generate([[1, 2]])}

    def on_token(request_id, token, tried=[]):  # noqa: B006 (once: without the guard a nested run never ends)
        if not tried:
            tried.append(1)
            calls[call]()

    eng.submit([3, 4, 5], SamplingParams(max_new_tokens=3), on_token)
    with fail_after(60), pytest.raises(RuntimeError, match=r"called inside a step \(from an on_token callback\?\)"):
        eng.run(show_progress=False)
    assert not eng._stepping  # the guard is down again: the engine takes further calls
    eng.abort()
    assert eng.generate([[6, 7]], SamplingParams(max_new_tokens=2), show_progress=False)[0]
