"""Compile options for the tests' float32 model programs."""

# XLA's CPU backend without LLVM's optimisation passes: about half the compile time of a small model's step, and
# IEEE arithmetic either way (no fast-math); not for bfloat16 programs, whose rounding it changes.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
