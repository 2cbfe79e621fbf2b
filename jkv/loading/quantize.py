"""Quantizing float weights at load into GGUF block formats (NumPy), for models that come unquantized.

Written from the formats' definitions (``pallas_kernels.block_formats``; GGML's Q8_0 and Q4_K), not from
llama.cpp's quantizers, whose Q4_K search for the best scales is more careful than this one:

* Q8_0: per 32 values, ``scale = max|x| / 127`` (rounded to f16), ``code = round(x / scale)``. Error per value
  at most ``scale / 2`` (plus the scale's f16 rounding: ``|x| * 2**-11``).
* Q4_K: per 32 values, the range ``[min(x, 0), max(x)]`` in 15 steps; per 256 values the 8 step sizes and the
  8 offsets as 6-bit multiples of two f16 super-scales ``d``, ``dmin`` (each rounded up so the range still
  fits); ``nibble = round((x + offset) / step)`` clipped to 0..15. Error per value at most about half a step
  plus ``dmin`` where the rounded-up offset pushes the top value past 15 steps.

A weight so large that a scale has no finite float16 (Q8_0: ``max|x| > 65504 * 127``) is a ``ValueError``.

:func:`plan` says which format each matrix of a model gets: the requested one for the block's projections,
Q8_0 for the embedding and LM head (a 4-bit LM head costs far more quality than its share of the bytes), and
Q8_0 where a matrix's input width is not a multiple of 256 (Q4_K's block).
"""

from __future__ import annotations

import numpy as np

from pallas_kernels.block_formats import block_format

QUANTIZE = ("q8_0", "q4_k")  # --quantize choices
_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")


def quantize_q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w [N, K]`` (K a multiple of 32) as Q8_0 planes ``(codes int8 [N, K], scales f16 [N, K/32])``."""
    n, k = _check(w, 32)
    blocks = np.asarray(w, np.float32).reshape(n, k // 32, 32)
    scale = _to_f16(np.abs(blocks).max(axis=-1) / 127.0, "Q8_0", w)  # (N, K/32)
    s = scale.astype(np.float32)[..., None]
    codes = np.where(s > 0, np.round(blocks / np.where(s > 0, s, 1)), 0)
    return np.clip(codes, -127, 127).astype(np.int8).reshape(n, k), scale


def _to_f16(scale: np.ndarray, fmt: str, w: np.ndarray) -> np.ndarray:
    """``scale`` as float16, or a ``ValueError`` where a value has no finite float16 (weights far too large)."""
    with np.errstate(over="ignore"):
        out = scale.astype(np.float16)
    if not np.isfinite(out).all():
        raise ValueError(
            f"{fmt} needs float16 scales, and max|w|={float(np.abs(w).max()):g} makes one past "
            f"{float(np.finfo(np.float16).max):g}"
        )
    return out


def _six_bit(values: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``values [..., 8] >= 0`` as an f16 super-scale ``[...]`` and 6-bit multiples ``[..., 8]`` rounded up."""
    top = values.max(axis=-1)
    sup = _to_f16(top / 63.0, "Q4_K", w)
    sup = np.where(sup.astype(np.float32) * 63 < top, np.nextafter(sup, np.float16(np.inf)), sup)  # round up
    sup = _to_f16(sup, "Q4_K", w)
    s = sup.astype(np.float32)[..., None]
    q = np.where(s > 0, np.ceil(values / np.where(s > 0, s, 1) - 1e-6), 0)
    return sup, np.clip(q, 0, 63).astype(np.uint8)


def quantize_q4_k(w: np.ndarray) -> tuple[np.ndarray, ...]:
    """``w [N, K]`` (K a multiple of 256) as Q4_K planes ``(nibbles, sub_scales, sub_mins, d, dmin)``."""
    n, k = _check(w, 256)
    x = np.asarray(w, np.float32).reshape(n, k // 256, 8, 32)
    low = np.minimum(x.min(axis=-1), 0.0)  # (N, K/256, 8)
    step = (x.max(axis=-1) - low) / 15.0
    d, sub = _six_bit(step, w)
    dmin, sub_min = _six_bit(-low, w)
    step_q = d.astype(np.float32)[..., None] * sub  # what the planes hold
    offset_q = dmin.astype(np.float32)[..., None] * sub_min
    safe = np.where(step_q > 0, step_q, 1)[..., None]
    values = np.clip(np.round((x + offset_q[..., None]) / safe), 0, 15).astype(np.uint8)
    values = np.where(step_q[..., None] > 0, values, 0).reshape(n, k // 32, 32)
    nibbles = (values[..., :16] | (values[..., 16:] << 4)).reshape(n, k // 2)  # the Q4_0 nibble order
    return nibbles, sub.reshape(n, k // 32), sub_min.reshape(n, k // 32), d, dmin


def quantize(w: np.ndarray, fmt: str) -> tuple[np.ndarray, ...]:
    """``w [N, K]`` as the planes of ``fmt`` (``"Q8_0"`` or ``"Q4_K"``)."""
    if fmt == "Q8_0":
        return quantize_q8_0(w)
    if fmt == "Q4_K":
        return quantize_q4_k(w)
    raise ValueError(f"jkv quantizes to Q8_0 or Q4_K, not {fmt!r}")


def plan(name: str, k: int, choice: str) -> str | None:
    """The format canonical weight ``name`` (``[out, in]``, ``in = k``) gets for ``--quantize choice``, or None
    (kept dense: norms, biases, widths no block fits)."""
    if choice not in QUANTIZE:
        raise ValueError(f"quantize={choice!r} is not one of {QUANTIZE}")
    linear = name.rpartition(".")[2] in _LINEAR and "." in name
    if not linear and name not in ("embed", "lm_head"):
        return None
    fmt = choice.upper() if linear else "Q8_0"
    if k % block_format(fmt).block:
        fmt = "Q8_0"
    return fmt if k % block_format(fmt).block == 0 else None


def _check(w, block: int) -> tuple[int, int]:
    if getattr(w, "ndim", None) != 2 or w.shape[1] % block or w.shape[1] == 0:
        raise ValueError(f"quantizing needs a [N, K] matrix with K a multiple of {block}, got {np.shape(w)}")
    if not np.isfinite(w).all():
        raise ValueError("quantizing needs finite weights")
    return w.shape


_FIELDS = {"wqkv": "q", "wo": "o", "w_gate_up": "gate", "w_down": "down"}


def quantize_params(params, choice: str):
    """Dense ``LlamaParams`` (either layout) with every matrix ``plan`` picks quantized on the host and placed back
    on the device (``jkv.models.quant.QuantizedMatrix``, computing in the params' dtype); the rest unchanged.
    A matrix that is block-quantized already is a ``ValueError``."""
    import jax

    from jkv.models import quant
    from jkv.models.llama import with_layout

    dtype = params.dtype

    def convert(w, name: str, reduce_axis: int = 0, field: str | None = None):
        if quant.is_quantized(w):  # a second rounding on top of the blocks' own
            raise ValueError(
                f"{field or name} is already {w.format}: quantize_params takes dense weights (dequantize "
                "block-quantized ones first: jkv.models.quant.dequantize_params)"
            )
        dense = np.asarray(jax.device_get(w), np.float32)
        k = dense.shape[reduce_axis]
        fmt = plan(name, k, choice)
        if fmt is None:
            return w
        rows = dense.reshape(k, -1).T if reduce_axis == 0 else dense  # (N, K)
        return jax.device_put(quant.from_planes(fmt, quantize(rows, fmt), dense.shape, dtype, reduce_axis))

    stacked = params.stacked
    layers = with_layout(params, "layers").layers
    layers = tuple(
        layer.replace(
            **{
                field: convert(getattr(layer, field), f"{i}.{name}", field=f"layers[{i}].{field}")
                for field, name in _FIELDS.items()
            }
        )
        for i, layer in enumerate(layers)
    )
    lm_head = None if params.lm_head is None else convert(params.lm_head, "lm_head")
    out = params.replace(embed=convert(params.embed, "embed", reduce_axis=1), layers=layers, lm_head=lm_head)
    return with_layout(out, "stacked") if stacked else out
