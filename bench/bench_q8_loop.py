"""The Q8 decode kernel's loop forms (``pallas_kernels.decode_q8.LOOP_FORMS``) and launches, timed beside bf16.

Issue 22 asks for Q8 decode attention at <= 0.55x the bf16 kernel's time at B*T >= 131072 (Hq/Hkv/D 32/8/128, bf16
queries, float16 scales). Each variant ``form[/block_k/warps/stages][*F]`` (the launch fields left out keep
``q8_decode_config``'s defaults; ``*F`` runs F times its splits, at most one block a split) is compiled once and
timed in interleaved rounds in one process beside the bf16 kernel the dispatch picks (``bf16``, the baseline) and
the bf16 Triton kernel (``bf16_triton``). Rows print µs, TB/s of the bytes each variant reads and the time against
``bf16``; each variant's error against the float32 reference on the Q8 cache is checked, and ``same`` says whether
its output equals the default form's (same launch) bit for bit. ``--paged-forms``: the paged Q8 kernel
(``paged_q8``, page 16, the same contents at permuted pool places, its default launch) in each
``form[/stages][*F]`` too, as ``paged:<form>`` rows; ``--fp8 SPEC ...``: the contiguous FP8 kernel
(``decode_fp8``) at launches ``default`` or ``[block_k[/warps[/stages]]][*F]``, as ``fp8:<spec>`` rows (its error
against its own reference);
``--bf16-splits F ...`` the bf16 Triton kernel likewise (``bf16_triton*F``, F may be under 1); ``--bf16-paged``
the bf16 paged kernel (page 16) at launches ``default`` or ``pages_per_block/stages[*F]``; all against the
same bf16 baseline (the issue asks Q8 never slower than bf16, paged included). The loop's per-block instruction
counts of the same forms: ``bench/decode_ir.py`` (CPU).

    python bench/bench_q8_loop.py --out $OUT --rounds 5
    python bench/bench_q8_loop.py --out $OUT --variants default vperm+srot vperm+srot/128/4 --shapes 1x131072
    python bench/bench_q8_loop.py --out $OUT --variants default --paged-forms default vperm vperm+srot+dsum+exp2
    JAX_PLATFORMS=cpu python bench/bench_q8_loop.py --smoke --out /tmp/q8loop   # CPU: wiring only, no timing
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from bench.bench_paged import paged_sets
from jkv.caches.formats import quantize
from pallas_kernels import common as pl_common
from pallas_kernels import decode, decode_fp8, decode_q8, dispatch, paged, paged_q8, reference
from pallas_kernels import formats as kernel_formats

SHAPES = ("1x131072", "16x8192", "128x2048", "1x4096")
PAGE_SIZE = 16  # the paged rows' pages (the issue's)
VARIANTS = (
    "default",
    "vperm",
    "srot",
    "dsum",
    "exp2",
    "vperm+srot",
    "vperm+srot+dsum",
    "vperm+srot+exp2",
    "vperm+srot+dsum+exp2",
    "iq8",
    "vperm+iq8",
    "default/128/4",
    "vperm+srot+dsum+exp2/128/4",
    "vperm+srot+dsum+exp2/128/2/2",
    "vperm+srot+dsum+exp2/64/2",
    "vperm+srot+dsum+exp2/32/1",
)


def scaled_splits(splits: int, factor: float, seq: int, block_k: int) -> int:
    """``factor`` times a default's ``splits`` (rounded: the bf16 rows take fractions), at least one and at most one
    ``block_k`` block of ``seq`` a split: the ``*F`` of every variant grammar here."""
    return max(1, min(-(-seq // block_k), round(splits * factor)))


def parse_variant(text: str) -> tuple[str, dict]:
    """``form[/block_k[/warps[/stages]]][*F]`` -> ``(form, launch overrides)`` (``*F``: ``split_factor``)."""
    body, _, factor = text.partition("*")
    form, *launch = body.split("/")
    if set(form.split("+")) - decode_q8.FLAGS - {"default"}:
        raise ValueError(f"variant {text!r}: form {form!r} is not default or parts of {sorted(decode_q8.FLAGS)}")
    overrides = dict(zip(("block_k", "num_warps", "num_stages"), map(int, launch), strict=False))
    if factor:
        if not factor.isdigit() or int(factor) < 1:
            raise ValueError(f"variant {text!r}: the split factor after '*' must be a positive integer")
        overrides["split_factor"] = int(factor)
    return form, overrides


def q8_call(batch: int, seq: int, form: str, overrides: dict, interpret: bool):
    """The Q8 kernel at this shape with ``form`` and the default launch under ``overrides`` (splits follow
    ``q8_decode_config`` for the block), as ``fn(q, k, k_scale, v, v_scale, lengths)`` over one layer."""
    block_k = overrides.get("block_k")
    config = decode_q8.q8_decode_config(batch, common.NUM_KV_HEADS, seq, common.HEAD_DIM, block_k=block_k)
    factor = overrides.get("split_factor", 1)
    config = config._replace(**{k: v for k, v in overrides.items() if k not in ("block_k", "split_factor")})
    config = config._replace(num_splits=scaled_splits(config.num_splits, factor, seq, config.block_k))
    options = dict(scale=common.HEAD_DIM**-0.5, config=config, interpret=interpret, form=form)

    def call(q, k, ks, v, vs, n):
        layers = (x[None] for x in (k, ks, v, vs))
        return decode_q8._decode(q, *layers, n, jnp.zeros(1, jnp.int32), **options)

    return call, config


def parse_paged_form(text: str) -> tuple[str, int | None, int | None]:
    """``form[/stages][*F]`` -> ``(form, stages or None, F or None)``; SystemExit naming a bad one."""
    body, _, factor = text.partition("*")
    form, _, stages = body.partition("/")
    ok = form in decode_q8.LOOP_FORMS and all(not x or (x.isdigit() and int(x) > 0) for x in (stages, factor))
    if not ok:
        raise SystemExit(f"--paged-forms {text!r}: expected form[/stages][*F], form one of {decode_q8.LOOP_FORMS}")
    return form, int(stages) if stages else None, int(factor) if factor else None


def paged_q8_call(form: str, interpret: bool):
    """The paged Q8 kernel in loop form ``form[/stages][*F]`` (its default launch; ``/stages``: its pipeline depth,
    ``*F``: F times its splits), as ``fn(q, k, k_scale, v, v_scale, table, lengths)`` over page pools; the form
    (``decode_q8.LOOP_FORM``, read per call) and the splits are set while the call is traced."""
    form, stages, factor = parse_paged_form(form)

    def call(q, *pools_table_lengths):
        splits = None
        if factor:
            pool, tables = pools_table_lengths[0], pools_table_lengths[4]
            (batch, pages), heads = tables.shape, pool.shape[-3]
            config = paged_q8.paged_q8_config(batch, heads, pages, PAGE_SIZE, q.shape[-1])
            splits = scaled_splits(config.num_splits, factor, pages, config.pages_per_block)
        with mock.patch.object(decode_q8, "LOOP_FORM", form):
            return paged_q8.paged_q8_decode_attention(
                q, *pools_table_lengths, scale=common.HEAD_DIM**-0.5, interpret=interpret, num_splits=splits,
                num_stages=stages,
            )  # fmt: skip

    return call


def sampler(fn, sets, est_s: float, smoke: bool):
    if smoke:
        run = common._chained(fn, 2)
        common._wall(run, sets)
        return lambda: common._wall(run, sets) / 2
    return common.jax_sampler(fn, sets, est_s)


def parse_fp8(text: str) -> dict:
    """``default`` or ``[block_k[/warps[/stages]]][*F]`` -> the FP8 kernel's launch overrides (``split_factor``: F);
    SystemExit naming a bad one."""
    body, _, factor = text.partition("*")
    fields = [] if body in ("default", "") else body.split("/")
    numbers = [*fields, *([factor] if factor else [])]
    if len(fields) > 3 or not all(x.isdigit() and int(x) > 0 for x in numbers) or text in ("", "*"):
        raise SystemExit(f"--fp8 {text!r}: expected default or [block_k[/warps[/stages]]][*F]")
    out = dict(zip(("block_k", "num_warps", "num_stages"), map(int, fields), strict=False))
    return {**out, "split_factor": int(factor)} if factor else out


def fp8_cells(batch: int, seq: int, sets, specs, interpret: bool) -> dict:
    """``{"fp8:<spec>": (fn, sets over the FP8 cache, config, reference output)}``: the contiguous FP8 kernel
    (``decode_fp8``, its default form) at each launch (:func:`parse_fp8`; F times the splits the launch's block
    gets by default, at most one block a split)."""
    fp8_sets = [(q, *kernel_formats.quantize_fp8(k), *kernel_formats.quantize_fp8(v), n) for q, k, v, n in sets]
    ref = np.asarray(reference.fp8_decode_attention_reference(*fp8_sets[0]), np.float32)
    cells = {}
    for spec in specs:
        launch = parse_fp8(spec)
        factor = launch.pop("split_factor", 1)
        base = decode_fp8.fp8_decode_config(
            batch, common.NUM_KV_HEADS, seq, common.HEAD_DIM, block_k=launch.get("block_k")
        )
        config = base._replace(**launch)
        config = config._replace(num_splits=scaled_splits(base.num_splits, factor, seq, config.block_k))
        options = dict(scale=common.HEAD_DIM**-0.5, interpret=interpret, **config._asdict())
        fn = functools.partial(decode_fp8.fp8_decode_attention, **options)
        cells[f"fp8:{spec}"] = (fn, fp8_sets, config, ref)
    return cells


def bf16_split_calls(batch: int, seq: int, factors, interpret: bool) -> dict:
    """``{"bf16_triton*F": (fn, config)}``: the bf16 Triton kernel at F times its default splits (F may be a
    fraction; at least one split, at most one block a split)."""
    base = pl_common.decode_config(batch, common.NUM_KV_HEADS, seq, common.HEAD_DIM, jnp.bfloat16)
    calls = {}
    for factor in factors:
        splits = scaled_splits(base.num_splits, factor, seq, base.block_k)
        fn = functools.partial(decode.decode_attention, interpret=interpret, num_splits=splits)
        calls[f"bf16_triton*{factor:g}"] = (fn, base._replace(num_splits=splits))
    return calls


def parse_bf16_paged(text: str) -> dict:
    """``default`` or ``pages_per_block/stages[*F]`` -> the bf16 paged kernel's launch overrides (``split_factor``:
    F); SystemExit naming a bad one."""
    body, _, factor = text.partition("*")
    fields = [] if body == "default" else body.split("/")
    if len(fields) not in (0, 2) or not all(
        x.isdigit() and int(x) > 0 for x in [*fields, *([factor] if factor else [])]
    ):
        raise SystemExit(f"--bf16-paged {text!r}: expected default or pages_per_block/stages[*F]")
    out = dict(zip(("pages_per_block", "num_stages"), map(int, fields), strict=False))
    return {**out, "split_factor": int(factor)} if factor else out


def bf16_paged_calls(batch: int, seq: int, specs, interpret: bool) -> dict:
    """``{"bf16_paged:<spec>": fn}``: the bf16 paged kernel (``pallas_kernels.paged``, page 16) at each launch."""
    base = paged.paged_config(batch, common.NUM_KV_HEADS, seq // PAGE_SIZE, PAGE_SIZE, common.HEAD_DIM, jnp.bfloat16)
    calls = {}
    for spec in specs:
        launch = parse_bf16_paged(spec)
        factor = launch.pop("split_factor", None)
        if factor:
            block = launch.get("pages_per_block", base.pages_per_block) * PAGE_SIZE
            launch["num_splits"] = scaled_splits(base.num_splits, factor, seq, block)
        calls[f"bf16_paged:{spec}"] = functools.partial(paged.paged_decode_attention, interpret=interpret, **launch)
    return calls


def shape_cell(
    text: str,
    variants: list[str],
    rounds: int,
    smoke: bool,
    log,
    paged_forms=(),
    fp8=(),
    bf16_splits=(),
    bf16_paged=(),
) -> dict:
    batch, seq = (int(x) for x in text.split("x"))
    if smoke:
        batch, seq = min(batch, 2), min(seq, 256)
    sets, _, est = common.decode_inputs(batch, seq, rotate_bytes=0 if smoke else common.ROTATE_BYTES)
    q8_sets = [(q, *quantize(k), *quantize(v), n) for q, k, v, n in sets]
    ref = np.asarray(reference.q8_decode_attention_reference(*q8_sets[0]), np.float32)
    interpret = smoke
    bf16_triton = lambda q, k, v, n: decode.decode_attention(q, k, v, n, interpret=interpret)
    samplers = {
        "bf16": sampler(lambda q, k, v, n: dispatch.decode_attention_auto(q, k, v, n), sets, est, smoke),
        "bf16_triton": sampler(bf16_triton, sets, est, smoke),
    }
    row, outs = {"variants": {}}, {}
    for text_v in variants:
        form, overrides = parse_variant(text_v)
        if smoke and "block_k" in overrides:
            overrides["block_k"] = min(overrides["block_k"], seq)
        fn, config = q8_call(batch, seq, form, overrides, interpret)
        outs[text_v] = np.asarray(fn(*q8_sets[0]), np.float32)
        launch = "/".join(text_v.split("*")[0].split("/")[1:])
        base = outs.get("default" + (f"/{launch}" if launch else ""))
        row["variants"][text_v] = {
            "config": list(config),
            "rel_err": common.rel_err(outs[text_v], ref),
            "same_as_default": None if base is None else bool(np.array_equal(outs[text_v], base)),
        }
        samplers[text_v] = sampler(fn, q8_sets, est * 0.6, smoke)
    if paged_forms:
        p_sets = paged_sets(q8_sets, PAGE_SIZE, jax.random.key(batch * 7919 + seq))
        for form in paged_forms:
            name, fn = f"paged:{form}", paged_q8_call(form, interpret)
            outs[name] = np.asarray(jax.jit(fn)(*p_sets[0]), np.float32)
            base = outs.get("paged:default")
            row["variants"][name] = {
                "config": [],
                "rel_err": common.rel_err(outs[name], ref),
                "same_as_default": None if base is None else bool(np.array_equal(outs[name], base)),
            }
            samplers[name] = sampler(fn, p_sets, est * 0.6, smoke)
    for name, (fn, fp8_sets, config, fp8_ref) in fp8_cells(batch, seq, sets, fp8, interpret).items():
        out = np.asarray(jax.jit(fn)(*fp8_sets[0]), np.float32)
        row["variants"][name] = {"config": list(config), "rel_err": common.rel_err(out, fp8_ref)}
        row["variants"][name]["same_as_default"] = None
        samplers[name] = sampler(fn, fp8_sets, est * 0.6, smoke)
    bf16_ref = reference.decode_attention_reference(*sets[0]) if bf16_splits or bf16_paged else None
    for name, (fn, config) in bf16_split_calls(batch, seq, bf16_splits, interpret).items():
        row["variants"][name] = {"config": list(config), "same_as_default": None}
        row["variants"][name]["rel_err"] = common.rel_err(fn(*sets[0]), bf16_ref)
        samplers[name] = sampler(fn, sets, est, smoke)
    calls = bf16_paged_calls(batch, seq, bf16_paged, interpret)
    b_sets = paged_sets(sets, PAGE_SIZE, jax.random.key(batch * 7919 + seq + 1)) if calls else []
    for name, fn in calls.items():
        err = common.rel_err(fn(*b_sets[0]), bf16_ref)
        row["variants"][name] = {"config": [], "same_as_default": None, "rel_err": err}
        samplers[name] = sampler(fn, b_sets, est, smoke)
    timed = common.interleaved(samplers, rounds, baseline="bf16")
    fp8_bytes = 2 * batch * common.NUM_KV_HEADS * seq * (common.HEAD_DIM + 4)  # e4m3 values, a float32 scale
    for name, t in timed.items():
        nbytes = common.kv_bytes(batch, seq) if name.startswith("bf16") else common.q8_bytes(batch, seq)
        nbytes = fp8_bytes if name.startswith("fp8") else nbytes
        cell = {"us": t["time_s"] * 1e6, "tbps": nbytes / t["time_s"] / 1e12}
        cell["vs_bf16"] = 1 / t["speed_vs_bf16"]["median"]
        if name in row["variants"]:
            row["variants"][name].update(cell)
        else:
            row[name] = cell
    log(f"{text}: bf16 {row['bf16']['us']:.1f} us; " + ", ".join(
        f"{k} {v['us']:.1f} ({v['vs_bf16']:.3f})" for k, v in row["variants"].items()))  # fmt: skip
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help="form[/block_k[/warps[/stages]]]")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode, wall clock: wiring only")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new shape after this many seconds")
    ap.add_argument(
        "--paged-forms", nargs="*", default=[], help="paged Q8 kernel variants (form[/stages][*F]) to time too"
    )
    ap.add_argument(
        "--fp8", nargs="*", default=[], help="FP8 kernel launches: default or [block_k[/warps[/stages]]][*F]"
    )
    ap.add_argument(
        "--bf16-splits", nargs="*", type=float, default=[], help="F: the bf16 Triton kernel at F times its splits"
    )
    ap.add_argument(
        "--bf16-paged", nargs="*", default=[], help="bf16 paged kernel launches: default or pages_per_block/stages[*F]"
    )
    args = ap.parse_args(argv)
    for spec in args.bf16_paged:
        parse_bf16_paged(spec)
    for spec in args.fp8:
        parse_fp8(spec)
    if any(f <= 0 for f in args.bf16_splits):
        raise SystemExit(f"--bf16-splits {args.bf16_splits}: factors must be > 0")
    for v in args.variants:
        parse_variant(v)
    for form in args.paged_forms:
        parse_paged_form(form)
    out, t0 = Path(args.out), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)
    report = {"meta": common.meta(None), "shapes": {}}
    for shape in args.shapes:
        if time.perf_counter() - t0 > args.budget_s:
            log(f"budget reached: {shape} and later shapes not run")
            break
        rounds = 1 if args.smoke else args.rounds
        report["shapes"][shape] = shape_cell(
            shape, args.variants, rounds, args.smoke, log, args.paged_forms, args.fp8, args.bf16_splits,
            args.bf16_paged,
        )  # fmt: skip
        (out / "bench_q8_loop.json").write_text(json.dumps(report, indent=1))
        jax.clear_caches()
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print("\nµs (TB/s of the variant's bytes, time / bf16); same: output equal to the default form's at its launch")
    print("| shape | variant | launch (bk, splits, warps, stages) | us | TB/s | / bf16 | same | err |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, r in report["shapes"].items():
        for name in ("bf16", "bf16_triton"):
            print(
                f"| {shape} | {name} | | {r[name]['us']:.1f} | {r[name]['tbps']:.2f} | {r[name]['vs_bf16']:.3f} | | |"
            )
        for name, v in r["variants"].items():
            print(f"| {shape} | {name} | {tuple(v['config'])} | {v['us']:.1f} | {v['tbps']:.2f} | {v['vs_bf16']:.3f} "
                  f"| {v['same_as_default']} | {v['rel_err']:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
