"""Where a served request's time to first token goes: the load generator's ``--trace-ttft``.

A request's first token crosses three stretches, each timed on ``time.perf_counter`` (one monotonic clock for
every process of the machine): **ingress**, from the client sending it to the engine's ``submit`` (HTTP, the app,
the worker thread's inbox); **engine**, from ``submit`` to the engine handing out its first token (waiting to be
scheduled, the prefill step, reading the token back); **egress**, from there to the client reading the token's
server-sent event (the worker's hand-off to the event loop, the stream, the client's parsing). :func:`instrument`
wraps an in-process engine's ``submit`` to record the middle two instants per request, keyed by the prompt's last
token ids (the clients send token ids, so the engine sees the same ones); :func:`report` joins them with the
clients' own records and gives each stretch's percentiles over all requests and over the slowest tenth by TTFT.
"""

from __future__ import annotations

import time

import numpy as np

KEY_TOKENS = 16  # a prompt's last ids: its key (random prompts of 128 ids never share them)


def prompt_key(prompt) -> tuple:
    return tuple(int(t) for t in prompt[-KEY_TOKENS:])


class Trace:
    """Per prompt key: when the engine took the request (``submitted``) and gave its first token (``first``)."""

    def __init__(self):
        self.submitted: dict[tuple, float] = {}
        self.first: dict[tuple, float] = {}


def instrument(engine) -> tuple[Trace, callable]:
    """Record every later request's engine instants in a :class:`Trace`; returns it and a function that removes
    the wrapper."""
    trace, original = Trace(), engine.submit

    def submit(prompt, params=None, on_token=None):
        key = prompt_key(prompt)
        trace.submitted[key] = time.perf_counter()
        trace.first.pop(key, None)  # a prompt sent again (a warm-up's) is timed afresh

        def tap(rid, token):
            trace.first.setdefault(key, time.perf_counter())
            if on_token is not None:
                on_token(rid, token)

        return original(prompt, params, tap)

    engine.submit = submit
    return trace, lambda: setattr(engine, "submit", original)


def report(trace: Trace, requests: list[tuple[float, list[float], tuple]]) -> dict:
    """Each stretch's p50 / p90 / max in ms over the requests the trace saw (``(sent, arrivals, key)`` from the
    clients), and its mean over the slowest tenth by TTFT; ``unmatched`` counts requests it did not see."""
    rows, unmatched = [], 0
    for sent, arrivals, key in requests:
        if not arrivals or key not in trace.first:
            unmatched += 1
            continue
        submitted, first = trace.submitted[key], trace.first[key]
        rows.append((arrivals[0] - sent, submitted - sent, first - submitted, arrivals[0] - first))
    out = {"requests": len(rows), "unmatched": unmatched}
    if not rows:
        return out
    table = 1e3 * np.asarray(rows)
    slow = table[table[:, 0] >= np.percentile(table[:, 0], 90)]
    for i, name in enumerate(("ttft", "ingress", "engine", "egress")):
        column = table[:, i]
        out[name] = {
            "p50_ms": round(float(np.percentile(column, 50)), 2),
            "p90_ms": round(float(np.percentile(column, 90)), 2),
            "max_ms": round(float(column.max()), 2),
            "slowest_tenth_mean_ms": round(float(slow[:, i].mean()), 2),
        }
    return out


def lines(concurrency: int, result: dict) -> list[str]:
    """The report as a few printed lines."""
    head = f"ttft trace at {concurrency}: {result['requests']} requests ({result['unmatched']} unmatched)"
    if "ttft" not in result:
        return [head]
    out = [head, f"  {'stretch':>8} {'p50':>8} {'p90':>8} {'max':>8} {'slowest 10 %':>13}  (ms)"]
    for name in ("ttft", "ingress", "engine", "egress"):
        r = result[name]
        figures = f"{r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} {r['max_ms']:>8.2f} {r['slowest_tenth_mean_ms']:>13.2f}"
        out.append(f"  {name:>8} {figures}")
    return out
