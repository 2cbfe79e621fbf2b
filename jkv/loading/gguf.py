"""GGUF files (llama.cpp's format): the header read by ``jkv.loading.gguf_file``, tensors dequantized by
llama.cpp's own ``gguf`` package.

The config comes from the ``<arch>.*`` metadata, the tokenizer from ``tokenizer.*``, and tensors are dequantized
to f32 by the ``gguf`` package's own block routines before they are cast to the requested dtype.

llama.cpp's converter permutes the rows of the Q and K projections of ``llama`` models so that its interleaved
(NORM) rotary embedding matches HF's split-halves (NEOX) one; we undo that permutation here and run NEOX
everywhere, as HF transformers does. ``qwen2`` and ``qwen3`` files are stored unpermuted (llama.cpp runs them
in NEOX). ``phi3`` stores q/k/v fused as ``attn_qkv`` and gate/up as one ``ffn_up`` of ``2F`` rows (split
here). What each family's metadata means (windows, soft caps, Gemma's norms and query scale) is in
``jkv.loading.gguf_families``.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from jkv.loading import gguf_blocks, gguf_families, gguf_file, validate
from jkv.loading import tokenizer as tokenizer_lib
from jkv.loading.common import LoadedModel, ModelLoadError, build_params, resolve_dtype
from jkv.models.llama import LlamaConfig
from pallas_kernels import block_formats

ARCHITECTURES = gguf_families.ARCHITECTURES
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
WEIGHTS = ("dequantize", "native")  # load_gguf's choices: every tensor dense, or block formats kept

# Canonical name (see jkv.loading.common) -> GGUF tensor name.
_LAYER_NAMES = {
    "attn_norm": "attn_norm.weight",
    "q": "attn_q.weight",
    "k": "attn_k.weight",
    "v": "attn_v.weight",
    "q_bias": "attn_q.bias",
    "k_bias": "attn_k.bias",
    "v_bias": "attn_v.bias",
    "o": "attn_output.weight",
    "mlp_norm": "ffn_norm.weight",
    "gate": "ffn_gate.weight",
    "up": "ffn_up.weight",
    "down": "ffn_down.weight",
    "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight",
    **gguf_families.LAYER_NAMES,
}
_GLOBAL_NAMES = {"embed": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight"}


def gguf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    layer, _, rest = name.partition(".")
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: within each head, rows ``(2i, 2i+1)`` go back to ``(i, i + D/2)``."""
    rows = w.shape[0]
    half = rows // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path) -> gguf_file.GGUFFile:
    """``path`` read by ``jkv.loading.gguf_file.read_gguf`` (metadata decoded, tensors mapped, every length
    checked), or ``ModelLoadError`` saying why the file cannot be one."""
    return gguf_file.read_gguf(path)


def dequantize(t: gguf_file.GGUFTensor, chunk_values: int = 1 << 22) -> np.ndarray:
    """Tensor ``t`` as float32 ``[rows, row length]`` by the ``gguf`` package's block routines, applied to chunks
    of whole rows (its ``quants.dequantize`` loops over groups of 16 rows, seconds for a small model)."""
    import gguf

    if t.type_name in ("F32", "F16"):
        return np.asarray(gguf.quants.dequantize(t.data, t.ggml_type), np.float32)
    rows = max(1, chunk_values // t.dims[0])
    kind = getattr(gguf.quants, t.type_name)
    parts = [kind.dequantize_rows(t.data[i : i + rows]) for i in range(0, t.data.shape[0], rows)]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def config_from_metadata(meta: dict, tensor_names: set[str], source: str) -> tuple[LlamaConfig, dict[str, str]]:
    """The config and ``{config field: metadata key}`` (for errors), every value checked by ``validate``."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"unsupported architecture {arch!r} in {source}: jkv supports {ARCHITECTURES}")

    def field(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{source} lacks the metadata field {arch}.{key!s}")
        return value, f"{arch}.{key}"

    # As llama.cpp reads them: the type defaults to linear, the factor may sit under its older key.
    scaling = meta.get(f"{arch}.rope.scaling.type")
    factor = next((k for k in ("rope.scaling.factor", "rope.scale_linear") if f"{arch}.{k}" in meta), None)
    raw = {}
    if scaling == "linear" or (scaling is None and factor is not None):
        raw["rope_linear_factor"] = field(factor or "rope.scaling.factor")
    elif scaling not in ("none", None):
        raise ModelLoadError(f"unsupported rope scaling {scaling!r} in {source}: expected none or linear")
    experts = meta.get(f"{arch}.expert_count", 0)
    if experts:  # Mixtral is a llama file whose MLPs are experts
        raise ModelLoadError(f"unsupported {arch}.expert_count={experts!r} in {source}: jkv runs dense MLPs only")
    attn_factor = meta.get(f"{arch}.rope.scaling.attn_factor", 1.0)
    if attn_factor != 1.0:  # llama.cpp scales every rotation by it
        raise ModelLoadError(f"unsupported {arch}.rope.scaling.attn_factor={attn_factor!r} in {source}: expected 1.0")
    if meta.get(f"{arch}.vocab_size") is not None:
        raw["vocab_size"] = field("vocab_size")
    elif meta.get("tokenizer.ggml.tokens"):
        raw["vocab_size"] = (len(meta["tokenizer.ggml.tokens"]), "the length of tokenizer.ggml.tokens")
    else:
        raise ModelLoadError(f"{source} gives no vocabulary size ({arch}.vocab_size or tokenizer.ggml.tokens)")
    raw |= {
        "hidden_size": field("embedding_length"),
        "intermediate_size": field("feed_forward_length"),
        "num_layers": field("block_count"),
        "num_heads": field("attention.head_count"),
        "rms_norm_eps": field("attention.layer_norm_rms_epsilon"),  # required, as llama.cpp requires it
        "rope_theta": field("rope.freq_base", 10000.0),
        "max_position": field("context_length", 8192),
    }
    raw["num_kv_heads"] = field("attention.head_count_kv", raw["num_heads"][0])
    values = validate.config_values(raw, source)
    names = {key: name for key, (_, name) in raw.items()}
    if f"{arch}.attention.key_length" in meta:
        values |= validate.config_values({"head_dim": field("attention.key_length")}, source)
        names["head_dim"] = f"{arch}.attention.key_length"
    else:
        heads, hidden = (names["num_heads"], values["num_heads"]), (names["hidden_size"], values["hidden_size"])
        values["head_dim"] = validate.head_dim_from(hidden[1], heads[1], source, hidden[0], heads[0])
    if f"{arch}.attention.value_length" in meta:
        value = meta[f"{arch}.attention.value_length"]
        if value != values["head_dim"]:
            validate.integer(value, f"{arch}.attention.value_length", source, values["head_dim"], values["head_dim"])
    config = LlamaConfig(
        **values,
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        architecture=arch,
        **gguf_families.family_fields(meta, arch, values, source),
    )
    return config, names


def load_gguf(
    path,
    dtype=None,
    *,
    progress: bool = True,
    with_tokenizer: bool = True,
    layout: str = "auto",
    weights: str = "dequantize",
) -> LoadedModel:
    """Load a GGUF file: config from metadata, weights dequantized and placed on the device as ``dtype``.

    ``dtype``: None (bf16 on GPU, f32 elsewhere), a name such as ``"bf16"``, or a floating dtype. ``weights``:
    ``"dequantize"`` (every tensor as ``dtype``) or ``"native"``: matrices in a block format of
    ``pallas_kernels.block_formats`` stay in it on the device (``jkv.models.quant.QuantizedMatrix``, computing in
    ``dtype``); float tensors, and fused groups whose parts differ in format, are dequantized. Llama 3.1
    frequency factors (a ``rope_freqs.weight`` tensor) are applied to the rotary frequencies. Every field and
    tensor is checked before any weight is computed with (``jkv.loading.validate``). ``with_tokenizer``: build the
    file's tokenizer (None when it has no ``tokenizer.ggml.*`` metadata), before any weight loads.
    """

    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is not one of {WEIGHTS}")
    start = time.perf_counter()
    path = os.fspath(path)
    source = repr(path)
    reader = open_gguf(path)
    meta, tensors = reader.metadata, reader.tensors
    bad = [f"{t.name} ({t.type_name})" for t in tensors.values() if t.type_name not in TENSOR_TYPES]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ModelLoadError(
            f"unsupported tensor type in {path!r}: {', '.join(bad[:5])}{more}; jkv reads {', '.join(TENSOR_TYPES)}"
        )
    config, names = config_from_metadata(meta, set(tensors), source)
    shapes = {name: t.shape for name, t in tensors.items()}
    stored = dict(shapes)  # Phi-3's separate names shadow its fused ffn_up: reads reshape by the stored shape
    pieces = _split_fused(config, shapes) if config.architecture == "phi3" else {}
    validate.check_tensors(config, shapes, gguf_name, names, source, r"blk\.(\d+)\.")
    _check_all_read(config, names, set(tensors), pieces, source)
    dtype = resolve_dtype(dtype)

    def get(name: str) -> np.ndarray:
        key = gguf_name(name)
        fused, start, stop = pieces.get(key, (key, None, None))
        t = tensors[fused]
        w = dequantize(t)
        w = validate.check_finite(w.reshape(stored[fused])[start:stop], key, source, dtype)
        if config.architecture == "llama" and name.endswith((".q", ".q_bias")):
            w = unpermute_rows(w, config.num_heads)
        elif config.architecture == "llama" and name.endswith((".k", ".k_bias")):
            w = unpermute_rows(w, config.num_kv_heads)
        return w

    def packed(name: str):
        key = gguf_name(name)
        fused, start, stop = pieces.get(key, (key, None, None))
        t = tensors[fused]
        fmt = t.type_name
        if fmt not in block_formats.FORMATS or len(stored[fused]) != 2:
            return None
        planes = tuple(p[start:stop] for p in gguf_blocks.repack(t.data, fmt, *stored[fused]))
        for plane in planes:
            if plane.dtype == np.float16:
                validate.check_finite(plane, key, source, dtype)
        if np.dtype(dtype) == np.float16:  # finite scales times codes may still pass float16, the products' dtype
            get(name)
        if config.architecture == "llama" and name.endswith((".q", ".k")):
            heads = config.num_heads if name.endswith(".q") else config.num_kv_heads
            planes = tuple(unpermute_rows(p, heads) for p in planes)
        return fmt, planes

    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        factors = dequantize(t).astype(np.float64).reshape(-1)
        config = _with_rope_factors(config, factors, path)
    packed = packed if weights == "native" else None
    tok = None  # read first: a tokenizer error costs no weight loading; a file without one has none, as a directory
    if with_tokenizer and any(key.startswith("tokenizer.ggml.") for key in meta):
        tok = tokenizer_lib.from_gguf_metadata(meta, source)
        validate.check_tokenizer(tok, config, names["vocab_size"], source)
    params = build_params(
        config, get, dtype, progress=progress, layout=layout, desc=f"loading {os.path.basename(path)}", packed=packed
    )
    types: dict[str, int] = {}
    for t in tensors.values():
        types[t.type_name] = types.get(t.type_name, 0) + 1
    return LoadedModel(
        config=config,
        params=params,
        tokenizer=tok,
        source=path,
        load_seconds=time.perf_counter() - start,
        info={
            "format": "gguf",
            "name": meta.get("general.name"),
            "tensor_types": types,
            "dtype": str(dtype),
            "weights": weights,
        },
    )


def _with_rope_factors(config: LlamaConfig, factors: np.ndarray, path: str) -> LlamaConfig:
    """Fold llama.cpp's per-frequency divisors (how it stores Llama 3.1 rope scaling) into the config."""
    if factors.shape != (config.head_dim // 2,):
        raise ModelLoadError(
            f"rope_freqs.weight in {path!r} has shape {factors.shape}, expected ({config.head_dim // 2},)"
        )
    if not (np.isfinite(factors).all() and factors.min() > 0):
        raise ModelLoadError(f"rope_freqs.weight in {path!r} holds {factors.min()}: expected finite values > 0")
    return dataclasses.replace(config, rope_factors=tuple(float(f) for f in factors))


def _check_all_read(config: LlamaConfig, names: dict, held: set[str], pieces: dict, source: str) -> None:
    """Every tensor of the file is one jkv reads for ``config``: one left out would change the model's output
    (llama.cpp reads a Llama's ``attn_output.bias`` and a Phi-3 128k file's long-rope factors, which jkv cannot
    run; llama.cpp itself refuses a file holding a tensor it does not create)."""
    read = {pieces.get(key, (key,))[0] for key in map(gguf_name, validate.expected_shapes(config, names))}
    unread = sorted(held - read - {"rope_freqs.weight"})
    if unread:
        more = f" and {len(unread) - 5} more" if len(unread) > 5 else ""
        raise ModelLoadError(
            f"{source} holds tensors jkv does not read for architecture {config.architecture!r}: "
            f"{', '.join(map(repr, unread[:5]))}{more}; loading without them would change the model's output"
        )


def _split_fused(config: LlamaConfig, shapes: dict) -> dict[str, tuple[str, int, int]]:
    """Phi-3's fused ``attn_qkv`` and ``ffn_up`` (gate then up) as the separate tensors' names and shapes, added to
    ``shapes``; returns ``{separate name: (fused name, first row, end row)}``."""
    d, f = config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    pieces = {}
    for i in range(config.num_layers):
        for fused, parts in ((f"blk.{i}.attn_qkv.weight", (("attn_q", q), ("attn_k", kv), ("attn_v", kv))),
                             (f"blk.{i}.ffn_up.weight", (("ffn_gate", f), ("ffn_up", f)))):  # fmt: skip
            total = sum(n for _, n in parts)
            if fused not in shapes or shapes[fused][0] != total:
                got = shapes.get(fused, ("missing",))[0]
                raise ModelLoadError(f"tensor {fused!r} has {got} rows, expected {total} (fused {parts})")
            start = 0
            for name, n in parts:
                pieces[f"blk.{i}.{name}.weight"] = (fused, start, start + n)
                start += n
    for name, (fused, start, stop) in pieces.items():
        shapes[name] = (stop - start, *shapes[fused][1:])
    return pieces
