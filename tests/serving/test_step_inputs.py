"""The mixed step's inputs (``jkv.serving.step_inputs``): the host arrays go to the device as one packed array and
come back out of it whole inside the step; slots that do not sample reuse one device copy of their sampling rows
(a step of greedy slots transfers nothing for them), and which sampling program draws follows the slots."""

import jax.numpy as jnp
import numpy as np
import pytest

from jkv.serving import SamplingParams, mixed
from jkv.serving.step_inputs import SAMPLING_INPUTS, StepInputs


def test_pack_and_unpack_round_trip(rng):
    t, b = 24, 5
    tokens, src = rng.integers(0, 1000, t), rng.integers(-1, b, t)
    counts, verify, reset = rng.integers(0, 9, b), rng.random(b) < 0.5, rng.random(b) < 0.5
    packed = mixed.pack(tokens, src, counts, verify, reset)
    assert packed.dtype == np.int32 and packed.shape == (2 * t + 3 * b,) and mixed.packed_tokens(packed.size, b) == t
    out = mixed.unpack(jnp.asarray(packed), b)
    for got, want in zip(out, (tokens, src, counts, verify, reset), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert out[3].dtype == out[4].dtype == jnp.bool_


def _build(inputs, params):
    return inputs.build(lambda: params, np.zeros(8, np.int32), np.full(8, -1, np.int32), inputs.no_tokens)


def test_greedy_slots_reuse_one_copy_and_sampling_ones_choose_the_program():
    inputs = StepInputs(3, jnp.zeros(3, jnp.int32))
    first = _build(inputs, [None, SamplingParams(max_new_tokens=4), None])
    assert inputs.draw is None and len(first) == 7 and first[1] is inputs.no_tokens
    inputs.slots_changed()  # another greedy request took a slot: nothing new to send
    again = _build(inputs, [SamplingParams(seed=3), None, SamplingParams()])
    assert all(x is y for x, y in zip(first[SAMPLING_INPUTS], again[SAMPLING_INPUTS], strict=True))
    inputs.slots_changed()
    hot = _build(inputs, [None, SamplingParams(temperature=0.7, seed=9), None])
    assert inputs.draw == "all" and float(hot[SAMPLING_INPUTS][2][1]) == pytest.approx(0.7)
    inputs.slots_changed()
    _build(inputs, [SamplingParams(temperature=1.0, top_p=0.9), None, None])
    assert inputs.draw == "truncate"
    inputs.slots_changed()
    back = _build(inputs, [None, None, None])
    assert inputs.draw is None and back[SAMPLING_INPUTS][0] is first[SAMPLING_INPUTS][0]


def test_resets_travel_as_they_were_when_built():
    inputs = StepInputs(3, jnp.zeros(3, jnp.int32))
    inputs.resets[1] = True
    packed = _build(inputs, [None] * 3)[0]
    inputs.resets[:] = False  # the engine clears them after the dispatch: the step's copy keeps them
    np.testing.assert_array_equal(np.asarray(mixed.unpack(packed, 3)[4]), [False, True, False])
