"""Shared test configuration: tolerances keyed by dtype, NumPy float64 references, hypothesis profiles."""

import contextlib
import os
import zlib

from helpers_xla_flags import suite_xla_flags

# Eight host devices and the faster CPU code generation (helpers_xla_flags). Must precede importing jax.
os.environ["XLA_FLAGS"] = suite_xla_flags(os.environ)
# One OpenMP thread for torch (the HF references) and NumPy's BLAS: the suite runs one pytest worker per core, and
# torch's spinning thread pool beside a busy JAX runs HF's models many times slower. Read when torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax
import numpy as np
import pytest
from hypothesis import settings

# On a CPU the suite's time is mostly XLA compiling small programs: compile them without XLA's optimisation passes
# (half the compile time; IEEE arithmetic either way). Modules marked ``full_optimization`` (bfloat16 quality
# figures: the passes change where bf16 rounds) compile as users' programs do, and so do the tests that run the real
# SmolLM2 for many steps (the ``optimized`` fixture: runtime, not compiling, is their cost). JKV_TEST_FULL_OPT=1 turns
# it off.
FAST_CPU_COMPILE = jax.default_backend() == "cpu" and os.environ.get("JKV_TEST_FULL_OPT") != "1"
jax.config.update("jax_disable_most_optimizations", FAST_CPU_COMPILE)

# References are NumPy float64 (tests/reference.py); JAX runs in its default 32-bit mode, as users run it.
settings.register_profile("ci", deadline=None, print_blob=True, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Relative error bounds ‖out − ref‖ / ‖ref‖, keyed by the dtype the computation runs in.
REL_TOL = {"float64": 1e-12, "float32": 1e-6, "bfloat16": 2e-2, "float16": 5e-3}


def rel_err(out, ref) -> float:
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.isfinite(out).all(), "output holds NaN/Inf"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's id: fresh per test, reproducible per test."""
    seed = zlib.crc32(request.node.nodeid.encode())  # stable across processes (str hash() is salted)
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True, scope="module")
def _compile_level(request):
    """Full XLA optimisation for the tests of a module marked ``full_optimization`` (caches cleared on the way in
    and out, so no program compiled at the other level is reused)."""
    if not FAST_CPU_COMPILE or request.node.get_closest_marker("full_optimization") is None:
        yield
        return
    jax.clear_caches()
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.clear_caches()
    jax.config.update("jax_disable_most_optimizations", True)


@contextlib.contextmanager
def optimized_compiles():
    """XLA's optimisation passes on for the programs compiled inside: the real SmolLM2's matrix-vector steps run
    about ten times slower unoptimised, more than the passes cost. The level is not part of jit's cache key, so a
    program compiled before at the other level runs as it is (float32 results
    equal up to rounding, another speed)."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def optimized():
    """The test's programs compile with XLA's optimisation passes (``optimized_compiles``): for tests that run the
    real SmolLM2 for many steps."""
    with optimized_compiles():
        yield
