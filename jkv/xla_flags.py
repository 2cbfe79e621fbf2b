"""XLA options jkv recommends for decoding on a GPU, applied before JAX starts its backends.

A decode step is hundreds of small kernels (SmolLM2-135M: ~460 per token). XLA's command buffers replay a
step's kernels as a CUDA graph, without a launch gap between them. JAX 0.11's XLA captures fusions, cuBLAS and
custom calls (the Pallas kernels) by default, but not control flow; adding ``WHILE`` and ``CONDITIONAL`` lets the
whole step be captured. Measured on an H100 (docs/BENCHMARKS.md, "End-to-end decode"): SmolLM2-135M batch 1
went from 2.29 to 1.94 ms per step (command buffers off entirely: 4.12 ms); a Llama-3-8B step, bound by its
weight reads, was unchanged (5.99 vs 6.01 ms).

``jkv generate`` applies :data:`GPU_FLAGS` itself. Library users set ``XLA_FLAGS`` in their environment, or call
:func:`apply_recommended` before their first JAX computation.
"""

from __future__ import annotations

import os
import warnings

COMMAND_BUFFER = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL"
GPU_FLAGS = (COMMAND_BUFFER,)


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # an older or newer JAX: assume not started
        return False


def apply_recommended(environ=None, *, warn: bool = True) -> list[str]:
    """Add each of :data:`GPU_FLAGS` to ``XLA_FLAGS`` unless the user already set that option; return the flags
    added. XLA reads ``XLA_FLAGS`` once, when JAX starts its backends: after that this warns and changes nothing.
    (The flags only concern GPUs; other backends ignore them.) ``warn=False`` skips the warning."""
    environ = os.environ if environ is None else environ
    current = environ.get("XLA_FLAGS", "")
    added = [flag for flag in GPU_FLAGS if flag.split("=")[0] not in current]
    if not added:
        return []
    if environ is os.environ and _backends_started():
        if warn:
            warnings.warn("jkv.xla_flags.apply_recommended: JAX has already started; XLA_FLAGS unchanged", stacklevel=2)
        return []
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
