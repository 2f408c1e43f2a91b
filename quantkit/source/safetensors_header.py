"""The one reader of safetensors headers. A header is untrusted input: every entry is checked against the format
before any caller (integrity, inspect, the checkpoint reader) uses its dtype, shape or offsets."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.untrusted import field, parse_json

# Every safetensors dtype (the format's own table): its code, bits per element (a tensor takes prod(shape) * bits / 8
# bytes), the torch dtype quantkit writes it from (None: never), and whether quantkit reads it into torch to compute
DTYPES: tuple[tuple[str, int, torch.dtype | None, bool], ...] = (
    ("BOOL", 8, torch.bool, True), ("F4", 4, None, False), ("F6_E2M3", 6, None, False), ("F6_E3M2", 6, None, False),
    ("U8", 8, torch.uint8, True), ("I8", 8, torch.int8, True), ("F8_E5M2", 8, torch.float8_e5m2, False),
    ("F8_E4M3", 8, torch.float8_e4m3fn, False), ("F8_E8M0", 8, None, False), ("I16", 16, torch.int16, True),
    ("U16", 16, None, False), ("F16", 16, torch.float16, True), ("BF16", 16, torch.bfloat16, True),
    ("I32", 32, torch.int32, True), ("U32", 32, None, False), ("F32", 32, torch.float32, True),
    ("C64", 64, None, False), ("F64", 64, torch.float64, True), ("I64", 64, torch.int64, True),
    ("U64", 64, None, False),
)
DTYPE_BITS = {code: bits for code, bits, _, _ in DTYPES}
# the safetensors dtypes quantkit computes with, as torch dtypes
TORCH_DTYPES = {code: dtype for code, _, dtype, computes in DTYPES if computes and dtype is not None}
FLOAT_DTYPES = frozenset(code for code, dtype in TORCH_DTYPES.items() if dtype.is_floating_point)
# the safetensors code of each torch dtype quantkit writes
SAFETENSORS_CODES = {dtype: code for code, _, dtype, _ in DTYPES if dtype is not None}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses longer headers too


class IntegrityError(QuantkitError):
    """The checkpoint's files or tensors are damaged or inconsistent."""


def read_header(path: Path) -> dict:
    """The header of one safetensors file: tensor name -> {"dtype", "shape", "data_offsets"}, __metadata__ left
    out. Everything the format requires is checked, so callers may trust each entry: a known dtype, a shape of
    non-negative integers, [begin, end] offsets spanning exactly prod(shape) elements of that dtype, and the
    tensors, in offset order, filling the data after the header exactly (none past the end of the file, none
    overlapping another, no bytes between them). Anything else is one line naming the file (and the tensor)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise IntegrityError(f"{path}: not a safetensors file ({size} bytes, truncated)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise IntegrityError(f"{path}: truncated or corrupted (header of {n} bytes, file of {size})")
            if n > MAX_HEADER_BYTES:
                raise IntegrityError(f"{path}: a header of {n} bytes, more than a safetensors header may hold")
            raw = f.read(n)
    except OSError as e:
        raise IntegrityError(f"{path}: unreadable safetensors header ({e.strerror or e})") from None
    header = parse_json(raw, f"{path}: the safetensors header", dict)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise IntegrityError(f"{path}: the header's __metadata__ is not an object of strings")
    spans = sorted((_header_entry(path, name, info) + (name,) for name, info in header.items()))
    data_bytes, at, previous = size - 8 - n, 0, None
    for begin, end, name in spans:
        if end > data_bytes:
            raise IntegrityError(f"{path}: tensor {name} lies at bytes {begin} to {end} of the data, past its end "
                                 f"({data_bytes} bytes): truncated or corrupted")
        if begin < at:
            raise IntegrityError(f"{path}: tensor {name} (bytes {begin} to {end}) overlaps tensor {previous}")
        if begin > at:
            raise IntegrityError(f"{path}: bytes {at} to {begin} of the data belong to no tensor (before tensor "
                                 f"{name}): corrupted")
        at, previous = end, name
    if at != data_bytes:
        raise IntegrityError(f"{path}: truncated or corrupted: its header describes {8 + n + at} bytes, the file "
                             f"has {size}")
    return header


def _header_entry(path: Path, name: str, info: object) -> tuple[int, int]:
    """(begin, end) of one header entry, after checking its dtype, shape and offsets agree with one another."""
    what = f"{path}: tensor {name}"
    if not isinstance(info, dict):
        raise IntegrityError(f"{what}: its header entry is not an object with dtype, shape and data_offsets")
    dtype = field(info, "dtype", str, what)
    shape = field(info, "shape", list, what)
    offsets = field(info, "data_offsets", list, what)
    if dtype not in DTYPE_BITS:
        raise IntegrityError(f"{what}: unknown dtype {dtype[:20]!r}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise IntegrityError(f"{what}: shape {json.dumps(shape)[:60]} is not a list of non-negative integers")
    if not (len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise IntegrityError(f"{what}: data_offsets {json.dumps(offsets)[:60]} are not [begin, end] with "
                             "0 <= begin <= end")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        takes = f"{bits // 8} bytes" if bits % 8 == 0 else f"{bits} bits, not whole bytes"
        raise IntegrityError(f"{what}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but a {dtype} "
                             f"tensor of shape {json.dumps(shape)[:60]} takes {takes}")
    return offsets[0], offsets[1]
