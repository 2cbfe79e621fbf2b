"""Hugging Face checkpoints: a directory with ``config.json`` and ``*.safetensors`` (sharded or not).

The tokenizer comes from ``tokenizer.json`` (and the chat template and special tokens from
``tokenizer_config.json``) when the directory has them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from jkv.loading import families, validate
from jkv.loading import quantize as quantize_lib
from jkv.loading import tokenizer as tokenizer_lib
from jkv.loading.common import LoadedModel, ModelLoadError, build_params, read_json, resolve_dtype
from jkv.models.llama import LlamaConfig

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

# Canonical name (see jkv.loading.common) -> HF tensor name.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}


def hf_name(name: str, architecture: str = "llama") -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    layer, _, rest = name.partition(".")
    return f"model.layers.{layer}.{families.LAYER_NAMES.get(architecture, {}).get(rest) or _LAYER_NAMES[rest]}"


def config_from_hf(hf: dict, source: str = "config.json") -> tuple[LlamaConfig, dict[str, str]]:
    """A ``LlamaConfig`` from a Hugging Face ``config.json`` dict (transformers 4.x and 5.x spellings), and
    ``{config field: JSON key}`` for errors; every value checked by ``jkv.loading.validate``."""
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{source} must hold a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture model_type={model_type!r} in {source}: jkv supports {ARCHITECTURES}"
        )
    if hf.get("mlp_bias"):
        raise ModelLoadError(f"unsupported mlp_bias=True in {source}: expected false")
    if hf.get("attention_bias") and model_type in families.BIASED_O_PROJ:
        raise ModelLoadError(
            f"unsupported attention_bias=True in {source} for model_type={model_type!r} (it biases o_proj, which "
            "jkv does not run): expected false"
        )
    hf = families.DEFAULTS.get(model_type, {}) | hf
    try:
        return _config_from_hf(hf, model_type, source)
    except KeyError as e:
        raise ModelLoadError(f"{source} lacks the field {e.args[0]!r}") from None


def _config_from_hf(hf: dict, model_type: str, source: str) -> tuple[LlamaConfig, dict[str, str]]:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(rope, dict) or not isinstance(scaling, dict):
        raise ModelLoadError(f"{source}: rope_parameters and rope_scaling must be objects")
    if model_type == "gemma3_text" and "rope_local_base_freq" in hf:
        rope = {**rope, "rope_local_base_freq": hf["rope_local_base_freq"]}
    base = "rope_parameters.full_attention" if "full_attention" in rope else "rope_parameters"
    rope, local_theta = families.split_rope(rope, model_type, source)
    rope_type, rope_field = _rope_type(rope, scaling, base)

    def rope_value(key: str, default=None) -> tuple[object, str]:
        """``key`` (``rope_scaling``'s over ``rope_parameters``') and its field as the file spells it."""
        for field, where in (("rope_scaling", scaling), (base, rope)):
            if key in where:
                return where[key], f"{field}.{key}"
        if default is None:
            raise ModelLoadError(f"{source} lacks the field {rope_field.rsplit('.', 1)[0] + '.' + key!r}")
        return default

    raw = {
        "vocab_size": (hf["vocab_size"], "vocab_size"),
        "hidden_size": (hf["hidden_size"], "hidden_size"),
        "intermediate_size": (hf["intermediate_size"], "intermediate_size"),
        "num_layers": (hf["num_hidden_layers"], "num_hidden_layers"),
        "num_heads": (hf["num_attention_heads"], "num_attention_heads"),
        "rms_norm_eps": (hf.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        "rope_theta": rope_value("rope_theta", (hf.get("rope_theta", 10000.0), "rope_theta")),
        "max_position": (hf.get("max_position_embeddings", 8192), "max_position_embeddings"),
    }
    raw["num_kv_heads"] = (hf.get("num_key_value_heads") or raw["num_heads"][0], "num_key_value_heads")
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            raw[f"rope_{key}"] = rope_value(key)
        raw["rope_original_max_position"] = rope_value("original_max_position_embeddings")
    elif rope_type == "linear":
        raw["rope_linear_factor"] = rope_value("factor")
    elif rope_type != "default":
        raise ModelLoadError(
            f"unsupported {rope_field}={rope_type!r} in {source}: expected one of default, linear, llama3"
        )
    values = validate.config_values(raw, source)
    names = {key: name for key, (_, name) in raw.items()}
    if hf.get("head_dim"):
        values |= validate.config_values({"head_dim": (hf["head_dim"], "head_dim")}, source)
    else:
        values["head_dim"] = validate.head_dim_from(
            values["hidden_size"], values["num_heads"], source, "hidden_size", "num_attention_heads"
        )
    llama3 = None
    if rope_type == "llama3":
        keys = ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position")
        llama3 = tuple(values.pop(key) for key in keys)
    config = LlamaConfig(
        **values,
        rope_llama3=llama3,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",  # Mistral and Phi-3 ignore attention_bias; the others are refused
        architecture=model_type,
        **families.family_fields(
            hf, model_type, values["num_layers"], values["head_dim"], values["hidden_size"], local_theta, source
        ),
    )
    return config, names


def _rope_type(rope: dict, scaling: dict, base: str) -> tuple[str, str]:
    """The rope type, ``rope_scaling``'s over ``rope_parameters``' (``base``), and the field that gives it."""
    for key in ("rope_type", "type"):
        for field, source in (("rope_scaling", scaling), (base, rope)):
            if key in source:
                return source[key], f"{field}.{key}"
    return "default", f"{base}.rope_type"


class _Renamed:
    """A tensor of a safetensors file read under another name (``get_tensor`` as a safetensors handle's)."""

    def __init__(self, handle, key: str):
        self.handle, self.key = handle, key

    def get_tensor(self, _name: str) -> np.ndarray:
        return self.handle.get_tensor(self.key)


def weight_files(directory: Path) -> list[Path]:
    """The files HF reads: ``model.safetensors``, else those ``model.safetensors.index.json`` names (each must be
    there), else every ``*.safetensors`` in ``directory``."""
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{str(directory)!r} has no *.safetensors files")
        return files
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(f"{str(index)!r} is invalid: expected an object whose weight_map maps tensors to files")
    for name in sorted(set(weight_map.values())):
        if Path(name).name != name or not (directory / name).is_file():
            raise ModelLoadError(f"{str(index)!r} names {name!r}, which is not in {str(directory)!r}")
    return [directory / name for name in sorted(set(weight_map.values()))]


def load_safetensors(
    path, dtype=None, *, progress: bool = True, layout: str = "auto", quantize: str | None = None
) -> LoadedModel:
    """Load an HF directory (``config.json`` + ``*.safetensors``) with weights on the device as ``dtype``.

    ``dtype``: None (bf16 on GPU, f32 elsewhere), a name such as ``"bf16"``, or a floating dtype.
    ``quantize``: None, ``"q8_0"`` or ``"q4_k"``: matrices quantized at load into block formats kept on the
    device (``jkv.loading.quantize.plan`` says which matrix gets which format), computing in ``dtype``.
    """
    if quantize is not None and quantize not in quantize_lib.QUANTIZE:
        raise ValueError(f"quantize={quantize!r} is not None or one of {quantize_lib.QUANTIZE}")
    start = time.perf_counter()
    directory = Path(path)
    if not directory.is_dir():
        raise ModelLoadError(f"safetensors model directory not found: {str(path)!r}")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{str(directory)!r} has no config.json")
    hf = read_json(config_path)
    config, names = config_from_hf(hf, str(config_path))
    files = weight_files(directory)
    dtype = resolve_dtype(dtype)
    source = f"the safetensors files in {str(directory)!r}"
    tok = None  # read first: a tokenizer error costs no weight loading
    if (directory / "tokenizer.json").is_file():
        tok = tokenizer_lib.from_hf_directory(directory)
        validate.check_tokenizer(tok, config, names["vocab_size"], source)

    where, shapes = {}, {}
    try:  # safe_open checks each header: JSON, known dtypes, offsets that tile the data exactly, within the file
        for file in files:
            handle = safe_open(str(file), framework="numpy")
            for name in handle.keys():
                if name in where:
                    raise ModelLoadError(f"tensor {name!r} appears in two files of {source}")
                piece = handle.get_slice(name)
                if piece.get_dtype() not in FLOAT_DTYPES:
                    raise ModelLoadError(
                        f"tensor {name!r} in {str(file)!r} has dtype {piece.get_dtype()}, expected one of "
                        f"{', '.join(FLOAT_DTYPES)}"
                    )
                where[name], shapes[name] = handle, tuple(piece.get_shape())
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"cannot read safetensors file in {str(directory)!r}: {e}") from None
    if "model.embed_tokens.weight" not in shapes and "embed_tokens.weight" in shapes:  # a base model's, as HF reads
        for key in [key for key in shapes if key != "lm_head.weight"]:
            where[f"model.{key}"], shapes[f"model.{key}"] = _Renamed(where.pop(key), key), shapes.pop(key)
    if config.tie_embeddings is False and "lm_head.weight" not in where:
        raise ModelLoadError(
            f"tie_word_embeddings is false but {validate.missing_tensor('lm_head.weight', shapes, source)}"
        )
    families.split_fused(config.architecture, where, shapes, validate.expected_shapes(config, names), source)
    file_name = lambda name: hf_name(name, config.architecture)
    validate.check_tensors(config, shapes, file_name, names, source, r"model\.layers\.(\d+)\.")

    def get(name: str) -> np.ndarray:
        key = file_name(name)
        x = validate.check_finite(where[key].get_tensor(key).astype(np.float32), key, source, dtype)
        return families.transform(name, x, config.architecture)

    def packed(name: str):
        key = file_name(name)
        fmt = quantize_lib.plan(name, shapes[key][-1], quantize) if len(shapes[key]) == 2 else None
        if fmt is None:
            return None
        try:
            return fmt, quantize_lib.quantize(get(name), fmt)
        except ValueError as e:  # the quantizer does not know which tensor it holds
            raise ModelLoadError(f"cannot quantize {key!r} of {source}: {e}") from None

    packed = None if quantize is None else packed
    params = build_params(
        config, get, dtype, progress=progress, layout=layout, desc=f"loading {directory.name}", packed=packed
    )
    return LoadedModel(
        config=config,
        params=params,
        tokenizer=tok,
        source=os.fspath(directory),
        load_seconds=time.perf_counter() - start,
        info={"format": "safetensors", "files": len(files), "dtype": str(dtype), "quantize": quantize},
    )
