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
import mmap
import re
import struct
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
            raise ModelLoadError(f"tensor {key!r} is missing from {source}")
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
    """Every id the tokenizer can produce, and its special ids, index a row of the embedding table."""
    from jkv.loading.tokenizer import TokenizerError

    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(
            f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but {vocab_field}={config.vocab_size}: "
            "its ids would index past the embedding table"
        )
    specials = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id} | {f"stop {i}": i for i in tokenizer.stop_ids}
    for what, token_id in specials.items():
        if token_id is not None and not 0 <= token_id < config.vocab_size:
            raise TokenizerError(
                f"{source}: the {what} token id {token_id} lies outside [0, {vocab_field}={config.vocab_size})"
            )


# ---------------------------------------------------------------------------------------------- GGUF layout
_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4
GGUF_VERSIONS = (2, 3)
GGUF_MAX_DIMS = 4


def gguf_layout(path: str, source: str) -> dict[str, tuple[tuple[int, ...], int]]:
    """Walk a GGUF file's header with every count and length bounded by the file's size, before any reader
    trusts them; returns ``{tensor name: (dims innermost first, type id)}``.

    Refuses: unknown versions or value types, lengths past the end, duplicate keys or tensors, tensors of 0 or more
    than 4 dims, unknown types, rows not a whole number of quantization blocks, misaligned offsets, tensor data
    past the end of the file or overlapping another tensor's.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _walk_gguf(data, source)


def _walk_gguf(data, source: str) -> dict[str, tuple[tuple[int, ...], int]]:
    import gguf

    size = len(data)
    pos = 0

    def take(fmt: str):
        nonlocal pos
        if pos + struct.calcsize(fmt) > size:
            raise ModelLoadError(f"{source} is truncated or corrupt: its header runs past the end ({size} bytes)")
        value = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value[0] if len(value) == 1 else value

    def skip(nbytes: int, what: str):
        nonlocal pos
        if nbytes > size - pos:
            raise ModelLoadError(
                f"{source} is truncated or corrupt: {what} claims {nbytes} bytes at offset {pos}, past the end "
                f"({size} bytes)"
            )
        pos += nbytes

    def string(what: str) -> bytes:
        n = take("Q")
        start = pos
        skip(n, what)
        return data[start:pos]

    def value(kind: int, key: str, nested: bool):
        if kind in _GGUF_SCALAR_BYTES:
            skip(_GGUF_SCALAR_BYTES[kind], f"the value of {key}")
        elif kind == _GGUF_STRING:
            string(f"the string value of {key}")
        elif kind == _GGUF_ARRAY and not nested:
            item, count = take("I"), take("Q")
            if item in _GGUF_SCALAR_BYTES:
                skip(count * _GGUF_SCALAR_BYTES[item], f"the array {key}")
            elif item == _GGUF_STRING:
                if count > (size - pos) // 8:  # each string takes 8 bytes of length at least
                    skip(count * 8, f"the array {key}")
                for _ in range(count):
                    string(f"an item of the array {key}")
            else:
                raise ModelLoadError(f"{source} is corrupt: the array {key} has items of unknown type {item}")
        else:
            raise ModelLoadError(f"{source} is corrupt: metadata {key} has unknown value type {kind}")

    take("4s")
    version = take("I")
    if version not in GGUF_VERSIONS:
        raise ModelLoadError(
            f"{source} is truncated or corrupt, or of a newer format: it has GGUF version {version}, jkv reads "
            f"versions {GGUF_VERSIONS}"
        )
    n_tensors, n_kv = take("Q"), take("Q")
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    keys = set()
    for _ in range(min(n_kv, size)):  # each key takes bytes: a larger count runs past the end and stops there
        key = string("a metadata key").decode("utf-8", "replace")
        if key in keys:
            raise ModelLoadError(f"{source} is corrupt: metadata key {key!r} appears twice")
        keys.add(key)
        kind = take("I")
        if key == "general.alignment" and kind == _GGUF_UINT32:
            alignment = take("I")
            if alignment == 0 or alignment & (alignment - 1):
                _fail(source, key, alignment, "a power of two")
        else:
            value(kind, key, nested=False)
    infos = {}
    for _ in range(min(n_tensors, size)):
        name = string("a tensor name").decode("utf-8", "replace")
        n_dims = take("I")
        if not 1 <= n_dims <= GGUF_MAX_DIMS:
            _fail(source, f"tensor {name!r} dimension count", n_dims, f"1 to {GGUF_MAX_DIMS}")
        dims = tuple(take("Q") for _ in range(n_dims))
        kind, offset = take("I"), take("Q")
        if name in infos:
            raise ModelLoadError(f"{source} is corrupt: tensor {name!r} appears twice")
        if min(dims) < 1 or math.prod(dims) > 1 << 40:
            _fail(source, f"tensor {name!r} shape", dims, "dimensions >= 1 and at most 2**40 elements")
        if kind not in gguf.GGML_QUANT_SIZES:
            _fail(source, f"tensor {name!r} type", kind, "a GGML tensor type")
        block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        if dims[0] % block:
            _fail(source, f"tensor {name!r} row length", dims[0], f"a multiple of its type's block of {block}")
        if offset % alignment:
            _fail(source, f"tensor {name!r} data offset", offset, f"a multiple of the alignment {alignment}")
        infos[name] = (dims, kind, offset, math.prod(dims) // block * block_bytes)
    start = pos + (-pos % alignment)
    end_of_last, last = 0, None
    for name, (_, _, offset, nbytes) in sorted(infos.items(), key=lambda item: item[1][2]):
        if start + offset + nbytes > size:
            raise ModelLoadError(
                f"{source} is truncated: tensor {name!r} needs bytes up to {start + offset + nbytes} but the file "
                f"has {size}"
            )
        if offset < end_of_last:
            raise ModelLoadError(
                f"{source} is corrupt: tensor {name!r}'s data (offset {offset}) overlaps tensor {last!r}'s "
                f"(which ends at {end_of_last})"
            )
        end_of_last, last = offset + nbytes, name
    return {name: (dims, kind) for name, (dims, kind, _, _) in infos.items()}


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
