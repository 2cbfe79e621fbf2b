"""Checks a model file must pass before any of its weights is computed with.

A loader reads its format's configuration fields into ``{config field: (value, field name in the file)}`` and
passes them to ``config_values``, which checks each value's type and range; ``check_tensors`` then checks that
every tensor the config needs is present with the shape the config implies (and nothing beyond its layer count);
``check_finite`` checks each weight as it is read. Every error is a ``ModelLoadError`` naming the file, the field
or tensor, the value, and what was expected.

``check_finite_logits`` is the same idea at generation time: a step whose logits are not finite stops generation
with an error naming the step, instead of sampling from garbage.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from jkv.loading.common import ModelLoadError

# Ranges (inclusive) wide enough for every published Llama-family model; a value outside is a corrupt field.
INT_RANGES = {
    "vocab_size": (1, 1 << 24),
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20),
    "num_layers": (1, 4096),
    "num_heads": (1, 4096),
    "num_kv_heads": (1, 4096),
    "head_dim": (2, 4096),
    "max_position": (1, 1 << 27),
    "rope_original_max_position": (1, 1 << 27),
}
# (low, high, low is exclusive)
FLOAT_RANGES = {
    "rms_norm_eps": (0.0, 1.0, True),
    "rope_theta": (1.0, 1e12, True),
    "rope_linear_factor": (0.0, 1e6, True),
    "rope_factor": (0.0, 1e6, True),
    "rope_low_freq_factor": (0.0, 1e6, True),
    "rope_high_freq_factor": (0.0, 1e6, True),
}


def _fail(source: str, field: str, value, expected: str):
    raise ModelLoadError(f"{source}: {field}={value!r} is invalid: expected {expected}")


def integer(value, field: str, source: str, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``, or ``ModelLoadError`` naming ``field`` in ``source``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        _fail(source, field, value, f"an integer in [{low}, {high}], not {type(value).__name__}")
    if not low <= int(value) <= high:
        _fail(source, field, int(value), f"an integer in [{low}, {high}]")
    return int(value)


def real(value, field: str, source: str, low: float, high: float, low_exclusive: bool = True) -> float:
    """``value`` as a finite float in ``(low, high]`` (or ``[low, high]``), or ``ModelLoadError``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        _fail(source, field, value, f"a number, not {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float range, e.g. 10**400 in a JSON file
        value = math.inf
    bracket = "(" if low_exclusive else "["
    if not math.isfinite(value) or value > high or value < low or (low_exclusive and value == low):
        _fail(source, field, value, f"a finite number in {bracket}{low:g}, {high:g}]")
    return value


def config_values(raw: Mapping[str, tuple[object, str]], source: str) -> dict:
    """Check ``{config field: (value, file field)}`` by the ranges above and the relations between fields.

    Returns ``{config field: checked value}``; fields not in the range tables pass through unchanged.
    """
    out = {}
    for key, (value, field) in raw.items():
        if key in INT_RANGES:
            out[key] = integer(value, field, source, *INT_RANGES[key])
        elif key in FLOAT_RANGES:
            out[key] = real(value, field, source, *FLOAT_RANGES[key])
        else:
            out[key] = value
    name = {key: field for key, (_, field) in raw.items()}
    if "num_heads" in out and "num_kv_heads" in out and out["num_heads"] % out["num_kv_heads"]:
        raise ModelLoadError(
            f"{source}: {name['num_heads']}={out['num_heads']} is not a multiple of "
            f"{name['num_kv_heads']}={out['num_kv_heads']} (each kv head serves a whole group of query heads)"
        )
    if "head_dim" in out and out["head_dim"] % 2:
        _fail(source, name["head_dim"], out["head_dim"], "an even head dimension (rotary embeddings pair its halves)")
    low, high = out.get("rope_low_freq_factor"), out.get("rope_high_freq_factor")
    if low is not None and high is not None and not high > low:
        _fail(source, name["rope_high_freq_factor"], high, f"more than {name['rope_low_freq_factor']}={low}")
    return out


def head_dim_from(hidden: int, heads: int, source: str, hidden_field: str, heads_field: str) -> int:
    """``hidden / heads`` when the file gives no head dimension, refusing a division that does not come out even."""
    if hidden % heads:
        raise ModelLoadError(
            f"{source}: {heads_field}={heads} does not divide {hidden_field}={hidden}, and no head dimension is "
            "given: the heads cannot split the hidden size"
        )
    return hidden // heads


def expected_shapes(config, fields: Mapping[str, str]) -> dict[str, tuple[tuple[int, str], ...]]:
    """Canonical tensor name (see ``jkv.loading.common``) -> its shape in HF layout, each dim with its origin."""
    name = lambda key: fields.get(key, key)
    d = f"head dim {config.head_dim}"
    v = (config.vocab_size, f"{name('vocab_size')}={config.vocab_size}")
    h = (config.hidden_size, f"{name('hidden_size')}={config.hidden_size}")
    f = (config.intermediate_size, f"{name('intermediate_size')}={config.intermediate_size}")
    nd = (config.num_heads * config.head_dim, f"{name('num_heads')}={config.num_heads} × {d}")
    kd = (config.num_kv_heads * config.head_dim, f"{name('num_kv_heads')}={config.num_kv_heads} × {d}")
    shapes = {"embed": (v, h), "norm": (h,)}
    if not config.tie_embeddings:
        shapes["lm_head"] = (v, h)
    per_layer = {"attn_norm": (h,), "q": (nd, h), "k": (kd, h), "v": (kd, h), "o": (h, nd), "mlp_norm": (h,)}
    per_layer |= {"gate": (f, h), "up": (f, h), "down": (h, f)}
    if config.qkv_bias:
        per_layer |= {"q_bias": (nd,), "k_bias": (kd,), "v_bias": (kd,)}
    if getattr(config, "qk_norm", False):
        per_layer |= {"q_norm": ((config.head_dim, d),), "k_norm": ((config.head_dim, d),)}
    if getattr(config, "sandwich_norms", False):
        per_layer |= {"post_attn_norm": (h,), "post_mlp_norm": (h,)}
    for i in range(config.num_layers):
        shapes |= {f"{i}.{key}": shape for key, shape in per_layer.items()}
    return shapes


def check_tensors(
    config,
    shapes: Mapping[str, tuple[int, ...]],
    file_name: Callable[[str], str],
    fields: Mapping[str, str],
    source: str,
    layer_pattern: str,
) -> None:
    """Every tensor the config needs is in ``shapes`` (file name -> shape in HF layout) with the implied shape,
    and no tensor belongs to a layer beyond the config's layer count (a shortened count would drop layers).

    ``file_name`` maps a canonical name to the file's; ``layer_pattern`` is a regex whose group 1 is a layer index.
    """
    for canonical, want in expected_shapes(config, fields).items():
        key = file_name(canonical)
        if key not in shapes:
            raise missing_tensor(key, shapes, source)
        got = tuple(int(n) for n in shapes[key])
        if got != tuple(n for n, _ in want):
            why = ", ".join(f"{n} from {origin}" for n, origin in want)
            raise ModelLoadError(
                f"tensor {key!r} in {source} has shape {got}, expected {tuple(n for n, _ in want)} ({why})"
            )
    pattern = re.compile(layer_pattern)
    for key in shapes:
        match = pattern.match(key)
        if match and int(match.group(1)) >= config.num_layers:
            raise ModelLoadError(
                f"tensor {key!r} in {source} belongs to layer {match.group(1)}, but "
                f"{fields.get('num_layers', 'num_layers')}={config.num_layers}: the layer count is wrong"
            )


def missing_tensor(key: str, shapes: Mapping[str, tuple[int, ...]], source: str) -> ModelLoadError:
    """The error for tensor ``key`` missing from ``shapes``, naming a tensor the file holds under another prefix
    (a multimodal checkpoint's ``language_model.``)."""
    tail = "." + key.removeprefix("model.")
    near = sorted(name for name in shapes if name.endswith(tail))
    held = f": the files hold {near[0]!r}, under a prefix that is not read" if near else ""
    return ModelLoadError(f"tensor {key!r} is missing from {source}{held}")


def check_finite(x: np.ndarray, name: str, source: str, dtype=np.float32) -> np.ndarray:
    """``x`` unchanged if every value is finite and fits ``dtype``; else ``ModelLoadError`` naming the tensor."""
    limit = float(np.finfo(dtype).max)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if not (-limit <= lo and hi <= limit):  # NaN fails both comparisons
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        what = f"{bad} non-finite values" if bad else f"values up to {max(-lo, hi):.3g}, beyond {np.dtype(dtype)}"
        raise ModelLoadError(f"tensor {name!r} in {source} holds {what}: the file is corrupt")
    return x


def check_tokenizer(tokenizer, config, vocab_field: str, source: str) -> None:
    """Every id of the tokenizer's vocabulary, and its special ids, index a row of the embedding table. Tokens
    added past the table (Gemma 3's ``<image_soft_token>``, one past its embeddings) are let be: text holding one
    is refused where prompts are checked against the vocabulary size (``Generator``, the engine)."""
    from jkv.loading.tokenizer import TokenizerError

    size = tokenizer.backend.get_vocab_size(with_added_tokens=False)
    if size > config.vocab_size:
        raise TokenizerError(
            f"{source}: the tokenizer has {size} tokens but {vocab_field}={config.vocab_size}: "
            "its ids would index past the embedding table"
        )
    specials = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id} | {f"stop {i}": i for i in tokenizer.stop_ids}
    for what, token_id in specials.items():
        if token_id is not None and not 0 <= token_id < config.vocab_size:
            raise TokenizerError(
                f"{source}: the {what} token id {token_id} lies outside [0, {vocab_field}={config.vocab_size})"
            )


class NonFiniteLogitsError(ValueError):
    """A generation step produced NaN or infinite logits: the model's weights or activations overflowed."""


def check_finite_logits(logits, step: int, rows: Iterable[int] | None = None) -> None:
    """Raise ``NonFiniteLogitsError`` naming ``step`` (and the batch rows) if any logit is NaN or infinite.

    ``logits``: ``[B, V]`` (or ``[B, T, V]``) logits, or a ``[B]`` boolean array of per-row finiteness already
    reduced on the device (``jnp.isfinite(logits).all(-1)``), which avoids copying the logits to the host.
    ``rows``: which batch rows are live (default: all).
    """
    flags = np.asarray(logits)
    if flags.dtype != np.bool_:
        flags = np.isfinite(flags).reshape(flags.shape[0], -1).all(axis=-1)
    live = range(flags.shape[0]) if rows is None else rows
    bad = [int(b) for b in live if not flags[b]]
    if bad:
        raise NonFiniteLogitsError(
            f"generation step {step} produced non-finite logits for batch row(s) {bad[:8]}: the model's weights "
            "or activations overflow (a corrupt model file, or a dtype too narrow for it)"
        )
