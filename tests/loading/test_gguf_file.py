"""jkv's GGUF header reader against the ``gguf`` package's own reader (the reference): the same metadata values of
every type, the same tensor shapes, types and bytes; and a damaged header refused with the place named."""

import gguf
import numpy as np
import pytest
from helpers_loading import write_tiny_gguf

from jkv.loading import ModelLoadError, gguf_file


def write_every_value_type(path):
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 1 << 60)
    writer.add_int64("t.i64", -(1 << 60))
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ✓")
    writer.add_array("t.ints", [3, -1, 7])
    writer.add_array("t.floats", [0.5, -2.25])
    writer.add_array("t.strs", ["a", "", "ü", "Ġthe"])
    writer.add_array("t.empty", [])
    rng = np.random.default_rng(1)
    writer.add_tensor("w.f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("w.f16", rng.standard_normal((4, 2, 8)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def reference(path):
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (int(t.tensor_type), tuple(int(n) for n in reversed(t.shape)), t.data) for t in reader.tensors}
    return meta, tensors


def assert_same_as_reference(path):
    meta, tensors = reference(path)
    got = gguf_file.read_gguf(path)
    assert got.metadata.keys() == meta.keys()
    for key, value in meta.items():
        assert got.metadata[key] == value and type(got.metadata[key]) is type(value), key
    assert list(got.tensors) == list(tensors)
    for name, (type_id, shape, data) in tensors.items():
        t = got.tensors[name]
        assert (t.type_id, t.shape) == (type_id, shape), name
        np.testing.assert_array_equal(t.data.reshape(-1), np.asarray(data).view(np.uint8).reshape(-1))
    return got


def test_every_value_type_reads_as_the_gguf_package_reads_it(tmp_path):
    path = tmp_path / "values.gguf"
    write_every_value_type(path)
    got = assert_same_as_reference(path)
    assert got.metadata["t.strs"] == ["a", "", "ü", "Ġthe"] and got.metadata["t.f32"] == np.float32(0.1)


Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("types", [None, {"attn_q": Q.Q8_0, "ffn_down": Q.Q4_1, "attn_v": Q.F16, "ffn_up": Q.Q6_K}])
def test_a_model_file_reads_as_the_gguf_package_reads_it(tmp_path, types):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, np.random.default_rng(0), types=types)
    assert_same_as_reference(path)


def test_a_cut_string_array_is_refused_naming_it(tmp_path):
    path = tmp_path / "values.gguf"
    write_every_value_type(path)
    raw = path.read_bytes()
    at = raw.index(b"t.strs") + len(b"t.strs") + 4 + 4 + 8  # value type, item type, count
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(raw[:at] + (10**6).to_bytes(8, "little") + raw[at + 8 :])  # the first string claims 1 MB
    with pytest.raises(ModelLoadError, match=r"an item of the array t\.strs claims 1000008 bytes"):
        gguf_file.read_gguf(cut)
    cut.write_bytes(raw[: at + 4])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        gguf_file.read_gguf(cut)
