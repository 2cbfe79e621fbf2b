"""Where an engine's compiled mixed step puts its device memory: for each token bucket, XLA's memory analysis
(arguments, outputs, how much of them is aliased to the donated cache, scratch) and the buffer assignment's
allocations of 1 GiB or more with the values they hold. Nothing runs: the steps are only compiled, so a shape that
would run out of memory can still be looked at.

    python bench/step_memory.py --model llama3-8b --slots 64 --max-len 16512 --buckets 64 2048
    python bench/step_memory.py --model llama3-8b --slots 64 --max-len 16512 --cli-xla-flags   # as `jkv serve`

Random weights of the shape; the engine's own pool size unless ``--num-pages``. The scratch of a step must not
grow with the pool (tests/serving/test_step_memory.py): a pool-sized allocation other than the donated
parameters is a copy of the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1 << 30
FAMILY_SHAPES = ("mistral-7b", "gemma2-9b")  # bench/bench_families.py's HF configs


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", choices=("smollm2-135m", "llama3-8b", *FAMILY_SHAPES), default="llama3-8b", help="the shape"
    )
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (faster compiles)")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--cache", default="paged", help="the engine's cache kind")
    ap.add_argument("--num-pages", type=int, default=None, help="paged pool (default: the engine's)")
    ap.add_argument("--buckets", type=int, nargs="+", default=[64, 2048], help="tokens per step of each step")
    ap.add_argument("--cli-xla-flags", action="store_true", help="compile with jkv.xla_flags, as the CLI runs")
    ap.add_argument("--dump", default=None, help="keep XLA's dumps in this folder (default: a temporary one)")
    return ap.parse_args(argv)


def allocations(text: str, min_bytes: int = GIB, min_value: int = 64 << 20) -> list[tuple[int, str, list[str]]]:
    """``(size, header, values)`` of each allocation of ``min_bytes`` or more in a buffer-assignment dump: its
    values of ``min_value`` bytes or more, largest first (the scratch allocation holds every temporary; a copy of
    each layer's weights shows there as one value per layer)."""
    found = []
    for block in re.split(r"\n(?=allocation \d+:)", text):
        head = re.match(r"allocation \d+: size (\d+)(.*)", block)
        if not head or int(head.group(1)) < min_bytes:
            continue
        values = []
        for line in block.splitlines()[1:]:
            size = re.search(r"size=(\d+)", line)
            if size and int(size.group(1)) >= min_value:
                values.append((int(size.group(1)), line.strip()))
        found.append((int(head.group(1)), head.group(2).strip(" ,:"), [v for _, v in sorted(values, reverse=True)]))
    return found


XLA_TYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32", "int8": "s8", "uint8": "u8", "int32": "s32"}


def weight_sized(text: str, weights) -> tuple[int, int]:
    """``(count, bytes)`` of the values outside the parameters' allocations (scratch, outputs) of a
    buffer-assignment dump whose type and element count are a weight's (``weights``: arrays; a copy may be
    reshaped): a step that copies its weights shows them here."""
    sizes = {(XLA_TYPES.get(str(w.dtype), str(w.dtype)), w.size) for w in weights if w.nbytes >= 1 << 20}
    count = total = 0
    for block in re.split(r"\n(?=allocation \d+:)", text):
        if re.match(r"allocation \d+: size \d+,[^\n]*\bparameter \d+", block):  # (GPU dumps: "page 0, parameter 0")
            continue
        for value in re.finditer(r"\(size=(\d+),offset=\d+\): (\w+)\[([\d,]*)\]", block):
            elements = math.prod(int(d) for d in value.group(3).split(",") if d)
            if (value.group(2), elements) in sizes:
                count, total = count + 1, total + int(value.group(1))
    return count, total


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    dump = args.dump or tempfile.mkdtemp(prefix="jkv_step_memory_")
    if args.cli_xla_flags:
        from jkv import xla_flags

        xla_flags.apply_recommended(warn=False)
    flags = f"--xla_dump_to={dump} --xla_dump_hlo_module_re=.*mixed_step.*"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()

    import jax
    import jax.numpy as jnp

    from jkv.models import llama
    from jkv.serving import Engine

    if args.model in FAMILY_SHAPES:
        from bench.bench_families import hf_config
        from jkv.loading.safetensors import config_from_hf

        shape, _ = config_from_hf(hf_config(args.model, smoke=False).to_dict(), f"{args.model} shape")
    else:
        shape = {"smollm2-135m": llama.LlamaConfig.smollm2_135m, "llama3-8b": llama.LlamaConfig.llama3_8b}[args.model]()
    config = shape
    if args.layers is not None:  # the first layers (per-layer fields cut alike)
        fields = {f.name: getattr(shape, f.name) for f in dataclasses.fields(shape)}
        cut = {k: v[: args.layers] for k, v in fields.items() if isinstance(v, tuple)}
        config = dataclasses.replace(shape, num_layers=args.layers, **cut)
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    params = llama.init_params(config, jax.random.key(0), dtype, scale=0.02)
    buckets = tuple(sorted(args.buckets))
    engine = Engine(
        params, config, num_slots=args.slots, max_len=args.max_len, cache=args.cache, num_pages=args.num_pages,
        buckets=buckets, max_batch_tokens=buckets[-1], verbose=False,
    )  # fmt: skip
    cache_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(engine.cache.storage()))  # (a plan: per group)
    print(
        f"{args.model} ({config.num_layers} layers) on {jax.devices()[0].device_kind}: {args.slots} slots, "
        f"max_len {args.max_len}, {args.cache} cache of {cache_bytes / GIB:.2f} GiB "
        f"({engine.cache_kind}, {getattr(engine.cache, 'num_pages', '-')} pages); XLA_FLAGS={os.environ['XLA_FLAGS']}"
    )
    weights = [x for x in jax.tree_util.tree_leaves(engine.params) if x.ndim >= 2]  # what a copy would match
    rows = []
    for bucket in buckets:
        before = set(glob.glob(f"{dump}/*buffer-assignment.txt"))
        inputs = engine.empty_step_inputs(bucket)
        lm_rows = engine.options.speculative_tokens + 1
        m = engine.steps.mixed_executable(engine.params, engine.cache, *inputs, lm_rows=lm_rows).memory_analysis()
        row = {
            "bucket": bucket,
            "arguments_gib": m.argument_size_in_bytes / GIB,
            "outputs_gib": m.output_size_in_bytes / GIB,
            "aliased_gib": m.alias_size_in_bytes / GIB,
            "scratch_gib": m.temp_size_in_bytes / GIB,
        }
        rows.append(row)
        print(f"\nbucket {bucket}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "bucket"))
        for path in sorted(set(glob.glob(f"{dump}/*buffer-assignment.txt")) - before):
            text = Path(path).read_text()
            count, total = weight_sized(text, weights)
            row["weight_sized_gib"] = row.get("weight_sized_gib", 0.0) + total / GIB
            print(f"  {count} values of a weight's type and size outside the parameters: {total / GIB:.2f} GiB")
            for size, header, values in allocations(text):
                print(f"  allocation of {size / GIB:.2f} GiB: {header[:160]}")
                for value in values[:12]:
                    print(f"    {value[:160]}")
                if len(values) > 12:
                    print(f"    ... {len(values) - 12} more values of 64 MiB or more share it")
    print(f"\n{'bucket':>7} {'arguments':>10} {'outputs':>8} {'aliased':>8} {'scratch':>8}  (GiB)")
    for r in rows:
        print(
            f"{r['bucket']:>7} {r['arguments_gib']:>10.2f} {r['outputs_gib']:>8.2f} {r['aliased_gib']:>8.2f} "
            f"{r['scratch_gib']:>8.2f}"
        )
    if args.dump is None:
        shutil.rmtree(dump, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
