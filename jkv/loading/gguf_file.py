"""A GGUF file's header read in one bounded pass: metadata as Python values, tensors as views of the mapped file.

The format (llama.cpp's ``gguf.md``): magic, version, tensor and key counts, the metadata key/value pairs, the
tensor infos (name, dims innermost first, GGML type, offset), then the tensor data from the next multiple of
``general.alignment``. Every count and length is bounded by the file's size before it is trusted, so a damaged
file gives a ``ModelLoadError`` naming what is wrong instead of a crash or a huge allocation. Numeric arrays are
decoded with one ``np.frombuffer`` each and strings with ``struct``: a 49k-token vocabulary takes milliseconds,
where the ``gguf`` package's reader builds a NumPy view per item. The ``gguf`` package still supplies the GGML
type table (block sizes) and the dequantization routines.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct

import numpy as np

from jkv.loading.common import ModelLoadError

VERSIONS = (2, 3)
MAX_DIMS = 4
_SCALARS = {  # value type id -> struct format (little-endian)
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor: ``dims`` innermost first (as stored), ``shape`` outermost first (NumPy's order), ``data`` its
    bytes as ``uint8 [rows, bytes per row]`` (a view of the mapped file: nothing is copied until it is read)."""

    name: str
    dims: tuple[int, ...]
    type_id: int
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))

    @property
    def ggml_type(self):
        """The type as the ``gguf`` package's ``GGMLQuantizationType`` (what its dequantizer takes)."""
        import gguf

        return gguf.GGMLQuantizationType(self.type_id)

    @property
    def type_name(self) -> str:
        return self.ggml_type.name


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A read GGUF file: ``metadata`` (``{key: str | int | float | bool | list}``) and ``tensors`` by name, in
    file order."""

    path: str
    version: int
    metadata: dict
    tensors: dict[str, GGUFTensor]


def read_gguf(path, source: str | None = None) -> GGUFFile:
    """Read ``path``'s header and map its tensors; ``source`` names the file in errors (default ``repr(path)``).

    Refuses: a wrong magic, big-endian files, unknown versions or value types, lengths past the end, duplicate keys
    or tensors, nested arrays, tensors of 0 or more than 4 dims, unknown tensor types, rows not a whole number of
    quantization blocks, misaligned offsets, tensor data past the end of the file or overlapping another tensor's.
    """
    path = os.fspath(path)
    source = repr(path) if source is None else source
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file not found: {path!r}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":  # also an empty file, which cannot be mapped
        raise ModelLoadError(f"{path!r} is not a GGUF file: it starts with {magic!r}, expected b'GGUF'")
    data = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))  # a plain view: no memmap subclass per slice
    return _Walk(data, path, source).file()


class _Walk:
    """One pass over the header; ``pos`` only moves forward and never past ``size``."""

    def __init__(self, data: np.ndarray, path: str, source: str):
        self.data, self.buf, self.path, self.source = data, memoryview(data), path, source
        self.size, self.pos = len(data), 0

    def fail(self, field: str, value, expected: str):
        raise ModelLoadError(f"{self.source}: {field}={value!r} is invalid: expected {expected}")

    def take(self, fmt: str):
        n = struct.calcsize("<" + fmt)
        if self.pos + n > self.size:
            raise ModelLoadError(
                f"{self.source} is truncated or corrupt: its header runs past the end ({self.size} bytes)"
            )
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def skip(self, nbytes: int, what: str) -> int:
        if nbytes > self.size - self.pos:
            raise ModelLoadError(
                f"{self.source} is truncated or corrupt: {what} claims {nbytes} bytes at offset {self.pos}, past "
                f"the end ({self.size} bytes)"
            )
        start, self.pos = self.pos, self.pos + nbytes
        return start

    def string(self, what: str) -> str:
        n = self.take("Q")
        start = self.skip(n, what)
        raw = bytes(self.buf[start : self.pos])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", "replace")

    def strings(self, count: int, key: str) -> list[str]:
        """``string`` ``count`` times, in one tight loop (vocabularies hold 10^5 strings)."""
        out, buf, pos, size, length = [], self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from
        for _ in range(count):
            n = length(buf, pos)[0] if pos + 8 <= size else size
            if n > size - pos - 8:
                self.pos = pos
                self.skip(8 + n, f"an item of the array {key}")
            out.append(str(buf[pos + 8 : pos + 8 + n], "utf-8", "replace"))
            pos += 8 + n
        self.pos = pos
        return out

    def value(self, kind: int, key: str):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string(f"the string value of {key}")
        if kind != _ARRAY:
            raise ModelLoadError(f"{self.source} is corrupt: metadata {key} has unknown value type {kind}")
        item, count = self.take("I"), self.take("Q")
        if item in _SCALARS:
            dtype = np.dtype("<" + _SCALARS[item]) if item != 7 else np.dtype(np.bool_)
            start = self.skip(count * dtype.itemsize, f"the array {key}")
            return np.frombuffer(self.buf, dtype, count, start).tolist()
        if item == _STRING:
            if count > (self.size - self.pos) // 8:  # each string takes 8 bytes of length at least
                self.skip(count * 8, f"the array {key}")
            return self.strings(count, key)
        raise ModelLoadError(f"{self.source} is corrupt: the array {key} has items of unknown type {item}")

    def file(self) -> GGUFFile:
        import gguf

        self.take("4s")  # the magic, checked by read_gguf
        version = self.take("I")
        if version not in VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in VERSIONS:  # the magic reads the same either way; the version tells the byte order
                raise ModelLoadError(
                    f"{self.source} is a big-endian GGUF file (version {swapped}): jkv reads little-endian files "
                    "only, as llama.cpp's converter writes them by default"
                )
            raise ModelLoadError(
                f"{self.source} is truncated or corrupt, or of a newer format: it has GGUF version {version}, jkv "
                f"reads versions {VERSIONS}"
            )
        n_tensors, n_kv = self.take("Q"), self.take("Q")
        metadata: dict = {}
        for _ in range(min(n_kv, self.size)):  # each key takes bytes: a larger count runs past the end and stops
            key = self.string("a metadata key")
            if key in metadata:
                raise ModelLoadError(f"{self.source} is corrupt: metadata key {key!r} appears twice")
            metadata[key] = self.value(self.take("I"), key)
        alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            self.fail("general.alignment", alignment, "a power of two")
        infos = {}
        for _ in range(min(n_tensors, self.size)):
            name = self.string("a tensor name")
            n_dims = self.take("I")
            if not 1 <= n_dims <= MAX_DIMS:
                self.fail(f"tensor {name!r} dimension count", n_dims, f"1 to {MAX_DIMS}")
            dims = tuple(self.take("Q") for _ in range(n_dims))
            kind, offset = self.take("I"), self.take("Q")
            if name in infos:
                raise ModelLoadError(f"{self.source} is corrupt: tensor {name!r} appears twice")
            if min(dims) < 1 or math.prod(dims) > 1 << 40:
                self.fail(f"tensor {name!r} shape", dims, "dimensions >= 1 and at most 2**40 elements")
            if kind not in gguf.GGML_QUANT_SIZES:
                self.fail(f"tensor {name!r} type", kind, "a GGML tensor type")
            block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
            if dims[0] % block:
                self.fail(f"tensor {name!r} row length", dims[0], f"a multiple of its type's block of {block}")
            if offset % alignment:
                self.fail(f"tensor {name!r} data offset", offset, f"a multiple of the alignment {alignment}")
            infos[name] = (dims, kind, offset, dims[0] // block * block_bytes)
        start = self.pos + (-self.pos % alignment)
        end_of_last, last = 0, None
        for name, (dims, _, offset, row_bytes) in sorted(infos.items(), key=lambda item: item[1][2]):
            nbytes = row_bytes * math.prod(dims[1:])
            if start + offset + nbytes > self.size:
                raise ModelLoadError(
                    f"{self.source} is truncated: tensor {name!r} needs bytes up to {start + offset + nbytes} but "
                    f"the file has {self.size}"
                )
            if offset < end_of_last:
                raise ModelLoadError(
                    f"{self.source} is corrupt: tensor {name!r}'s data (offset {offset}) overlaps tensor {last!r}'s "
                    f"(which ends at {end_of_last})"
                )
            end_of_last, last = offset + nbytes, name
        tensors = {}
        for name, (dims, kind, offset, row_bytes) in infos.items():
            rows = math.prod(dims[1:])
            data = self.data[start + offset : start + offset + rows * row_bytes].reshape(rows, row_bytes)
            tensors[name] = GGUFTensor(name, dims, kind, data)
        return GGUFFile(self.path, version, metadata, tensors)
