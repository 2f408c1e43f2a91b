"""Tensors kept on disk instead of in the process's memory, in unlinked scratch files.

Two uses. `KeptOnDisk`: inputs kept for a later pass of the same layer and read back once (down_proj's are wider
than the hidden states). `ActivationsOnDisk`: a CPU run's calibration activations themselves, read and rewritten
batch by batch in every pass. The kernel's page cache holds the file while memory is free and writes it back to
disk when it is not, so neither adds to the process's resident memory; reading a batch back is a copy from the page
cache. The files have no name (O_TMPFILE, or removed once opened), so nothing is left behind by a crash.
`ActivationsInMemory` is ActivationsOnDisk's in-memory twin: callers use either through one interface.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

import torch
from torch import Tensor


class KeptInMemory:
    """Tensors on the CPU, one per batch (the caller copies what it may still change)."""

    def __init__(self) -> None:
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


def _new_scratch_file(directory: Path) -> io.FileIO:
    """An unlinked file in `directory`; unbuffered, so a full disk shows in the write itself, not at a later seek."""
    return tempfile.TemporaryFile(dir=directory, buffering=0)


class ScratchFiles:
    """Unlinked scratch files in `directory` that are handed back after use and rewritten from the start by the
    next user (each decoder layer's kept inputs: the same sizes, layer after layer). Overwriting pages that the
    page cache holds already is a copy; writing a new file makes the file system allocate every page, which is
    several times slower."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._idle: list[io.FileIO] = []
        self._all: list[io.FileIO] = []

    def __str__(self) -> str:  # where, in messages
        return str(self.directory)

    def take(self) -> io.FileIO:
        """A file to write from its start: an idle one, or a new one."""
        if self._idle:
            return self._idle.pop()
        f = _new_scratch_file(self.directory)
        self._all.append(f)
        return f

    def give_back(self, f: io.FileIO) -> None:
        self._idle.append(f)

    def held_bytes(self) -> int:
        """Disk space the files take already (reused in place, not taken again)."""
        return sum(os.fstat(f.fileno()).st_size for f in self._all)

    def close(self) -> None:
        for f in self._all:
            f.close()
        self._all.clear()
        self._idle.clear()


class _ScratchFile:
    """Raw tensor bytes at offsets of an unlinked file in `directory` (or one taken from a ScratchFiles pool, given
    back on close); (offset, shape, dtype) per item."""

    def __init__(self, directory: Path | ScratchFiles) -> None:
        self._pool = directory if isinstance(directory, ScratchFiles) else None
        self._file: io.FileIO | None = directory.take() if isinstance(directory, ScratchFiles) else \
            _new_scratch_file(directory)
        self._items: list[tuple[int, torch.Size, torch.dtype] | None] = []
        self._end = 0

    def __len__(self) -> int:
        return len(self._items)

    def append(self, t: Tensor) -> None:
        data = t.detach().to("cpu").contiguous()
        write_tensor_at(self._open_file(), self._end, data)
        self._items.append((self._end, data.shape, data.dtype))
        self._end += data.numel() * data.element_size()

    def _open_file(self) -> io.FileIO:
        if self._file is None:
            raise RuntimeError("internal error: scratch file used after close")
        return self._file

    def _item(self, i: int) -> tuple[int, torch.Size, torch.dtype]:
        """Item i's (offset, shape, dtype); it must not have been taken."""
        item = self._items[i]
        if item is None:
            raise RuntimeError(f"internal error: kept tensor {i} was already taken")
        return item

    def _read(self, item: tuple[int, torch.Size, torch.dtype]) -> Tensor:
        return read_tensor_at(self._open_file(), *item)

    def close(self) -> None:
        if self._pool is not None and self._file is not None:
            self._pool.give_back(self._file)
        elif self._file is not None:
            self._file.close()
        self._file = None
        self._items.clear()


class KeptOnDisk(_ScratchFile):
    """Tensors appended once and read back once each, by index (`take`)."""

    def take(self, i: int) -> Tensor:
        return self._read(_pop(self._items, i))


class ActivationsInMemory(list):
    """The calibration mini-batches as a list of tensors in memory (a GPU run's pinned batches, which background
    saves read while the next layer computes): `store[i]` is the tensor itself. The same interface as
    ActivationsOnDisk, so callers never ask which one they hold."""

    reads_are_copies = False  # changing store[i] in place changes the stored batch

    def meta(self, i: int) -> tuple[torch.Size, torch.dtype]:
        """Item i's shape and dtype."""
        return self[i].shape, self[i].dtype

    def close(self) -> None:
        """Nothing to release: the tensors go when the last reference to them does."""


class ActivationsOnDisk(_ScratchFile):
    """A list of CPU tensors (the calibration mini-batches) that lives in a scratch file: `store[i]` reads item i
    into a new tensor (changing that tensor changes nothing on disk), `store[i] = t` rewrites it in place (same
    shape and dtype). Only the batch being worked on is in memory."""

    reads_are_copies = True  # a change to store[i] is kept only by writing it back (`store[i] = t`)

    def __getitem__(self, i: int) -> Tensor:
        return self._read(self._item(i))

    def __setitem__(self, i: int, t: Tensor) -> None:
        offset, shape, dtype = self._item(i)
        data = t.detach().to("cpu").contiguous()
        if data.shape != shape or data.dtype != dtype:
            raise ValueError(f"batch {i} is {tuple(shape)} {dtype} on disk; cannot replace it by "
                             f"{tuple(data.shape)} {data.dtype}")
        write_tensor_at(self._open_file(), offset, data)

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(len(self)))

    def meta(self, i: int) -> tuple[torch.Size, torch.dtype]:
        """Item i's shape and dtype, without reading it."""
        _, shape, dtype = self._item(i)
        return shape, dtype


Activations = ActivationsInMemory | ActivationsOnDisk  # where a layer's calibration inputs are kept


def write_tensor_at(file: BinaryIO, offset: int, data: Tensor) -> None:
    """data's bytes (a contiguous CPU tensor) at `offset` of a binary file, however many writes that takes."""
    raw = _bytes_of(data)
    file.seek(offset)
    written = 0
    while written < raw.nbytes:  # an unbuffered write may take part of it
        written += file.write(raw[written:])


def read_tensor_at(file: io.RawIOBase | io.BufferedIOBase, offset: int, shape: Sequence[int],
                   dtype: torch.dtype) -> Tensor:
    """A new CPU tensor read from `offset` of a binary file; OSError if the file ends first."""
    out = torch.empty(shape, dtype=dtype)
    raw = _bytes_of(out)
    file.seek(offset)
    got = 0
    while got < raw.nbytes:
        n = file.readinto(raw[got:])
        if not n:
            raise OSError(f"{getattr(file, 'name', 'scratch file')}: read {got} of {raw.nbytes} bytes at offset "
                          f"{offset}")
        got += n
    return out


def _bytes_of(t: Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes (bfloat16 has no numpy dtype; its bytes do)."""
    # numpy's stubs declare ndarray's buffer protocol only for Python 3.12 and later
    return memoryview(t.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


_Item = TypeVar("_Item")


def _pop(items: list[_Item | None], i: int) -> _Item:
    """items[i], leaving None in its place: each kept tensor is read once."""
    item, items[i] = items[i], None
    if item is None:
        raise RuntimeError(f"internal error: kept tensor {i} was already taken")
    return item


def disk_has_room(directory: Path | ScratchFiles, nbytes: int) -> bool:
    """Whether `directory` can take nbytes of scratch and still keep as much free for the output files (a pool's
    files count as room: they are rewritten in place)."""
    held = directory.held_bytes() if isinstance(directory, ScratchFiles) else 0
    where = directory.directory if isinstance(directory, ScratchFiles) else directory
    try:
        return shutil.disk_usage(where).free + held >= 2 * nbytes
    except OSError:
        return False
