"""Memory planner: byte counts and the largest batch / context that fit a budget."""

import warnings

import jax.numpy as jnp
import pytest

import jkv
from jkv import memory

SPEC = jkv.CacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, max_len=2048, dtype=jnp.bfloat16)


def test_bytes_per_token_counts_k_and_v_of_every_layer():
    assert memory.bytes_per_token(SPEC) == 2 * 30 * 3 * 64 * 2
    assert memory.bytes_per_layer_per_token(SPEC) == 2 * 3 * 64 * 2
    assert memory.cache_bytes(SPEC, 4) == jkv.KVCache.init(SPEC.replace(num_layers=30), 4).nbytes


@pytest.mark.parametrize("format", [jkv.Q8(), jkv.Q8(scale_dtype="float32"), jkv.FP8()], ids=str)
def test_bytes_per_token_of_a_format_is_what_its_cache_holds(format):
    per_token = memory.bytes_per_token(SPEC, format)
    small = SPEC.replace(max_len=16)
    assert memory.cache_bytes(small, 2, per_token) == jkv.KVCache.init(small, 2, format=format).nbytes


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_max_batch_is_tight(batch):
    budget = memory.cache_bytes(SPEC, batch)
    assert memory.max_batch(SPEC, budget=budget) == batch
    if batch > 1:
        assert memory.max_batch(SPEC, budget=budget - 1) == batch - 1
    assert memory.max_batch(SPEC, budget=budget * 10, limit=batch) == batch


def test_max_len_for_is_tight():
    n = memory.max_len_for(SPEC, batch=4, budget=memory.cache_bytes(SPEC, 4))
    assert n == SPEC.max_len
    assert memory.cache_bytes(SPEC.replace(max_len=n + 1), 4) > memory.cache_bytes(SPEC, 4)


def test_warns_when_nothing_fits():
    with pytest.warns(UserWarning, match="not even one sequence fits: one sequence of max_len=2048 needs"):
        assert memory.max_batch(SPEC, budget=1000) == 0
    with pytest.warns(UserWarning, match="not even one position fits for batch=4"):
        assert memory.max_len_for(SPEC, batch=4, budget=1000) == 0


@pytest.mark.parametrize(
    "budget, reserve",
    [(float("nan"), None), (float("inf"), None), (-1, None), ("1000000000", None), (True, None), (2**30, -5)],
    ids=["nan", "inf", "negative", "text", "bool", "negative-reserve"],
)
def test_bad_budgets_are_refused(budget, reserve):
    """A budget or reserve must be a finite number of bytes >= 0 (NaN and inf failed inside int(), a negative
    budget planned nothing silently, the text '1000000000' was taken as a number)."""
    name, value = ("budget", budget) if reserve is None else ("reserve", reserve)
    message = rf"{name}={value!r} must be a finite number of bytes >= 0"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        memory.max_batch(SPEC, budget=budget, reserve=reserve)
    with pytest.raises(ValueError, match=name):
        memory.max_len_for(SPEC, 4, budget=budget, reserve=reserve)
    assert memory.max_batch(SPEC, budget=8e9) == memory.max_batch(SPEC, budget=8 * 10**9)  # floats count


def test_device_free_memory_is_positive_and_default_budget_works():
    assert memory.device_free_bytes() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert memory.max_batch(SPEC.replace(max_len=16)) >= 1
