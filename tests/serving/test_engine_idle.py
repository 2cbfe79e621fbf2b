"""An engine driven by ``step()`` alone, as the server's worker drives it (``while has_work(): step()``), holds
nothing once ``has_work()`` is False: no slot length, page or pin, whether its last request finished or was
cancelled, with or without speculative decoding (whose steps read their tokens at once: nothing is in flight), and
after ``admit()``."""

import pytest
from helpers_server import IDLE, held
from helpers_serving import assert_nothing_held, engine, make_params

from jkv.serving import SamplingParams


@pytest.fixture(scope="module")
def params():
    return make_params(3)


@pytest.mark.parametrize("speculative", [0, 3], ids=["plain", "speculative"])
@pytest.mark.parametrize("end", ["finish", "cancel", "cancel-in-callback"])
def test_stepping_until_idle_holds_nothing(params, speculative, end):
    eng = engine(params, "paged", speculative_tokens=speculative)

    def on_token(rid, token):
        if end == "cancel-in-callback":
            eng.cancel(rid)

    rid = eng.submit([5, 6, 7] * 3, SamplingParams(max_new_tokens=6), on_token)
    eng.step()
    eng.step()
    if end == "cancel":
        assert eng.cancel(rid)
    while eng.has_work():
        eng.step()
    (done,) = eng.pop_finished()
    assert done.finish_reason == ("length" if end == "finish" else "cancelled")
    assert held(eng) == IDLE


@pytest.mark.parametrize("cache", ["f32", "paged"])
def test_admit_holds_nothing_once_its_requests_finished(params, cache):
    """``admit()`` runs the prompts and reads their first tokens: a request of one token finishes there, and the
    engine, idle, holds nothing of it."""
    eng = engine(params, cache)
    eng.submit([1, 2, 3], SamplingParams(max_new_tokens=1))
    eng.admit()
    assert not eng.has_work() and [c.finish_reason for c in eng.pop_finished()] == ["length"]
    assert_nothing_held(eng)
