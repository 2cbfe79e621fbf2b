"""The serving step never makes the host wait for the device: it holds no ``cond`` or ``while`` outside the Pallas
kernels. On a GPU XLA runs such control flow from the host (it reads the predicate back), so the thread that
dispatches step ``i + 1`` would stall until step ``i``'s forward pass is done and could not prepare the next step
while the device works (measured: a greedy sampling ``cond`` cost the 8B-shaped decode step 40 % of its speed)."""

import dataclasses
import functools

import jax
import jax.extend
import jax.numpy as jnp
import pytest

from jkv.models import llama
from jkv.serving import CACHE_KINDS, Engine, mixed

CONFIG = llama.LlamaConfig(96, 64, 128, 2, 2, 1, 32)  # head_dim 32: the Q8 formats take it
# Gemma 2's pattern: alternating windowed and full layers (a per-layer cache plan of two groups, a pool each)
WINDOWED = dataclasses.replace(CONFIG, windows=(16, None))
CONTROL_FLOW = {"cond", "while"}


@functools.cache
def _params():
    return llama.init_params(CONFIG, jax.random.key(0), jnp.float32, scale=0.2)  # WINDOWED's too


def control_flow(jaxpr) -> list[str]:
    """The control-flow primitives of ``jaxpr`` and the jaxprs inside it (a Pallas kernel's body not included:
    its loops run on the device)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in CONTROL_FLOW:
            found.append(eqn.primitive.name)
        if eqn.primitive.name == "pallas_call":
            continue
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += control_flow(sub)
    return found


def step_jaxpr(kind: str, rows: int = 1, config=CONFIG):
    engine = Engine(
        _params(), config, num_slots=3, max_len=64, cache=kind, buckets=(8,), max_batch_tokens=8,
        speculative_tokens=rows - 1, verbose=False,
    )  # fmt: skip
    inputs = engine.empty_step_inputs(8)
    step = functools.partial(mixed.mixed_step, config=config, options=engine.options.model_options, rows=rows)
    return jax.make_jaxpr(step)(engine.params, engine.cache, *inputs).jaxpr


@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_the_mixed_step_has_no_control_flow(kind):
    assert control_flow(step_jaxpr(kind)) == []


@pytest.mark.parametrize("config", [CONFIG, WINDOWED], ids=["uniform", "windowed"])
@pytest.mark.parametrize("kind", ["paged", "bf16"])
def test_the_slot_programs_have_no_control_flow(kind, config):
    """What runs between steps: emptying finished slots, and a prefix-cache hit's pin, attach and unpin (paged)."""
    engine = Engine(
        _params(), config, num_slots=3, max_len=64, cache=kind, buckets=(8,), prefix_cache_bytes=1 << 20,
        verbose=False,
    )  # fmt: skip
    cache, slot, n = engine.cache, jnp.int32(1), jnp.int32(20)
    programs = [jax.make_jaxpr(mixed.reset_slots)(cache, jnp.asarray([True, False, True]))]
    if kind == "paged":
        pinned, pages = jax.eval_shape(mixed.pin_pages, cache, slot, n)  # shapes only: the slot is empty
        programs.append(jax.make_jaxpr(mixed.pin_pages)(cache, slot, n))
        programs.append(jax.make_jaxpr(mixed.unpin_pages)(pinned, pages))
        single = engine.prefixes._empty  # what the engine's attach hands the cache
        programs.append(jax.make_jaxpr(mixed.attach_prefix)(pinned, jnp.int32(2), pages, n, single))
    else:
        programs.append(jax.make_jaxpr(functools.partial(mixed.extract_copy, max_len=32))(cache, slot))
    for program in programs:
        assert control_flow(program.jaxpr) == []


@pytest.mark.parametrize("truncate", [True, False])
def test_the_sampling_programs_have_no_control_flow(truncate):
    b, v = 3, CONFIG.vocab_size
    rows = (jnp.zeros((b, 2), jnp.uint32), jnp.zeros(b, jnp.int32), jnp.ones(b), jnp.zeros(b, jnp.int32), jnp.ones(b))
    program = functools.partial(mixed.sample_step, truncate=truncate)
    assert control_flow(jax.make_jaxpr(program)(jnp.zeros((b, v)), *rows).jaxpr) == []


@pytest.mark.parametrize("kind", ["paged", "q8-paged", "bf16"])
def test_the_step_of_a_windowed_plan_has_no_control_flow(kind):
    """A per-layer plan of pools: a group that refuses a sequence makes the others let it go, without a cond."""
    assert control_flow(step_jaxpr(kind, config=WINDOWED)) == []


def test_the_verification_step_has_no_control_flow():
    assert control_flow(step_jaxpr("paged", rows=3)) == []


def test_the_check_sees_control_flow():
    """The walk finds a ``cond`` inside a nested jaxpr (so that the tests above can fail)."""

    def f(x):
        return jax.jit(lambda y: jax.lax.cond(y.sum() > 0, lambda: y, lambda: -y))(x) * 2

    assert control_flow(jax.make_jaxpr(f)(jnp.ones(3)).jaxpr) == ["cond"]
