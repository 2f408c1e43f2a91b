"""A GGUF file written for llama.cpp, streamed: tensors declared, then header and metadata, then one tensor at a time.

`GGUFFileWriter` takes every tensor's name, element shape and ggml type first, so the size of each and the tensor
table are known before anything is written; `start` writes the header, the metadata (`kv`, gguf-py's GGUFWriter,
filled by write/gguf_model.py's and write/gguf_vocab.py's functions) and the tensor table; `write` then takes each
tensor's data in the declared order, one at a time, checked against its declared type, shape and byte count
before gguf-py writes it (aligned as GGUF requires). A model's tensors are never all in memory. Quantized tensors
arrive as uint8 [rows, row bytes] in their ggml type's block layout, unquantized ones as float32 (F32) or float16
(F16) arrays. A file not finished (an error, or a tensor never written) is deleted.

`GGUFFileWriter.for_model` starts one for a model: metadata, tokenizer and the tensors llama.cpp generates from
the config. `write_float_gguf` writes a whole float checkpoint this way (F32, or F16 with norms, biases and other
1-D tensors F32 as llama.cpp's converter keeps them), reading one checkpoint tensor at a time; `tensor_plan` is
which checkpoint tensor becomes which GGUF tensor, for any writer of a model. The model's layout (architecture, names,
q/k permutation, metadata) is write/gguf_model.py's; its names are re-exported here.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
import torch

from quantkit.errors import QuantkitError
from quantkit.source.checkpoint import SafetensorsCheckpoint, read_config_dict
from quantkit.write.gguf_mix import BLOCK_ELEMENTS, file_type_id, kept_unquantized
from quantkit.write.gguf_model import HEAD, add_model_metadata, extra_tensors, model_shape
from quantkit.write.gguf_model import gguf_architecture as gguf_architecture
from quantkit.write.gguf_model import gguf_tensor_name as gguf_tensor_name
from quantkit.write.gguf_model import rows_permutation as rows_permutation
from quantkit.write.gguf_vocab import add_tokenizer

if TYPE_CHECKING:
    from gguf import GGUFWriter

log = logging.getLogger("quantkit")

FLOAT_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16"}  # write_float_gguf's dtypes -> gguf.LlamaFileType
NUMPY_DTYPES: dict[str, np.dtype] = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16)}
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16}
QUANTIZED_DTYPE: np.dtype = np.dtype(np.uint8)
EMBEDDINGS = "token_embd.weight"
NAME_KEY = "_model_name_or_path"  # where transformers' GGUF import keeps general.name in config.json
_NUMBER = re.compile(r"(\d+)")


@dataclass(frozen=True)
class Declared:
    """A tensor of the file: element shape in numpy order ([out, in]), ggml type, and the array it arrives as."""
    name: str
    shape: tuple[int, ...]
    type_name: str
    data_shape: tuple[int, ...]
    nbytes: int


def data_shape(shape: Sequence[int], type_name: str) -> tuple[int, ...]:
    """The array shape a tensor of element shape `shape` arrives in: the elements for F32/F16, bytes per row
    (uint8) for block-quantized types."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if type_name in NUMPY_DTYPES:
        return tuple(shape)
    if type_name not in BLOCK_ELEMENTS:
        raise QuantkitError(f"unknown ggml type {type_name!r}; the GGUF writer takes "
                            f"{', '.join([*NUMPY_DTYPES, *BLOCK_ELEMENTS])}")
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    if not shape or shape[-1] % block:
        raise QuantkitError(f"a {type_name} tensor needs rows that are a multiple of {block} elements; got shape "
                            f"{list(shape)}")
    return (*shape[:-1], shape[-1] // block * block_bytes)


class GGUFFileWriter:
    """One GGUF file, streamed (see the module docstring): declare every tensor, fill `kv`, `start`, `write` each
    tensor in order, `finish`. As a context manager it deletes the file when the block fails or leaves it
    unfinished."""

    def __init__(self, path: str | Path, arch: str) -> None:
        from gguf import GGUFWriter

        self.path = Path(path)
        self._gguf = GGUFWriter(None, arch)
        self._declared: list[Declared] = []
        self._names: set[str] = set()
        self._given: dict[str, np.ndarray] = {}
        self._next = 0
        self._started = False
        self._finished = False

    @classmethod
    def for_model(cls, path: str | Path, config: dict, model_dir: Path, file_type: str, *,
                  name: str | None = None) -> GGUFFileWriter:
        """A writer for the model `config` describes (its tokenizer in `model_dir`) as a `file_type` file (one of
        gguf_mix.FILE_TYPES, or F32/F16): its metadata and tokenizer added, and the tensors llama.cpp generates
        from the config (rope_freqs) declared first with their data, written by `start`."""
        from gguf import LlamaFileType

        arch = gguf_architecture(config)
        type_id = int(LlamaFileType[FLOAT_FILE_TYPES[file_type]]) if file_type in FLOAT_FILE_TYPES \
            else file_type_id(file_type)
        writer = cls(path, arch)
        add_model_metadata(writer.kv, config, name=name or model_name(config, Path(model_dir)), file_type=type_id)
        add_tokenizer(writer.kv, Path(model_dir), config, arch)
        for tensor, values in extra_tensors(config).items():
            writer.declare(tensor, values.shape, "F32", data=values)
        return writer

    @property
    def kv(self) -> GGUFWriter:
        """gguf-py's writer, for the metadata keys (its add_* methods); only before `start`."""
        if self._started:
            raise QuantkitError(f"{self.path}: metadata added after the header was written")
        return self._gguf

    def declare(self, name: str, shape: Sequence[int], type_name: str, data: np.ndarray | None = None) -> Declared:
        """Tensor `name` of element shape `shape` (numpy order) and ggml type `type_name`, written later by `write`,
        or, given its (small) `data` now, written by the writer itself when its turn comes."""
        from gguf import GGMLQuantizationType

        if self._started:
            raise QuantkitError(f"{self.path}: tensor {name!r} declared after the header was written")
        if name in self._names:
            raise QuantkitError(f"{self.path}: tensor {name!r} declared twice")
        if not shape or any(not isinstance(d, (int, np.integer)) or d < 1 for d in shape):
            raise QuantkitError(f"{self.path}: tensor {name!r} has shape {list(shape)}, not positive sizes")
        shape = tuple(int(d) for d in shape)
        array_shape = data_shape(shape, type_name)
        dtype = NUMPY_DTYPES.get(type_name, QUANTIZED_DTYPE)
        entry = Declared(name, tuple(shape), type_name, array_shape, math.prod(array_shape) * dtype.itemsize)
        # gguf reads `shape` as elements because the dtype given is not uint8; the raw type is the ggml type
        self._gguf.add_tensor_info(name, entry.shape, np.dtype(np.float32), entry.nbytes,
                                   raw_dtype=GGMLQuantizationType[type_name])
        self._declared.append(entry)
        self._names.add(name)
        if data is not None:
            self._check(entry, data)
            self._given[name] = data
        return entry

    def start(self) -> None:
        """Write the header, the metadata and the tensor table."""
        if self._started:
            raise QuantkitError(f"{self.path}: the header is already written")
        self._started = True
        try:
            self._gguf.write_header_to_file(path=self.path)
            self._gguf.write_kv_data_to_file()
            self._gguf.write_ti_data_to_file()
        except OSError as e:
            raise QuantkitError(f"cannot write {self.path}: {e.strerror or e}") from None
        self._write_given()

    def write(self, name: str, data: np.ndarray) -> None:
        """The next declared tensor's data: it must be `name`, in its declared dtype, shape and size."""
        if not self._started or self._next >= len(self._declared):
            state = "before the header was written" if not self._started else "after every declared tensor"
            raise QuantkitError(f"{self.path}: tensor {name!r} written {state}")
        entry = self._declared[self._next]
        if name != entry.name:
            raise QuantkitError(f"{self.path}: tensor {name!r} written where {entry.name!r} was declared next")
        self._check(entry, data)
        self._put(data)
        self._write_given()

    def _check(self, entry: Declared, data: np.ndarray) -> None:
        expected = NUMPY_DTYPES.get(entry.type_name, QUANTIZED_DTYPE)
        if data.dtype != expected or tuple(data.shape) != entry.data_shape or data.nbytes != entry.nbytes:
            raise QuantkitError(f"{self.path}: tensor {entry.name!r} arrived as {data.dtype} {list(data.shape)} "
                                f"({data.nbytes} bytes); its {entry.type_name} declaration needs {expected} "
                                f"{list(entry.data_shape)} ({entry.nbytes} bytes)")

    def _put(self, data: np.ndarray) -> None:
        try:
            self._gguf.write_tensor_data(np.ascontiguousarray(data))
        except OSError as e:
            raise QuantkitError(f"cannot write {self.path}: {e.strerror or e}") from None
        self._next += 1

    def _write_given(self) -> None:
        """The tensors whose data came with their declaration, while they are next."""
        while self._next < len(self._declared) and self._declared[self._next].name in self._given:
            self._put(self._given.pop(self._declared[self._next].name))

    def finish(self) -> Path:
        """Every declared tensor written: flush, sync and close the file."""
        if not self._started or self._next != len(self._declared):
            missing = self._declared[self._next].name if self._started else "the header"
            raise QuantkitError(f"{self.path} is unfinished: {missing} was never written")
        try:
            fout = self._gguf.fout
            if fout is not None:
                for f in fout:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            raise QuantkitError(f"cannot write {self.path}: {e.strerror or e}") from None
        self.close()
        self._finished = True
        return self.path

    def close(self) -> None:
        self._gguf.close()

    def __enter__(self) -> GGUFFileWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
        if not self._finished and self._started:
            self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Planned:
    """Checkpoint tensor `hf_name` written as GGUF tensor `gguf_name` of element shape `shape`."""
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]


def tensor_plan(config: dict, checkpoint: SafetensorsCheckpoint) -> list[Planned]:
    """Which checkpoint tensor becomes which GGUF tensor (headers only), in layer order; dropped tensors left out.
    A config that does not tie the head needs the checkpoint's lm_head."""
    shape = model_shape(config)
    planned: list[Planned] = []
    for name in checkpoint.names():
        gguf_name = gguf_tensor_name(name, config)
        if gguf_name is None:
            continue
        if not checkpoint.is_floating(name):
            raise QuantkitError(f"{checkpoint.model_dir}: tensor {name} is not floating point; a float model's GGUF "
                                "cannot hold it")
        planned.append(Planned(name, gguf_name, checkpoint.shape(name)))
    names = {p.gguf_name for p in planned}
    if EMBEDDINGS not in names:
        raise QuantkitError(f"{checkpoint.model_dir} holds no token embeddings (model.embed_tokens.weight)")
    if not shape.tied and HEAD not in checkpoint:
        raise QuantkitError(f"{checkpoint.model_dir}: config.json does not tie the output head to the embeddings, "
                            f"and the checkpoint holds no {HEAD}")
    return sorted(planned, key=lambda p: [int(t) if t.isdigit() else t for t in _NUMBER.split(p.gguf_name)])


def float_type(gguf_name: str, shape: Sequence[int], dtype: str) -> str:
    """The type llama.cpp's converter gives a tensor of a `dtype` (F32/F16) file: F32 for what it keeps F32."""
    return "F32" if kept_unquantized(gguf_name, len(shape)) else dtype


def model_name(config: dict, model_dir: Path) -> str:
    """`general.name`: the name a GGUF import kept in config.json, else the model directory's name."""
    kept = config.get(NAME_KEY)
    return kept if isinstance(kept, str) and kept.strip() else model_dir.resolve().name


def write_float_gguf(model_dir: str | Path, out_path: str | Path, dtype: str = "F16", *,
                     overwrite: bool = False) -> Path:
    """The float model in `model_dir` as the GGUF file `out_path` (`dtype` F32 or F16), with llama.cpp's
    metadata, tokenizer, names and q/k order; one checkpoint tensor in memory at a time."""
    model_dir, out = Path(model_dir), Path(out_path)
    if dtype not in FLOAT_FILE_TYPES:
        raise QuantkitError(f"unknown GGUF float type {dtype!r}; choose one of {', '.join(FLOAT_FILE_TYPES)}")
    if out.exists() and (out.is_dir() or not overwrite):
        raise QuantkitError(f"{out} already exists; choose a new file name" + ("" if out.is_dir() else
                                                                               " or pass overwrite"))
    config = read_config_dict(model_dir)
    if config.get("quantization_config"):
        raise QuantkitError(f"{model_dir} holds a quantized model; write_float_gguf writes float checkpoints")
    checkpoint = SafetensorsCheckpoint(model_dir)
    plan = tensor_plan(config, checkpoint)
    with GGUFFileWriter.for_model(out, config, model_dir, dtype) as writer:
        types = {p.gguf_name: writer.declare(p.gguf_name, p.shape, float_type(p.gguf_name, p.shape, dtype)).type_name
                 for p in plan}
        writer.start()
        for p in plan:
            tensor = checkpoint.get_as(p.hf_name, TORCH_DTYPES[types[p.gguf_name]])
            rows = rows_permutation(p.hf_name, config)
            writer.write(p.gguf_name, (tensor if rows is None else tensor[rows]).numpy())
            del tensor
        path = writer.finish()
    checkpoint.close()
    log.info("wrote %s (%d tensors from %s)", path, len(plan), model_dir)
    return path
