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
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jkv.models import quant
from jkv.models.llama import LayerParams, LlamaConfig, LlamaParams, check_params, fuse_qkv, resolve_layout


class ModelLoadError(ValueError):
    """A model file or directory that cannot be loaded: missing, corrupt, truncated or unsupported."""


def read_json(path: Path, error: type[ValueError] = ModelLoadError, what: str = "valid JSON"):
    """The JSON value in the file ``path``; ``error`` naming the file where it is not JSON (or not UTF-8 text):
    ``'<path>' is not <what>: <why>``."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{str(path)!r} is not {what}: {e}") from None


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
    packed: Callable[[str], tuple[str, tuple] | None] | None = None,
) -> LlamaParams:
    """Fuse, transpose and place every weight on the default device as ``dtype`` (see the module docstring).

    ``layout``: per-layer buffers or stacked layers, as ``jkv.models.llama.with_layout`` describes.
    ``packed``: ``name -> (format, planes) or None`` for weights kept block-quantized (``jkv.models.quant``;
    planes of the ``[out, in]`` matrix, NumPy); a fused group whose parts differ in format is dequantized.
    """
    dtype = resolve_dtype(dtype)
    np_dtype = np.dtype(dtype)
    stacked = resolve_layout(layout) == "stacked"

    def host(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32).astype(np_dtype)

    def packed_group(names, fuse, dense_shape, reduce_axis=0):
        """A QuantizedMatrix of the fused ``names``, or None (a dense weight) where any is not packed alike."""
        parts = [packed(name) for name in names] if packed is not None else [None]
        if any(p is None for p in parts) or len({fmt for fmt, _ in parts}) != 1:
            return None
        return quant.from_planes(parts[0][0], fuse([planes for _, planes in parts]), dense_shape, dtype, reduce_axis)

    bar = tqdm(total=config.num_layers + 2, desc=desc, unit="layer", file=sys.stderr, disable=not progress)
    h, f, nd = config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim
    one = lambda parts: parts[0]
    embed = packed_group(["embed"], one, (config.vocab_size, h), reduce_axis=1)
    embed = jax.device_put(host(get("embed")) if embed is None else embed)
    bar.update(1)
    layers = []
    for i in range(config.num_layers):
        w = lambda name, i=i: np.asarray(get(f"{i}.{name}"), np.float32)
        k = config.num_kv_heads
        names = lambda *parts, i=i: [f"{i}.{p}" for p in parts]
        fuse = lambda parts, k=k: quant.fuse_qkv_rows(*parts, k)
        wqkv = packed_group(names("q", "k", "v"), fuse, (h, *config.qkv_shape))
        wqkv = host(fuse_qkv(w("q").T, w("k").T, w("v").T, k)) if wqkv is None else wqkv  # (H, K, G + 2, D)
        w_gate_up = packed_group(names("gate", "up"), quant.concat_rows, (h, 2, f))
        w_gate_up = host(np.stack([w("gate").T, w("up").T], axis=1)) if w_gate_up is None else w_gate_up
        wo, w_down = packed_group(names("o"), one, (nd, h)), packed_group(names("down"), one, (f, h))
        bqkv = fuse_qkv(w("q_bias"), w("k_bias"), w("v_bias"), k) if config.qkv_bias else None
        layer = LayerParams(
            attn_norm=host(w("attn_norm")),
            wqkv=wqkv,
            bqkv=None if bqkv is None else host(bqkv),
            wo=host(w("o").T) if wo is None else wo,
            mlp_norm=host(w("mlp_norm")),
            w_gate_up=w_gate_up,  # (H, 2, F)
            w_down=host(w("down").T) if w_down is None else w_down,
            q_norm=host(w("q_norm")) if config.qk_norm else None,
            k_norm=host(w("k_norm")) if config.qk_norm else None,
            post_attn_norm=host(w("post_attn_norm")) if config.sandwich_norms else None,
            post_mlp_norm=host(w("post_mlp_norm")) if config.sandwich_norms else None,
        )
        # Per-layer buffers go to the device at once (host memory holds one layer); stacked ones at the end.
        layers.append(layer if stacked else jax.device_put(layer))
        bar.update(1)
    if stacked and len({jax.tree.structure(layer) for layer in layers}) > 1:
        stacked, layers = False, [jax.device_put(layer) for layer in layers]  # formats differ by layer: no stack
    if stacked:
        layers = jax.device_put(jax.tree.map(lambda *xs: np.stack(xs), *layers))
    lm_head = None
    if not config.tie_embeddings:
        lm_head = packed_group(["lm_head"], one, (h, config.vocab_size))
        lm_head = host(np.asarray(get("lm_head"), np.float32).T) if lm_head is None else lm_head
    params = LlamaParams(
        embed=embed,
        layers=layers if stacked else tuple(layers),
        norm=jax.device_put(host(get("norm"))),
        lm_head=None if lm_head is None else jax.device_put(lm_head),
    )
    bar.update(1)
    bar.close()
    try:
        check_params(params, config)
    except ValueError as e:
        raise ModelLoadError(f"tensor shapes do not match the model's config: {e}") from None
    return params
