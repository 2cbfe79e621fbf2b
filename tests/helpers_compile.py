"""Compile options for the tests' own jitted programs."""

import jax

# XLA's CPU backend without its optimisation passes: about half the compile time of a small model's step, and IEEE
# arithmetic either way (no fast-math). The tests' float64 / HF comparisons hold at the same tolerances. On a GPU
# the programs compile as users compile them.
FAST_COMPILE = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
