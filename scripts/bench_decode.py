"""End-to-end decode speed (GPU): jkv against HF transformers and against the weight-read roofline, in one run.

For each model shape (SmolLM2-135M, Llama-3-8B; random bf16 weights) and batch size:

* jkv, ``impl`` pallas (and xla): the compiled decode step (cache donated, greedy argmax on the device) timed
  two ways: a device loop (each step's token ids fed to the next step, no host sync until the end) and the
  ``Generator`` end to end (4 bytes of token ids per sequence read back each step, next step queued first);
* HF transformers, torch bf16, ``StaticCache``, the one-token forward + argmax compiled with
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), timed with CUDA events;
* roofline: weight bytes one step reads (every layer, final norm, LM head) / the device-to-device copy bandwidth
  measured in this run (bytes read + bytes written per second, the better of a torch copy and a JAX copy).
  ``roofline %`` = roofline time / measured step time.

Writes one JSON line per measurement to ``--out`` and prints a table last. Measurements run in priority order
and stop starting new ones past ``--deadline`` seconds, so a time-limited run still reports what it finished.

    python scripts/bench_decode.py --out $OUT/decode.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.hf_llama import hf_config
from jkv import xla_flags
from jkv.models import llama
from jkv.serving import Generator, SamplingParams

MODELS = {
    "smollm2-135m": llama.LlamaConfig.smollm2_135m,
    "llama3-8b": llama.LlamaConfig.llama3_8b,
    "tiny": lambda: llama.LlamaConfig(512, 128, 256, 2, 4, 2, 32),  # a smoke test of this script on a CPU
}
START = time.perf_counter()


def log(*args):
    print(f"[{time.perf_counter() - START:6.1f}s]", *args, flush=True)


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


# ---------------------------------------------------------------------------------------------- ceilings
def copy_bandwidth(nbytes: int = 2 << 30) -> dict:
    """Device-to-device copy, (read + written bytes) / time, median of 20, torch and JAX."""
    out = {}
    buffer = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)
    add = jax.jit(lambda a: a + 1.0)  # reads and writes every byte; XLA cannot elide it
    add(buffer).block_until_ready()
    out["jax_tbps"] = 2 * nbytes / median_ms(lambda: add(buffer).block_until_ready(), 20) / 1e9
    buffer.delete()
    try:
        import torch

        a = torch.randn(nbytes // 4, device="cuda")
        b = torch.empty_like(a)
        times = []
        for _ in range(25):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            b.copy_(a)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        out["torch_tbps"] = 2 * nbytes / float(np.median(times[5:])) / 1e9
        del a, b
        torch.cuda.empty_cache()
    except Exception as e:  # torch missing or no CUDA: the JAX figure stands alone
        out["torch_error"] = repr(e)
    out["tbps"] = max(v for k, v in out.items() if k.endswith("_tbps"))
    return out


# ---------------------------------------------------------------------------------------------- jkv
def bench_jkv(config, params, batch: int, options, steps: int, prompt: int, max_len: int, cache="bf16") -> dict:
    """``cache``: a ``jkv generate --cache`` kind, ``q8-plain`` (a Q8 cache without its rotation), or a Q8 kind
    with ``:<a jkv.Q8 hadamard_impl>`` appended (e.g. ``q8:dot``)."""
    cache, _, hadamard_impl = cache.partition(":")
    kind = cache.removesuffix("-plain")
    storage = {"rotated": False} if cache != kind else {}  # fields of the kind's storage format
    if hadamard_impl:
        storage["hadamard_impl"] = hadamard_impl
    gen = Generator(config, params, max_len=max_len, batch=batch, cache=kind, options=options, cache_options=storage)
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(0, config.vocab_size, prompt).tolist() for _ in range(batch)]
    first = gen.generate(prompts, max_new_tokens=steps, stop_ids=())  # compiles prefill and decode
    e2e = gen.generate(prompts, max_new_tokens=steps, stop_ids=())
    assert e2e.tokens == first.tokens, "greedy decoding differs between two identical runs"
    step, rows = gen.decode_step_compiled()
    kernels = kernel_count(step.as_text())
    tokens = jnp.asarray([t[-1] for t in e2e.tokens], jnp.int32)

    # The slots are filled with the prompts (prefill only); each device loop adds `steps` positions and is then
    # rolled back, outside the timed region. The engine is not stepped again.
    for p in prompts:
        gen.engine.submit(p, SamplingParams(max_new_tokens=steps))
    gen.engine.admit()
    start_lengths = jnp.full((batch,), prompt, jnp.int32)
    times = []
    for _ in range(6):
        t = time.perf_counter()
        for _ in range(steps):
            tokens, gen.cache = step(params, gen.cache, tokens, *rows)
        tokens.block_until_ready()
        times.append(time.perf_counter() - t)
        gen.cache = gen.cache.check().rollback(start_lengths)
    loop_ms = 1e3 * float(np.median(times[1:])) / steps
    return {
        "compile_s": first.timing.compile_s,
        "prefill_ms": 1e3 * e2e.timing.prefill_s,
        "e2e_ms": e2e.timing.ms_per_step,
        "e2e_tok_s": e2e.timing.tokens_per_s,
        "ms": loop_ms,
        "tok_s": 1e3 * batch / loop_ms,
        "kernels": kernels,
        "tokens": e2e.tokens[0][:16],
    }


def kernel_count(hlo: str) -> int:
    """Instructions of the compiled step's entry computation that launch work (fusions, library calls, custom
    calls such as the Pallas kernels, copies...): bookkeeping ops (parameters, tuples, bitcasts) excluded."""
    entry = hlo[hlo.index("ENTRY") :]
    entry = entry[: entry.index("\n}")]
    skip = ("parameter(", "get-tuple-element(", "tuple(", "bitcast(", "constant(", "after-all(")
    return sum(1 for line in entry.splitlines()[1:] if " = " in line and not any(op in line for op in skip))


# ---------------------------------------------------------------------------------------------- HF transformers
def hf_model(config: llama.LlamaConfig):
    import torch
    import transformers

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM._from_config(hf_config(config), dtype=torch.bfloat16)
    return model.eval()


def bench_hf(model, config, batch: int, steps: int, prompt: int, max_len: int) -> dict:
    import torch
    import transformers

    cache = transformers.StaticCache(config=model.config, max_cache_len=max_len)
    ids = torch.randint(0, config.vocab_size, (batch, prompt), device="cuda")
    with torch.no_grad():
        out = model(ids, past_key_values=cache, cache_position=torch.arange(prompt, device="cuda"), use_cache=True)
    first = out.logits[:, -1].argmax(-1)

    def one_token(token, position):
        logits = model(
            token[:, None],
            past_key_values=cache,
            cache_position=position,
            position_ids=position[None].expand(batch, 1),
            use_cache=True,
        ).logits
        return logits[:, -1].argmax(-1)

    step = torch.compile(one_token, mode="reduce-overhead", fullgraph=True)
    t = time.perf_counter()
    with torch.no_grad():
        token = first
        for i in range(3):  # compile, record the CUDA graph, replay
            token = step(token.clone(), torch.tensor([prompt + i], device="cuda"))
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t
        times = []
        for rep in range(4):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            token = first
            start.record()
            for i in range(steps):
                token = step(token.clone(), torch.tensor([prompt + i], device="cuda"))
            end.record()
            torch.cuda.synchronize()
            if rep:
                times.append(start.elapsed_time(end) / steps)
    ms = float(np.median(times))
    return {"compile_s": compile_s, "ms": ms, "tok_s": 1e3 * batch / ms}


# ---------------------------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama3-8b,smollm2-135m")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--impls", default="pallas,xla")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--min-rows", default="8", help="variants of llama.LlamaOptions.min_matmul_rows, e.g. 8,1")
    parser.add_argument(
        "--norm-kernel", default="off", help="variants of llama.LlamaOptions.norm_kernel: off, on or off,on"
    )
    parser.add_argument(
        "--caches",
        default="bf16",
        help="cache kinds of the jkv rows, e.g. bf16,q8,q8-plain (q8 without rotation),q8:dot (a Q8 hadamard_impl)",
    )
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--deadline", type=float, default=1e9, help="start nothing new after this many seconds")
    parser.add_argument("--out", default="decode.jsonl")
    parser.add_argument(
        "--default-xla-flags", action="store_true", help="do not add jkv.xla_flags.GPU_FLAGS to XLA_FLAGS"
    )
    args = parser.parse_args(argv)
    if not args.default_xla_flags:
        xla_flags.apply_recommended()  # what `jkv generate` runs with; recorded in the output
    if args.max_len < args.prompt + 2 * args.steps:
        parser.error(f"--max-len must be at least prompt + 2 * steps = {args.prompt + 2 * args.steps}")
    device = jax.devices()[0]
    log(f"device: {device.device_kind}, jax {jax.__version__}")
    rows = []

    def record(row):
        rows.append(row)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        log(json.dumps(row))

    bw = copy_bandwidth()
    record({"kind": "copy", "device": device.device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""), **bw})
    batches = [int(b) for b in args.batches.split(",")]
    impls = args.impls.split(",")
    for name in args.models.split(","):
        config = MODELS[name]()
        t = time.perf_counter()
        params = llama.init_params(config, jax.random.key(0), jnp.bfloat16, scale=0.02, layout="layers")
        jax.block_until_ready(params)
        weight_bytes = params.decode_bytes()
        roofline_ms = 1e3 * weight_bytes / (bw["tbps"] * 1e12)
        log(f"{name}: random bf16 init {time.perf_counter() - t:.1f} s, {weight_bytes / 1e9:.2f} GB read per step")
        base = {"model": name, "weight_gb": weight_bytes / 1e9, "roofline_ms": roofline_ms}
        variants = [(int(m), n) for m in args.min_rows.split(",") for n in args.norm_kernel.split(",")]
        for min_rows, norm_kernel in variants:
            for impl, batch, cache in [(i, b, c) for i in impls for b in batches for c in args.caches.split(",")]:
                if time.perf_counter() - START > args.deadline:
                    log(f"deadline: skipping jkv {name} b{batch} {impl} {cache} min_rows={min_rows}")
                    continue
                options = llama.LlamaOptions(impl, {"off": False, "on": True}[norm_kernel], min_rows)
                r = bench_jkv(config, params, batch, options, args.steps, args.prompt, args.max_len, cache)
                r |= {"impl": impl, "batch": batch, "cache": cache, "min_rows": min_rows, "norm_kernel": norm_kernel}
                r |= {"roofline": roofline_ms / r["ms"]}
                record({"kind": "jkv", **base, **r})
        del params
        gc.collect()
        if args.no_hf:
            continue
        model = None
        for batch in batches:
            if time.perf_counter() - START > args.deadline:
                log(f"deadline: skipping HF {name} b{batch}")
                continue
            if model is None:
                model = hf_model(config)
            r = bench_hf(model, config, batch, args.steps, args.prompt, args.max_len)
            record({"kind": "hf", "batch": batch, **base, **r, "roofline": roofline_ms / r["ms"]})
        del model
        gc.collect()
        try:
            import torch

            torch.cuda.empty_cache()
        except ImportError:
            pass
    print_table(rows)
    return 0


def print_table(rows):
    copy = next(r for r in rows if r["kind"] == "copy")
    print(f"\ncopy bandwidth (read + write): {copy['tbps']:.2f} TB/s on {copy['device']}")
    print(f"XLA_FLAGS={copy.get('xla_flags', '')!r}")
    hf = {(r["model"], r["batch"]): r for r in rows if r["kind"] == "hf"}
    print(
        f"{'model':14} {'B':>2} {'impl':6} {'cache':8} {'ms/step':>8} {'tok/s':>8} {'e2e ms':>7}"
        f" {'roof ms':>7} {'roof %':>6}"
        f" {'HF ms':>7} {'HF tok/s':>8} {'vs HF':>6} {'compile s':>9} {'rows':>4} {'kernels':>7}"
        f" {'norm':>4}"
    )
    for r in rows:
        if r["kind"] != "jkv":
            continue
        h = hf.get((r["model"], r["batch"]))
        hf_cols = f"{h['ms']:7.2f} {h['tok_s']:8.0f} {h['ms'] / r['ms']:5.2f}x" if h else f"{'-':>7} {'-':>8} {'-':>6}"
        print(
            f"{r['model']:14} {r['batch']:2d} {r['impl']:6} {r.get('cache', 'bf16'):8} {r['ms']:8.2f}"
            f" {r['tok_s']:8.0f} {r['e2e_ms']:7.2f}"
            f" {r['roofline_ms']:7.2f} {100 * r['roofline']:5.1f}% {hf_cols} {r['compile_s']:9.1f}"
            f" {r.get('min_rows', 1):4d} {r.get('kernels', 0):7d} {r.get('norm_kernel', '-'):>4}"
        )


if __name__ == "__main__":
    sys.exit(main())
