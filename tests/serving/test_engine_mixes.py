"""Random mixes of everything the engine must get right at once, on every cache kind: each request's tokens and
finish reason equal the same request alone in an engine of that kind, and nothing is held once the engine is idle.

A mix (seeded numpy draws) holds: requests arriving between steps and from inside ``on_token`` callbacks, 8 to 16
tokens per step (prompts of up to 50 tokens split over steps), prompts of one token, identical prompts submitted
together (a prefix hit on pages whose writer is still running) and prompts sharing a prefix, a small page pool
(requests wait), a prefix cache small enough to evict, ``max_new_tokens`` that fill the row exactly or run past
it, stop tokens among the first three tokens (the first included), cancellations at any step and from callbacks,
and either prompt-lookup drafts (greedy) or seeded sampling with top-k / top-p beside greedy requests. The engine
is driven as the server's worker drives it, ``step()`` while ``has_work()``, with a few ``admit()`` calls between."""

import dataclasses

import numpy as np
import pytest
from helpers_serving import CONFIG, MAX_LEN, assert_nothing_held, cache_kinds_paged, engine, make_params

from jkv.serving import SamplingParams, cache_kinds
from jkv.serving.requests import fills_row


@pytest.fixture(scope="module")
def params():
    return make_params(3)


class Alone:
    """Each request alone in an engine of one kind (its continuation memoized, the longest asked for kept)."""

    def __init__(self, params, kind):
        self.engine, self.seen = engine(params, kind), {}

    def tokens(self, prompt, sp: SamplingParams) -> list[int]:
        key = (tuple(prompt), sp.temperature, sp.top_k, sp.top_p, sp.seed)
        known = self.seen.get(key, [])
        if len(known) < sp.max_new_tokens and not fills_row(len(prompt), len(known), MAX_LEN):
            self.engine.submit(prompt, dataclasses.replace(sp, stop_tokens=()))
            (done,) = self.engine.run(show_progress=False)
            self.seen[key] = known = done.tokens
        return known

    def expect(self, prompt, sp: SamplingParams) -> tuple[list[int], str]:
        """The tokens and finish reason of ``prompt`` under ``sp`` alone."""
        out = self.tokens(prompt, sp)[: sp.max_new_tokens]
        stops = [i for i, t in enumerate(out) if t in sp.stop_tokens]
        if stops:
            return out[: stops[0]], "stop"
        return out, "length" if len(out) == sp.max_new_tokens else "max_len"


def run_mix(params, kind, alone: Alone, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    v, drafts = CONFIG.vocab_size, int(rng.choice([0, 3]))
    knobs = {"num_pages": int(rng.choice([8, 24]))} if cache_kinds_paged(kind) else {}
    knobs |= {"prefix_cache_bytes": int(rng.choice([20_000, 1 << 20])), "max_batch_tokens": int(rng.integers(8, 17))}
    eng = engine(params, kind, speculative_tokens=drafts, **knobs)
    shared = rng.integers(0, v, size=int(rng.integers(17, 40))).tolist()
    requests, cancelled = {}, set()  # id -> (prompt, sampling, streamed)

    def draw_request():
        kind_of = rng.random()
        if kind_of < 0.15:
            prompt = [int(rng.integers(v))]
        elif kind_of < 0.4:
            prompt = list(shared)
        elif kind_of < 0.6:
            prompt = shared + rng.integers(0, v, size=int(rng.integers(1, 10))).tolist()
        elif kind_of < 0.7:  # repeats itself: drafts to accept
            prompt = (rng.integers(0, v, size=3).tolist() * 6)[: int(rng.integers(4, 18))]
        else:
            prompt = rng.integers(0, v, size=int(rng.integers(1, 51))).tolist()
        n = int(rng.choice([1, 2, 5, 9, MAX_LEN - len(prompt) + 1, MAX_LEN]))  # the last two: the row's end
        hot = not drafts and rng.random() < 0.4
        sp = SamplingParams(0.9 * hot, int(rng.choice([0, 20])), float(rng.choice([1.0, 0.8])), int(rng.integers(99)))
        sp = dataclasses.replace(sp, max_new_tokens=n)
        if rng.random() < 0.2:  # a stop token among the first three (of one generated token: that one)
            first = alone.tokens(prompt, dataclasses.replace(sp, max_new_tokens=max(n, 3)))
            sp = dataclasses.replace(sp, stop_tokens=(first[int(rng.integers(min(3, len(first))))],))
        return prompt, sp

    def cancel_one():
        victim = int(rng.choice(list(requests)))
        if eng.cancel(victim):
            cancelled.add(victim)

    def submit(prompt, sp):
        streamed = []

        def on_token(rid, token):
            streamed.append(token)
            if rng.random() < 0.03 and len(requests) < 16:
                submit(*draw_request())
            if rng.random() < 0.02:
                cancel_one()

        requests[eng.submit(prompt, sp, on_token)] = (prompt, sp, streamed)

    for _ in range(int(rng.integers(3, 10))):
        submit(*draw_request())
    done = []
    while eng.has_work():
        eng.admit() if rng.random() < 0.05 else eng.step()  # admit: every waiting prompt in, first tokens read
        if rng.random() < 0.3 and len(requests) < 16:
            submit(*draw_request())
        if rng.random() < 0.05:
            cancel_one()
        done += eng.pop_finished()
    done += eng.pop_finished()
    assert sorted(c.id for c in done) == sorted(requests)
    assert_nothing_held(eng)
    for c in done:
        prompt, sp, streamed = requests[c.id]
        want, reason = alone.expect(prompt, sp)
        assert c.tokens == streamed, c.id
        if c.id in cancelled and c.finish_reason == "cancelled":
            assert c.tokens == want[: len(c.tokens)], (seed, c.id)
        else:
            assert (c.tokens, c.finish_reason) == (want, reason), (seed, c.id, len(prompt), sp)
    return {"cancelled": len(cancelled), "drafts": eng.stats.drafted_tokens, "hits": eng.stats.prefix_hits}


@pytest.mark.parametrize("kind", cache_kinds())
def test_random_mixes_equal_each_request_alone(params, kind):
    alone = Alone(params, kind)
    seen = [run_mix(params, kind, alone, seed) for seed in range(2)]
    assert all(s["hits"] for s in seen)
