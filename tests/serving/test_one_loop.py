"""Serving is written once: the engine at any concurrency, token budget and cache kind, with chunked prompts,
prefix-cache hits and speculative decoding, equals one-at-a-time generation token for token; the Generator front
equals the Engine request for request (greedy and seeded sampling), both follow one stop-token rule, and non-finite
logits stop generation with an error naming the step."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers_serving import BUCKETS, CONFIG, MAX_LEN, SLOTS, assert_nothing_held, engine, make_params, one_at_a_time

from jkv.models import llama
from jkv.serving import Generator, NonFiniteLogitsError, SamplingParams, cache_kinds

# Generators of the shared engine shape and model options: they run the engines' compiled steps.
SHAPE = {"max_len": MAX_LEN, "batch": SLOTS, "buckets": BUCKETS, "options": llama.DEFAULT_OPTIONS}


@pytest.fixture(scope="module")
def params():
    return make_params(3)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(12)
    return [rng.integers(0, CONFIG.vocab_size, size=n).tolist() for n in (5, 9, 2, 17, 7, 3)]


def mixed_prompts(rng):
    """Prompts the tests do not name: some longer than a step of 8 tokens, three sharing a 21-token prefix (a
    whole page of 16 and more), two repeating themselves (drafts to accept)."""
    v = CONFIG.vocab_size
    system = rng.integers(0, v, size=21).tolist()
    pattern = rng.integers(0, v, size=4).tolist()

    def tail():
        return rng.integers(0, v, size=rng.integers(1, 5)).tolist()

    return [
        rng.integers(0, v, size=5).tolist(),
        system + tail(),
        pattern * 4,
        rng.integers(0, v, size=17).tolist(),
        system + tail(),
        rng.integers(0, v, size=2).tolist(),
        (pattern * 3)[:9],
        system + tail(),
    ]


@pytest.mark.parametrize("kind", cache_kinds())
def test_engine_at_any_concurrency_and_budget_equals_one_at_a_time(params, kind):
    """Concurrent requests arriving mid-generation, 8 tokens per step (prompts split over steps), prefix hits and
    speculative decoding: the tokens of each request alone, and the stored codes and attention of a sequence do not
    depend on what else is in its step."""
    ps = mixed_prompts(np.random.default_rng(4))  # a draw whose continuations repeat: some drafts are accepted
    sp = SamplingParams(max_new_tokens=8)
    want = one_at_a_time(params, ps, kind, sp)
    assert all(len(w) == 8 for w in want)
    eng = engine(params, kind, prefix_cache_bytes=1 << 20, speculative_tokens=3, max_batch_tokens=8)
    for p in ps[:4]:
        eng.submit(p, sp)
    eng.step()
    eng.step()
    for p in ps[4:]:
        eng.submit(p, sp)
    done = eng.run(show_progress=False)
    assert [c.tokens for c in done] == want, kind
    st = eng.stats
    assert st.prefix_hits >= 1 and st.cached_prompt_tokens >= 16
    assert st.accepted_tokens > 0 and st.verify_steps > 0
    assert st.prefill_tokens + st.cached_prompt_tokens == sum(map(len, ps))
    assert_nothing_held(eng)


@pytest.mark.parametrize(
    "sampling", [SamplingParams(), SamplingParams(0.9, top_k=20, top_p=0.9)], ids=["greedy", "seeded"]
)
def test_generator_and_engine_give_the_same_tokens(params, prompts, sampling):
    seed = 7
    generator = Generator(CONFIG, params, **SHAPE)
    got = generator.generate(prompts[:3], max_new_tokens=8, sampling=sampling, seed=seed).tokens
    # The same requests (sequence i draws with seed + i) in another order through an engine of other width.
    eng = engine(params, max_batch_tokens=8)
    ids = {}
    for i in (2, 0, 1):
        ids[i] = eng.submit(prompts[i], SamplingParams(**{**vars(sampling), "seed": seed + i, "max_new_tokens": 8}))
    done = {c.id: c.tokens for c in eng.run(show_progress=False)}
    assert got == [done[ids[i]] for i in range(3)]
    if not sampling.greedy:  # it did sample, and the draws depend on the seed
        assert got != generator.generate(prompts[:3], max_new_tokens=8).tokens
        assert got != generator.generate(prompts[:3], max_new_tokens=8, sampling=sampling, seed=seed + 1).tokens


def test_stop_token_rule_is_the_same_in_both_fronts(params, prompts):
    """A stop token ends its request with finish reason "stop" and is neither returned nor streamed."""
    free = Generator(CONFIG, params, **SHAPE).generate(prompts[:2], max_new_tokens=10).tokens
    stop = free[0][3]
    cut = [f[: f.index(stop)] if stop in f else f for f in free]
    streamed = []
    result = Generator(CONFIG, params, **SHAPE).generate(
        prompts[:2], max_new_tokens=10, stop_ids=[stop], on_token=lambda b, t: streamed.append((b, t))
    )
    assert result.tokens == cut and result.tokens[0] == free[0][:3]
    assert result.finish_reasons == ["stop" if stop in f else "length" for f in free]
    assert [[t for b, t in streamed if b == i] for i in range(2)] == cut
    eng = engine(params)
    engine_streamed = []
    for p in prompts[:2]:
        sp = SamplingParams(max_new_tokens=10, stop_tokens=(stop,))
        eng.submit(p, sp, on_token=lambda i, t: engine_streamed.append((i, t)))
    done = eng.run(show_progress=False)
    assert [c.tokens for c in done] == cut and [c.finish_reason for c in done] == result.finish_reasons
    assert [[t for i, t in engine_streamed if i == c.id] for c in done] == cut


def _poison(params, token):
    """``params`` whose embedding row of ``token`` is NaN: logits go non-finite once ``token`` is fed."""
    return params.replace(embed=params.embed.at[token].set(jnp.nan))


def test_non_finite_logits_stop_generation_naming_the_step(params, prompts):
    first = Generator(CONFIG, params, **SHAPE).generate([prompts[0]], max_new_tokens=1).tokens[0][0]
    poisoned = _poison(params, first)
    # The prompt is clean: its last chunk gives `first`, whose embedding then poisons the next step.
    assert first not in prompts[0]
    with pytest.raises(NonFiniteLogitsError, match=r"request 0: the logits of its token 1 held NaN or Inf \(step 2\)"):
        engine(poisoned).generate([prompts[0]], show_progress=False)
    generator = Generator(CONFIG, poisoned, **SHAPE)
    with pytest.raises(NonFiniteLogitsError, match=r"token 0 held NaN or Inf \(step 1\)"):
        generator.generate([[*prompts[1], first]], max_new_tokens=4)
    # The failed call left no request behind: the next one runs on its own (and fails at its own second step).
    assert generator.engine.num_active == 0 and not generator.engine.has_work()
    with pytest.raises(NonFiniteLogitsError, match=r"token 1 held NaN or Inf \(step 4\)"):
        generator.generate([prompts[0]], max_new_tokens=4)
    eng = engine(poisoned, speculative_tokens=3)  # the drafting step of the concurrency test
    with pytest.raises(NonFiniteLogitsError, match=r"token 1 held NaN or Inf \(step 2\)"):
        eng.generate([prompts[0]], show_progress=False)
