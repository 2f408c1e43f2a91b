"""Writing a checkpoint directory: tensors streamed into safetensors shards with an index, plus JSON files."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from torch import Tensor

from .errors import QuantkitError

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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


class ShardWriter:
    """Accumulates tensors and writes a safetensors shard whenever `max_shard_bytes` would be exceeded.

    Only the current shard's tensors are held in memory. `finish()` names the shards
    model-0000i-of-0000N.safetensors and writes model.safetensors.index.json.
    """

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, Tensor] = {}
        self._buffer_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, Tensor]) -> None:
        for name, tensor in tensors.items():
            if name in self._buffer or any(name in names for _, names in self._parts):
                raise QuantkitError(f"internal error: tensor {name} written twice")
            size = tensor.numel() * tensor.element_size()
            if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
                self.flush()
            self._buffer[name] = tensor.detach().to("cpu").contiguous()
            self._buffer_bytes += size
            self.total_bytes += size

    def flush(self) -> None:
        if not self._buffer:
            return
        from safetensors.torch import save_file

        path = self.directory / f"part-{len(self._parts):05d}.safetensors"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~_umask())  # save_file creates 0600 files; shards are meant to be shared
        self._parts.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

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
        write_json(self.directory / "model.safetensors.index.json", index)
        return names
