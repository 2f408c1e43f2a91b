"""The next decoder layer's base tensors read while the current layer computes: on a background thread, through a
checkpoint reader of its own, each tensor read, hashed (what resume.HashedReads records) and, for a GPU, copied
into pinned memory, so that loading the layer is a copy to the GPU. A GPU run's default: its host's cores are
idle while the GPU computes. A CPU run reads each layer when it starts: its cores are the ones computing, and a
layer held ahead would add to the peak a CPU user watches (QUANTKIT_PREFETCH=1 turns it on, =0 off on a GPU)."""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from quantkit.run.resume import HashedReads, tensor_sha256
from quantkit.source.checkpoint import SafetensorsCheckpoint, TensorReader

PREFETCH_ENV = "QUANTKIT_PREFETCH"

Fetched = dict[str, tuple[Tensor, str]]  # checkpoint name -> (the tensor, its tensor_sha256)


def prefetch_wanted(device: torch.device) -> bool:
    """Whether a run on `device` reads each next layer ahead: on a GPU unless QUANTKIT_PREFETCH=0, on a CPU only
    with QUANTKIT_PREFETCH=1."""
    setting = os.environ.get(PREFETCH_ENV)
    return device.type == "cuda" if setting is None else setting == "1"


class LayerPrefetch:
    """Reads a layer's tensors ahead (`start`); `reader` then serves them to skeleton.materialize. One layer
    ahead at most. pin: the tensors are copied into pinned memory (for a GPU)."""

    def __init__(self, model_dir: Path, reads: HashedReads, pin: bool) -> None:
        self._checkpoint = SafetensorsCheckpoint(model_dir)  # its own file handles: the run's never change under it
        self._reads, self._pin = reads, pin
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="quantkit-prefetch")
        self._pending: tuple[int, Future[Fetched]] | None = None
        self._stop = threading.Event()  # set by close: a read in flight stops at its next tensor

    def start(self, index: int, names: list[str]) -> None:
        """Read tensors `names` of layer `index` on the background thread."""
        self._pending = (index, self._pool.submit(self._read, names))

    def reader(self, index: int) -> TensorReader:
        """The checkpoint as layer `index` reads it: the tensors read ahead for it (their digests recorded in the
        run's HashedReads as each is taken, as a direct read records them), anything else read directly. A read
        ahead that failed raises its error here, where the direct read would have."""
        if self._pending is None or self._pending[0] != index:
            return cast(TensorReader, self._reads)
        fetched = self._pending[1].result()
        self._pending = None
        return _FetchedReads(self._reads, fetched)

    def _read(self, names: list[str]) -> Fetched:
        fetched: Fetched = {}
        try:
            for name in names:
                if self._stop.is_set():
                    break
                tensor = self._checkpoint.get(name)
                fetched[name] = (_pinned(tensor) if self._pin else tensor, tensor_sha256(name, tensor))
        finally:
            self._checkpoint.close()  # unmap the shards: their pages stop counting as the process's memory
        return fetched

    def close(self) -> None:
        """Stop a read in flight at its next tensor, wait for it (it holds the checkpoint's files) and drop what it
        read."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending = None
        self._checkpoint.close()


def _pinned(tensor: Tensor) -> Tensor:
    """tensor copied into pinned memory, or as it is where pinned memory cannot be had (a direct read would not
    have needed it: the copy to the GPU is then a plain one)."""
    try:
        return tensor.pin_memory()
    except RuntimeError:
        return tensor


class _FetchedReads:
    """A TensorReader over tensors read ahead, the rest read through the run's HashedReads."""

    def __init__(self, reads: HashedReads, fetched: Fetched) -> None:
        self._reads, self._fetched = reads, fetched

    def get(self, name: str) -> Tensor:
        got = self._fetched.pop(name, None)  # handed over: the module holds it from now on
        if got is None:
            return self._reads.get(name)
        tensor, digest = got
        self._reads.digests[name] = digest
        return tensor

    def __contains__(self, name: str) -> bool:
        return name in self._reads

    def names(self) -> list[str]:
        return self._reads.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._reads.shape(name)

    def close(self) -> None:
        self._fetched.clear()
        self._reads.close()
