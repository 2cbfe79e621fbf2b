"""One launch of each ``qmatmul`` variant of a cell, for Nsight Compute (issue 26: why the small-M kernels sit far
below their read floor). Run under ``ncu``; the kernels launch in the order printed first, one launch each, so the
profiler's n-th ``jkv_qmatmul`` report is the n-th variant listed::

    ncu --clock-control none -k regex:jkv_qmatmul --section SpeedOfLight --section WarpStateStats \\
        --section Occupancy --section MemoryWorkloadAnalysis \\
        python bench/ncu_qmatmul.py --matrix wqkv --fmt Q8_0 --rows 1 --variants default,units

Variants are ``bench/bench_qmatmul.py``'s names at the cell, or ``path:bm/bn/bk/splits/warps/stages`` for any
launch (``units:1/64/256/8/4/3``; ``dp4a_il:...``: the dp4a path over interleaved words); a launch the cell
cannot take is skipped with its reason, so one list serves several matrices. Without ``ncu`` it runs too (a
check of the launches: each output against the float32 reference).
"""

from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from bench import bench_qmatmul, common
from pallas_kernels import block_formats
from pallas_kernels import quantized_matmul as qm


def parse_variant(text: str, named: dict, anywhere: set) -> tuple[str, qm.QMatmulConfig | None]:
    """``(text, config)``; a name the bench gives other cells but not this one (``dp4a_il_split2x`` where twice
    the splits do not divide the K steps): ``(text, None)``, left out."""
    if ":" not in text:
        if text not in named and text not in anywhere:
            raise SystemExit(f"variant {text!r} is not one of {sorted(named)} nor path:bm/bn/bk/splits/warps/stages")
        return text, named.get(text)
    path, numbers = text.split(":", 1)
    values = [int(v) for v in numbers.split("/")]
    path = path.removesuffix(bench_qmatmul.INTERLEAVED)  # dp4a_il: the dp4a path over interleaved words
    if len(values) != 6 or path not in qm.PATHS:
        raise SystemExit(f"variant {text!r}: expected path:bm/bn/bk/splits/warps/stages with path in {qm.PATHS}")
    return text, qm.QMatmulConfig(*values, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", default="wqkv", choices=sorted(bench_qmatmul.MATRICES))
    parser.add_argument("--fmt", default="Q8_0", choices=sorted(block_formats.FORMATS))
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--variants", default="default")
    parser.add_argument("--shape", default="", help="N,K instead of the matrix's (a small check off the GPU)")
    args = parser.parse_args(argv)
    n, k = map(int, args.shape.split(",")) if args.shape else bench_qmatmul.MATRICES[args.matrix]
    named = bench_qmatmul.variants(args.rows, n, k, args.fmt)
    chosen = []
    anywhere = {v for nk in bench_qmatmul.MATRICES.values() for v in bench_qmatmul.variants(args.rows, *nk, args.fmt)}
    for name, config in (parse_variant(v, named, anywhere) for v in args.variants.split(",") if v):
        if config is None:
            print(f"skipped {name}: not a variant at this cell", flush=True)
            continue
        try:  # a launch this cell cannot take (its splits do not divide the K steps, ...) is left out, said so
            qm.check_config(config, args.rows, n, k, args.fmt)
            chosen.append((name, config))
        except ValueError as e:
            print(f"skipped {name} {tuple(config)}: {e}", flush=True)
    for i, (name, config) in enumerate(chosen):  # the n-th profiled launch is the n-th printed here
        print(f"launch {i}: {name} {config}", flush=True)
    key = jax.random.key(zlib.crc32(f"{args.matrix} {args.fmt}".encode()))
    planes = bench_qmatmul.random_planes(key, args.fmt, n, k)
    x = jax.random.normal(jax.random.fold_in(key, 1), (args.rows, k), jnp.bfloat16)
    ref = block_formats.qmatmul_reference(x.astype(jnp.float32), planes, args.fmt)
    for name, config in chosen:
        laid = bench_qmatmul.layout(args.fmt, name, planes, config)  # made before the profiled launch
        y = jax.block_until_ready(bench_qmatmul.product(args.fmt, name, config)(x, laid))
        print(f"{name}: rel_err {common.rel_err(y, ref):.2e}", flush=True)


if __name__ == "__main__":
    main()
