"""Where a Pallas kernel runs, decided in one place, and the device facts the launch rules read.

Every kernel of ``pallas_kernels`` builds its ``pallas_call`` through :func:`pallas_call` and resolves its
``interpret`` argument through :func:`resolve_interpret`, so the backend choice and its fallbacks live here:

* ``"mosaic_gpu"``: kernels written against ``jax.experimental.pallas.mosaic_gpu`` (TMA, warpgroup MMAs; Hopper
  and later, no interpret mode) ask :func:`mosaic_gpu_usable` before they launch (``decode_mgpu``; the contiguous
  dispatch ``pallas_kernels.dispatch`` takes it where its measured rule says so).
* ``"triton"``: plain ``pallas_call`` on a CUDA GPU lowers through Triton (``jax.experimental.pallas.triton``
  supplies the compiler parameters: warps per program, software-pipelining stages).
* ``"interpret"``: the kernel body runs as ordinary JAX ops on any backend (the CPU CI path). Chosen when the
  default backend is not a GPU, or, with a warning, when the GPU has no Triton lowering in this JAX build.

Device facts (:func:`num_multiprocessors`, :func:`shared_memory_per_block`) come from the device at run time.
Off a GPU, where interpret mode runs the same launch rules, they are those of the GPU the rules were measured
on (an H100/H200: 132 multiprocessors, 227 KiB of shared memory per block), so tests see the GPU's launches.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import jax
from jax.experimental import pallas as pl

TRITON = "triton"
INTERPRET = "interpret"
MOSAIC_GPU = "mosaic_gpu"
MOSAIC_GPU_MIN_CAPABILITY = (9, 0)  # TMA and warpgroup MMAs: Hopper

# Off a GPU: the device the launch rules were measured on (docs/BENCHMARKS.md), so interpret mode launches alike.
OFF_GPU_MULTIPROCESSORS = 132
OFF_GPU_SHARED_MEMORY = 227 * 1024
# Most shared memory one block may opt in to, per compute capability (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability"), for jaxlib builds whose device does not report it.
SHARED_MEMORY_PER_BLOCK = {
    (7, 0): 96 * 1024,
    (7, 5): 64 * 1024,
    (8, 0): 163 * 1024,
    (8, 6): 99 * 1024,
    (8, 7): 163 * 1024,
    (8, 9): 99 * 1024,
    (9, 0): 227 * 1024,
    (10, 0): 227 * 1024,
    (12, 0): 99 * 1024,
}


def on_gpu() -> bool:
    """True when JAX's default backend is a GPU."""
    return jax.default_backend() == "gpu"


@functools.cache
def _optional_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def triton_module():
    """``jax.experimental.pallas.triton``, or ``None`` when this JAX build lacks it."""
    return _optional_module("jax.experimental.pallas.triton")


def mosaic_gpu_module():
    """``jax.experimental.pallas.mosaic_gpu``, or ``None`` when this JAX build lacks it."""
    return _optional_module("jax.experimental.pallas.mosaic_gpu")


def _compute_capability() -> tuple[int, int] | None:
    """``(major, minor)`` of the default CUDA device, ``None`` off a GPU or when the device does not say."""
    if not on_gpu():
        return None
    value = getattr(jax.devices()[0], "compute_capability", None)  # "9.0" on an H100
    try:
        major, minor = str(value).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def mosaic_gpu_unavailable_reason() -> str | None:
    """Why Mosaic GPU kernels cannot run in this process, or ``None`` when they can."""
    if not on_gpu():
        return f"the default backend is {jax.default_backend()!r}, not a GPU"
    if mosaic_gpu_module() is None:
        return "this JAX build has no jax.experimental.pallas.mosaic_gpu"
    capability = _compute_capability()
    if capability is None or capability < MOSAIC_GPU_MIN_CAPABILITY:
        return f"the GPU's compute capability {capability} is below {MOSAIC_GPU_MIN_CAPABILITY} (Hopper)"
    return None


def mosaic_gpu_usable() -> bool:
    """True when kernels written against Mosaic GPU can run: a Hopper (or later) GPU and the JAX module."""
    return mosaic_gpu_unavailable_reason() is None


def gpu_backend() -> str:
    """The backend a ``pallas_call`` kernel gets on this process's default device: ``"triton"`` or ``"interpret"``."""
    if on_gpu() and triton_module() is not None:
        return TRITON
    return INTERPRET


def resolve_interpret(interpret: bool | None) -> bool:
    """``interpret=None`` means interpret mode unless the Triton GPU lowering is available.

    ``interpret=False`` off a GPU raises instead of failing later inside the lowering.
    """
    if interpret is None:
        if on_gpu() and triton_module() is None:
            warnings.warn(
                "this JAX build has no Pallas Triton lowering: running Pallas kernels in interpret mode",
                RuntimeWarning,
                stacklevel=3,
            )
        return gpu_backend() == INTERPRET
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret must be None or a bool, got {interpret!r}")
    if not interpret and gpu_backend() != TRITON:
        raise ValueError(
            f"interpret=False needs a GPU with the Pallas Triton lowering; the default backend is "
            f"{jax.default_backend()!r} (pass interpret=True or None)"
        )
    return interpret


def compiler_params(*, num_warps: int, num_stages: int):
    """Triton compiler parameters, under whichever name this JAX version gives them."""
    plgpu = triton_module()
    cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def pallas_call(kernel, *, interpret: bool, num_warps: int, num_stages: int, **kwargs):
    """``pl.pallas_call`` for the chosen backend: Triton compiler parameters on GPU, none in interpret mode."""
    if interpret:
        return pl.pallas_call(kernel, interpret=True, **kwargs)
    return pl.pallas_call(kernel, compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages), **kwargs)


def load(ref, *, mask=None, other=None, volatile: bool = False):
    """Masked load from a ref (``pl.load`` semantics): Triton's on any backend that has it, else Pallas's own.
    ``volatile``: a volatile load (never from the multiprocessor's L1: memory other programs wrote), which Pallas's
    own load (interpret mode) need not mark."""
    plgpu = triton_module()
    if plgpu is not None:
        return plgpu.load(ref, mask=mask, other=other, volatile=volatile)
    from jax._src.pallas import primitives  # interpret-only fallback when this JAX build lacks the Triton module

    return primitives.load(ref, None, mask=mask, other=other)


def store(ref, val, *, mask=None) -> None:
    """Masked store to a ref (``pl.store`` semantics), like :func:`load`."""
    plgpu = triton_module()
    if plgpu is not None:
        return plgpu.store(ref, val, mask=mask)
    from jax._src.pallas import primitives

    return primitives.store(ref, None, val, mask=mask)


def sync_threads(interpret: bool) -> None:
    """A barrier of the program's threads (CUDA's ``__syncthreads``) in the Triton lowering; nothing in interpret
    mode, where a program runs as one sequence of array operations."""
    if not interpret:
        triton_module().debug_barrier()


def atomic_add(ref, index, value):
    """``ref[index] += value`` atomically (acquire-release, GPU scope, in the Triton lowering); returns the value
    before. Interpret mode runs it as a plain read-modify-write (its programs run one after another)."""
    return triton_module().atomic_add(ref, index, value)


@functools.cache
def num_multiprocessors() -> int:
    """Multiprocessors of the default GPU (``OFF_GPU_MULTIPROCESSORS`` off a GPU or where the device does not say)."""
    if on_gpu():
        count = getattr(jax.devices()[0], "core_count", None)
        if isinstance(count, int) and count > 0:
            return count
    return OFF_GPU_MULTIPROCESSORS


@functools.cache
def shared_memory_per_block() -> int:
    """Bytes of shared memory one program may opt in to on the default GPU: the device's own figure where jaxlib
    reports it, else :data:`SHARED_MEMORY_PER_BLOCK` for its compute capability; ``OFF_GPU_SHARED_MEMORY``
    off a GPU or for a capability the table lacks."""
    if on_gpu():
        value = getattr(jax.devices()[0], "shared_memory_per_block_optin", None)
        if isinstance(value, int) and value > 0:
            return value
        capability = _compute_capability()
        if capability in SHARED_MEMORY_PER_BLOCK:
            return SHARED_MEMORY_PER_BLOCK[capability]
    return OFF_GPU_SHARED_MEMORY


def describe() -> dict:
    """What this process can run, for benchmark logs."""
    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "default_backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "pallas_backend": gpu_backend(),
        "triton_lowering": triton_module() is not None,
        "mosaic_gpu": mosaic_gpu_module() is not None,
        "mosaic_gpu_usable": mosaic_gpu_usable(),
        "num_multiprocessors": num_multiprocessors(),
        "shared_memory_per_block": shared_memory_per_block(),
    }
