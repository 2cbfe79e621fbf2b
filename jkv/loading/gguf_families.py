"""What each GGUF architecture beyond Llama's adds, read as llama.cpp reads the files its converter writes
(``convert_hf_to_gguf.py``): metadata keys as ``LlamaConfig`` family options, and the extra tensor names.

* ``llama`` (Mistral is converted as ``llama``), ``phi3``: ``attention.sliding_window``, when present and not 0,
  is the window of every layer.
* ``qwen3``: per-head q/k RMSNorm (``attn_q_norm`` / ``attn_k_norm``).
* ``gemma2``: the window (4096 when absent) on even layers (llama.cpp's pattern 2), attention and final soft caps
  (50 and 30 when absent), norms after each sub-block (``post_attention_norm``, ``post_ffw_norm``; the
  pre-MLP norm is ``ffn_norm``), GELU-tanh MLP, embeddings times ``sqrt(hidden)``.
* ``gemma3``: Gemma 2's without the attention soft cap (an ``attn_logit_softcapping`` key is ignored, as llama.cpp
  ignores it; a final cap only when the file has one), plus q/k norms;
  the window, when present and not 0, on all but every sixth layer (pattern 6), whose rope base is
  ``rope.freq_base_swa`` (10000 when absent) and unscaled; ``rope.freq_base`` and its linear scaling are the
  global layers'.

Neither Gemma stores its query scale: llama.cpp scales scores by ``head_dim ** -0.5``, or by
``(hidden // heads) ** -0.5`` for the 27B models, which it recognises by their layer count; so does jkv. The
converter stores Gemma's norm weights ``w`` as ``1 + w`` already, so they load as they are. An
``attention.sliding_window_pattern`` key (a period, or one flag per layer), where a file has one, overrides the
family's pattern.
"""

from __future__ import annotations

import math

from jkv.loading import validate
from jkv.loading.common import ModelLoadError

ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
GEMMA = ("gemma2", "gemma3")
# Canonical name (see jkv.loading.common) -> GGUF tensor name in a block, for the norms only Gemma has.
LAYER_NAMES = {"post_attn_norm": "post_attention_norm.weight", "post_mlp_norm": "post_ffw_norm.weight"}
# Which layers are windowed, as llama.cpp's ``set_swa_pattern(n)``: 0 all of them, else all but every n-th.
PATTERNS = {"llama": 0, "phi3": 0, "gemma2": 2, "gemma3": 6}
# llama.cpp's values for what a file leaves out.
GEMMA2_WINDOW = 4096
GEMMA2_SOFTCAPS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
LOCAL_ROPE_THETA = 10000.0
# Layer counts of the 27B models, whose query scale llama.cpp takes from hidden // heads.
LARGE_LAYER_COUNTS = {"gemma2": 46, "gemma3": 62}


def family_fields(meta: dict, arch: str, values: dict, source: str) -> dict:
    """``LlamaConfig`` family options of a GGUF file of architecture ``arch`` from its metadata ``meta``;
    ``values``: the checked common fields (``num_layers``, ``num_heads``, ``hidden_size``, ``head_dim``)."""
    fields = {"qk_norm": arch in ("qwen3", "gemma3")}
    n_layers = values["num_layers"]
    rope_dims = meta.get(f"{arch}.rope.dimension_count")
    if rope_dims is not None and rope_dims != values["head_dim"]:
        validate.integer(rope_dims, f"{arch}.rope.dimension_count", source, values["head_dim"], values["head_dim"])
    window = windows(meta, arch, n_layers, source)
    if window is not None:
        fields["windows"] = window
    if arch not in GEMMA:
        return fields
    large = n_layers == LARGE_LAYER_COUNTS[arch]
    scalar = values["hidden_size"] // values["num_heads"] if large else values["head_dim"]
    fields |= {"query_scale": scalar**-0.5, "sandwich_norms": True, "activation": "gelu_tanh"}
    fields["embed_scale"] = math.sqrt(values["hidden_size"])
    caps = GEMMA2_SOFTCAPS if arch == "gemma2" else {"final_logit_softcapping": 0.0}
    for field, key in (("attn_softcap", "attn_logit_softcapping"), ("final_softcap", "final_logit_softcapping")):
        if key not in caps:  # Gemma 3's attention applies no cap, in llama.cpp and HF alike, whatever the file says
            continue
        value = validate.real(meta.get(f"{arch}.{key}", caps[key]), f"{arch}.{key}", source, 0.0, 1e9, False)
        fields[field] = value or None  # 0: no cap, as llama.cpp reads it
    if arch == "gemma3" and window is not None:
        key = f"{arch}.rope.freq_base_swa"
        fields["rope_local_theta"] = validate.real(meta.get(key, LOCAL_ROPE_THETA), key, source, 1.0, 1e12)
    return fields


def windows(meta: dict, arch: str, n_layers: int, source: str) -> tuple[int | None, ...] | None:
    """Each layer's window (None: full attention), or None when no layer has one."""
    key = f"{arch}.attention.sliding_window"
    window = meta.get(key, GEMMA2_WINDOW if arch == "gemma2" else None)
    if arch not in PATTERNS or window is None:
        return None
    window = validate.integer(window, key, source, 0, 1 << 27)
    if window == 0:
        return None
    key = f"{arch}.attention.sliding_window_pattern"
    pattern = meta.get(key, PATTERNS[arch])
    if isinstance(pattern, list):
        if len(pattern) != n_layers or not all(isinstance(x, bool) for x in pattern):
            raise ModelLoadError(f"{source}: {key} holds {pattern!r}: expected {n_layers} booleans, one per layer")
        local = pattern
    else:
        period = validate.integer(pattern, key, source, 0, 1 << 20)
        local = [period == 0 or i % period < period - 1 for i in range(n_layers)]
    if not any(local):
        return None
    return tuple(window if x else None for x in local)
