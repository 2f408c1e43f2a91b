"""A GGUF file's header, walked with every length checked against the file before any other reader parses it.

The gguf package's reader and transformers' GGUF parsing trust the counts and offsets a header states: an array
length past the end of the file makes the gguf reader loop over it, and tensor offsets or dimensions that lie are
only noticed, if at all, deep inside dequantization. This walk reads nothing it has not bounded by the file's size
and refuses, with one line naming the file, a header whose metadata or tensor table runs past the end, more
metadata keys, array elements or tensors than a model's file holds (the gguf reader builds objects for each), a
tensor of an unknown type or of impossible dimensions, or tensor data that lies outside the file or overlaps another
tensor's. What it keeps is the architecture and the tensor table.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import NamedTuple

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit.errors import QuantkitError

GGUF_MAGIC = b"GGUF"  # a GGUF file's first four bytes
GGUF_SUFFIX = ".gguf"  # and its name's ending
VERSIONS = (2, 3)  # what the gguf package and transformers read; v1 counted in 32 bits
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
MAX_NAME_BYTES = 1 << 16  # a metadata key, tensor name or architecture; GGUF's own limits are lower
# The gguf package's reader (and transformers' GGUF parsing through it) builds a few numpy objects for every
# metadata key, array element and tensor, so a small file of many tiny entries would take gigabytes to parse.
# The largest real vocabularies (about 262k tokens, with their scores and types, and up to about 500k merges)
# hold about 1.3 million array elements in all; a model file states a few dozen keys and at most tens of thousands
# of tensors (a MoE's experts are one tensor per layer). Values and strings are bounded by the file's size.
MAX_ARRAY_ELEMENTS = 2_000_000  # the elements of all metadata arrays together: 1.5x the largest real vocabulary
MAX_METADATA_KEYS = 1 << 16
MAX_TENSORS = 1 << 17
_U32, _STRING, _ARRAY = 4, 8, 9
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF metadata value types
_KEPT = {"general.architecture": _STRING, "general.alignment": _U32}  # the metadata read here, and its value type


class TensorEntry(NamedTuple):
    name: str
    dims: tuple[int, ...]  # ggml order: the fastest-moving dimension first
    ggml_type: GGMLQuantizationType
    start: int  # absolute offset of its data in the file
    nbytes: int


class GGUFHeader(NamedTuple):
    architecture: str
    tensors: tuple[TensorEntry, ...]


class _Walk:
    """A cursor over the mapped file that refuses to read past its end."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0
        self.elements = 0  # of the metadata arrays walked so far

    def fail(self, what: str) -> QuantkitError:
        return QuantkitError(f"{self.path} is not a valid GGUF file: {what}; download or convert it again")

    def skip(self, n: int, what: str) -> None:
        if n > len(self.data) - self.pos:
            raise self.fail(f"its {what} runs past the end of the file (byte {self.pos} of {len(self.data)})")
        self.pos += n

    def take(self, n: int, what: str) -> bytes:
        self.skip(n, what)
        return self.data[self.pos - n:self.pos]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(what)
        if n > MAX_NAME_BYTES:
            raise self.fail(f"its {what} at byte {self.pos - 8} claims {n} bytes")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"its {what} is not UTF-8") from None

    def skip_value(self, value_type: int, key: str) -> None:
        if value_type in _SCALAR_BYTES:
            self.skip(_SCALAR_BYTES[value_type], f"metadata value {key!r}")
        elif value_type == _STRING:
            self.skip(self.u64(f"metadata value {key!r}"), f"metadata value {key!r}")
        elif value_type == _ARRAY:
            element_type, count = self.u32(f"metadata array {key!r}"), self.u64(f"metadata array {key!r}")
            self.elements += count
            if self.elements > MAX_ARRAY_ELEMENTS:
                raise self.fail(f"its metadata array {key!r} holds {count} elements, {self.elements} in its arrays "
                                f"so far, more than the {MAX_ARRAY_ELEMENTS} a model's vocabulary needs")
            if element_type in _SCALAR_BYTES:
                self.skip(count * _SCALAR_BYTES[element_type], f"metadata array {key!r}")
            elif element_type == _STRING:
                for _ in range(count):  # each element takes at least its 8-byte length, so this ends with the file
                    self.skip(self.u64(f"metadata array {key!r}"), f"metadata array {key!r}")
            else:
                raise self.fail(f"metadata {key!r} is an array of type {element_type}, which GGUF readers cannot read")
        else:
            raise self.fail(f"metadata {key!r} has the unknown value type {value_type}")


def read_header(path: Path) -> GGUFHeader:
    """The architecture and tensor table of the GGUF file `path`, every part of it checked to lie inside the file."""
    try:
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise QuantkitError(f"cannot read GGUF file {path}: {getattr(e, 'strerror', None) or e}") from None
    with data:
        return _walk(_Walk(data, Path(path)))


def _walk(w: _Walk) -> GGUFHeader:
    if w.take(4, "magic") != GGUF_MAGIC:
        raise w.fail("its first bytes are not 'GGUF'")
    version = w.u32("version")
    if version not in VERSIONS:
        raise w.fail(f"it is GGUF version {version}; versions {' and '.join(map(str, VERSIONS))}, little-endian, "
                     "are readable")
    tensor_count, kv_count = w.u64("tensor count"), w.u64("metadata count")
    if kv_count > MAX_METADATA_KEYS or tensor_count > MAX_TENSORS:
        raise w.fail(f"it states {kv_count} metadata keys and {tensor_count} tensors (a model has at most "
                     f"{MAX_METADATA_KEYS} and {MAX_TENSORS})")
    architecture, alignment, keys = None, DEFAULT_ALIGNMENT, set()
    for _ in range(kv_count):  # each entry takes at least 12 bytes, so a lying count ends with the file
        key = w.string("metadata key")
        if key in keys:
            raise w.fail(f"it holds the metadata key {key!r} twice")
        keys.add(key)
        value_type = w.u32(f"metadata type of {key!r}")
        if key in _KEPT and value_type != _KEPT[key]:
            raise w.fail(f"its metadata {key!r} has value type {value_type}")
        if key == "general.architecture":
            architecture = w.string(f"metadata value {key!r}")
        elif key == "general.alignment":
            alignment = w.u32(f"metadata value {key!r}")
            if alignment == 0 or alignment & (alignment - 1):
                raise w.fail(f"its alignment {alignment} is not a power of two")
        else:
            w.skip_value(value_type, key)
    if architecture is None:
        raise w.fail("it names no general.architecture")
    table = []
    for _ in range(tensor_count):
        name = w.string("tensor name")
        n_dims = w.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise w.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = tuple(w.u64(f"dimensions of tensor {name!r}") for _ in range(n_dims))
        raw_type, offset = w.u32(f"type of tensor {name!r}"), w.u64(f"offset of tensor {name!r}")
        table.append((name, dims, raw_type, offset))
    data_start = -(-w.pos // alignment) * alignment
    tensors, seen = [], set()
    for name, dims, raw_type, offset in table:
        if name in seen:
            raise w.fail(f"it holds two tensors named {name!r}")
        seen.add(name)
        if raw_type not in GGML_QUANT_SIZES:
            raise w.fail(f"tensor {name!r} has the unknown ggml type {raw_type}")
        ggml_type = GGMLQuantizationType(raw_type)
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        if min(dims) < 1 or dims[0] % block:
            raise w.fail(f"tensor {name!r} has dimensions {list(dims)}, impossible for type {ggml_type.name}")
        elements = 1
        for d in dims:
            elements *= d
        nbytes, start = elements // block * block_bytes, data_start + offset
        if start + nbytes > len(w.data):
            raise w.fail(f"tensor {name!r} ({nbytes} bytes at byte {start}) lies past the end of the file "
                         f"({len(w.data)} bytes): it is truncated or its header is wrong")
        tensors.append(TensorEntry(name, dims, ggml_type, start, nbytes))
    spans = sorted((t.start, t.start + t.nbytes, t.name) for t in tensors if t.nbytes)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise w.fail(f"the data of tensors {first!r} and {second!r} overlap")
    return GGUFHeader(architecture, tuple(tensors))
