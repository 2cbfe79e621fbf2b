"""Generation: greedy output against a recompute-everything reference, ragged batches, stop tokens, streaming,
seeded sampling, cache types, compile-once, timing, and every argument error."""

import dataclasses
import functools

import helpers_params
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkv
from jkv.models import llama
from jkv.serving import Generator, SamplingParams, cache_kinds

CONFIG = llama.LlamaConfig(83, 64, 96, 2, 4, 2, 32, 1e-5, 1e4, max_position=512)


@pytest.fixture(scope="module")
def params():
    return helpers_params.random_params(CONFIG, 11, scale=0.2, layout="stacked")


@pytest.fixture(scope="module")
def full_logits(params):
    """Logits of the last token of a sequence by one full causal pass (no cache reuse): the reference."""
    width = 64
    forward = jax.jit(functools.partial(llama.forward, config=CONFIG))
    spec = jkv.CacheSpec(CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim, width)

    def run(seq):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(seq)] = seq
        logits, _ = forward(params, jkv.KVCache.init(spec, 1), jnp.asarray(padded))
        return np.asarray(logits[0, len(seq) - 1])  # causal: the padding after it changes nothing

    return run


@pytest.fixture(scope="module")
def generator(params):
    return Generator(CONFIG, params, max_len=64, batch=4, buckets=(16,))


def greedy_reference(full_logits, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(full_logits(seq))))
    return seq[len(prompt) :]


PROMPTS = [[5, 17, 3], [40, 2, 9, 66, 12, 1, 7], [80]]


def test_greedy_ragged_batch_matches_full_recompute(generator, full_logits):
    result = generator.generate(PROMPTS, max_new_tokens=12)
    assert result.tokens == [greedy_reference(full_logits, p, 12) for p in PROMPTS]
    assert result.finish_reasons == ["length"] * 3
    t = result.timing
    assert t.decode_steps == 11 and t.batch == 3 and t.prompt_tokens == 11
    assert t.prefill_s > 0 and t.decode_s > 0 and np.isfinite(t.tokens_per_s) and "tokens/s" in t.summary()
    # Each sequence's prompt ran through the model once; finished sequences left the cache empty and error-free.
    assert generator.engine.stats.prefill_tokens >= 11
    assert not np.asarray(generator.cache.lengths).any() and not np.asarray(generator.cache.errors).any()


def test_compiles_once_across_calls_and_positions(generator):
    generator.generate([[1, 2, 3, 4, 5, 6]], max_new_tokens=3)
    again = generator.generate([[4, 5, 6, 7, 8]], max_new_tokens=5)  # other lengths, the one step shape
    assert again.timing.compile_s == 0
    assert generator.engine.steps.mixed_variants() == [(16, 1)]
    assert again.tokens[0] == generator.generate([[4, 5, 6, 7, 8]], max_new_tokens=5).tokens[0]


def test_stop_tokens_end_one_sequence_and_streaming_order(generator, full_logits):
    ref = [greedy_reference(full_logits, p, 10) for p in PROMPTS]
    stop = ref[1][3]
    seen = []
    result = generator.generate(PROMPTS, max_new_tokens=10, stop_ids=[stop], on_token=lambda b, t: seen.append((b, t)))
    for i, r in enumerate(ref):
        want = r[: r.index(stop)] if stop in r else r
        assert result.tokens[i] == want
        assert result.finish_reasons[i] == ("stop" if stop in r else "length")
        assert [t for b, t in seen if b == i] == want
    assert result.finish_reasons[1] == "stop"


def test_sampling_is_seeded_and_respects_top_k(generator, full_logits):
    hot = SamplingParams(temperature=2.0, top_k=5)
    a = generator.generate(PROMPTS, max_new_tokens=8, sampling=hot, seed=1)
    b = generator.generate(PROMPTS, max_new_tokens=8, sampling=hot, seed=1)
    c = generator.generate(PROMPTS, max_new_tokens=8, sampling=hot, seed=2)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    for prompt, tokens in zip(PROMPTS, a.tokens, strict=True):
        for j, token in enumerate(tokens):
            top5 = np.argsort(full_logits(prompt + tokens[:j]))[-5:]
            assert token in top5, (prompt, j)
    greedy = generator.generate(PROMPTS, max_new_tokens=8).tokens
    assert generator.generate(PROMPTS, max_new_tokens=8, sampling=SamplingParams(1.0, top_k=1), seed=5).tokens == greedy
    assert (
        generator.generate(PROMPTS, max_new_tokens=8, sampling=SamplingParams(1.0, top_p=1e-6), seed=5).tokens == greedy
    )


@pytest.mark.parametrize("kind", ["paged", "q8", "bf16"])
def test_other_cache_types_generate(kind, params, generator):
    want = generator.generate(PROMPTS, max_new_tokens=6).tokens
    gen = Generator(CONFIG, params, max_len=64, batch=4, buckets=(16,), cache=kind)
    got = gen.generate(PROMPTS, max_new_tokens=6)
    layout = {"paged": ("paged", "Plain"), "q8": ("contiguous", "Q8"), "bf16": ("contiguous", "Plain")}[kind]
    assert (gen.cache.layout, type(gen.cache.format).__name__) == layout
    if kind == "paged":  # same numbers, other layout: identical tokens
        assert got.tokens == want
    else:  # quantized or bf16 keys/values: the first token comes from the f32 prefill logits
        assert [t[0] for t in got.tokens] == [t[0] for t in want] and all(len(t) == 6 for t in got.tokens)


def test_cache_kinds_lists_what_exists():
    assert tuple(cache_kinds()) == jkv.kinds() == ("bf16", "f32", "q8", "fp8", "paged", "q8-paged", "fp8-paged")


# ---------------------------------------------------------------------------------------------- errors
SAMPLING_ERRORS = {
    "negative-temperature": (dict(temperature=-1.0), "temperature must be a finite number >= 0, got -1.0"),
    "nan-temperature": (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    "negative-top-k": (dict(top_k=-1), r"top_k must be an int >= 0 \(0: no top-k cut\), got -1"),
    "float-top-k": (dict(top_k=2.5), "top_k must be an int >= 0"),
    "int32-top-k": (dict(top_k=2**31), r"top_k must be below 2\*\*31 \(one at least the vocabulary .*, got 2147483648"),
    "float32-temperature": (
        dict(temperature=1e39),
        r"temperature must be at most 3.402823e\+38 \(float32's .*got 1e\+39",
    ),
    "zero-top-p": (dict(top_p=0.0), r"top_p must lie in \(0, 1\], got 0.0"),
    "big-top-p": (dict(top_p=1.5), r"top_p must lie in \(0, 1\], got 1.5"),
    "bool-temperature": (dict(temperature=True), "temperature must be a finite number >= 0, got True"),
    "bool-top-p": (dict(top_p=True), r"top_p must lie in \(0, 1\], got True"),
    "int-stop-tokens": (dict(stop_tokens=2), r"stop_tokens must be a sequence of token ids \(ints\), got 2"),
    "text-stop-tokens": (dict(stop_tokens="2"), r"stop_tokens must be a sequence of token ids \(ints\), got '2'"),
}


def test_sampling_takes_numpy_scalars_as_numbers():
    params = SamplingParams(np.float32(0.5), np.int64(4), np.float32(0.75), np.uint32(7), np.int16(3), [np.int32(2)])
    assert params == SamplingParams(0.5, 4, 0.75, 7, 3, (2,))
    assert [type(x) for x in dataclasses.astuple(params)[:5]] == [float, int, float, int, int]


@pytest.mark.parametrize("case", list(SAMPLING_ERRORS))
def test_sampling_errors(case):
    changes, message = SAMPLING_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        SamplingParams(**changes)


GENERATE_ERRORS = {
    "prompt-longer-than-max-len": (
        dict(prompts=[list(range(1, 70))]),
        ValueError,
        "prompt 0 has 69 tokens, longer than max_len=64",
    ),
    "prompt-plus-new-tokens": (
        dict(prompts=[[1], list(range(1, 60))], max_new_tokens=10),
        ValueError,
        r"prompt 1 \(59 tokens\) \+ max_new_tokens=10 needs 68 cache positions, more than max_len=64",
    ),
    "too-many-prompts": (dict(prompts=[[1]] * 5), ValueError, "5 prompts do not fit this generator's batch=4"),
    "empty-prompt": (dict(prompts=[[1], []]), ValueError, "prompt 1 must be a non-empty list of token ids"),
    "token-out-of-vocab": (dict(prompts=[[1, 83]]), ValueError, r"prompt 0 has token ids outside \[0, vocab_size=83\)"),
    "text-prompt": (dict(prompts="hello"), TypeError, "prompts must be a non-empty list of token-id lists"),
    "negative-new-tokens": (dict(max_new_tokens=-2), ValueError, "max_new_tokens must be an int >= 0, got -2"),
    "sampling-type": (dict(sampling=0.7), TypeError, "sampling must be a jkv.serving.SamplingParams, got float"),
    "negative-seed": (dict(seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*32\), got -1"),
    "seed-beyond-32-bits": (dict(seed=2**40), ValueError, r"seed must be an int in \[0, 2\*\*32\), got 1099511627776"),
    "bool-seed": (dict(seed=True), ValueError, r"seed must be an int in \[0, 2\*\*32\), got True"),
    "on-token-not-callable": (
        dict(on_token=1),
        TypeError,
        r"on_token must be a callable on_token\(sequence_index, token\)",
    ),
    "int-stop-ids": (dict(stop_ids=3), ValueError, r"stop_tokens must be a sequence of token ids \(ints\), got 3"),
}


@pytest.mark.parametrize("case", list(GENERATE_ERRORS))
def test_generate_errors(case, generator):
    kwargs, error, message = GENERATE_ERRORS[case]
    kwargs = {"prompts": [[1, 2]], **kwargs}
    with pytest.raises(error, match=message):
        generator.generate(kwargs.pop("prompts"), **kwargs)


def test_generator_errors(params):
    with pytest.raises(ValueError, match="max_len=1024 exceeds the model's context length max_position=512"):
        Generator(CONFIG, params, max_len=1024)
    with pytest.raises(ValueError, match="max_len must be an int >= 2, got 1"):
        Generator(CONFIG, params, max_len=1)
    with pytest.raises(ValueError, match="batch must be a positive int, got 0"):
        Generator(CONFIG, params, max_len=64, batch=0)
    names = r"\['bf16', 'f32', 'fp8', 'fp8-paged', 'paged', 'q8', 'q8-paged'\]"
    with pytest.raises(ValueError, match=r"cache='int4' is not one of " + names):
        Generator(CONFIG, params, max_len=64, cache="int4")
    with pytest.raises(ValueError, match="impl='cuda' is not one of"):
        Generator(CONFIG, params, max_len=64, impl="cuda")
    with pytest.raises(ValueError, match="params has 2 layers"):
        Generator(dataclasses.replace(CONFIG, num_layers=3), llama.with_layout(params, "layers"), max_len=64)
    nothing = Generator(CONFIG, params, max_len=64).generate([[1]], max_new_tokens=0)
    assert nothing.tokens == [[]] and "nan" not in nothing.timing.summary()  # no rates of nothing


def test_compiled_decode_step_continues_as_generate(params, full_logits):
    """``decode_step_compiled`` (benchmarks' device loop: one greedy token per slot, ``mixed.decode_only``) over
    slots holding the prompts continues each as ``generate`` does."""
    gen = Generator(CONFIG, params, max_len=64, batch=3, buckets=(16,))
    want = [greedy_reference(full_logits, p, 6) for p in PROMPTS]
    step, rows = gen.decode_step_compiled()
    for p in PROMPTS:
        gen.engine.submit(p, SamplingParams(max_new_tokens=6))
    gen.engine.admit()  # the slots (in submission order) hold the prompts and their first token is read
    tokens, got = jnp.asarray([w[0] for w in want], jnp.int32), []
    for _ in range(5):
        tokens, gen.cache = step(params, gen.cache, tokens, *rows)
        got.append(np.asarray(tokens))
    assert np.stack(got, axis=1).tolist() == [w[1:] for w in want]
