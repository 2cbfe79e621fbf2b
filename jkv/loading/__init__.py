"""Model loading: GGUF files and Hugging Face safetensors directories → ``LlamaConfig`` + ``LlamaParams``."""

from __future__ import annotations

import os

from jkv.loading.common import LoadedModel, ModelLoadError, resolve_dtype
from jkv.loading.gguf import load_gguf
from jkv.loading.quantize import QUANTIZE
from jkv.loading.safetensors import load_safetensors
from jkv.loading.tokenizer import StreamDecoder, Tokenizer, TokenizerError
from jkv.loading.validate import NonFiniteLogitsError, check_finite_logits


def load(
    path,
    dtype=None,
    *,
    progress: bool = True,
    layout: str = "auto",
    weights: str = "dequantize",
    quantize: str | None = None,
) -> LoadedModel:
    """Load a GGUF file or an HF safetensors directory, whichever ``path`` is.

    ``dtype``: None (bf16 on GPU, f32 elsewhere), a name (``"bf16"``, ``"f32"``) or a floating dtype.
    ``layout``: ``"layers"`` (per-layer buffers), ``"stacked"`` (scan over layers) or ``"auto"`` (per-layer on GPU).
    ``weights`` (GGUF): ``"dequantize"`` or ``"native"`` (block formats kept on the device); ``quantize``
    (safetensors): None, ``"q8_0"`` or ``"q4_k"`` (docs/quant.md, "Quantized weights").
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if weights != "dequantize":
            raise ValueError(
                f"weights={weights!r} applies to GGUF files; {path!r} is a safetensors directory, which quantizes "
                f"at load with quantize= one of {QUANTIZE}"
            )
        return load_safetensors(path, dtype, progress=progress, layout=layout, quantize=quantize)
    if not os.path.exists(path):
        raise ModelLoadError(f"model not found: {path!r} (expected a .gguf file or a safetensors directory)")
    if quantize is not None:
        raise ValueError(
            f"quantize={quantize!r} applies to safetensors directories; {path!r} is a GGUF file, whose quantized "
            "matrices stay quantized with weights='native'"
        )
    return load_gguf(path, dtype, progress=progress, layout=layout, weights=weights)


__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "NonFiniteLogitsError",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "check_finite_logits",
    "load",
    "load_gguf",
    "load_safetensors",
    "resolve_dtype",
]
