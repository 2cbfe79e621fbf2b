"""Random Llama weights drawn by NumPy: ``llama.init_params``'s distribution in its traced shapes, so nothing
compiles (its one jitted program costs seconds per config on a CPU)."""

import jax
import jax.numpy as jnp
import numpy as np

from jkv.models import llama


def random_params(config, seed: int = 0, scale: float = 0.02, layout: str = "layers", dtype=jnp.float32):
    """Weights of ``config``: norms near 1 (std 0.1), the embedding std 1, the rest std ``scale``."""
    shapes = jax.eval_shape(lambda: llama.init_params(config, jax.random.key(0), dtype, scale=scale, layout=layout))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "name", "")
        mean, std = (1.0, 0.1) if name.endswith("norm") else (0.0, 1.0 if name == "embed" else scale)
        # device_put, not jnp.asarray: that compiles a small staging program per shape
        return jax.device_put(np.asarray(mean + std * rng.standard_normal(leaf.shape), leaf.dtype))

    return jax.tree_util.tree_map_with_path(draw, shapes)
