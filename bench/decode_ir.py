"""What the Triton compiler makes of the decode attention kernels' loop, on a CPU: the bf16 kernel
(``pallas_kernels.decode``), the Q8 one (``pallas_kernels.decode_q8``, each of its loop forms,
``decode_q8.LOOP_FORMS``) and the contiguous FP8 one (``pallas_kernels.decode_fp8``, ``--fp8-forms``) lowered
for CUDA by jax's Pallas Triton lowering at one shape (Hq/Hkv/D 32/8/128, bf16 queries, float16 Q8 scales, the
default launch), then compiled for sm_90 by the ``triton`` package
(``bench.qmatmul_ir.compile_sm90``). No GPU needed; that Triton is not jaxlib's, so the counts are indicative.

Counted inside the loop over full blocks, so per block (``per key``: warp instructions per key, the SASS loop's
instructions times warps over the block's keys; ``warps/SM``: resident warps the registers and shared memory
allow): in the TTGIR (the ``scf.for``), layout conversions,
shared-memory allocations and loads, async copies by contiguity (elements), reshapes, transposes, products; in the
SASS (the backward branch's body holding the most MMAs), instructions by mnemonic group (``SASS_GROUPS``) and in
all; from ``ptxas -v``, registers and spill bytes. Usage (``triton`` importable, e.g. ``PYTHONPATH=/tmp/tt:$PWD``)::

    JAX_PLATFORMS=cpu python bench/decode_ir.py [--shape 1x131072] [--forms default kt ...] [--paged] [--out DIR]
    JAX_PLATFORMS=cpu python bench/decode_ir.py --head-dim 96 --paged   # the bf16 kernel in column chunks

prints a table (one row per kernel) and, with ``--out``, writes ``DIR/decode_ir.json`` and each kernel's TTGIR and
SASS. ``--block-k/--warps/--stages`` override the Q8 and FP8 launch, and the contiguous bf16 one.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from bench import qmatmul_ir
from pallas_kernels import checks, common, decode, decode_fp8, decode_q8, paged, paged_q8

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
PAGE_SIZE = 16

SASS_GROUPS = {  # column: mnemonic pattern (instruction name with its modifiers); first match wins
    "LDSM": r"LDSM\b",
    "LDS": r"LDS\b",
    "STSM": r"STSM\b",
    "STS": r"STS\b",
    "BAR": r"BAR\.",
    "LDGSTS": r"LDGSTS\b",
    "LDG": r"LDG\b",
    "PRMT": r"PRMT\b",
    "F2FP": r"F2FP\b",
    "I2F": r"I2F",
    "HADD2": r"HADD2\b",
    "HMMA": r"HMMA\b|HGMMA\b",
    "FFMA": r"FFMA\b",
    "FMUL": r"FMUL\b",
    "FADD": r"FADD\b",
    "SHFL": r"SHFL\b",
    "LOP3": r"LOP3\b",
    "MUFU": r"MUFU\b",
    "MOV": r"IMAD\.MOV\b|MOV\b",
}
TTGIR_OPS = ("convert_layout", "local_alloc", "local_load", "local_store", "tt.reshape", "tt.trans", "tt.dot")


def _inputs(batch: int, seq: int, paged_pool: bool, head_dim: int = HEAD_DIM):
    """Abstract inputs of one layer: ``(q, k, v, lengths, layer)`` bf16 and ``(k codes, scales)`` pairs;
    paged pools ``[1, pages, K, PAGE_SIZE, .]`` with a block table when ``paged_pool``."""
    sds = jax.ShapeDtypeStruct
    q = sds((batch, NUM_Q_HEADS, head_dim), jnp.bfloat16)
    rows = (1, batch * seq // PAGE_SIZE, NUM_KV_HEADS, PAGE_SIZE) if paged_pool else (1, batch, NUM_KV_HEADS, seq)
    codes, scales = sds((*rows, head_dim), jnp.int8), sds((*rows, head_dim // 32), jnp.float16)
    dense = sds((*rows, head_dim), jnp.bfloat16)
    fp8 = sds((*rows, head_dim), jnp.float8_e4m3fn), sds((*rows, 1), jnp.float32)
    tables = sds((batch, seq // PAGE_SIZE), jnp.int32)
    return q, dense, (codes, scales), fp8, tables, sds((batch,), jnp.int32), sds((1,), jnp.int32)


def lowered(
    kind: str, batch: int, seq: int, form: str = "default", paged_pool: bool = False, head_dim: int = HEAD_DIM, **launch
):
    """The ``tt``-dialect module of the ``kind`` (``bf16`` / ``q8``) decode kernel at ``batch x seq`` and its
    launch ``(num_warps, num_stages)``; ``form`` picks the Q8 loop form, ``launch`` overrides the Q8 launch (and
    the contiguous bf16 one's)."""
    q, dense, (codes, scales), fp8, tables, lengths, layer = _inputs(batch, seq, paged_pool, head_dim)
    scale = head_dim**-0.5
    if kind == "bf16" and not paged_pool:
        config = common.decode_config(batch, NUM_KV_HEADS, seq, head_dim, jnp.bfloat16)
        config = config._replace(**{k: v for k, v in launch.items() if v is not None})
        call = lambda: decode._decode.trace(
            q, dense, dense, lengths, layer, scale=scale, config=config, interpret=False
        )
    elif kind in ("q8", "fp8") and not paged_pool:
        rule = decode_q8.q8_decode_config if kind == "q8" else decode_fp8.fp8_decode_config
        default = rule(batch, NUM_KV_HEADS, seq, head_dim, block_k=launch.pop("block_k", None))
        config = default._replace(**{k: v for k, v in launch.items() if v is not None})
        args = (q, codes, scales, codes, scales, lengths, layer) if kind == "q8" else (q, *fp8, *fp8, lengths, layer)
        call = lambda: decode_q8._decode.trace(*args, scale=scale, config=config, interpret=False, form=form)
    elif kind == "q8":
        pages = max(1, (launch.pop("block_k", None) or decode_q8.BLOCK_K) // PAGE_SIZE)
        config = paged_q8.paged_q8_config(batch, NUM_KV_HEADS, seq // PAGE_SIZE, PAGE_SIZE, head_dim)
        config = config._replace(pages_per_block=pages, **{k: v for k, v in launch.items() if v is not None})
        args = (q, codes, scales, codes, scales, tables, lengths, layer)
        call = lambda: paged_q8._paged_q8.trace(*args, scale=scale, config=config, interpret=False, form=form)
    else:
        config = paged.paged_config(batch, NUM_KV_HEADS, seq // PAGE_SIZE, PAGE_SIZE, head_dim, jnp.bfloat16)
        config = config._replace(**{k: v for k, v in launch.items() if v is not None and k in config._fields})
        call = lambda: paged._paged.trace(q, dense, dense, tables, lengths, layer, scale=scale, config=config,
                                          interpret=False)  # fmt: skip
    modules = []
    jax.clear_caches()
    with qmatmul_ir._capture_triton_modules(modules):
        call().lower(lowering_platforms=("cuda",))
    block_k = config.block_k if hasattr(config, "block_k") else config.pages_per_block * PAGE_SIZE
    return modules[0], (config.num_warps, config.num_stages, block_k)


def _sass_loop(sass: str) -> list[str]:
    """Instruction lines of the body of the SASS loop holding the most MMAs (from a label to a branch back)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    best = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i:
            body = [x for x in lines[labels[m.group(1)] : i + 1] if re.match(r"\s+/\*[0-9a-f]+\*/", x)]
            if sum("MMA" in x for x in body) > sum("MMA" in x for x in best):
                best = body
    return best


def _mnemonic(line: str) -> str:
    m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9][A-Z0-9_.]*)", line)
    return m.group(1) if m else ""


def counts(ttir: str, num_warps: int, num_stages: int) -> dict:
    """Per-block TTGIR and SASS counts of ``ttir`` compiled for sm_90 (see the module docstring)."""
    compiled = qmatmul_ir.compile_sm90(ttir, num_warps, num_stages)
    loop = "\n".join(qmatmul_ir._loop_lines(compiled["ttgir"]))
    ttgir = {op.split(".")[-1]: len(re.findall(r"\b" + re.escape(op) + r"\b", loop)) for op in TTGIR_OPS}
    copies = re.findall(r"async_copy_global_to_local .*?(?:contiguity = (\d+)[^}]*\})? :", loop)
    ttgir["async_copy"] = dict(collections.Counter(f"x{c or 1}" for c in copies))
    body = [_mnemonic(x) for x in _sass_loop(compiled["sass"])]
    sass = collections.Counter()
    widths = collections.Counter()
    for name in body:
        group = next((g for g, pattern in SASS_GROUPS.items() if re.match(pattern, name)), None)
        if group:
            sass[group] += 1
        if group in ("LDS", "LDGSTS", "STS"):
            widths[f"{group}.{_width(name)}"] += 1
    regs = re.search(r"Used (\d+) registers", compiled["ptxas"])
    spills = re.search(r"(\d+) bytes spill stores", compiled["ptxas"])
    return {
        "ttgir_loop": ttgir,
        "sass_loop": {"instructions": len(body), **sass, "widths": dict(sorted(widths.items()))},
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spills.group(1)) if spills else None,
        "shared_bytes": compiled["shared"],
        "triton": compiled["triton"],
        "_text": {"ttgir": compiled["ttgir"], "sass": compiled["sass"]},
    }


def _width(name: str) -> str:
    """Bits an LDS / STS / LDGSTS moves: from its ``.U8``/``.64``/``.128``-style suffix, else 32."""
    m = re.search(r"\.(?:[US])?(8|16|64|128)\b", name)
    return m.group(1) if m else "32"


COLUMNS = ("instructions", "HMMA", "LDS", "LDSM", "STS", "STSM", "BAR", "LDGSTS", "PRMT", "F2FP", "I2F", "HADD2",
           "FFMA", "FMUL", "FADD", "SHFL", "LOP3", "MUFU", "MOV")  # fmt: skip


def warps_per_sm(registers: int, shared: int, warps: int) -> int:
    """Resident warps per Hopper multiprocessor for programs of ``warps`` warps: 64K registers (allocated per warp
    in units of 256), 228 KB of shared memory (1 KB reserved per program), at most 32 programs and 64 warps."""
    per_warp = -(-registers * 32 // 256) * 256
    programs = min(65536 // (per_warp * warps), 233472 // (shared + 1024), 32, 64 // warps)
    return programs * warps


HEAD = ("kernel", "bk/w/s", "per key", "warps/SM", "cvt", "alloc", "lload", "reshape", "trans", *COLUMNS, "regs",
        "spill", "smem")  # fmt: skip


def print_table(rows: dict) -> None:
    print("| " + " | ".join(HEAD) + " |")
    print("|" + "---|" * len(HEAD))
    for name, r in rows.items():
        t, s, launch = r["ttgir_loop"], r["sass_loop"], r["launch"]
        per_key = s["instructions"] * launch["warps"] / launch["block_k"]  # warp instructions per key
        occupancy = warps_per_sm(r["registers"], r["shared_bytes"], launch["warps"])
        cells = [name, "{block_k}/{warps}/{stages}".format(**launch), f"{per_key:.2f}", occupancy]
        cells += [t[k] for k in ("convert_layout", "local_alloc", "local_load", "reshape", "trans")]
        cells += [s.get(c, 0) for c in COLUMNS] + [r["registers"], r["spill_bytes"], r["shared_bytes"]]
        print("| " + " | ".join(map(str, cells)) + " |")
    for name, r in rows.items():
        print(f"{name}: async copies {r['ttgir_loop']['async_copy']}; widths {r['sass_loop']['widths']}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1x131072", help="B x T")
    ap.add_argument("--forms", nargs="*", default=list(decode_q8.LOOP_FORMS), help="Q8 loop forms")
    ap.add_argument("--fp8-forms", nargs="*", default=["vperm"], help="FP8 loop forms (contiguous only)")
    ap.add_argument("--paged", action="store_true", help="the paged kernels (pages of 16) instead")
    ap.add_argument("--block-k", type=int, default=None)
    ap.add_argument("--warps", type=int, default=None)
    ap.add_argument("--stages", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=HEAD_DIM, help="Q8 rows at multiples of 32")
    ap.add_argument("--out", default=None, help="write decode_ir.json and each kernel's TTGIR / SASS here")
    args = ap.parse_args(argv)
    batch, seq = (int(x) for x in args.shape.split("x"))
    launch = dict(block_k=args.block_k, num_warps=args.warps, num_stages=args.stages)
    quantized = checks.takes_head_dim(args.head_dim, chunked=True)  # Q8 codes also want a multiple of 32
    q8 = quantized and args.head_dim % checks.Q8_BLOCK == 0
    kernels = {"bf16": ("bf16", "default")} | {f"q8 {f}": ("q8", f) for f in args.forms if q8}
    if not args.paged and quantized:
        kernels |= {f"fp8 {f}": ("fp8", f) for f in args.fp8_forms}
    rows = {}
    for name, (kind, form) in kernels.items():
        overrides = launch if kind != "bf16" or not args.paged else {}
        ttir, (warps, stages, block_k) = lowered(kind, batch, seq, form, args.paged, args.head_dim, **overrides)
        rows[name] = counts(ttir, warps, stages) | {"launch": {"block_k": block_k, "warps": warps, "stages": stages}}
    print_table(rows)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, r in rows.items():
            for ext, text in r.pop("_text").items():
                (out / f"{name.replace(' ', '_')}.{ext}").write_text(text)
        report = {"shape": [batch, seq], "head_dim": args.head_dim, "rows": rows}
        (out / "decode_ir.json").write_text(json.dumps(report, indent=1))
    return rows


if __name__ == "__main__":
    main()
