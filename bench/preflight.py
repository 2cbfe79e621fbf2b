"""Run rows of bench/bench_decode_kinds.py in a child process before the benchmark does, so that a kernel that
crashes the process (an illegal address poisons the CUDA context: every later call in that process fails) or
hangs costs only its own row. A row passes where it runs at each of :data:`SHAPES` within the tolerance.

Child: ``python -m bench.preflight ROW ...`` prints one JSON line per row, ``{"row": name, "error": str | None}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Ragged lengths off the block and page edges, B * N not a multiple of 8 (9/3/64, 15/3/128), head_dim 256 with
# GQA 2. A row skips the shapes its kernel refuses (Row.refused).
SHAPES = ("4xr100-4000:32/8/128", "3xr64-2000:9/3/64", "3xr64-1000:15/3/128", "2x1024:16/8/256")


def check_rows(names, shapes=SHAPES) -> None:
    """The child: each row at each shape against its XLA reference (a row stops at its first failure); then one
    JSON line per row."""
    import jax

    from bench import common
    from bench import decode_kinds as kinds

    known = kinds.jax_rows(kinds.parse_shape(shapes[0]), smoke=False)
    errors = {name: None if name in known else f"no row {name!r}; expected one of {list(known)}" for name in names}
    for text in shapes:
        shape = kinds.parse_shape(text)
        rows = {name: row for name, row in kinds.jax_rows(shape, smoke=False).items() if name in names}
        sets, _, _ = kinds.shape_inputs(shape, 0, {row.layout for row in rows.values()})
        refs = kinds.references(shape, sets)
        for name, row in rows.items():
            if errors[name] is not None or row.refused:
                continue
            try:
                out = jax.block_until_ready(jax.jit(row.fn)(*sets[row.layout][0]))
                err = common.rel_err(out, refs[row.fmt])
                errors[name] = None if err <= kinds.TOL else f"{text}: relative error {err:.3g} > {kinds.TOL}"
            except Exception as e:
                errors[name] = f"{text}: {type(e).__name__}: {str(e)[:1000]}"
    for name in names:
        print(json.dumps({"row": name, "error": errors[name]}), flush=True)


def preflight(names, *, timeout_s: float = 150.0, shapes=SHAPES) -> dict:
    """``{row: None (passed) or why not}`` for ``names``, checked in a child process. Where the child dies before
    it reports, each row is tried again alone in a fresh child, so a crash is pinned on its own row; where it
    hangs, the rows it did not report are given up (a retry would likely hang as long again)."""
    verdicts, queue = {}, [list(names)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    while queue:
        group = queue.pop(0)
        command = [sys.executable, "-m", "bench.preflight", *group, "--shapes", *shapes]
        try:
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
            out, fault, hung = proc.stdout, f"the child exited with {proc.returncode}: {proc.stderr[-1500:]}", False
        except subprocess.TimeoutExpired as e:  # its output comes as bytes whatever text= says
            out, fault, hung = (e.stdout or b"").decode(errors="replace"), f"the child ran past {timeout_s:g} s", True
        for line in out.splitlines():
            if line.startswith('{"row"'):
                report = json.loads(line)
                verdicts[report["row"]] = report["error"]
        left = [name for name in group if name not in verdicts]
        if hung or len(group) == 1:
            verdicts.update({name: f"{fault} (rows {', '.join(group)})" for name in left})
        else:
            queue += [[name] for name in left]
    return verdicts


if __name__ == "__main__":
    args = sys.argv[1:]
    cut = args.index("--shapes") if "--shapes" in args else len(args)
    check_rows(args[:cut], tuple(args[cut + 1 :]) or SHAPES)
