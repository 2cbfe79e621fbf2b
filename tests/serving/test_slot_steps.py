"""``decode_steps="slots"``: the engine's decode-only steps laid out by slot (``jkv.serving.mixed.slot_step``, the
decode kernels' path) give the tokens of one-at-a-time generation for every cache kind, and run only where a step
carries one token per running sequence."""

import numpy as np
import pytest
from helpers_serving import assert_nothing_held, engine, make_params, one_at_a_time, random_prompts

from jkv.serving import EngineOptions, SamplingParams, cache_kinds
from jkv.serving.requests import by_slot
from jkv.serving.scheduler import Entry, StepPlan
from jkv.serving.scheduler import Sequence as Scheduled


@pytest.fixture(scope="module")
def params():
    return make_params(5)


@pytest.mark.parametrize("kind", cache_kinds())
def test_slot_steps_equal_one_at_a_time(params, kind):
    """Requests arriving while others decode (so steps alternate between mixed and decode-only), prompts split
    over 8-token steps, a seeded sampler beside greedy ones."""
    ps = random_prompts(np.random.default_rng(11), 6, 2, 14)
    greedy, seeded = SamplingParams(max_new_tokens=6), SamplingParams(0.8, top_k=16, seed=3, max_new_tokens=6)
    want = [one_at_a_time(params, [p], kind, sp)[0] for p, sp in zip(ps, [greedy, seeded] * 3, strict=True)]
    eng = engine(params, kind, decode_steps="slots", max_batch_tokens=8, buckets=(8, 16))
    assert eng.compile_all(progress=False) == 3  # two token buckets and the slot step
    ids = [eng.submit(p, sp) for p, sp in zip(ps[:3], [greedy, seeded, greedy], strict=True)]
    for _ in range(4):
        eng.step()
    ids += [eng.submit(p, sp) for p, sp in zip(ps[3:], [seeded, greedy, seeded], strict=True)]
    done = {c.id: c.tokens for c in eng.run(show_progress=False)}
    assert [done[i] for i in ids] == want, kind
    assert eng.steps.calls["slots"] >= 4 and eng.steps.calls["mixed"] >= 6  # both kinds of step ran
    assert_nothing_held(eng)


def test_slot_layout_only_for_one_token_per_running_sequence():
    def plan(*entries):
        seqs = []
        for slot, (prompt_len, computed, count) in enumerate(entries):
            seq = Scheduled(slot, prompt_len, prompt_len + 8)
            seq.slot, seq.computed = slot * 2, computed  # slots 0, 2, 4: a gap between them
            seqs.append(Entry(seq, computed, count))
        counts = np.zeros(6, np.int32)
        for e in seqs:
            counts[e.seq.slot] = e.count
        return StepPlan(0, 8, seqs, counts, [])

    tokens, src = np.arange(10, 18, dtype=np.int32), np.asarray([-1, 2, -1, -1, -1, -1, -1, -1], np.int32)
    got = by_slot(plan((3, 4, 1), (5, 6, 1), (2, 9, 1)), tokens, src, 6)
    assert got is not None
    np.testing.assert_array_equal(got[0], [10, 0, 11, 0, 12, 0])
    np.testing.assert_array_equal(got[1], [-1, -1, 2, -1, -1, -1])
    assert by_slot(plan((3, 4, 1), (5, 4, 1)), tokens, src, 6) is None  # a prompt token (position 4 of 5)
    assert by_slot(plan((3, 4, 1), (5, 6, 2)), tokens, src, 6) is None  # a draft


def test_decode_steps_option_is_checked():
    with pytest.raises(ValueError, match=r"decode_steps='padded' is not one of \('flat', 'slots'\)"):
        EngineOptions(decode_steps="padded")
    # with speculative decoding every step stays a mixed step (drafts are verified there)
    eng = engine(make_params(5), decode_steps="slots", speculative_tokens=2)
    assert eng.compile_all(progress=False) == 1
    eng.generate([[1, 2, 3, 1, 2, 3]], SamplingParams(max_new_tokens=4), show_progress=False)
    assert eng.steps.calls["slots"] == 0
