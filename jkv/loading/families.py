"""What each architecture beyond Llama adds to a Hugging Face checkpoint: its ``config.json`` fields as
``LlamaConfig`` family options, its tensor names, and the weights it stores differently (docs/model.md).

* ``qwen3``: per-head q/k RMSNorm (``self_attn.q_norm`` / ``k_norm``).
* ``mistral``, ``phi3``: ``sliding_window`` on every layer when set (HF applies it then).
* ``gemma2``, ``gemma3_text``: ``layer_types`` picks the windowed layers, ``query_pre_attn_scalar`` the score
  scale, soft caps, four norms per block stored as ``w`` for a ``(1 + w)`` scale (``+ 1`` is folded in here),
  GELU-tanh MLP, embeddings times ``sqrt(hidden_size)``; Gemma 3 adds q/k norms and a local rope base.
* ``phi3``: q/k/v fused as ``qkv_proj`` and gate/up as ``gate_up_proj``; split here into the Llama names.
"""

from __future__ import annotations

import math
import re

import numpy as np

from jkv.loading import validate
from jkv.loading.common import ModelLoadError

GEMMA = ("gemma2", "gemma3_text")
# Canonical name -> HF tensor name, where an architecture differs from Llama's.
LAYER_NAMES = {
    "qwen3": {"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"},
    "gemma2": {
        "post_attn_norm": "post_attention_layernorm.weight",
        "mlp_norm": "pre_feedforward_layernorm.weight",
        "post_mlp_norm": "post_feedforward_layernorm.weight",
    },
}
LAYER_NAMES["gemma3_text"] = LAYER_NAMES["gemma2"] | LAYER_NAMES["qwen3"]
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# Where attention_bias=True biases o_proj as well as q/k/v (Qwen2 biases q/k/v always, Mistral and Phi-3 never).
BIASED_O_PROJ = ("llama", "qwen3", "gemma2", "gemma3_text")
# What a key absent from config.json means where HF's config class default is not Llama's. transformers 4 wrote no
# key equal to its base class's default, so Gemma's hub checkpoints have no tie_word_embeddings (true).
DEFAULTS = {
    "mistral": {"sliding_window": 4096},
    "qwen3": {"head_dim": 128},
    "gemma2": {"tie_word_embeddings": True, "head_dim": 256, "sliding_window": 4096, "query_pre_attn_scalar": 256},
    "gemma3_text": {"tie_word_embeddings": True, "head_dim": 256, "sliding_window": 4096, "query_pre_attn_scalar": 256},
    "phi3": {"rms_norm_eps": 1e-5},
}
DEFAULTS["gemma2"] |= {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
DEFAULTS["gemma3_text"] |= {"rope_theta": 1e6, "rope_local_base_freq": 1e4}


def activation(hf: dict, model_type: str, source: str) -> str:
    """The MLP gate's activation as a ``LlamaConfig.activation``, refusing others."""
    key = "hidden_activation" if model_type in GEMMA else "hidden_act"
    name = hf.get(key) or ("gelu_pytorch_tanh" if model_type in GEMMA else "silu")
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ModelLoadError(f"unsupported {key}={name!r} in {source}: expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def split_rope(rope: dict, model_type: str, source: str) -> tuple[dict, float | None]:
    """Gemma 3's per-layer-type ``rope_parameters``: (the global layers' parameters, the local rope base)."""
    if "full_attention" not in rope:  # transformers 4 spelling: rope_local_base_freq beside the global rope
        theta = rope.pop("rope_local_base_freq", None) if model_type == "gemma3_text" else None
        return rope, None if theta is None else validate.real(theta, "rope_local_base_freq", source, 1.0, 1e12)
    local, full = rope.get("sliding_attention") or {}, rope["full_attention"]
    if not isinstance(local, dict) or not isinstance(full, dict):
        raise ModelLoadError(f"{source}: rope_parameters per layer type must be objects, got {rope!r}")
    if local.get("rope_type", "default") != "default":
        field = "rope_parameters.sliding_attention.rope_type"
        raise ModelLoadError(f"unsupported {field}={local['rope_type']!r} in {source}: expected default")
    theta = local.get("rope_theta")
    return full, None if theta is None else validate.real(theta, "rope_theta", source, 1.0, 1e12)


def default_layer_types(hf: dict, model_type: str, num_layers: int) -> list[str]:
    """Which layers are windowed when ``config.json`` has no ``layer_types`` (transformers 4 spellings): all of
    Mistral's and Phi-3's, Gemma 2's even layers, all but every ``sliding_window_pattern``-th of Gemma 3's."""
    pattern = hf.get("sliding_window_pattern", 6)
    if model_type == "gemma3_text":
        pattern = validate.integer(pattern, "sliding_window_pattern", "config.json", 1, 1 << 20)
    every = {"gemma2": 2, "gemma3_text": pattern}.get(model_type)
    local = [every is None or (i + 1) % every != 0 for i in range(num_layers)]
    return ["sliding_attention" if x else "full_attention" for x in local]


def family_fields(
    hf: dict, model_type: str, num_layers: int, head_dim: int, hidden_size: int, local_theta, source: str
) -> dict:
    """``LlamaConfig`` family options from the config dict ``hf``."""
    if hf.get("use_sliding_window"):  # Qwen's windows on only some layers: not mapped
        raise ModelLoadError(f"unsupported use_sliding_window=True in {source}: expected false")
    fields = {"activation": activation(hf, model_type, source), "qk_norm": model_type in ("qwen3", "gemma3_text")}
    window = hf.get("sliding_window")
    if window is not None and model_type in ("mistral", "phi3", *GEMMA):
        window = validate.integer(window, "sliding_window", source, 1, 1 << 27)
        types = hf.get("layer_types") or default_layer_types(hf, model_type, num_layers)
        kinds = ("sliding_attention", "full_attention")
        if not isinstance(types, list) or len(types) != num_layers or any(t not in kinds for t in types):
            raise ModelLoadError(f"{source}: layer_types={types!r} is invalid: expected {num_layers} layer types")
        fields["windows"] = tuple(window if kind == "sliding_attention" else None for kind in types)
    if model_type in GEMMA:
        scalar = validate.real(hf.get("query_pre_attn_scalar", head_dim), "query_pre_attn_scalar", source, 0, 1e9)
        fields |= {"query_scale": scalar**-0.5, "sandwich_norms": True, "embed_scale": math.sqrt(hidden_size)}
        caps = (("attn_softcap", "attn_logit_softcapping"), ("final_softcap", "final_logit_softcapping"))
        for key, name in caps[model_type == "gemma3_text" :]:  # HF's Gemma 3 attention applies no cap it is given
            if hf.get(name) is not None:
                fields[key] = validate.real(hf[name], name, source, 0.0, 1e9)
        if model_type == "gemma3_text" and local_theta is not None:
            fields["rope_local_theta"] = local_theta
    if model_type == "phi3":
        factor = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if factor != 1.0:
            raise ModelLoadError(f"unsupported partial_rotary_factor={factor!r} in {source}: expected 1.0")
    return fields


def transform(name: str, x: np.ndarray, model_type: str) -> np.ndarray:
    """A weight read under canonical ``name`` as the model uses it: Gemma's norms store ``w`` for ``1 + w``."""
    if model_type in GEMMA and name.split(".")[-1].endswith("norm"):
        return x + np.float32(1.0)
    return x


class _Rows:
    """Rows ``[start, stop)`` of a fused tensor, read like a safetensors handle's ``get_tensor``."""

    def __init__(self, handle, key: str, start: int, stop: int):
        self.handle, self.key, self.start, self.stop = handle, key, start, stop

    def get_tensor(self, _name: str) -> np.ndarray:
        return self.handle.get_tensor(self.key)[self.start : self.stop]


# Phi-3's fused tensors -> their parts: (canonical name, HF name), in row order.
FUSED = {
    "self_attn.qkv_proj.weight": (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj")),
    "mlp.gate_up_proj.weight": (("gate", "mlp.gate_proj"), ("up", "mlp.up_proj")),
}


def split_fused(model_type: str, where: dict, shapes: dict, expected: dict, source: str) -> None:
    """Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` as the separate Llama-named tensors, in place, each fused
    tensor checked first against the shape its parts imply.

    ``expected``: ``jkv.loading.validate.expected_shapes`` of the config (each dim with the field it comes from)."""
    if model_type != "phi3":
        return
    for key in list(shapes):
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if match is None or match.group(2) not in FUSED:
            continue
        layer, fused = match.groups()
        parts = [(expected[f"0.{canonical}"], name) for canonical, name in FUSED[fused]]  # alike in every layer
        (_, (h, h_origin)), _ = parts[0]
        want = (sum(shape[0][0] for shape, _ in parts), h)
        if tuple(shapes[key]) != want:
            rows = " + ".join(shape[0][1] for shape, _ in parts)
            raise ModelLoadError(
                f"tensor {key!r} in {source} has shape {tuple(shapes[key])}, expected {want} "
                f"({want[0]} from {rows}, {h} from {h_origin})"
            )
        start = 0
        for ((n, _), _), name in parts:
            where[f"model.layers.{layer}.{name}.weight"] = _Rows(where[key], key, start, start + n)
            shapes[f"model.layers.{layer}.{name}.weight"] = (n, h)
            start += n
        del where[key], shapes[key]
