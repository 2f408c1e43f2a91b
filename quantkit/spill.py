"""Tensors kept for a later pass of the same layer: in memory, or in an unlinked scratch file on disk.

A kept tensor is read back once, by index (`take`). The file variant is for inputs too large to hold beside the
activations (a 7B down_proj's are 2.7x the hidden states): the kernel's page cache holds them while memory is
free and writes them back to disk when it is not, so they never add to the process's resident memory. The file
has no name (O_TMPFILE, or removed once opened), so nothing is left behind by a crash.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor


class KeptInMemory:
    """Tensors on the CPU, one per batch (the caller copies what it may still change)."""

    def __init__(self):
        self._items: list[Tensor | None] = []

    def append(self, t: Tensor) -> None:
        self._items.append(t)

    def __len__(self) -> int:
        return len(self._items)

    def take(self, i: int) -> Tensor:
        """Item i; its memory is freed once the caller drops it."""
        return _pop(self._items, i)

    def close(self) -> None:
        self._items.clear()


class KeptOnDisk:
    """Raw bytes appended to a scratch file in `directory`; (offset, shape, dtype) per batch."""

    def __init__(self, directory: Path):
        # unlinked at once where the OS allows; unbuffered, so a full disk shows in `append`, not at a later seek
        self._file = tempfile.TemporaryFile(dir=directory, buffering=0)
        self._items: list[tuple[int, torch.Size, torch.dtype] | None] = []
        self._end = 0

    def append(self, t: Tensor) -> None:
        data = t.detach().to("cpu").contiguous()
        raw = memoryview(data.view(-1).view(torch.uint8).numpy())  # a view: bfloat16 has no numpy dtype, its bytes do
        self._file.seek(self._end)
        written = 0
        while written < raw.nbytes:  # an unbuffered write may take part of it
            written += self._file.write(raw[written:])
        self._items.append((self._end, data.shape, data.dtype))
        self._end += raw.nbytes

    def __len__(self) -> int:
        return len(self._items)

    def take(self, i: int) -> Tensor:
        offset, shape, dtype = _pop(self._items, i)
        out = torch.empty(shape, dtype=dtype)
        raw = memoryview(out.view(-1).view(torch.uint8).numpy())
        self._file.seek(offset)
        got = 0
        while got < raw.nbytes:
            n = self._file.readinto(raw[got:])
            if not n:
                raise OSError(f"quantkit scratch file: read {got} of {raw.nbytes} bytes at offset {offset}")
            got += n
        return out

    def close(self) -> None:
        self._file.close()
        self._items.clear()


def _pop(items: list, i: int):
    """items[i], leaving None in its place: each kept tensor is read once."""
    item, items[i] = items[i], None
    if item is None:
        raise RuntimeError(f"internal error: kept tensor {i} was already taken")
    return item


def disk_has_room(directory: Path, nbytes: int) -> bool:
    """Whether `directory` can take nbytes of scratch and still keep as much free for the output files."""
    try:
        return shutil.disk_usage(directory).free >= 2 * nbytes
    except OSError:
        return False
