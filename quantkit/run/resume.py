"""Checkpoints of a running quantization in its work directory, so a killed run continues where it stopped.

Layout of the work directory (every file written under a temporary name, then renamed):
  state.json                  fingerprint of the run, the reports of the finished layers and, per finished
                              step, the sha256 and size of its file and the sha256 of each base tensor it was
                              computed from; the sha256 and size of the activations file (written last)
  layers/layer-00012.safetensors   the packed tensors of finished layer 12
  activations-00013.safetensors    the calibration activations entering layer 13 (the next one); several
                              processes (run/ranks.py) each save theirs, activations-00013.<rank>-of-<N>.safetensors
A restart with the same command finds state.json, checks the fingerprint (model, settings, calibration tokens,
quantkit and torch versions, device) and continues after the last finished layer. Because the activations are
restored bit for bit, the finished files are byte-identical to those of an uninterrupted run.

Nothing in the work directory is trusted: before any work a restart validates state.json in full, checks every
file it names against its recorded sha256 and size, and re-reads the finished steps' base tensors to check that
the base model is still the one they were computed from (a retrain of the same shapes changes no header). A
state that fails any of these, or a state.json without checksums, is refused with one line saying how to start
over. The base tensors' sha256s come from the run's own reads (HashedReads): a fresh run reads nothing twice.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from quantkit.errors import QuantkitError, first_line
from quantkit.memory.spill import Activations, read_tensor_at, write_tensor_at
from quantkit.run.ranks import Ranks
from quantkit.run.step_report import check_report
from quantkit.source.checkpoint import SafetensorsCheckpoint
from quantkit.source.safetensors_header import TORCH_DTYPES, read_header
from quantkit.untrusted import field, file_record, read_json, sha256_digest, sha256_file
from quantkit.write.shards import header_bytes, safetensors_dtype

STATE = "state.json"
T = TypeVar("T")
STATE_FORMAT = 2  # state.json's layout; any other (the first had no checksums) is refused, never trusted


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
    """config.json and each weight file's name, size and safetensors header: cheap, and another architecture,
    shape or file layout is refused at once. New weights of the same shapes change none of it, so each finished
    step also records the base tensors it was computed from (RunState.check_base)."""
    files = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = f.read(min(n, 100_000_000))
        files[path.name] = [path.stat().st_size, hashlib.sha256(header).hexdigest()]
    return {"config": (model_dir / "config.json").read_text(), "weights": files}


class ResumeRefused(QuantkitError):
    """The work directory holds a state this run must not continue (another run's, damaged, or made from other
    base weights); it is left as it is, for the user to remove."""


def tensor_sha256(name: str, tensor: Tensor) -> str:
    """sha256 over a tensor's name, dtype, shape and bytes: which data a step was computed from."""
    h = hashlib.sha256(json.dumps([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]).encode())
    h.update(_raw_bytes(tensor))
    return h.hexdigest()


def _raw_bytes(t: Tensor) -> memoryview:
    """The bytes of a CPU tensor, as they lie in memory once contiguous (bfloat16 has no numpy dtype; its bytes do)."""
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy().data


class HashedReads:
    """The base checkpoint as the run reads it: each tensor `get` returns is hashed on its way (tensor_sha256, by
    name, in `digests`), so the run records which base data its saved steps came from without a second read.
    Everything else is the wrapped checkpoint's own."""

    def __init__(self, checkpoint: SafetensorsCheckpoint) -> None:
        self.checkpoint = checkpoint
        self.digests: dict[str, str] = {}

    def get(self, name: str) -> Tensor:
        tensor = self.checkpoint.get(name)
        self.digests[name] = tensor_sha256(name, tensor)
        return tensor

    def __contains__(self, name: str) -> bool:
        return name in self.checkpoint

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.checkpoint, attr)


def _write_atomically(path: Path, write: Callable[[Path], T]) -> T:
    """write(temporary path), then the rename to `path`; returns what `write` returned."""
    tmp = _temporary(path)
    result = write(tmp)
    _make_durable(tmp, path)
    return result


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _make_durable(tmp: Path, path: Path) -> None:
    """tmp's data onto the disk, then tmp renamed to `path`: the rename never exposes a file whose data is not on
    disk yet."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _record_of(path: Path) -> dict:
    """sha256 and size of a file just written (a layer's packed tensors: small, and still in the page cache)."""
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


class RunState:
    """The resumable state of one quantize run in `work` (created if missing). A state found there is validated,
    and every file it names checked, before anything uses it; `check_base` checks the base model against it.

    In a run of several processes (`ranks`) every process keeps the same state, and process 0 alone writes
    state.json and the finished steps' files; each process saves and checks its own windows' inputs."""

    def __init__(self, work: Path, fingerprint: str, ranks: Ranks | None = None) -> None:
        self.work, self.fingerprint = Path(work), fingerprint
        self.ranks = ranks if ranks is not None else Ranks.single()
        self.reports: list[dict] = []
        self.steps: list[dict] = []  # per finished step: its file's sha256 and size, and its base tensors' sha256s
        # sha256 and size of the saved inputs of step layers_done: one record, or one per process
        self.activations: dict | list[dict] | None = None
        self._base_read: dict[int, dict[str, str]] = {}  # note_base's, until their step is saved
        state = self.work / STATE
        if state.exists() or state.is_symlink():
            saved = self._read(state)
            if saved["fingerprint"] != fingerprint:
                raise ResumeRefused(f"{self.work} holds an unfinished run of a different model, settings or "
                                    "calibration; remove that directory to start over, or rerun the original "
                                    "command to resume it")
            self.reports, self.steps, self.activations = saved["layers"], saved["steps"], saved.get("activations")
            per_process = isinstance(self.activations, list)
            if self.activations is not None and (per_process != self.ranks.distributed or
                                                 per_process and len(self.activations) != self.ranks.world):
                raise self._damaged(f"{state} records the inputs of another number of processes")
            for i, step in enumerate(self.steps if self.ranks.is_main else []):
                self._check_file(self.layer_file(i), step)
            if self.own_activations is not None:
                self._check_file(self.activations_file(self.layers_done), self.own_activations)
        if self.ranks.is_main:
            (self.work / "layers").mkdir(parents=True, exist_ok=True)

    @property
    def own_activations(self) -> dict | None:
        """The record of this process's saved inputs (the only one in a single process's state)."""
        return self.activations[self.ranks.rank] if isinstance(self.activations, list) else self.activations

    def _damaged(self, why: str) -> ResumeRefused:
        return ResumeRefused(f"{why}: the unfinished run's state in {self.work} is damaged; remove that directory to "
                             "start over")

    def _read(self, path: Path) -> dict:
        """state.json, validated in full: its shape and every value a later step uses (the layers' reports are
        published in the manifest and model card), so a damaged state fails here, not after every layer ran."""
        where = str(path)
        try:
            saved = read_json(path, "resume state")
            if "format" not in saved:
                raise QuantkitError(f"{path} holds no checksums (an older quantkit's format)")
            if field(saved, "format", int, where) != STATE_FORMAT:
                raise QuantkitError(f"{path} is in format {saved['format']}, not {STATE_FORMAT}")
            field(saved, "fingerprint", str, where)
            reports, steps = field(saved, "layers", list, where), field(saved, "steps", list, where)
            if len(steps) != len(reports):
                raise QuantkitError(f"{path} records {len(reports)} layers' reports but {len(steps)} steps")
            for i, (report, step) in enumerate(zip(reports, steps)):
                check_report({f"layers[{i}]": report}, i, where)
                step = field({f"steps[{i}]": step}, f"steps[{i}]", dict, where)
                file_record(step, f"{where}: steps[{i}]")
                for name, digest in field(step, "base", dict, f"{where}: steps[{i}]").items():
                    sha256_digest(digest, f"{where}: steps[{i}]: base tensor {name}")
            if saved.get("activations") is not None:
                self._check_activations_record(saved, where)
        except QuantkitError as e:
            raise self._damaged(str(e)) from None
        return saved

    def _check_activations_record(self, saved: dict, where: str) -> None:
        """The saved inputs' record: one file's, or from a run of several processes one per process (how many
        is checked once the fingerprint, which counts them, matches)."""
        records = field(saved, "activations", (dict, list), where)
        for rank, record in enumerate(records if isinstance(records, list) else [records]):
            file_record(field({"record": record}, "record", dict, where), f"{where}: activations[{rank}]")

    def _check_file(self, path: Path, record: dict) -> None:
        """path holds what `record` says: its size, then its sha256."""
        try:
            size = path.stat().st_size
            if size == record["size"]:
                digest = sha256_file(path)
        except FileNotFoundError:
            raise self._damaged(f"{path} is missing") from None
        except OSError as e:
            raise self._damaged(f"cannot read {path}: {e.strerror or e}") from None
        if size != record["size"]:
            raise self._damaged(f"{path} is {size} bytes, where {STATE} recorded {record['size']}")
        if digest != record["sha256"]:
            raise self._damaged(f"{path} does not match the sha256 that {STATE} recorded")

    def check_base(self, checkpoint: HashedReads, layer_names: list[list[str]], steps: int) -> None:
        """Before any work: the base tensors the finished steps were computed from are unchanged in `checkpoint`.
        Each is read once and its sha256 compared with the recorded one (checkpoint keeps it for the steps to
        come). layer_names: the base tensors each decoder layer reads; steps: how many the whole run has."""
        state = self.work / STATE
        if self.layers_done > steps:
            raise self._damaged(f"{state} records {self.layers_done} finished steps of a run of {steps}")
        recorded = {name: digest for step in self.steps for name, digest in step["base"].items()}
        for i in range(min(self.layers_done, len(layer_names))):
            missing = [name for name in layer_names[i] if name not in recorded]
            if missing:
                raise self._damaged(f"{state} records no sha256 of {missing[0]}, read by finished layer {i}")
        layer_of = {name: i for i, names in enumerate(layer_names) for name in names}
        for name, digest in recorded.items():
            if name in checkpoint:
                checkpoint.get(name)
                checkpoint.close()  # unmap: one tensor's pages resident at a time
            if checkpoint.digests.get(name) != digest:
                what = f"layer {layer_of[name]}" if name in layer_of else f"tensor {name}"
                raise ResumeRefused(f"the base model's weights changed since the unfinished run in {self.work} "
                                    f"({what} differs); remove that directory to start over")

    @property
    def layers_done(self) -> int:
        return len(self.reports)

    def layer_file(self, index: int) -> Path:
        return self.work / "layers" / f"layer-{index:05d}.safetensors"

    def note_base(self, index: int, digests: dict[str, str]) -> None:
        """The sha256s of the base tensors read so far (HashedReads.digests) as step `index` finishes, taken before
        its save starts (a background save runs while the next layer is read); save_layer records those that no
        earlier step did as the base that step was computed from."""
        self._base_read[index] = dict(digests)

    def save_layer(self, index: int, tensors: dict[str, Tensor], report: dict,
                   activations: Sequence[Activations] | None) -> None:
        """Record layer `index` as finished, on disk before it returns (write_layer, then its commit)."""
        self.write_layer(index, tensors, report, activations)()

    def write_layer(self, index: int, tensors: dict[str, Tensor], report: dict,
                    activations: Sequence[Activations] | None) -> Callable[[], None]:
        """Record layer `index` as finished: its tensors and the next layer's inputs written (read from
        `activations` now, so the caller may change them once this returns), and this state updated; returns the
        commit, which makes it durable: both files synced to disk and renamed into place, then state.json, with
        the sha256 and size of both files and the base tensors the layer came from (note_base), then the layer's
        own inputs file kept as the spare (spare_file). The commit may run on another thread while the next
        layer computes; the next write_layer must wait for it. activations: the next layer's input streams
        (spill.Activations), saved one after another.

        A kill before or during the commit leaves the old state (redo this layer from its kept inputs), after it
        the new one (continue with the next layer's inputs): each layer's inputs live in their own file. Several
        processes commit together (collectives, so in the caller's thread): every process's files on disk, then
        process 0's state.json, then the old inputs given up.
        """
        from safetensors.torch import save_file

        if index != self.layers_done:
            raise QuantkitError(f"internal error: layer {index} saved after {self.layers_done} finished layers")
        main, ranks = self.ranks.is_main, self.ranks
        layer_file = self.layer_file(index)
        step: dict = {}
        if main:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(_temporary(layer_file)))
            step = _record_of(_temporary(layer_file))
        inputs_file = self.activations_file(index + 1)
        saved_inputs = None
        if activations is not None:
            if self.spare_file.is_file() and not self.spare_file.is_symlink():  # written over in place: a new
                # file's pages cost the file system several times more
                os.replace(self.spare_file, _temporary(inputs_file))
            saved_inputs = _save_batches(_temporary(inputs_file), activations)
        records = ranks.gathered(f"the save of layer {index}", saved_inputs)
        recorded = {name for done in self.steps for name in done.get("base", {})}
        step["base"] = {n: d for n, d in self._base_read.pop(index, {}).items() if n not in recorded}
        self.reports.append(report)
        self.steps.append(step)
        self.activations = [r for r in records if r is not None] if ranks.distributed and saved_inputs is not None \
            else saved_inputs
        state = json.dumps({"format": STATE_FORMAT, "fingerprint": self.fingerprint, "layers": self.reports,
                            "steps": self.steps, "activations": self.activations}, indent=1)

        def commit() -> None:
            if main:
                _make_durable(_temporary(layer_file), layer_file)
            if saved_inputs is not None:
                _make_durable(_temporary(inputs_file), inputs_file)
            ranks.barrier(f"the save of layer {index}")
            if main:
                _write_atomically(self.work / STATE, lambda p: p.write_text(state))
            ranks.barrier(f"the save of layer {index}")
            if self.activations_file(index).is_file():  # this layer's inputs are no longer needed: the next's file
                os.replace(self.activations_file(index), self.spare_file)
        return commit

    @property
    def spare_file(self) -> Path:
        """A finished layer's inputs file, kept to be written over by a later layer's (the same size)."""
        own = f".{self.ranks.rank}-of-{self.ranks.world}" if self.ranks.distributed else ""
        return self.work / f".activations{own}.spare"

    def activations_file(self, index: int) -> Path:
        """Where the inputs of layer `index` are saved (this process's share of them, in a run of several)."""
        own = f".{self.ranks.rank}-of-{self.ranks.world}" if self.ranks.distributed else ""
        return self.work / f"activations-{index:05d}{own}.safetensors"

    def load_activations(self, streams: Sequence[Activations]) -> None:
        """The saved inputs of layer `layers_done`, as the mini-batches they were, appended to `streams` (empty
        spill.Activations) in the order they were saved, an equal share each."""
        path = self.activations_file(self.layers_done)
        if self.own_activations is None:
            raise self._damaged(f"{self.work / STATE} records no saved inputs of layer {self.layers_done}")
        if not path.is_file():
            raise ResumeRefused(f"{path} is missing, so the run cannot resume; remove {self.work} to start over")
        try:
            _load_batches(path, streams)
        except (QuantkitError, OSError, ValueError, KeyError, TypeError) as e:
            raise ResumeRefused(f"{path} is damaged ({first_line(e)}), so the run cannot resume; remove {self.work} "
                                "to start over") from None

    def layer_tensors(self, index: int) -> dict[str, Tensor]:
        """Finished layer `index`'s tensors, its file checked against its recorded sha256 first (it is small, and
        read again from the page cache)."""
        from safetensors.torch import load_file

        self._check_file(self.layer_file(index), self.steps[index])
        return load_file(str(self.layer_file(index)))


def _save_batches(path: Path, streams: Sequence[Activations]) -> dict:
    """The mini-batches of each stream, one after another, as a safetensors file (batch.00000, ...), written
    one batch at a time: batches kept on disk are read back one by one, never all into memory at once. Returns
    the file's sha256 and size, hashed as it was written."""
    header: dict[str, dict] = {}
    offset = 0
    for stream in streams:
        for i in range(len(stream)):
            shape, dtype = stream.meta(i)
            size = math.prod(shape) * dtype.itemsize
            header[f"batch.{len(header):05d}"] = {"dtype": safetensors_dtype(dtype), "shape": list(shape),
                                                  "data_offsets": [offset, offset + size]}
            offset += size
    head = header_bytes(header)
    digest = hashlib.sha256(head)  # of the file, as it is written: an activations file can be GBs
    if path.is_symlink():  # quantkit's own name: never written through
        path.unlink()
    # an existing file (the spare) is written over, then cut to size
    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666), "r+b") as f:
        f.write(head)
        at = f.tell()
        for stream in streams:
            for batch in stream:
                data = batch.contiguous()
                write_tensor_at(f, at, data)
                digest.update(_raw_bytes(data))
                at += data.numel() * data.element_size()
        f.truncate(at)
    return {"sha256": digest.hexdigest(), "size": at}


def _load_batches(path: Path, streams: Sequence[Activations]) -> None:
    """Read what _save_batches wrote (a safetensors file) batch by batch into `streams`, an equal share each."""
    header = read_header(path)  # checked against the format: every entry's offsets lie within the file
    with open(path, "rb", buffering=0) as f:
        length = int.from_bytes(f.read(8), "little")
        names = sorted(header)
        if not names or len(names) % len(streams):
            raise ValueError(f"{len(names)} batches for {len(streams)} stream(s)")
        share = len(names) // len(streams)
        for k, name in enumerate(names):
            entry = header[name]
            streams[k // share].append(read_tensor_at(f, 8 + length + entry["data_offsets"][0], entry["shape"],
                                                      TORCH_DTYPES[entry["dtype"]]))
