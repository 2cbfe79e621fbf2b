"""Two checkouts of jkv timed against each other in interleaved rounds (GPU): is the new one slower?

Each checkout runs in its own worker process (it imports ``jkv`` and ``pallas_kernels`` from its own folder),
builds every case once (random inputs, compiled before timing), then times a case when the coordinator asks.
Round r times every case on both checkouts, in an order that alternates between rounds, because the order of
two timings biases an A/B comparison by 1-2 %. The verdict per case is the median over rounds of the per-round
ratio B / A, with its range.

Cases: the Llama-3-8B-shaped decode step (random bf16 weights, bf16 cache, greedy argmax on the device, the
cache donated; a device loop of ``--steps`` steps) at batch 1 and 64, and decode attention (bf16, 32/8/128) over
a one-layer contiguous cache at three shapes, ``--calls`` calls unrolled in one jitted program, each call's
output the next call's query.

    python bench/ab.py --a /path/to/old/checkout --b . --rounds 7 --out $OUT/ab.jsonl
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

STEP_CASES = {"step-8b-b1": 1, "step-8b-b64": 64}
ATTN_CASES = {"attn-1x32768": (1, 32768), "attn-16x8192": (16, 8192), "attn-128x2048": (128, 2048)}
HEADS = (32, 8, 128)  # query heads, kv heads, head_dim
PROMPT, MAX_LEN = 1024, 2048
# Each worker's share of the GPU's memory (two workers; JKV_AB_MEM_FRACTION overrides, e.g. 0.48 on an 80 GB card).
MEM_FRACTION = os.environ.get("JKV_AB_MEM_FRACTION", "0.45")
SMOKE = os.environ.get("JKV_AB_SMOKE") == "1"  # tiny shapes: a check of this script on a CPU
if SMOKE:
    ATTN_CASES = {name: (b, 64) for name, (b, _) in ATTN_CASES.items()}
    PROMPT, MAX_LEN = 16, 256


# ---------------------------------------------------------------------------------------------- worker
def _random_cache(make, key):
    """The cache ``make()`` builds, with random values in every floating leaf (K/V however the checkout names them)
    and zeros elsewhere, made leaf by leaf: the zero cache is never allocated (at batch 64 it is 16 GiB)."""
    import jax

    shapes = jax.eval_shape(make)
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(key, len(leaves))
    out = [
        jax.random.normal(k, x.shape, x.dtype)
        if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
        else jax.numpy.zeros(x.shape, x.dtype)
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(tree, out)


def _with_lengths(cache, lengths):
    """``cache`` at ``lengths`` (a fresh copy: the step donates the cache, lengths included)."""
    import jax.numpy as jnp

    return cache.replace(lengths=jnp.array(lengths, cache.lengths.dtype, copy=True))


class Api:
    """The few calls whose spelling differs between checkouts."""

    def __init__(self):
        import jkv

        self.jkv = jkv
        self.new = hasattr(jkv, "attend")

    def cache(self, spec, batch):
        return self.jkv.KVCache.init(spec, batch)

    def attention(self, q, cache):
        """Decode attention of one query per sequence over ``lengths + 1`` positions (the new token included)."""
        if self.new:
            return self.jkv.attend(q[:, None], cache.begin(1), 0)[:, 0]
        return self.jkv.decode_attention(q, cache, 0)


@functools.cache
def _model():
    """The 8B-shaped config and its random bf16 weights, once per worker: the step cases share them (16 GB)."""
    import jax
    import jax.numpy as jnp

    from jkv.models import llama

    config = llama.LlamaConfig(512, 128, 256, 2, 4, 2, 32) if SMOKE else llama.LlamaConfig.llama3_8b()
    return config, llama.init_params(config, jax.random.key(0), dtype=jnp.bfloat16)


def _step_case(api, batch):
    import jax
    import jax.numpy as jnp

    from jkv.models import llama

    config, params = _model()
    spec = api.jkv.CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, MAX_LEN, jnp.bfloat16)
    lengths = jax.random.randint(jax.random.key(1), (batch,), PROMPT // 2, PROMPT + 1)
    cache = _with_lengths(_random_cache(lambda: api.cache(spec, batch), jax.random.key(2)), lengths)

    def step(params, cache, tokens):
        logits, cache = llama.decode_step(params, cache, tokens, config=config)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache

    step = jax.jit(step, donate_argnums=(1,))
    state = {"cache": cache, "tokens": jnp.zeros((batch,), jnp.int32)}

    def run(n):
        tokens, cache = state["tokens"], state["cache"]
        for _ in range(n):
            tokens, cache = step(params, cache, tokens)
        tokens.block_until_ready()
        state["cache"], state["tokens"] = _with_lengths(cache, lengths), tokens  # every timing at the same lengths

    return run


def _attention_case(api, batch, seq):
    import jax
    import jax.numpy as jnp

    n, k, d = HEADS
    spec = api.jkv.CacheSpec(1, k, d, seq, jnp.bfloat16)
    cache = _random_cache(lambda: api.cache(spec, batch), jax.random.key(3))
    cache = _with_lengths(cache, jnp.full((batch,), seq - 1, jnp.int32))
    q = jax.random.normal(jax.random.key(4), (batch, n, d), jnp.float32).astype(jnp.bfloat16)

    def make(calls):
        @jax.jit
        def chained(q, cache):
            for _ in range(calls):
                q = api.attention(q, cache).astype(q.dtype)
            return q

        return chained

    programs = {}

    def run(calls):
        if calls not in programs:
            programs[calls] = make(calls)
        programs[calls](q, cache).block_until_ready()

    return run


def worker(case_names, steps, calls):
    api = Api()
    runs, per_call = {}, {}
    for name in case_names:
        if name in STEP_CASES:
            runs[name], per_call[name] = _step_case(api, STEP_CASES[name]), steps
        else:
            runs[name], per_call[name] = _attention_case(api, *ATTN_CASES[name]), calls
        for _ in range(2):  # compile, then one warm run
            runs[name](per_call[name])
    print(json.dumps({"ready": True, "new_api": api.new}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        t = time.perf_counter()
        runs[name](per_call[name])
        print(json.dumps({"ms": 1e3 * (time.perf_counter() - t) / per_call[name]}), flush=True)


# ---------------------------------------------------------------------------------------------- coordinator
def start(path, cases, args):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path), XLA_PYTHON_CLIENT_MEM_FRACTION=MEM_FRACTION)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--cases", *cases]
    cmd += ["--steps", str(args.steps), "--calls", str(args.calls)]
    proc = subprocess.Popen(cmd, env=env, cwd=path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc


def ask(proc, line=None):
    if line is not None:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
    reply = proc.stdout.readline()
    if not reply:
        raise RuntimeError(f"worker exited with {proc.wait()}")
    return json.loads(reply)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", help="baseline checkout (folder holding jkv/ and pallas_kernels/)")
    p.add_argument("--b", help="checkout compared with the baseline")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=20, help="decode steps per timing")
    p.add_argument("--calls", type=int, default=400, help="attention calls per timing (fewer: rounds too noisy)")
    p.add_argument("--cases", nargs="+", default=[*STEP_CASES, *ATTN_CASES])
    p.add_argument("--out", default=None, help="JSON lines, one per timing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.cases, args.steps, args.calls)
    if not (args.a and args.b):
        p.error("--a and --b name the two checkouts")
    workers = {}
    for side, path in (("a", args.a), ("b", args.b)):  # one at a time: compiling both at once skews neither
        workers[side] = start(path, args.cases, args)
        print(f"{side} ({path}):", ask(workers[side]), flush=True)
    times = {(c, s): [] for c in args.cases for s in "ab"}
    out = open(args.out, "w") if args.out else None
    for r in range(args.rounds):
        order = "ab" if r % 2 == 0 else "ba"
        for case in args.cases:
            for side in order:
                ms = ask(workers[side], case)["ms"]
                times[case, side].append(ms)
                if out:
                    out.write(json.dumps({"round": r, "case": case, "side": side, "ms": ms}) + "\n")
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    print(f"\n{'case':<16} {'a ms':>9} {'b ms':>9} {'b/a median':>11} {'b/a range':>15}")
    for case in args.cases:
        a, b = times[case, "a"], times[case, "b"]
        ratios = [y / x for x, y in zip(a, b, strict=True)]
        print(
            f"{case:<16} {statistics.median(a):9.4f} {statistics.median(b):9.4f} {statistics.median(ratios):11.4f}"
            f" {min(ratios):7.4f}-{max(ratios):.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
