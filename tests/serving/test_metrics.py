"""The run summary leaves compiling out of every latency it reports (a fresh engine's first requests wait for their
steps to compile) and its line says how long compiling took."""

import math

import numpy as np
from helpers_serving import engine, make_params, random_prompts

from jkv.serving import SamplingParams
from jkv.serving.metrics import Completion, EngineStats


def test_latencies_leave_out_the_compiling_between_a_requests_times():
    """Submitted at 0, a slot at 2, first token at 5, fifth and last at 9; compiling in [1, 4] and [6, 7]."""
    compiles = [(1.0, 4.0), (6.0, 7.0)]
    overlap = lambda start, end: sum(max(min(e, end) - max(s, start), 0.0) for s, e in compiles)
    stats = EngineStats()
    stats.completed_one(Completion(0, [1], [7] * 5, "length", 0, 0.0, 5.0, 9.0, 9.0, 2.0), overlap)
    s = stats.summary()
    assert (s.mean_ttft_s, s.mean_queue_s, s.mean_itl_s) == (2.0, 1.0, 0.75)


def test_time_to_first_token_leaves_the_first_steps_compile_out(rng):
    """Every request submitted to a fresh engine waits for its first step to compile: that compile is no part of
    the mean time to first token (nor of the wait for a slot), and the summary line reports it apart."""
    eng = engine(make_params(5), "f32", num_slots=3, buckets=(8,), max_batch_tokens=8)  # shapes other tests lack
    for prompt in random_prompts(rng, 3, 2, 6):
        eng.submit(prompt, SamplingParams(max_new_tokens=4))
    done = eng.run(show_progress=False)
    s, compiled = eng.summary(), eng.stats.compile_s  # one step shape: its compile came before every first token
    assert (
        sorted(name for name, _ in eng.steps.compiled) == ["mixed", "retire"] and compiled > 0
    )  # retire: after the run
    assert s.mean_ttft_s <= np.mean([c.time_to_first_token for c in done]) - compiled + 1e-9
    assert s.compile_s == compiled
    between = eng.steps.compile_s_between
    assert math.isclose(
        s.mean_ttft_s, np.mean([c.time_to_first_token - between(c.submitted, c.first_token) for c in done])
    )
    assert 0 <= s.mean_queue_s <= s.mean_ttft_s and s.mean_itl_s > 0
    assert f"compiling {s.compile_s:.2f} s, left out of every time and rate here" in s.format()
