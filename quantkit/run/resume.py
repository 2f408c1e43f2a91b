"""Checkpoints of a running quantization in its work directory, so a killed run continues where it stopped.

Layout of the work directory (every file written under a temporary name, then renamed):
  state.json                  fingerprint of the run, the reports of the finished layers and, per finished
                              step, the sha256 and size of its file and the sha256 of each base tensor it was
                              computed from; the sha256 and size of the activations file (written last)
  layers/layer-00012.safetensors   the packed tensors of finished layer 12
  activations-00013.safetensors    the calibration activations entering layer 13 (the next one)
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
from quantkit.run.step_report import EXPERT_FIELDS, REPORT_FIELDS, REPORT_REQUIRED
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
    and every file it names checked, before anything uses it; `check_base` checks the base model against it."""

    def __init__(self, work: Path, fingerprint: str) -> None:
        self.work, self.fingerprint = Path(work), fingerprint
        self.reports: list[dict] = []
        self.steps: list[dict] = []  # per finished step: its file's sha256 and size, and its base tensors' sha256s
        self.activations: dict | None = None  # sha256 and size of the saved inputs of step layers_done
        self._base_read: dict[int, dict[str, str]] = {}  # note_base's, until their step is saved
        state = self.work / STATE
        if state.exists() or state.is_symlink():
            saved = self._read(state)
            if saved["fingerprint"] != fingerprint:
                raise ResumeRefused(f"{self.work} holds an unfinished run of a different model, settings or "
                                    "calibration; remove that directory to start over, or rerun the original "
                                    "command to resume it")
            self.reports, self.steps, self.activations = saved["layers"], saved["steps"], saved.get("activations")
            for i, step in enumerate(self.steps):
                self._check_file(self.layer_file(i), step)
            if self.activations is not None:
                self._check_file(self.activations_file(self.layers_done), self.activations)
        (self.work / "layers").mkdir(parents=True, exist_ok=True)

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
                _check_report({f"layers[{i}]": report}, i, where)
                step = field({f"steps[{i}]": step}, f"steps[{i}]", dict, where)
                file_record(step, f"{where}: steps[{i}]")
                for name, digest in field(step, "base", dict, f"{where}: steps[{i}]").items():
                    sha256_digest(digest, f"{where}: steps[{i}]: base tensor {name}")
            if saved.get("activations") is not None:
                file_record(field(saved, "activations", dict, where), f"{where}: activations")
        except QuantkitError as e:
            raise self._damaged(str(e)) from None
        return saved

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
        the new one (continue with the next layer's inputs): each layer's inputs live in their own file.
        """
        from safetensors.torch import save_file

        if index != self.layers_done:
            raise QuantkitError(f"internal error: layer {index} saved after {self.layers_done} finished layers")
        layer_file = self.layer_file(index)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(_temporary(layer_file)))
        step = _record_of(_temporary(layer_file))
        inputs_file = self.activations_file(index + 1)
        saved_inputs = None
        if activations is not None:
            if self.spare_file.is_file() and not self.spare_file.is_symlink():  # written over in place: a new
                # file's pages cost the file system several times more
                os.replace(self.spare_file, _temporary(inputs_file))
            saved_inputs = _save_batches(_temporary(inputs_file), activations)
        recorded = {name for done in self.steps for name in done["base"]}
        step["base"] = {n: d for n, d in self._base_read.pop(index, {}).items() if n not in recorded}
        self.reports.append(report)
        self.steps.append(step)
        self.activations = saved_inputs
        state = json.dumps({"format": STATE_FORMAT, "fingerprint": self.fingerprint, "layers": self.reports,
                            "steps": self.steps, "activations": self.activations}, indent=1)

        def commit() -> None:
            _make_durable(_temporary(layer_file), layer_file)
            if saved_inputs is not None:
                _make_durable(_temporary(inputs_file), inputs_file)
            _write_atomically(self.work / STATE, lambda p: p.write_text(state))
            if self.activations_file(index).is_file():  # this layer's inputs are no longer needed: the next's file
                os.replace(self.activations_file(index), self.spare_file)
        return commit

    @property
    def spare_file(self) -> Path:
        """A finished layer's inputs file, kept to be written over by a later layer's (the same size)."""
        return self.work / ".activations.spare"

    def activations_file(self, index: int) -> Path:
        return self.work / f"activations-{index:05d}.safetensors"

    def load_activations(self, streams: Sequence[Activations]) -> None:
        """The saved inputs of layer `layers_done`, as the mini-batches they were, appended to `streams` (empty
        spill.Activations) in the order they were saved, an equal share each."""
        path = self.activations_file(self.layers_done)
        if self.activations is None:
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


def _check_report(holder: dict, index: int, where: str) -> None:
    """A finished layer's report (the only value of `holder`, keyed by where it is in state.json) holds the
    fields a layer report has, of their types, numbers in its tables, and its own index."""
    key = next(iter(holder))
    report = field(holder, key, dict, where)
    at = f"{where}: {key}"
    for name in REPORT_REQUIRED:
        field(report, name, REPORT_FIELDS[name], at)
    for name, value in report.items():
        if name not in REPORT_FIELDS:
            raise QuantkitError(f"{at}: {name!r} is not a field of a layer's report")
        field(report, name, REPORT_FIELDS[name], at)
        if name == "experts":
            for block in value:
                _check_expert_record(field(value, block, dict, f"{at}: experts"), f"{at}: experts: {block}")
        elif isinstance(value, dict):
            for entry in value:
                field(value, entry, (int, float), f"{at}: {name}")
    if report["index"] != index:
        raise QuantkitError(f"{at}: 'index' is {report['index']}, expected {index}")


def _check_expert_record(record: dict, at: str) -> None:
    """One MoE block's record in a report (step_report.EXPERT_FIELDS): its fields, counts and expert indices."""
    if set(record) != set(EXPERT_FIELDS):
        raise QuantkitError(f"{at}: fields are {sorted(record)}, expected {sorted(EXPERT_FIELDS)}")
    for key, kind in EXPERT_FIELDS.items():
        field(record, key, kind, at)
    n = record["experts"]
    tokens, indices = record["tokens"], record["rounded"] + record["skipped"]
    if not all(type(v) is int and v >= 0 for v in (n, record["min_tokens"], *tokens)) or len(tokens) != n \
            or not all(type(e) is int and 0 <= e < n for e in indices):
        raise QuantkitError(f"{at}: expected {n} token counts and expert indices below {n}")


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
