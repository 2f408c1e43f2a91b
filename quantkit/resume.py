"""Checkpoints of a running quantization in its work directory, so a killed run continues where it stopped.

Layout of the work directory (every file written under a temporary name, then renamed):
  state.json                  fingerprint of the run and the reports of the finished layers (written last)
  layers/layer-00012.safetensors   the packed tensors of finished layer 12
  activations-00013.safetensors    the calibration activations entering layer 13 (the next one)
A restart with the same command finds state.json, checks the fingerprint (model, settings, calibration tokens,
quantkit and torch versions, device) and continues after the last finished layer. Because the activations are
restored bit for bit, the finished files are byte-identical to those of an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from typing import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .errors import QuantkitError
from .integrity import TORCH_DTYPES
from .spill import batch_meta, read_tensor_at, write_tensor_at
from .writer import header_bytes, safetensors_dtype

STATE = "state.json"


def run_fingerprint(**parts) -> str:
    """sha256 over everything that decides the output; parts must be JSON-serialisable or tensors."""
    h = hashlib.sha256()
    for key in sorted(parts):
        value = parts[key]
        h.update(key.encode())
        if isinstance(value, Tensor):
            h.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
            h.update(value.contiguous().view(torch.uint8).numpy().tobytes() if value.numel() else b"")
        else:
            h.update(json.dumps(value, sort_keys=True, default=str).encode())
    return h.hexdigest()


def model_fingerprint(model_dir: Path) -> dict:
    """config.json and each weight file's name, size and safetensors header (cheap, yet changes with any retrain)."""
    files = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = f.read(min(n, 100_000_000))
        files[path.name] = [path.stat().st_size, hashlib.sha256(header).hexdigest()]
    return {"config": (model_dir / "config.json").read_text(), "weights": files}


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())  # the rename must never expose a file whose data is not on disk yet
    os.replace(tmp, path)


class RunState:
    """The resumable state of one quantize run in `work` (created if missing)."""

    def __init__(self, work: Path, fingerprint: str):
        self.work, self.fingerprint = Path(work), fingerprint
        self.reports: list[dict] = []
        state = self.work / STATE
        if state.is_file():
            saved = json.loads(state.read_text())
            if saved.get("fingerprint") != fingerprint:
                raise QuantkitError(f"{self.work} holds an unfinished run of a different model, settings or calibration; "
                                    "remove that directory to start over, or rerun the original command to resume it")
            self.reports = saved["layers"]
        (self.work / "layers").mkdir(parents=True, exist_ok=True)

    @property
    def layers_done(self) -> int:
        return len(self.reports)

    def layer_file(self, index: int) -> Path:
        return self.work / "layers" / f"layer-{index:05d}.safetensors"

    def save_layer(self, index: int, tensors: dict[str, Tensor], report: dict,
                   activations: Sequence[Sequence[Tensor]] | None) -> None:
        """Record layer `index` as finished: its tensors and the next layer's inputs first, state.json last.
        activations: the next layer's input streams (lists or spill.ActivationsOnDisk), saved one after another.

        A kill between any two steps leaves either the old state (redo this layer from its kept inputs) or
        the new one (continue with the next layer's inputs): each layer's inputs live in their own file.
        """
        from safetensors.torch import save_file

        if index != self.layers_done:
            raise QuantkitError(f"internal error: layer {index} saved after {self.layers_done} finished layers")
        _write_atomically(self.layer_file(index),
                          lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)))
        if activations is not None:
            _write_atomically(self.activations_file(index + 1), lambda p: _save_batches(p, activations))
        self.reports.append(report)
        _write_atomically(self.work / STATE, lambda p: p.write_text(json.dumps(
            {"fingerprint": self.fingerprint, "layers": self.reports}, indent=1)))
        self.activations_file(index).unlink(missing_ok=True)  # this layer's inputs are no longer needed

    def activations_file(self, index: int) -> Path:
        return self.work / f"activations-{index:05d}.safetensors"

    def load_activations(self, streams: list) -> None:
        """The saved inputs of layer `layers_done`, as the mini-batches they were, appended to `streams` (empty
        lists or spill.ActivationsOnDisk) in the order they were saved, an equal share each."""
        path = self.activations_file(self.layers_done)
        if not path.is_file():
            raise QuantkitError(f"{path} is missing, so the run cannot resume; remove {self.work} to start over")
        try:
            _load_batches(path, streams)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise QuantkitError(f"{path} is damaged ({e}), so the run cannot resume; remove {self.work} to start "
                                "over") from None

    def layer_tensors(self, index: int) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.layer_file(index)))


def _save_batches(path: Path, streams: Sequence[Sequence[Tensor]]) -> None:
    """The mini-batches of each stream, one after another, as a safetensors file (batch.00000, ...), written
    one batch at a time: batches kept on disk are read back one by one, never all into memory at once."""
    header, offset = {}, 0
    for stream in streams:
        for i in range(len(stream)):
            shape, dtype = batch_meta(stream, i)
            size = math.prod(shape) * dtype.itemsize
            header[f"batch.{len(header):05d}"] = {"dtype": safetensors_dtype(dtype), "shape": list(shape),
                                                  "data_offsets": [offset, offset + size]}
            offset += size
    with open(path, "wb") as f:
        f.write(header_bytes(header))
        at = f.tell()
        for stream in streams:
            for batch in stream:
                write_tensor_at(f, at, batch.contiguous())
                at += batch.numel() * batch.element_size()


def _load_batches(path: Path, streams: list) -> None:
    """Read what _save_batches wrote (a safetensors file) batch by batch into `streams`, an equal share each."""
    with open(path, "rb", buffering=0) as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
        names = sorted(k for k in header if k != "__metadata__")
        if not names or len(names) % len(streams):
            raise ValueError(f"{len(names)} batches for {len(streams)} stream(s)")
        share = len(names) // len(streams)
        for k, name in enumerate(names):
            entry = header[name]
            streams[k // share].append(read_tensor_at(f, 8 + length + entry["data_offsets"][0], entry["shape"],
                                                      TORCH_DTYPES[entry["dtype"]]))


class BackgroundSaves:
    """Layer saves run one at a time on a worker thread while the next layer computes (on a GPU a 7B layer's
    2.1 GB of activations took about 2 s to write and fsync, a quarter of the layer). Saves keep their order:
    each waits for the one before. Disabled, `submit` saves at once (the CPU's way: there the write is a small
    share of a layer, and a second copy of the activations would count against the run's memory).
    The caller must not change the saved tensors in place until `wait` (see capture.BlockMemo.fold_into)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, save: Callable[[], None]) -> None:
        self.wait()
        if not self.enabled:
            save()
            return

        def run():
            try:
                save()
            except BaseException as e:  # raised in the caller's thread by the next wait
                self._error = e

        self._thread = threading.Thread(target=run, name="quantkit-save", daemon=True)
        self._thread.start()

    def wait(self, raise_error: bool = True) -> None:
        """Until the save in flight is on disk; re-raises its error unless raise_error is False (the caller is
        failing already and its own error matters more)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error
