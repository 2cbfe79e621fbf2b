"""The NNX and Equinox example models against jkv's own Llama: same logits and greedy tokens with contiguous,
paged and Q8 caches (random tiny weights here; the shipped SmolLM2 in test_smollm.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_integrations import CONFIG, FRAMEWORKS, make_cache, model_step, random_params

from jkv.integrations import common, example_eqx, example_nnx
from jkv.models import llama

KINDS = ("f32", "paged", "q8")


# jkv's own model, the reference (one jitted function: its compilations are shared by every test).
LLAMA_FORWARD = jax.jit(lambda params, cache, tokens: llama.forward(params, cache, tokens, config=CONFIG))


def greedy(step, weights, cache, prompt, new_tokens, rng):
    """Prefill ``prompt [B, T]``, then ``new_tokens`` greedy steps, each padded to the prompt's ``T`` (counts 1; the
    padding random, never written: one program per model and cache kind): (logits of every step, tokens)."""
    b, t = prompt.shape
    logits, cache = step(weights, cache, prompt, jnp.full(b, t, jnp.int32))
    all_logits, tokens = [np.asarray(logits[:, -1])], []
    ones = jnp.ones(b, jnp.int32)
    for _ in range(new_tokens):
        token = np.argmax(all_logits[-1], axis=-1).astype(np.int32)
        tokens.append(token)
        padded = rng.integers(0, CONFIG.vocab_size, prompt.shape).astype(np.int32)
        padded[:, 0] = token
        logits, cache = step(weights, cache, jnp.asarray(padded), ones)
        all_logits.append(np.asarray(logits[:, 0]))
    return np.stack(all_logits, 1), np.stack(tokens, 1), cache


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_example_model_matches_jkv_llama(framework, kind, rng):
    params = random_params(layout="stacked")  # the converter reads either layout
    prompt = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 5)), jnp.int32)
    step, weights = model_step(framework, params)
    logits, tokens, cache = greedy(step, weights, make_cache(kind, 2), prompt, 4, rng)
    # The reference teacher-forced on the example's tokens in one pass (one program per kind): its logits at the
    # prompt's last token and at each generated one, whose argmax must be the next generated token.
    ref_logits, ref_cache = LLAMA_FORWARD(params, make_cache(kind, 2), jnp.concatenate([prompt, tokens], 1))
    ref_logits = np.asarray(ref_logits)[:, prompt.shape[1] - 1 :]
    np.testing.assert_array_equal(tokens, np.argmax(ref_logits[:, :-1], -1))
    assert logits.shape == (2, 5, CONFIG.vocab_size) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5 * np.abs(ref_logits).max(), rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [9, 9])
    np.testing.assert_array_equal(np.asarray(cache.errors), np.asarray(ref_cache.errors))


@pytest.mark.parametrize("layout", ["layers", "stacked"])
def test_llama_layers_split_fused_weights(layout):
    """The example models' converter reads jkv's fused q/k/v (and Qwen2's biases) as ``llama.unfuse_qkv`` does."""
    config = llama.LlamaConfig(61, 32, 48, 2, 6, 2, 8, qkv_bias=True, tie_embeddings=True)
    params = random_params(config, layout=layout)
    for w, layer in zip(common.llama_layers(params), llama.with_layout(params, "layers").layers, strict=True):
        for names, fused in ((("wq", "wk", "wv"), layer.wqkv), (("bq", "bk", "bv"), layer.bqkv)):
            for name, want in zip(names, llama.unfuse_qkv(fused), strict=True):
                np.testing.assert_array_equal(np.asarray(w[name]), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(w["up"]), np.asarray(layer.w_gate_up[:, 1]))


@pytest.mark.parametrize("module", [example_nnx, example_eqx], ids=FRAMEWORKS)
def test_example_model_names_bad_tokens(module):
    """Tokens that are not ``int [B, T]`` are named (a vector failed on ``tokens.shape[1]``, floats in the gather)."""
    model = module.from_llama_params(random_params(), CONFIG)
    cache = make_cache("f32", 2)
    for tokens in (jnp.zeros(3, jnp.int32), jnp.zeros((2, 3), jnp.float32)):
        with pytest.raises(ValueError, match=r"tokens must be integers \[B, T\], got shape \((3,|2, 3)\) "):
            model(tokens, cache)


@pytest.mark.parametrize("module", [example_nnx, example_eqx], ids=FRAMEWORKS)
def test_from_llama_params_refuses_what_the_example_would_get_wrong(module):
    """A config the example model does not implement (Qwen3's q/k norms, Gemma's soft caps, ...) or weights of
    another config are refused, naming the field: the model built anyway ran, with wrong logits."""
    for change, message in (
        (dict(qk_norm=True), r"config.qk_norm=True"),
        (dict(final_softcap=30.0), r"config.final_softcap=30.0"),
        (dict(activation="gelu_tanh"), r"config.activation='gelu_tanh'"),
        (dict(windows=(4, None)), r"config.windows=\(4, None\)"),
    ):
        config = dataclasses.replace(CONFIG, **change)
        with pytest.raises(ValueError, match=message):
            module.from_llama_params(llama.init_params(config, jax.random.key(0)), config)
    params = random_params()
    other = dataclasses.replace(CONFIG, num_heads=16, head_dim=16, num_kv_heads=4)  # same q/k/v widths
    with pytest.raises(ValueError, match=r"params.layers\[0\].wqkv has shape"):
        module.from_llama_params(params, other)
    with pytest.raises(ValueError, match=r"params.lm_head is present but config.tie_embeddings=True"):
        module.from_llama_params(params, dataclasses.replace(CONFIG, tie_embeddings=True))
