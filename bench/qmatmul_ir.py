"""What the Triton compiler makes of each ``qmatmul`` launch variant, on a CPU: the Pallas kernel lowered for CUDA
(``jax``'s own Pallas-to-Triton lowering, as on a GPU), then, where the ``triton`` package is importable, compiled
by it for sm_90 to TTGIR (layouts assigned), PTX and SASS (its bundled ``ptxas`` and ``nvdisasm``): no GPU needed.

Counted per variant: in the TTGIR, ``convert_layout`` ops inside the K loop (each a register shuffle or a round
trip through shared memory) and shared-memory allocations; in the SASS (the whole kernel; the K loop dominates),
global loads by width, shared-memory loads and stores, barriers, warp shuffles, FMAs; from ``ptxas -v``, registers
and spills. The ``triton`` package's version is not the one inside jaxlib on the GPU machine: its passes are
close, not equal. Usage: ``python bench/qmatmul_ir.py --out DIR [--smoke] [--shape wqkv] [--rows 1]
[--variants units,default,dp4a]`` (``pip install triton`` for the compiled counts; without it only the lowered
TTIR's op counts). Writes ``DIR/qmatmul_ir.json`` and a table.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from bench import bench_qmatmul
from pallas_kernels import backend, qmatmul_dp4a
from pallas_kernels import quantized_matmul as qm

SASS_OPS = {  # SASS mnemonic prefixes counted (first match wins)
    "ldg_128": r"LDG\.E\.(?:EL\.)?128",
    "ldg_64": r"LDG\.E\.(?:EL\.)?64",
    "ldg_32": r"LDG\.E(?:\.EL)?(?:\.CONSTANT)?\s",
    "ldg_16": r"LDG\.E\.(?:EL\.)?U?16",
    "ldg_8": r"LDG\.E\.(?:EL\.)?[US]8",
    "ldgsts": r"LDGSTS",
    "lds": r"LDS",
    "sts": r"STS",
    "bar": r"BAR\.SYNC",
    "shfl": r"SHFL",
    "ffma": r"FFMA",
    "idp": r"IDP",  # dp4a
    "hmma": r"HGMMA|HMMA",
}


@contextlib.contextmanager
def _capture_triton_modules(out: list):
    """Within: every Pallas Triton lowering appends its module's text (``tt`` dialect) to ``out``."""
    from jax._src.pallas.triton import pallas_call_registration as reg

    lower = reg.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        out.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    with (
        mock.patch.object(reg.lowering, "lower_jaxpr_to_triton_module", capture),
        mock.patch.object(backend, "gpu_backend", lambda: backend.TRITON),
    ):
        yield


def lowered_ttir(fmt: str, m: int, n: int, k: int, config, name: str = "") -> str:
    """The ``tt``-dialect module ``qmatmul`` lowers to for CUDA at this shape and launch (abstract inputs); a
    variant ``name`` with ``bench_qmatmul.INTERLEAVED`` in it reads words laid out by ``qmatmul_dp4a.interleave``."""
    sds = jax.ShapeDtypeStruct
    planes = tuple(sds(s, d) for s, d in bench_qmatmul.plane_specs(fmt, n, k))
    tiled = bench_qmatmul.INTERLEAVED in name
    if tiled:
        planes = jax.eval_shape(lambda p: qmatmul_dp4a.interleave(qmatmul_dp4a.weight_words(p, fmt), fmt), planes)
    modules = []
    jax.clear_caches()  # a launch lowered before would come from the cache, past the capture
    with _capture_triton_modules(modules):
        x = sds((m, k), jnp.bfloat16)
        qm._qmatmul.trace(x, planes, fmt=fmt, config=config, interpret=False, interleaved=tiled).lower(
            lowering_platforms=("cuda",)
        )
    # the product's kernel (the dp4a path lowers its activations' rounding kernel first)
    return next(text for text in modules if re.search(r"tt\.func (?:public )?@jkv_qmatmul_", text))


def _loop_lines(text: str) -> list[str]:
    """Lines inside the outermost ``scf.for`` of an MLIR text (the K loop)."""
    lines, depth, inside = [], 0, False
    for line in text.splitlines():
        if not inside and "scf.for" in line:
            inside, depth = True, 0
        if inside:
            lines.append(line)
            depth += line.count("{") - line.count("}")
            if depth <= 0 and len(lines) > 1:
                break
    return lines


def ttir_counts(ttir: str) -> dict:
    ops = collections.Counter(re.findall(r"\btt\.(reshape|broadcast|expand_dims|reduce|dot|load|store)\b", ttir))
    rank3 = len(re.findall(r"tensor<\d+x\d+x\d+x", ttir))
    return {"ops": dict(ops), "rank3_types": rank3}


def compile_sm90(ttir: str, num_warps: int, num_stages: int) -> dict:
    """``ttir`` compiled by the ``triton`` package for sm_90: its ``ttgir``, ``sass`` (nvdisasm), ``ptxas`` (the
    ``-v`` report) and ``shared`` (bytes). The TTIR goes through the backend's TTIR passes first (canonicalization,
    dot-and-add combining, CSE, loop unrolling), as a GPU compile of a Pallas kernel does: ``triton.compile`` skips
    the passes of the stage an IR file enters at. Raises ImportError without the package."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ttir"
        target = GPUTarget("cuda", 90, 32)
        options = {"num_warps": num_warps, "num_stages": num_stages}
        path.write_text(ttir)
        path.write_text(ttir_passes(path, target, options))
        kernel = triton.compile(str(path), target=target, options=options)
        ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        sass = subprocess.run([tools / "nvdisasm", cubin], capture_output=True, text=True).stdout
        (Path(tmp) / "kernel.ptx").write_text(ptx)
        ptxas = next((p for p in (tools / "ptxas-blackwell", tools / "ptxas") if p.exists()), None)
        info = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", Path(tmp) / "kernel.ptx", "-o", Path(tmp) / "x.cubin"],
            capture_output=True,
            text=True,
        ).stderr
    return {"ttgir": ttgir, "sass": sass, "ptxas": info, "shared": kernel.metadata.shared, "triton": triton.__version__}


def ttir_passes(path: Path, target, options: dict) -> str:
    """The TTIR file at ``path`` after the ``triton`` backend's own TTIR stage (``make_ttir``), as text."""
    from triton._C.libtriton import ir
    from triton.compiler.compiler import IRSource, make_backend

    compiler = make_backend(target)
    context = ir.context()
    parsed = compiler.parse_options(options)
    codegen, modules = compiler.get_codegen_implementation(parsed), compiler.get_module_map()
    module = IRSource(str(path), context, compiler).make_ir(target, parsed, codegen, modules, context)
    return str(compiler.make_ttir(module, {}, parsed, target.arch))


def compiled_counts(ttir: str, num_warps: int, num_stages: int) -> dict:
    """TTGIR / SASS / ptxas counts of ``ttir`` compiled by the ``triton`` package for sm_90 (see the docstring)."""
    compiled = compile_sm90(ttir, num_warps, num_stages)
    ttgir, sass, info = compiled["ttgir"], compiled["sass"], compiled["ptxas"]
    loop = "\n".join(_loop_lines(ttgir))
    sass_counts = collections.Counter()
    for line in sass.splitlines():
        for name, pattern in SASS_OPS.items():
            if re.search(r"\b" + pattern, line):
                sass_counts[name] += 1
                break
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    return {
        "triton": compiled["triton"],
        "convert_layout_in_loop": loop.count("ttg.convert_layout"),
        "convert_layout_total": ttgir.count("ttg.convert_layout"),
        "local_alloc": ttgir.count("ttg.local_alloc"),
        "shared_bytes": compiled["shared"],
        "sass": dict(sass_counts),
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spills.group(1)) if spills else None,
    }


def analyse(fmt: str, m: int, n: int, k: int, config, name: str = "") -> dict:
    ttir = lowered_ttir(fmt, m, n, k, config, name)
    row = {"config": list(config), "ttir": ttir_counts(ttir)}
    try:
        row["compiled"] = compiled_counts(ttir, config.num_warps, config.num_stages)
    except ImportError:
        row["compiled"] = None
    except Exception as e:  # a compile error is a finding too
        row["compiled"] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="one small shape, two variants")
    parser.add_argument("--shape", default="wo", help="which matrix of bench_qmatmul.MATRICES (default wo)")
    parser.add_argument("--rows", default=",".join(map(str, bench_qmatmul.ROWS)), help="M values (default all)")
    parser.add_argument("--variants", default="", help="only these bench_qmatmul variants (all if empty)")
    args = parser.parse_args(argv)
    only = {v for v in args.variants.split(",") if v}
    n, k = (256, 512) if args.smoke else bench_qmatmul.MATRICES[args.shape]
    report = {"shape": [n, k], "rows": {}}
    for fmt in bench_qmatmul.FORMATS:
        for m in (1,) if args.smoke else tuple(int(r) for r in args.rows.split(",")):
            variants = bench_qmatmul.variants(m, n, k, fmt)
            variants = {v: c for v, c in variants.items() if (not only or v in only) and v != bench_qmatmul.DEQUANT}
            for name, config in list(variants.items())[: 2 if args.smoke else None]:
                key = f"{fmt} M={m} {name}"
                report["rows"][key] = analyse(fmt, m, n, k, config, name)
                print_row(key, report["rows"][key])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qmatmul_ir.json").write_text(json.dumps(report, indent=1))
    return report


def print_row(key: str, row: dict) -> None:
    c = row["compiled"]
    if not c or "error" in c:
        print(f"{key:34s} ttir {row['ttir']}  compiled: {c and c['error'][:200]}", flush=True)
        return
    s = c["sass"]
    ldg = "/".join(str(s.get(f"ldg_{w}", 0)) for w in (128, 64, 32, 16, 8))
    print(
        f"{key:34s} cvt(loop) {c['convert_layout_in_loop']:2d} smem {c['shared_bytes']:6d} B  "
        f"LDG128/64/32/16/8 {ldg:>16s} LDGSTS {s.get('ldgsts', 0):3d} LDS {s.get('lds', 0):3d} "
        f"STS {s.get('sts', 0):3d} BAR {s.get('bar', 0):2d} SHFL {s.get('shfl', 0):4d} FFMA {s.get('ffma', 0):5d} "
        f"IDP {s.get('idp', 0):4d} "
        f"MMA {s.get('hmma', 0):3d} regs {c['registers']} spill {c['spill_bytes']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
