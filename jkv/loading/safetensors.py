"""Hugging Face checkpoints: a directory with ``config.json`` and ``*.safetensors`` (sharded or not).

The tokenizer comes from ``tokenizer.json`` (and the chat template and special tokens from
``tokenizer_config.json``) when the directory has them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from jkv.loading import tokenizer as tokenizer_lib
from jkv.loading.common import LoadedModel, ModelLoadError, build_params, resolve_dtype
from jkv.models.llama import LlamaConfig

ARCHITECTURES = ("llama", "mistral", "qwen2")

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


def hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    layer, _, rest = name.partition(".")
    return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"


def config_from_hf(hf: dict, source: str = "config.json") -> LlamaConfig:
    """A ``LlamaConfig`` from a Hugging Face ``config.json`` dict (transformers 4.x and 5.x spellings)."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture model_type={model_type!r} in {source}: jkv supports {ARCHITECTURES}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"unsupported hidden_act={hf['hidden_act']!r} in {source}: expected 'silu'")
    if hf.get("mlp_bias"):
        raise ModelLoadError(f"unsupported mlp_bias=True in {source}")
    if hf.get("use_sliding_window") or (model_type == "mistral" and hf.get("sliding_window")):
        raise ModelLoadError(f"unsupported sliding-window attention in {source}")
    try:
        heads = hf["num_attention_heads"]
        rope = dict(hf.get("rope_parameters") or {})
        rope.update(hf.get("rope_scaling") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        llama3, linear = None, 1.0
        if rope_type == "llama3":
            llama3 = (
                float(rope["factor"]),
                float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]),
                int(rope["original_max_position_embeddings"]),
            )
        elif rope_type == "linear":
            linear = float(rope["factor"])
        elif rope_type != "default":
            raise ModelLoadError(f"unsupported rope type {rope_type!r} in {source}: expected default, linear or llama3")
        return LlamaConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_llama3=llama3,
            rope_linear_factor=linear,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            max_position=int(hf.get("max_position_embeddings", 8192)),
            architecture=model_type,
        )
    except KeyError as e:
        raise ModelLoadError(f"{source} lacks the field {e.args[0]!r}") from None


def load_safetensors(path, dtype=None, *, progress: bool = True, layout: str = "auto") -> LoadedModel:
    """Load an HF directory (``config.json`` + ``*.safetensors``) with weights on the device as ``dtype``.

    ``dtype``: None (bf16 on GPU, f32 elsewhere), a name such as ``"bf16"``, or a floating dtype.
    """
    start = time.perf_counter()
    directory = Path(path)
    if not directory.is_dir():
        raise ModelLoadError(f"safetensors model directory not found: {str(path)!r}")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{str(directory)!r} has no config.json")
    try:
        hf = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{str(config_path)!r} is not valid JSON: {e}") from None
    config = config_from_hf(hf, str(config_path))
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{str(directory)!r} has no *.safetensors files")
    dtype = resolve_dtype(dtype)

    handles, where = [], {}
    try:
        for file in files:
            handle = safe_open(str(file), framework="numpy")
            handles.append(handle)
            for name in handle.keys():
                where[name] = handle
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"cannot read safetensors file in {str(directory)!r}: {e}") from None

    def get(name: str) -> np.ndarray:
        key = hf_name(name)
        if key not in where:
            raise ModelLoadError(f"tensor {key!r} is missing from the safetensors files in {str(directory)!r}")
        # safe_open already checked that the header's offsets cover the file: reading cannot run short.
        return where[key].get_tensor(key).astype(np.float32)

    if config.tie_embeddings is False and "lm_head.weight" not in where:
        raise ModelLoadError(f"tie_word_embeddings is false but lm_head.weight is missing in {str(directory)!r}")
    params = build_params(config, get, dtype, progress=progress, layout=layout, desc=f"loading {directory.name}")
    tok = tokenizer_lib.from_hf_directory(directory) if (directory / "tokenizer.json").is_file() else None
    return LoadedModel(
        config=config,
        params=params,
        tokenizer=tok,
        source=os.fspath(directory),
        load_seconds=time.perf_counter() - start,
        info={"format": "safetensors", "files": len(files), "dtype": str(dtype)},
    )
