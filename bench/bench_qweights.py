"""Quantized weights on the GPU (issue 26): decode steps and prefill of a Llama-3-8B-shaped model with bf16, Q8_0
and Q4_K weights, each beside its weight-read floor; greedy agreement of quantized small models with bf16.

* ``decode``: one decode step (``llama.decode_step``, bf16 KV cache filling from empty, greedy tokens fed back)
  at batch 1, 16 and 64, timed as runs of ``n`` and ``2n`` steps under ``lax.fori_loop`` (one compile, the step
  count traced; wall clock, differenced: dispatch and the cache's allocation cancel), the variants in
  ``--rounds`` interleaved rounds (``bench.common.interleaved``). Each row's floor: its weight bytes read once per step
  (``LlamaParams.decode_bytes``) plus the K/V bytes the step reads at its mean length, over the bandwidth (a
  device copy measured in the same run where torch sees the GPU, else 4.8e12 B/s); ``of_floor`` = floor / time.
  Where Mosaic GPU runs, each quantized model also as ``<name>_mgpu`` (``weights_impl="mgpu"``); each quantized
  model also as ``<name>_dp4a`` (``quant.to_dp4a_layout``: the integer-dot kernel over interleaved words, its
  activations rounded as ``qmatmul_act.ROUNDING`` says: on a GPU one launch per product), and that as
  ``<name>_dp4a_actx`` (the activations rounded by XLA's fusions instead, the form before),
  ``<name>_dp4a_normk`` (the norms before wqkv and w_gate_up rounding their rows in their own launch) and
  ``<name>_dp4a_rule2x`` (the products launched as before ``qmatmul_configs.DP4A_PROGRAMS``).
* ``prefill``: one prompt of each ``--prefill-tokens`` length into an empty cache (``llama.prefill``; a sample is the
  fastest of ``PREFILL_REPEATS`` calls in a row, the rows interleaved), tokens/s, and
  each quantized row's throughput against bf16's (issue 26 asks >= 0.8x) as dispatched, through the kernel's
  large-M path (``<name>_kernel``) and as ``<name>_xla`` (``LlamaOptions(weights_impl="xla")``: dequantize to
  bf16, then XLA's GEMM).
* ``agreement``: the shipped SmolLM2 (``--smoke``: a tiny random model) in bf16 against its native Q4_1 blocks
  and its matrices requantized at load to Q8_0 and Q4_K (``jkv.loading.quantize``), 32 greedy tokens on each of
  a fixed prompt set: the fraction of tokens equal to bf16's, and of prompts equal throughout; each quantized
  model also in the dp4a layout (``<name>_dp4a``: its decode steps round the activations to int8).

The quantized 8B weights are random planes drawn on the device (a step's time does not depend on the values;
quantizing 8B parameters on the host would take minutes); the embedding and LM head take Q8_0 in both quantized
rows, as ``--quantize`` does. XLA runs with ``jkv.xla_flags.GPU_FLAGS`` added, as ``jkv generate`` runs a
step (whole steps as CUDA graphs; ``--default-xla-flags`` leaves ``XLA_FLAGS`` as given); the report's meta
names the flags. Usage: ``python bench/bench_qweights.py --out DIR [--rounds 5]``; ``--smoke`` runs
tiny shapes on any backend in seconds. Writes ``DIR/bench_qweights.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jkv
from bench import common, torch_peers
from bench.qweights_rows import (  # noqa: F401 (re-exported: the breakdown and the tests take them from here)
    ACT_XLA,
    MGPU,
    MID_DEQUANT,
    NORM_KERNEL,
    PLAIN_NORM,
    RULE2X,
    SLICES,
    STEPS2,
    dp4a_rule2x,
    launch_rule,
    options_of,
    row_settings,
    with_act_rows,
    with_dp4a_rows,
    with_mgpu_rows,
)
from jkv.loading import quantize as quantize_lib
from jkv.models import llama, quant
from pallas_kernels import block_formats

DATASHEET_BPS = 4.8e12
BATCHES = (1, 16, 64)
VARIANTS = ("bf16", "q8_0", "q4_k")
SECTIONS = {"decode", "prefill", "agreement"}
SMOKE_CONFIG = llama.LlamaConfig(
    vocab_size=256, hidden_size=256, intermediate_size=256, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64
)
SMOKE_BATCHES = (2,)
PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
    "List three uses of copper.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "What does a compiler do?",
    "Give a synonym for happy.",
)
_FIELDS = {"wqkv": "q", "wo": "o", "w_gate_up": "gate", "w_down": "down"}


def random_planes(rng, fmt: str, n: int, k: int):
    """Planes of a random ``n x k`` matrix whose values are about N(0, 0.02) in scale (finite, both signs), drawn
    on the host (a compile per shape on the device costs more than drawing the bytes) and placed on the device."""
    out = []
    for (rows, cols), plane in zip(
        block_formats.plane_shapes(fmt, n, k), block_formats.FORMATS[fmt].planes, strict=True
    ):
        if plane.dtype == np.float16:
            scale = {"Q8_0": 3e-4, "Q6_K": 2e-5, "Q4_K": 1e-4}.get(fmt, 5e-3)
            x = (scale * rng.standard_normal((rows, cols), np.float32)).astype(np.float16)
        elif plane.dtype == np.int8:
            x = rng.integers(-127, 128, (rows, cols), np.int8)
        else:
            x = rng.integers(0, 64 if plane.name.startswith("sub") else 256, (rows, cols), np.uint8)
        out.append(jax.device_put(x))
    return tuple(out)


def random_quantized(params, choice: str, seed: int):
    """``params`` (per-layer layout) with every matrix replaced by random planes in ``quantize.plan``'s format."""

    def replace(w, name, i, reduce_axis=0):
        k = w.shape[reduce_axis]
        fmt = quantize_lib.plan(name, k, choice)
        if fmt is None:
            return w
        n = w.size // k
        planes = random_planes(np.random.default_rng([seed, i + 2]), fmt, n, k)
        return quant.from_planes(fmt, planes, w.shape, w.dtype, reduce_axis)

    layers = tuple(
        layer.replace(
            **{f: replace(getattr(layer, f), f"{i}.{n}", 10 * i + j) for j, (f, n) in enumerate(_FIELDS.items())}
        )
        for i, layer in enumerate(params.layers)
    )
    lm_head = None if params.lm_head is None else replace(params.lm_head, "lm_head", -1)
    return params.replace(embed=replace(params.embed, "embed", -2, 1), layers=layers, lm_head=lm_head)


def decode_program(config, batch: int, max_steps: int, options=llama.DEFAULT_OPTIONS):
    """A jitted ``(params, tokens, steps) -> tokens`` running ``steps`` (traced, at most ``max_steps``) greedy decode
    steps from an empty cache: one compile serves both program lengths."""
    spec = jkv.CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, max_steps + 8, jnp.bfloat16)

    def run(params, tokens, steps):
        def body(_, carry):
            cache, tokens = carry
            logits, cache = llama.decode_step(params, cache, tokens, config=config, options=options)
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)

        return lax.fori_loop(0, steps, body, (jkv.KVCache.init(spec, batch), tokens))[1]

    return jax.jit(run)


PREFILL_REPEATS = 3  # a prefill sample is the fastest of this many calls in a row (one call's rounds spread 15-30 %)


def fastest(repeats: int, fn, *args) -> float:
    """The least of ``repeats`` consecutive :func:`wall` times of ``fn(*args)``."""
    return min(wall(fn, *args) for _ in range(repeats))


def wall(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def step_sampler(config, params, batch: int, steps: int, options=llama.DEFAULT_OPTIONS):
    """One sample of a decode step's seconds: runs of ``steps`` and ``2 * steps`` steps, differenced."""
    program = decode_program(config, batch, 2 * steps, options)
    tokens = jnp.arange(batch, dtype=jnp.int32) % config.vocab_size
    short, long = jnp.int32(steps), jnp.int32(2 * steps)
    compile_s = wall(program, params, tokens, short)
    best = lambda n: min(wall(program, params, tokens, n) for _ in range(3))  # the least-disturbed of three runs
    sampler = lambda: (best(long) - best(short)) / steps
    return sampler, compile_s


def kv_read_bytes(config, batch: int, steps: int) -> int:
    """K/V bytes (bf16) one timed step reads: the difference of the two runs is steps ``steps .. 2 * steps - 1``,
    at a mean length of ``1.5 * steps``."""
    return 2 * config.num_layers * batch * config.num_kv_heads * (3 * steps // 2) * config.head_dim * 2


def bench_decode(config, models: dict, bandwidth: float, steps: int, rounds: int, batches=BATCHES) -> dict:
    out = {}
    for batch in batches:
        samplers, compile_s = {}, {}
        for name, params in models.items():
            with row_settings(name):
                samplers[name], compile_s[name] = step_sampler(config, params, batch, steps, options_of(name))
        rows = common.interleaved(samplers, rounds, baseline="bf16")
        for name, row in rows.items():
            weights = models[name].decode_bytes()
            floor = (weights + kv_read_bytes(config, batch, steps)) / bandwidth
            row.update(compile_s=compile_s[name], weight_bytes=weights, floor_s=floor, of_floor=floor / row["time_s"])
            row.pop("samples_s")
        out[str(batch)] = rows
        common.log(f"decode batch {batch}: " + ", ".join(f"{n} {r['time_s'] * 1e3:.3f} ms" for n, r in rows.items()))
    return out


def bench_prefill(config, models: dict, tokens: int, rounds: int, keep=None) -> dict:
    """Prefill rows: every model as dispatched (``quant.DEQUANT_MIN_ROWS`` and more rows: dequantize, one dot),
    and each quantized one also as ``<name>_kernel`` (the Triton kernel's large-M path whatever the rows),
    ``<name>_xla`` (``weights_impl="xla"``: each matrix dequantized to bf16 by XLA, then one library GEMM) and
    ``<name>_expand`` (the kernel with ``dot_expand``'s tile dequantization) and ``<name>_deqk`` (as dispatched,
    the matrices dequantized by ``pallas_kernels.dequantize_weights``' kernel instead of XLA's fusions)."""
    spec = jkv.CacheSpec(config.num_layers, config.num_kv_heads, config.head_dim, tokens, jnp.bfloat16)
    prompt = (jnp.arange(tokens, dtype=jnp.int32) * 7919 % config.vocab_size)[None]

    def program(options):
        return jax.jit(lambda p, t: llama.prefill(p, jkv.KVCache.init(spec, 1), t, config=config, options=options)[0])

    dequant = program(llama.LlamaOptions(weights_impl="xla"))
    runs = {name: (program(llama.DEFAULT_OPTIONS), params, None) for name, params in models.items()}
    quantized = {name: params for name, params in models.items() if name != "bf16"}
    runs |= {f"{name}_kernel": (program(llama.DEFAULT_OPTIONS), p, "kernel") for name, p in quantized.items()}
    runs |= {f"{name}_xla": (dequant, params, None) for name, params in quantized.items()}
    runs |= {f"{name}_expand": (program(llama.DEFAULT_OPTIONS), p, "expand") for name, p in quantized.items()}
    runs |= {f"{name}_deqk": (program(llama.DEFAULT_OPTIONS), p, "deqk") for name, p in quantized.items()}
    runs = {name: run for name, run in runs.items() if keep is None or name in keep or name == "bf16"}
    samplers = {}
    for name, (fn, params, rule) in runs.items():
        with launch_rule(rule):  # compiled inside: the program keeps the launch it was traced with
            wall(fn, params, prompt)
        samplers[name] = functools.partial(fastest, PREFILL_REPEATS, fn, params, prompt)
    rows = common.interleaved(samplers, rounds, baseline="bf16")
    for row in rows.values():
        row["tokens_per_s"] = tokens / row["time_s"]
        row.pop("samples_s")
    return rows


def greedy_tokens(config, params, prompts, new_tokens: int, buckets=None):
    from jkv.serving.generator import Generator

    max_len = max(len(p) for p in prompts) + new_tokens
    generator = Generator(config, params, max_len=max_len, batch=len(prompts), buckets=buckets)
    return generator.generate(prompts, max_new_tokens=new_tokens, stop_ids=()).tokens


def agreement(smoke: bool, new_tokens: int) -> dict:
    """Greedy tokens of quantized small models against the bf16 one."""
    if smoke:
        config = SMOKE_CONFIG
        base = llama.init_params(config, jax.random.key(1), jnp.bfloat16, scale=0.05)
        prompts = [list(range(3 + i, 9 + 2 * i)) for i in range(2)]
        variants, buckets = {"bf16": base}, (16,)  # every step one shape: one compiled step per variant
    else:
        from jkv.loading import default_model_path, load_gguf

        model = load_gguf(default_model_path(), "bf16", progress=False, layout="layers", weights="native")
        config, tok = model.config, model.tokenizer
        prompts = [tok.encode(tok.render_chat([{"role": "user", "content": q}]), add_eos=False) for q in PROMPTS]
        base = quant.dequantize_params(model.params)
        variants, buckets = {"bf16": base, "q4_1_native": model.params}, None
    variants = with_dp4a_rows(variants | {c: quantize_lib.quantize_params(base, c) for c in ("q8_0", "q4_k")})
    tokens = {name: greedy_tokens(config, p, prompts, new_tokens, buckets) for name, p in variants.items()}
    ref = np.asarray(tokens["bf16"])
    out = {}
    for name, toks in tokens.items():
        toks = np.asarray(toks)
        out[name] = {
            "token_agreement": float((toks == ref).mean()),
            "prompts_equal": float((toks == ref).all(1).mean()),
        }
    return {"prompts": len(prompts), "new_tokens": new_tokens, "rows": out}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed program (and 2x)")
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[2048], help="prompt lengths to prefill")
    parser.add_argument("--prefill-rows", default="", help="only these prefill rows (and bf16), comma-separated")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: a check of this script on any backend")
    parser.add_argument("--breakdown", action="store_true", help="only the per-kernel time of a batch-1 step")
    parser.add_argument("--sections", default="decode,prefill,agreement", help="which sections, comma-separated")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="decode batches, comma-separated")
    parser.add_argument("--decode-rows", default="", help="only these decode rows, comma-separated (default: all)")
    common.add_xla_flags_option(parser, "`jkv generate` does")
    args = parser.parse_args(argv)
    xla_flags_used = common.apply_xla_flags(args)  # before JAX starts: the step as the CLI runs it
    torch = torch_peers.load_torch()
    copy = torch_peers.copy_bandwidth(torch) if torch is not None else None
    bandwidth = copy["tbps"] * 1e12 if copy is not None else DATASHEET_BPS
    if args.smoke:
        config, steps, rounds, prefill_tokens = SMOKE_CONFIG, 2, 2, [8]
    else:
        config, steps, rounds, prefill_tokens = (
            llama.LlamaConfig.llama3_8b(),
            args.steps,
            args.rounds,
            args.prefill_tokens,
        )
    t0 = time.perf_counter()
    dense = llama.init_params(config, jax.random.key(0), jnp.bfloat16, layout="layers")
    models = {"bf16": dense} | {c: random_quantized(dense, c, i + 1) for i, c in enumerate(VARIANTS[1:])}
    common.log(f"weights ready in {time.perf_counter() - t0:.1f} s")
    named = set(args.decode_rows.split(",")) if args.decode_rows else None  # --decode-rows (None: every row)
    if args.breakdown:
        from bench.qweights_breakdown import step_breakdown

        # One step a profiled program: with the decode loop captured as a command buffer (GPU_FLAGS' WHILE) the
        # profiler records one iteration's kernels however many run, so per-step figures need a one-step program.
        breakdown = step_breakdown(config, models, 1, 1, keep=named, capacity=2 * args.steps)
        report = {"meta": common.meta(torch) | {"xla_flags": xla_flags_used}, "breakdown": breakdown}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_qweights_breakdown.json").write_text(json.dumps(report, indent=1))
        return report
    sections = set(args.sections.split(","))
    if not sections <= SECTIONS:
        raise SystemExit(f"--sections {args.sections!r}: expected a comma-separated subset of {sorted(SECTIONS)}")
    batches = SMOKE_BATCHES if args.smoke else tuple(int(b) for b in args.batches.split(","))
    report = {
        "meta": common.meta(torch)
        | {"smoke": args.smoke, "model": "smoke" if args.smoke else "llama3-8b", "steps": steps}
        | {"xla_flags": xla_flags_used},
        "bandwidth": {"bytes_per_s": bandwidth, "source": "device copy" if copy else "datasheet", "copy": copy},
        "decode": {},
        "prefill": {"runs": []},  # one {"tokens", "rows"} per prompt length
        "agreement": {"rows": {}},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save = lambda: (out / "bench_qweights.json").write_text(json.dumps(report, indent=1))  # after every section
    if "decode" in sections:
        keep = None if named is None else named | {"bf16"}
        decode_models = with_mgpu_rows(models) | with_act_rows(with_dp4a_rows(models, keep))
        decode_models |= {  # rows asked for by name only: q/k/v sliced
            f"{name}{SLICES}": p for name, p in decode_models.items() if keep and f"{name}{SLICES}" in keep
        }
        if keep is not None:
            decode_models = {name: p for name, p in decode_models.items() if name in keep}
        report["decode"] = bench_decode(config, decode_models, bandwidth, steps, rounds, batches)
        save()
    if "prefill" in sections:
        for tokens in prefill_tokens:  # the dequantization is a cost per call: longer prompts amortize it
            rows = bench_prefill(config, models, tokens, rounds, set(args.prefill_rows.split(",")) - {""} or None)
            report["prefill"]["runs"].append({"tokens": tokens, "rows": rows})
            save()
    if "agreement" in sections:
        try:
            report["agreement"] = agreement(args.smoke, 3 if args.smoke else 32)
        except (ImportError, OSError, ValueError) as e:  # no gguf package or no SmolLM2 on this machine
            report["agreement"] = {"error": f"{type(e).__name__}: {e}", "rows": {}}
        save()
    print_table(report)
    return report


def print_table(report: dict) -> None:
    common.log(f"{'decode':<10}{'variant':<16}{'ms':>10}{'floor ms':>10}{'of floor':>10}")
    for batch, rows in report["decode"].items():
        for name, r in rows.items():
            ms, floor = r["time_s"] * 1e3, r["floor_s"] * 1e3
            common.log(f"{'B=' + batch:<10}{name:<16}{ms:>10.3f}{floor:>10.3f}{r['of_floor']:>10.2f}")
    for run in report["prefill"]["runs"]:
        for name, r in run["rows"].items():
            speed = r["speed_vs_bf16"]["median"]
            common.log(f"prefill {run['tokens']:>6} {name:<12} {r['tokens_per_s']:.0f} tok/s ({speed:.2f}x bf16)")
    for name, r in report["agreement"]["rows"].items():
        common.log(f"agreement {name:<12} tokens {r['token_agreement']:.3f} prompts {r['prompts_equal']:.3f}")


if __name__ == "__main__":
    main()
