"""Writing a checkpoint directory: tensors streamed into safetensors shards with an index, plus JSON files."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.source.checkpoint import INDEX_NAME
from quantkit.source.safetensors_header import SAFETENSORS_CODES

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}


def parse_size(text: str) -> int:
    """'2GB' / '500MB' / '1000000' -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 500MB or 2GB")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return n


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def safetensors_dtype(dtype: torch.dtype) -> str | None:
    """The safetensors code quantkit writes a tensor of `dtype` as; None for a dtype it does not write."""
    return SAFETENSORS_CODES.get(dtype)


def header_bytes(header: dict) -> bytes:
    """A safetensors file's first bytes: the header's length, then the header, padded so the data starts 8-byte
    aligned."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class _SpooledShard:
    """One safetensors file written without keeping its tensors in memory.

    Tensor bytes go straight to spool files, one per element size; `close()` writes the header and then
    the spools, largest element size first, so every tensor stays aligned to its element size in the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._spools: dict[int, tuple[Path, BinaryIO]] = {}
        # element size -> (name, dtype, shape, nbytes) of each tensor spooled
        self._entries: dict[int, list[tuple[str, str, list[int], int]]] = {}

    def add(self, name: str, tensor: Tensor) -> None:
        dtype = safetensors_dtype(tensor.dtype)
        if dtype is None:
            raise QuantkitError(f"internal error: cannot write tensor {name} of dtype {tensor.dtype}")
        size = tensor.element_size()
        if size not in self._spools:
            spool = self.path.with_name(f"{self.path.name}.spool-{size}")
            self._spools[size] = (spool, spool.open("wb"))
            self._entries[size] = []
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._spools[size][1].write(data.data)
        self._entries[size].append((name, dtype, list(tensor.shape), data.nbytes))

    def close(self) -> list[str]:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset, names = 0, []
        for size in sorted(self._entries, reverse=True):
            for name, dtype, shape, nbytes in self._entries[size]:
                header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
                names.append(name)
        with self.path.open("wb") as out:
            out.write(header_bytes(header))
            for size in sorted(self._spools, reverse=True):
                spool, handle = self._spools[size]
                handle.close()
                with spool.open("rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
                spool.unlink()
        os.chmod(self.path, 0o666 & ~umask())
        return names


class ShardWriter:
    """Streams tensors into safetensors shards of at most `max_shard_bytes` each, holding none of them.

    `finish()` names the shards model-0000i-of-0000N.safetensors and writes model.safetensors.index.json.
    """

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._shard: _SpooledShard | None = None
        self._shard_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, tensors: dict[str, Tensor]) -> None:
        for name, tensor in tensors.items():
            if name in self._names:
                raise QuantkitError(f"internal error: tensor {name} written twice")
            self._names.add(name)
            size = tensor.numel() * tensor.element_size()
            if self._shard is not None and self._shard_bytes + size > self.max_shard_bytes:
                self.flush()
            if self._shard is None:
                self._shard = _SpooledShard(self.directory / f"part-{len(self._parts):05d}.safetensors")
            self._shard.add(name, tensor)
            self._shard_bytes += size
            self.total_bytes += size

    def flush(self) -> None:
        if self._shard is None:
            return
        self._parts.append((self._shard.path, self._shard.close()))
        self._shard, self._shard_bytes = None, 0

    def finish(self) -> list[str]:
        """Write the last shard and the index; returns the shard file names."""
        self.flush()
        n = len(self._parts)
        weight_map, names = {}, []
        for i, (path, tensor_names) in enumerate(self._parts, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.directory / final)
            names.append(final)
            weight_map.update({t: final for t in tensor_names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(self.directory / INDEX_NAME, index)
        return names
