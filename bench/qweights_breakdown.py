"""bench/bench_qweights.py's ``--breakdown``: where a decode step's time goes, kernel by kernel (one profiled run
per variant), with each XLA fusion's defining instruction so the profile's names can be read."""

from __future__ import annotations

import jax.numpy as jnp

from bench import common
from bench.bench_qweights import (
    decode_program,
    launch_rule,
    options_of,
    row_settings,
    wall,
    with_act_rows,
    with_dp4a_rows,
    with_mgpu_rows,
)


def step_breakdown(config, models: dict, batch: int, steps: int, top: int = 12, keep=None, capacity: int = 64) -> dict:
    """Per decode step, the device time of each kernel a ``steps``-step program launches (one profiled run) and the
    span: where a step's time goes, per variant (every kernel in the JSON, the ``top`` by time in the log and with
    their fusions' instructions; ``other_s`` the time of the rest; quantized ones also with the
    small-M products on the register path, ``<name>_units``, in the dp4a layout, ``<name>_dp4a`` (and
    ``<name>_dp4a_actx``: its activations rounded by XLA's fusions), and where Mosaic GPU runs on its kernel,
    ``<name>_mgpu``). ``keep``: only these variants (all when None). ``capacity``: the steps the program's cache
    holds, as the timed programs' (a cache shorter than a kernel block is padded to one, a copy every layer)."""
    out = {}
    tokens = jnp.arange(batch, dtype=jnp.int32) % config.vocab_size
    for name, params, launch in breakdown_runs(models, keep):
        program = decode_program(config, batch, max(steps, capacity), options_of(name))
        args = (params, tokens, jnp.int32(steps))
        with launch_rule(launch), row_settings(name):
            wall(program, *args)
            hlo = program.lower(*args).compile().as_text() or ""  # the fusions' instructions, named as in the trace
        events = common._trace(lambda a, program=program: program(*a), args, 1, "/device:GPU")
        kernels, calls = {}, {}
        for kernel, start, end in events:
            kernels[kernel] = kernels.get(kernel, 0.0) + (end - start) * 1e-9 / steps
            calls[kernel] = calls.get(kernel, 0) + 1 / steps
        span = (max(e for _, _, e in events) - min(s for _, s, _ in events)) * 1e-9 / steps if events else 0.0
        ranked = sorted(kernels.items(), key=lambda kv: -kv[1])
        xla = {k: fusion_line(hlo, k) for k, _ in ranked if not k.startswith("jkv_")}
        out[name] = {
            "span_s": span,
            "kernels_s": dict(ranked),  # every kernel: a layer's small launches are the tail of this list
            "calls_per_step": {k: calls[k] for k, _ in ranked},
            "xla_fusions": {k: line for k, line in xla.items() if line},
            "xla_bodies": {k: fused_body(hlo, line) for k, line in xla.items() if line},  # what each fusion does
            "other_s": sum(t for _, t in ranked[top:]),
            "busy_s": sum(kernels.values()),
            "launches_per_step": sum(calls.values()),  # every kernel a step runs: the gaps between them scale with it
            "launches_by_kind": launch_kinds(calls),
        }
        common.log(
            f"breakdown {name} B={batch}: span {span * 1e3:.3f} ms/step, busy {sum(kernels.values()) * 1e3:.3f}, "
            f"{sum(calls.values()):.0f} launches/step {launch_kinds(calls)}"
        )
        for kernel, t in ranked[:top]:
            common.log(f"  {t * 1e6:9.1f} us {calls[kernel]:6.1f}x  {kernel[:100]}  {xla.get(kernel, '')[:160]}")
    return out


def breakdown_runs(models: dict, keep=None) -> list:
    """The variants :func:`step_breakdown` profiles, as ``(name, params, launch rule)`` in order."""
    runs = [(name, params, None) for name, params in with_mgpu_rows(models).items()]
    runs += [(f"{name}_units", params, "units") for name, params in models.items() if name != "bf16"]
    dp4a = {name: p for name, p in with_dp4a_rows(models, keep).items() if name.endswith("_dp4a")}
    runs += [(name, p, None) for name, p in with_act_rows(dp4a).items()]
    return [run for run in runs if keep is None or run[0] in keep]


def launch_kinds(calls: dict) -> dict:
    """Launches a step, by kind: jkv's Pallas kernels by name (``jkv_qmatmul_q4_k`` and its numbered copies as one),
    XLA's fusions by their kind (``loop``, ``input``, ...: the name's first word), the rest under ``other``."""
    out = {}
    for kernel, n in calls.items():
        if kernel.startswith("jkv_"):
            kind = kernel.split("__")[0]
        elif "fusion" in kernel:
            kind = "xla_" + kernel.split("_")[0]
        else:
            kind = "other"
        out[kind] = out.get(kind, 0) + n
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def fused_body(hlo: str, line: str, limit: int = 3000) -> str:
    """The instructions of the computation a fusion ``line`` calls (``calls=%name``), its first ``limit``
    characters, or ''."""
    called = line.partition("calls=%")[2].split(",")[0].split(" ")[0]
    if not called:
        return ""
    lines, inside = [], False
    for text in hlo.splitlines():
        if not inside and text.lstrip("%").startswith(called + " ") and text.rstrip().endswith("{"):
            inside = True
        elif inside:
            if text.strip() == "}":
                break
            lines.append(text.strip())
    return "\n".join(lines)[:limit]


def fusion_line(hlo: str, name: str) -> str:
    """The instruction of the compiled program's HLO text that defines ``name`` (a fusion or kernel as the
    profiler names it: the HLO name with its dots as underscores, ``loop_pad_fusion.126`` -> ``_126``), or ''."""
    for line in hlo.splitlines():
        stripped = line.strip().removeprefix("ROOT ").lstrip("%")
        defined, sep, _ = stripped.partition(" = ")
        if sep and defined.replace(".", "_") == name.replace(".", "_"):
            return stripped
    return ""
