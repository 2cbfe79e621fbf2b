"""What every loader shares: the error type, the loaded-model bundle, dtype choice and the params builder.

A loader turns its format into a config and a function ``get(name) -> np.ndarray`` over canonical tensor names
in Hugging Face layout (linear weights ``[out, in]``); ``build_params`` fuses, transposes and places them on the
device in the requested dtype, one layer at a time behind a progress bar.

Canonical names: ``embed``, ``norm``, ``lm_head``, and per layer ``i``: ``{i}.attn_norm``, ``{i}.q``, ``{i}.k``,
``{i}.v``, ``{i}.q_bias``, ``{i}.k_bias``, ``{i}.v_bias``, ``{i}.o``, ``{i}.mlp_norm``, ``{i}.gate``, ``{i}.up``,
``{i}.down``, and where the family has them ``{i}.q_norm``, ``{i}.k_norm``, ``{i}.post_attn_norm``,
``{i}.post_mlp_norm``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jkv.models.llama import LayerParams, LlamaConfig, LlamaParams, check_params, fuse_qkv, resolve_layout


class ModelLoadError(ValueError):
    """A model file or directory that cannot be loaded: missing, corrupt, truncated or unsupported."""


@dataclasses.dataclass
class LoadedModel:
    config: LlamaConfig
    params: LlamaParams
    tokenizer: Any  # jkv.loading.tokenizer.Tokenizer, or None when the source carries none
    source: str
    load_seconds: float
    info: dict = dataclasses.field(default_factory=dict)  # e.g. name, tensor types


DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "f16": jnp.float16, "float16": jnp.float16}
DTYPES |= {"f32": jnp.float32, "float32": jnp.float32}


def resolve_dtype(dtype) -> jnp.dtype:
    """``None`` → bf16 on GPU, f32 elsewhere; a name (``"bf16"``, ``"f32"``, ``"f16"``) or a floating dtype."""
    if dtype is None:
        return jnp.dtype(jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    try:
        result = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype must be a floating dtype or one of {sorted(DTYPES)}, got {dtype!r}") from e
    if not jnp.issubdtype(result, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {result}")
    return result


def build_params(
    config: LlamaConfig,
    get: Callable[[str], np.ndarray],
    dtype,
    *,
    progress: bool = True,
    desc: str = "loading",
    layout: str = "auto",
) -> LlamaParams:
    """Fuse, transpose and place every weight on the default device as ``dtype`` (see the module docstring).

    ``layout``: per-layer buffers or stacked layers, as ``jkv.models.llama.with_layout`` describes.
    """
    dtype = resolve_dtype(dtype)
    np_dtype = np.dtype(dtype)
    stacked = resolve_layout(layout) == "stacked"

    def host(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32).astype(np_dtype)

    bar = tqdm(total=config.num_layers + 2, desc=desc, unit="layer", file=sys.stderr, disable=not progress)
    embed = jax.device_put(host(get("embed")))
    bar.update(1)
    layers = []
    for i in range(config.num_layers):
        w = lambda name, i=i: np.asarray(get(f"{i}.{name}"), np.float32)
        k = config.num_kv_heads
        wqkv = fuse_qkv(w("q").T, w("k").T, w("v").T, k)  # (H, K, G + 2, D)
        bqkv = fuse_qkv(w("q_bias"), w("k_bias"), w("v_bias"), k) if config.qkv_bias else None
        layer = LayerParams(
            attn_norm=host(w("attn_norm")),
            wqkv=host(wqkv),
            bqkv=None if bqkv is None else host(bqkv),
            wo=host(w("o").T),
            mlp_norm=host(w("mlp_norm")),
            w_gate_up=host(np.stack([w("gate").T, w("up").T], axis=1)),  # (H, 2, F)
            w_down=host(w("down").T),
            q_norm=host(w("q_norm")) if config.qk_norm else None,
            k_norm=host(w("k_norm")) if config.qk_norm else None,
            post_attn_norm=host(w("post_attn_norm")) if config.sandwich_norms else None,
            post_mlp_norm=host(w("post_mlp_norm")) if config.sandwich_norms else None,
        )
        # Per-layer buffers go to the device at once (host memory holds one layer); stacked ones at the end.
        layers.append(layer if stacked else jax.device_put(layer))
        bar.update(1)
    if stacked:
        layers = jax.device_put(jax.tree.map(lambda *xs: np.stack(xs), *layers))
    params = LlamaParams(
        embed=embed,
        layers=layers if stacked else tuple(layers),
        norm=jax.device_put(host(get("norm"))),
        lm_head=None if config.tie_embeddings else jax.device_put(host(np.asarray(get("lm_head"), np.float32).T)),
    )
    bar.update(1)
    bar.close()
    try:
        check_params(params, config)
    except ValueError as e:
        raise ModelLoadError(f"tensor shapes do not match the model's config: {e}") from None
    return params
