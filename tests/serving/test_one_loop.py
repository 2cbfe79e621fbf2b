"""Serving is written once: the engine at any concurrency and cache kind equals one-at-a-time generation, the
Generator front equals the Engine request for request (greedy and seeded sampling), both follow one stop-token
rule, and non-finite logits stop generation with an error naming the step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkv.models import llama
from jkv.serving import Engine, Generator, NonFiniteLogitsError, SamplingParams, cache_kinds

# head_dim 32: the Q8 kinds quantize blocks of 32 values.
CONFIG = llama.LlamaConfig(96, 64, 128, 2, 4, 2, 32)
MAX_LEN = 64


@pytest.fixture(scope="module")
def params():
    return llama.init_params(CONFIG, jax.random.key(3), jnp.float32, scale=0.2)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(12)
    return [rng.integers(0, CONFIG.vocab_size, size=n).tolist() for n in (5, 9, 2, 17, 7, 3)]


def one_at_a_time(params, prompts, kind, sp):
    """Each request alone in a one-slot engine: nothing shares its steps."""
    engine = Engine(params, CONFIG, num_slots=1, max_len=MAX_LEN, cache=kind, verbose=False)
    out = []
    for p in prompts:
        engine.submit(p, sp)
        (alone,) = engine.run(show_progress=False)
        out.append(alone.tokens)
    return out


@pytest.mark.parametrize("kind", cache_kinds())
def test_engine_at_any_concurrency_equals_one_at_a_time(params, prompts, kind):
    sp = SamplingParams(max_new_tokens=7)
    want = one_at_a_time(params, prompts, kind, sp)
    assert all(len(w) == 7 for w in want)
    for slots in (2, 4):
        engine = Engine(params, CONFIG, num_slots=slots, max_len=MAX_LEN, cache=kind, verbose=False)
        for p in prompts[:3]:
            engine.submit(p, sp)
        engine.step()  # later requests arrive while earlier ones are mid-generation
        for p in prompts[3:]:
            engine.submit(p, sp)
        assert [c.tokens for c in engine.run(show_progress=False)] == want, (kind, slots)


@pytest.mark.parametrize(
    "sampling", [SamplingParams(), SamplingParams(0.9, top_k=20, top_p=0.9)], ids=["greedy", "seeded"]
)
def test_generator_and_engine_give_the_same_tokens(params, prompts, sampling):
    seed = 7
    generator = Generator(CONFIG, params, max_len=MAX_LEN, batch=3)
    got = generator.generate(prompts[:3], max_new_tokens=8, sampling=sampling, seed=seed).tokens
    # The same requests (sequence i draws with seed + i) in another order through an engine of other width.
    engine = Engine(params, CONFIG, num_slots=2, max_len=MAX_LEN, verbose=False)
    ids = {}
    for i in (2, 0, 1):
        ids[i] = engine.submit(prompts[i], SamplingParams(**{**vars(sampling), "seed": seed + i, "max_new_tokens": 8}))
    done = {c.id: c.tokens for c in engine.run(show_progress=False)}
    assert got == [done[ids[i]] for i in range(3)]
    if not sampling.greedy:  # it did sample, and the draws depend on the seed
        assert got != generator.generate(prompts[:3], max_new_tokens=8).tokens
        assert got != generator.generate(prompts[:3], max_new_tokens=8, sampling=sampling, seed=seed + 1).tokens


def test_stop_token_rule_is_the_same_in_both_fronts(params, prompts):
    """A stop token ends its request with finish reason "stop" and is neither returned nor streamed."""
    free = Generator(CONFIG, params, max_len=MAX_LEN, batch=2).generate(prompts[:2], max_new_tokens=10).tokens
    stop = free[0][3]
    cut = [f[: f.index(stop)] if stop in f else f for f in free]
    streamed = []
    result = Generator(CONFIG, params, max_len=MAX_LEN, batch=2).generate(
        prompts[:2], max_new_tokens=10, stop_ids=[stop], on_token=lambda b, t: streamed.append((b, t))
    )
    assert result.tokens == cut and result.tokens[0] == free[0][:3]
    assert result.finish_reasons == ["stop" if stop in f else "length" for f in free]
    assert [[t for b, t in streamed if b == i] for i in range(2)] == cut
    engine = Engine(params, CONFIG, num_slots=2, max_len=MAX_LEN, verbose=False)
    engine_streamed = []
    for p in prompts[:2]:
        sp = SamplingParams(max_new_tokens=10, stop_tokens=(stop,))
        engine.submit(p, sp, on_token=lambda i, t: engine_streamed.append((i, t)))
    done = engine.run(show_progress=False)
    assert [c.tokens for c in done] == cut and [c.finish_reason for c in done] == result.finish_reasons
    assert [[t for i, t in engine_streamed if i == c.id] for c in done] == cut


def _poison(params, token):
    """``params`` whose embedding row of ``token`` is NaN: logits go non-finite once ``token`` is fed."""
    return params.replace(embed=params.embed.at[token].set(jnp.nan))


def test_non_finite_logits_stop_generation_naming_the_step(params, prompts):
    first = Generator(CONFIG, params, max_len=MAX_LEN).generate([prompts[0]], max_new_tokens=1).tokens[0][0]
    poisoned = _poison(params, first)
    # The prompt is clean: its prefill gives `first`, whose embedding then poisons the first decode step.
    assert first not in prompts[0]
    with pytest.raises(
        NonFiniteLogitsError, match=r"request 0: the logits of its token 1 held NaN or Inf \(decode step 1\)"
    ):
        Engine(poisoned, CONFIG, num_slots=2, max_len=MAX_LEN, verbose=False).generate(
            [prompts[0]], show_progress=False
        )
    generator = Generator(CONFIG, poisoned, max_len=MAX_LEN)
    with pytest.raises(NonFiniteLogitsError, match=r"token 0 held NaN or Inf \(prefill\)"):
        generator.generate([[*prompts[1], first]], max_new_tokens=4)
    # The failed call left no request behind: the next one runs on its own (and fails at its own decode step).
    assert generator.engine.num_active == 0 and not generator.engine.has_work()
    with pytest.raises(NonFiniteLogitsError, match=r"\(decode step 1\)"):
        generator.generate([prompts[0]], max_new_tokens=4)
    engine = Engine(poisoned, CONFIG, num_slots=1, max_len=MAX_LEN, speculative_tokens=2, verbose=False)
    with pytest.raises(NonFiniteLogitsError, match=r"\(verify step 1\)"):
        engine.generate([prompts[0]], show_progress=False)
