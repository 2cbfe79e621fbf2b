"""Mutated model files: every mutation of a GGUF header, metadata value or tensor-info field, and of a safetensors
header or config.json, either fails with a ModelLoadError / TokenizerError naming the file, or loads a model whose
first forward is finite and whose tokenizer stays inside the vocabulary — never another exception or garbage."""

import json
import struct

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers_loading import TINY_HF_CONFIG as HF_CONFIG
from helpers_loading import write_tiny_gguf, write_tiny_safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jkv
from jkv.loading import ModelLoadError, TokenizerError, load
from jkv.models import llama

DIMS = dict(hidden=64, ffn=64, layers=1, heads=4, kv_heads=2)
MUTATION_SETTINGS = settings(
    max_examples=120,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TOKENS = np.array([[1, 7, 42, 255, 3, 9]], np.int32)


def first_forward_is_finite(model) -> None:
    """The loaded model's logits on a few tokens are finite; its tokenizer's ids index the embedding."""
    c = model.config
    cache = jkv.KVCache.init(jkv.CacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 8), 1)
    tokens = jnp.asarray(TOKENS % c.vocab_size)
    logits, _ = jax.jit(llama.forward, static_argnames="config")(model.params, cache, tokens, config=c)
    assert np.isfinite(np.asarray(logits)).all(), "a mutated file loaded and gave non-finite logits"
    if model.tokenizer is not None:
        ids = model.tokenizer.encode("the the cat")
        assert all(0 <= i < c.vocab_size for i in ids)


def load_or_refuse(path, note: str = "") -> None:
    try:
        model = load(path, "f32", progress=False, layout="layers")
    except (ModelLoadError, TokenizerError) as e:
        assert path.name in str(e), f"the error does not name the file ({note}): {e}"
        return
    first_forward_is_finite(model)


# ---------------------------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A tiny GGUF's bytes, where its tensor data starts, and the scalar parts of its header by group:
    ``{group: [(file offset, dtype, what it is)]}`` (groups: header, model, tokenizer, tensor-info)."""
    path = tmp_path_factory.mktemp("gguf") / "base.gguf"
    write_tiny_gguf(path, np.random.default_rng(0), dims=DIMS, types={"attn_q": Q.Q8_0, "ffn_up": Q.F16})
    reader = gguf.GGUFReader(path)
    base = reader.data.ctypes.data
    groups = {"header": [], "model": [], "tokenizer": [], "tensor-info": []}

    def add(group, part, what):
        for i in range(min(part.size, 4)):
            groups[group].append((part.ctypes.data - base + i * part.itemsize, part.dtype, what))

    for key, field in reader.fields.items():
        group = "header" if key.startswith("GGUF.") else "tokenizer" if key.startswith("tokenizer.") else "model"
        # Key length, key, value type, then the value (or an array's item type, count and first three items).
        for part in field.parts[:8]:
            if part.dtype != np.uint8 or part.size == 1:  # skip the bytes of strings: their lengths are mutated
                add(group, part, key)
    for t in reader.tensors:
        for part in t.field.parts[2:]:  # n_dims, dims, type, data offset
            add("tensor-info", part, t.name)
    data, header_end = bytes(reader.data), reader.data_offset
    del reader
    return data, groups, header_end


def new_value(old, dtype, choice: int, noise: float):
    """One of eight edits of a header value: extremes, neighbours, scalings, or a random value of its type."""
    if dtype.kind == "f":
        return [np.nan, np.inf, -np.inf, 0.0, -old, old * 1e30, old * 1e-30, old * (1 + noise)][choice]
    info = np.iinfo(dtype)
    value = [0, 1, int(info.max), old + 1, old - 1, old * 2, old // 2, int(noise * int(info.max))][choice]
    return min(max(value, int(info.min)), int(info.max))


@MUTATION_SETTINGS
@given(data=st.data())
def test_mutated_gguf_is_refused_or_sound(gguf_file, tmp_path_factory, data):
    raw, groups, header_end = gguf_file
    mutated = bytearray(raw)
    kind = data.draw(st.sampled_from([*groups, "byte"]), label="kind")
    if kind != "byte":
        offset, dtype, what = data.draw(st.sampled_from(groups[kind]), label="point")
        old = np.frombuffer(raw, dtype, 1, offset)[0]
        choice = data.draw(st.integers(0, 7), label="choice")
        noise = data.draw(st.floats(0, 1), label="noise")
        value = new_value(old.item() if dtype.kind == "f" else int(old), dtype, choice, noise)
        note = f"{what} at byte {offset}: {old} -> {value}"
        mutated[offset : offset + dtype.itemsize] = np.asarray(value).astype(dtype).tobytes()
    else:
        where = data.draw(st.integers(4, header_end - 1), label="byte")
        mutated[where] ^= data.draw(st.integers(1, 255), label="xor")
        note = f"byte {where} flipped"
    path = tmp_path_factory.getbasetemp() / "mutated.gguf"
    path.write_bytes(bytes(mutated))
    load_or_refuse(path, note)


# ---------------------------------------------------------------------------------------------- safetensors
@pytest.fixture(scope="module")
def safetensors_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    write_tiny_safetensors(directory, np.random.default_rng(0))
    load_or_refuse(directory)  # the unmutated model loads and runs
    return directory


ODD_VALUES = [float("nan"), float("inf"), -1, 0, 1, 3, 2**40, 1e-30, "x", None, [], {"a": 1}, True, 2.5]


def header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def with_header(meta: dict, body: bytes) -> bytes:
    text = json.dumps(meta).encode()
    return struct.pack("<Q", len(text)) + text + body


@MUTATION_SETTINGS
@given(data=st.data())
def test_mutated_safetensors_is_refused_or_sound(safetensors_dir, tmp_path_factory, data):
    raw = (safetensors_dir / "model.safetensors").read_bytes()
    config = dict(HF_CONFIG)
    meta, body = header(raw)
    names = sorted(k for k in meta if k != "__metadata__")
    kind = data.draw(st.sampled_from(["config", "dtype", "shape", "offsets", "byte", "length"]), label="kind")
    odd = data.draw(st.sampled_from(ODD_VALUES), label="value")
    name = data.draw(st.sampled_from(names), label="tensor")
    if kind == "config":
        config[data.draw(st.sampled_from(sorted(HF_CONFIG)), label="key")] = odd
    elif kind == "dtype":
        meta[name]["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "Q"]))
    elif kind == "shape":
        shape = list(meta[name]["shape"])
        shape[data.draw(st.integers(0, len(shape) - 1))] = data.draw(st.sampled_from([0, 1, 2, 3, 2**31, -1]))
        meta[name]["shape"] = shape
    elif kind == "offsets":
        meta[name]["data_offsets"][data.draw(st.integers(0, 1))] += data.draw(st.sampled_from([-4, 4, 2**40, -(2**20)]))
    mutated = with_header(meta, body)
    if kind == "byte":
        where = data.draw(st.integers(0, 8 + len(json.dumps(meta))), label="byte")
        mutated = bytearray(mutated)
        mutated[where] ^= data.draw(st.integers(1, 255), label="xor")
    elif kind == "length":
        mutated = struct.pack("<Q", data.draw(st.sampled_from([0, 1, 7, 2**20, 2**63]))) + mutated[8:]
    directory = tmp_path_factory.getbasetemp() / "mutated"
    directory.mkdir(exist_ok=True)
    (directory / "model.safetensors").write_bytes(bytes(mutated))
    (directory / "config.json").write_text(json.dumps(config))
    try:
        model = load(directory, "f32", progress=False, layout="layers")
    except ModelLoadError as e:
        assert "mutated" in str(e) or "config.json" in str(e), f"the error does not name the file: {e}"
        return
    first_forward_is_finite(model)
