"""The shipped SmolLM2-135M (float32) through the NNX and Equinox example models: the logits of jkv's own Llama
model within 1e-5 and the same greedy tokens, with contiguous, paged and Q8 caches (Q8: the same tokens, logits within
the flips of its int8 codes: ``TOLERANCE``)."""

import functools

import helpers_smollm
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_integrations import FRAMEWORKS, make_cache, model_step

from jkv.models import llama

NEW_TOKENS = 8
# Logits' largest difference over their largest magnitude. A Q8 cache is discontinuous in what it stores: the
# example models compute keys with 1-ulp differences from jkv's model (norm and projections in another order), which
# flip some int8 codes; the flips move the logits by ~2e-3 of their range, far below what changes a greedy token.
TOLERANCE = {"f32": 1e-5, "paged": 1e-5, "q8": 5e-3}


@pytest.fixture(scope="module")
def smollm():
    return helpers_smollm.smollm()


@pytest.fixture(scope="module")
def prompts(smollm):
    ids = [smollm.tokenizer.encode(text) for text in ("The capital of France is", "One, two, three,")]
    t = min(len(x) for x in ids)
    return jnp.asarray([x[-t:] for x in ids], jnp.int32)  # [2, T]: each prompt's last T tokens


def greedy(step, weights, cache, prompt):
    """The prompt one token per step (one compiled step per model: 30 unrolled layers take long to compile on a
    CPU; multi-token steps are compared in test_example_models.py), then greedy tokens."""
    for t in range(prompt.shape[1]):
        logits, cache = step(weights, cache, prompt[:, t : t + 1])
    all_logits, tokens = [logits[:, -1]], []
    for _ in range(NEW_TOKENS):
        tokens.append(jnp.argmax(all_logits[-1], axis=-1).astype(jnp.int32))
        logits, cache = step(weights, cache, tokens[-1][:, None])
        all_logits.append(logits[:, -1])
    return np.stack(all_logits, 1), np.stack(tokens, 1)


@pytest.fixture(scope="module")
def reference(smollm, prompts):
    forward = helpers_smollm.jitted("forward", smollm.config, llama.LlamaOptions(impl="xla"))
    kinds = {}

    def run(kind):
        if kind not in kinds:
            kinds[kind] = greedy(forward, smollm.params, make_cache(kind, 2, 32, smollm.config), prompts)
        return kinds[kind]

    return run


@pytest.fixture(scope="module")
def framework_step(smollm):
    """Each framework's model of SmolLM2's weights and its step, built once for the three cache kinds."""
    return functools.cache(lambda framework: model_step(framework, smollm.params, smollm.config))


@pytest.mark.slow  # 30 unrolled layers compile in ~30 s per model on a 2-core CPU
@pytest.mark.parametrize("kind", list(TOLERANCE))
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_smollm_matches_jkv_llama(framework, kind, smollm, prompts, reference, framework_step):
    ref_logits, ref_tokens = reference(kind)
    step, weights = framework_step(framework)
    logits, tokens = greedy(step, weights, make_cache(kind, 2, 32, smollm.config), prompts)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=TOLERANCE[kind] * np.abs(ref_logits).max(), rtol=0)
