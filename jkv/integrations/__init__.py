"""jkv caches inside your own JAX model: attention layers for Flax NNX (``jkv.integrations.nnx``) and Equinox
(``jkv.integrations.eqx``), example Llama-shaped models built from them (``example_nnx``, ``example_eqx``), and
the framework-free pieces they share (``common``). See docs/own-model.md.

Nothing here is imported by ``import jkv``; the submodules import flax or equinox themselves, so Equinox is needed
only by ``jkv.integrations.eqx`` and ``example_eqx``.
"""
