"""The warp-specialised multi-token kernel's barrier protocol (``multi_token_mgpu_ws``), with and without the
ping-pong schedule, as a model on any host: the producer's and both consumers' barrier arrivals and waits, in the
order the kernel issues them (keep ``consumer_ops`` in step with ``_kernel``'s consumer), run under random
interleavings over mbarriers that count phases and keep, per waiting thread, the parity of the next phase it waits
for. A schedule passes if every interleaving tried finishes with no barrier holding a partial phase, no thread
arriving twice in one phase and no waiter two phases behind (its parity would then name the wrong phase). The
consumers' skip and computed steps come from ``_own_range`` on the tile tables of test_multi_token_mgpu_ws.py's
cases, and from every split of short tiles.

The model's ping-pong turns are checked against the kernel itself: its traced program takes two turns per step in
each of its five step loops, and the two offset turns outside them (``test_kernel_takes_two_turns_in_every_step``).
A kernel that breaks the protocol hangs on the GPU; these find such a break on a CPU first.
"""

import functools
import itertools
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore
from test_multi_token_mgpu import case_inputs, tile_table
from test_multi_token_mgpu_ws import WS_CASES, WS_IDS

from pallas_kernels import multi_token_mgpu as mgpu
from pallas_kernels import multi_token_mgpu_ws as ws

Config = mgpu.MgpuMultiTokenConfig
CONSUMERS = ws.CONSUMERS
INTERLEAVINGS = 20
TURN = ("turn", 0)  # the ping-pong barrier; the ring's are (name, slot)


def consumer_ops(wg, kinds, *, stages, pingpong, skip_turns=2):
    """Consumer ``wg``'s barrier operations over a tile whose steps are ``kinds`` ("skip" or "compute"):
    ``("arrive" | "wait", barrier)``; ``skip_turns`` other than 2 plants a bug."""
    steps = len(kinds)
    k, v, k_free, v_free = (lambda i, n=n: (n, i % stages) for n in ("k", "v", "k_free", "v_free"))
    turn = [("arrive", TURN), ("wait", TURN)]
    ops = []
    if pingpong:
        ops += [("wait", k(0))] if steps else []
        ops += turn if wg == 1 else []
    for i, kind in enumerate(kinds):
        next_k = [("wait", k(i + 1))] if pingpong and i + 1 < steps else []
        ops += [] if pingpong else [("wait", k(i))]
        if kind == "skip":  # the slot released; pingpong: the computed step's two turns around the V wait
            ops += [("arrive", k_free(i))]
            if pingpong and skip_turns:
                ops += turn * (skip_turns - 1) + [("arrive", TURN), ("wait", v(i)), ("wait", TURN)]
            else:
                ops += [("wait", v(i))]
            ops += [("arrive", v_free(i)), *next_k]
        else:  # scores issued, a turn, scores read; softmax, half a turn, V, the turn's wait; PV issued, next K
            ops += turn if pingpong else []
            ops += [("arrive", k_free(i))] + ([("arrive", TURN)] if pingpong else [])
            ops += [("wait", v(i))] + ([("wait", TURN)] if pingpong else [])
            ops += [*next_k, ("arrive", v_free(i))]
    ops += turn if pingpong and wg == 0 else []
    return ops


def producer_ops(steps, *, stages):
    """The producer's: the first ``stages`` blocks at once, then each slot refilled once both consumers freed it."""
    ops = []
    for i in range(steps):
        slot = i % stages
        for name in ("k", "v"):
            ops += [("wait", (f"{name}_free", slot))] if i >= stages else []
            ops += [("arrive", (name, slot))]  # the slot's TMA copies (counted as one arrival)
    return ops


def run_protocol(programs: dict, rng) -> None:
    """Run ``{thread: ops}`` in a random interleaving over barriers of ``CONSUMERS`` arrivals (one for K/V slots,
    which only the producer's copies complete); raise AssertionError on a hang or a broken phase."""
    arrivals = lambda b: 1 if b[0] in ("k", "v") else CONSUMERS
    phase, arrived, waits = Counter(), {}, {t: Counter() for t in programs}
    at = dict.fromkeys(programs, 0)

    def ready(t):
        op, b = programs[t][at[t]]
        return op == "arrive" or phase[b] > waits[t][b]

    while live := [t for t in programs if at[t] < len(programs[t])]:
        runnable = [t for t in live if ready(t)]
        assert runnable, f"hang: {[(t, programs[t][at[t]]) for t in live]}"
        t = runnable[rng.integers(len(runnable))]
        op, b = programs[t][at[t]]
        at[t] += 1
        if op == "wait":
            assert phase[b] == waits[t][b] + 1, f"{t} waits on {b} two phases behind"
            waits[t][b] += 1
            continue
        who = arrived.setdefault(b, [])
        assert t not in who, f"{t} arrives twice in one phase of {b}"
        who.append(t)
        if len(who) == arrivals(b):
            phase[b] += 1
            who.clear()
    assert not any(arrived.values()), f"partial phases left: {arrived}"


def tile_programs(kinds_per_wg, *, stages, pingpong, skip_turns=2):
    """One tile's programs: both consumers' (their steps' kinds) and the producer's."""
    steps = len(kinds_per_wg[0])
    programs = {
        f"consumer{wg}": consumer_ops(wg, kinds, stages=stages, pingpong=pingpong, skip_turns=skip_turns)
        for wg, kinds in enumerate(kinds_per_wg)
    }
    return {**programs, "producer": producer_ops(steps, stages=stages)}


def kinds_of(lo, hi, steps):
    """A consumer computing the tile's steps ``lo .. hi - 1`` and skipping the others."""
    return ["compute" if lo <= i < hi else "skip" for i in range(steps)]


@pytest.mark.parametrize("pingpong", [False, True], ids=["plain", "pingpong"])
@pytest.mark.parametrize("case", WS_CASES, ids=WS_IDS)
def test_case_tiles_never_hang(rng, case, pingpong):
    """Every tile of the case's two-consumer table, each consumer computing only its own blocks."""
    q, _, _, starts, lengths, counts, window, _, config = case_inputs(rng, case)
    table = tile_table(
        starts, lengths, counts, num_rows=q.shape[0], block_q=2 * config.block_q, block_k=config.block_k, window=window
    )
    for _, _, skip, nrows, pos_base, _, hi, t_lo, _, _, t_hi in np.asarray(table):
        steps = int(t_hi - t_lo)
        kinds = []
        for wg in range(CONSUMERS):
            own = ws._own_range(
                wg, skip, nrows, pos_base, hi, t_lo, block_q=config.block_q, block_k=config.block_k, window=window
            )
            _, _, _, my_lo, _, _, my_hi = (int(x) for x in own)
            kinds.append(kinds_of(my_lo - t_lo, my_hi - t_lo, steps))
        for stages in sorted({1, config.num_stages}):
            for _ in range(INTERLEAVINGS // 4):
                run_protocol(tile_programs(kinds, stages=stages, pingpong=pingpong), rng)


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("pingpong", [False, True], ids=["plain", "pingpong"])
def test_every_split_of_short_tiles_never_hangs(rng, pingpong, stages):
    """Tiles of up to 4 steps, each consumer computing any run of them (none included)."""
    for steps in range(5):
        runs = [(lo, hi) for lo in range(steps + 1) for hi in range(lo, steps + 1)]
        for (lo0, hi0), (lo1, hi1) in itertools.product(runs, repeat=2):
            kinds = [kinds_of(lo0, hi0, steps), kinds_of(lo1, hi1, steps)]
            for _ in range(INTERLEAVINGS // 4):
                run_protocol(tile_programs(kinds, stages=stages, pingpong=pingpong), rng)


@pytest.mark.parametrize("skip_turns", [0, 1, 3])
def test_the_model_catches_unpaired_turns(rng, skip_turns):
    """A skip step taking other than a computed step's two turns: the model reports the hang or the broken phase
    (the kernel would hang)."""
    kinds = [kinds_of(0, 3, 3), kinds_of(0, 2, 3)]  # consumer 1 skips the last block (a causal diagonal)
    with pytest.raises(AssertionError, match=r"hang|partial phases|twice|behind"):
        for _ in range(INTERLEAVINGS):
            run_protocol(tile_programs(kinds, stages=2, pingpong=True, skip_turns=skip_turns), rng)


def turn_ops(config, window):
    """The kernel's own operations on its ping-pong barrier (the one barrier of one slot; the ring's have
    ``num_stages`` > 1, the query tiles' ``2 * heads_per_tile``), from ``_attend``'s traced program: per loop body
    (``lax.fori_loop``), the ops outside any ``pl.when`` in order, and the ops under a ``pl.when`` outside loops."""
    sd = jax.ShapeDtypeStruct
    cache = sd((2, 3, 2, 256, 128), jnp.bfloat16)
    ints = sd((3,), jnp.int32)
    args = (sd((64, 8, 128), jnp.bfloat16), cache, cache, ints, ints, ints, sd((1,), jnp.int32))
    attend = functools.partial(ws._attend, scale=0.1, window=window, softcap=None, config=config)
    loops, when = [], []

    def walk(jaxpr, loop, conditional):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name in ("barrier_arrive", "barrier_wait") and eqn.invars[0].aval.shape == (1,):
                op = name.removeprefix("barrier_")
                assert not (conditional and loop is not None), "a turn under a pl.when inside a loop"
                (when if conditional else loop).append(op)
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else [param]:
                    sub = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
                    if not isinstance(sub, jcore.Jaxpr):
                        continue
                    if name == "while":
                        loops.append([])
                        walk(sub, loops[-1], False)
                    else:
                        walk(sub, loop, conditional or name == "cond")

    walk(jax.make_jaxpr(attend)(*args).jaxpr, None, False)
    return [ops for ops in loops if ops], when


@pytest.mark.parametrize("window", [None, 70])
@pytest.mark.parametrize("config", [Config(16, 4, 64, 2), Config(64, 1, 64, 3)], ids=str)
def test_kernel_takes_two_turns_in_every_step(config, window):
    """The count the module doc argues from, read off the kernel's program: each of the consumer's five loops
    (skip, masked, plain, masked, skip steps) takes exactly two turns per step, each arrival followed by its wait,
    none of them conditional, and outside the loops only the two offset turns (consumer 1's first, consumer 0's
    last); without ``pingpong`` there is no such barrier."""
    loops, when = turn_ops(config._replace(pingpong=True), window)
    assert loops == [["arrive", "wait", "arrive", "wait"]] * 5
    assert when == ["arrive", "wait"] * 2
    assert turn_ops(config, window) == ([], [])
