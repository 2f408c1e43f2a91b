"""Finding and reading a base checkpoint: config.json plus safetensors shards, one tensor at a time."""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from quantkit.errors import QuantkitError
from quantkit.source.hub import cached_snapshot, hub_cache_dir, looks_like_repo_id
from quantkit.source.safetensors_header import read_header
from quantkit.untrusted import field, positive_int, read_json, relative_name

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
QUANTIZE_CONFIG_NAME = "quantize_config.json"  # AutoGPTQ's copy of the GPTQ settings; the only one in older repos
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class TensorSlice(Protocol):
    """safetensors' lazy view of one tensor: rows read from the mapping when indexed."""

    def __getitem__(self, rows: slice) -> Tensor: ...


class ShardHandle(Protocol):
    """An open safetensors shard (safetensors.safe_open), as this module reads it."""

    def get_tensor(self, name: str) -> Tensor: ...

    def get_slice(self, name: str) -> TensorSlice: ...


def resolve_model_dir(model: str) -> Path:
    """A local directory, or a repo id already in the local hub cache (never downloaded)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise QuantkitError(f"{model} is a file; pass the model directory that holds config.json")
    if looks_like_repo_id(model):
        snapshot = cached_snapshot(model)
        if snapshot is not None:
            return snapshot
    raise QuantkitError(f"model {model!r} not found: it is neither a directory nor a repo id in the local "
                        f"Hugging Face cache ({hub_cache_dir()})")


def read_config_dict(model_dir: Path) -> dict:
    """config.json as a JSON object whose quantization_config, when set, is an object too (every reader looks
    into it); see `read_config` for where that quantization_config may come from."""
    return read_config(model_dir)[0]


def read_config(model_dir: Path) -> tuple[dict, str | None]:
    """config.json as a JSON object, and the name of the file its quantization_config came from (None when the
    model is not quantized). A GPTQ checkpoint that keeps its settings only in quantize_config.json (AutoGPTQ,
    TheBloke's repositories) gets them from there (`read_quantize_config`), so that every reader sees one
    quantization_config."""
    cfg_path = model_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise QuantkitError(f"{model_dir} has no config.json; is it a Hugging Face model directory?")
    config = read_json(cfg_path, "config")
    if config.get("quantization_config") is not None:
        gptq_format_key(field(config, "quantization_config", dict, str(cfg_path)), cfg_path)
        return config, CONFIG_NAME if config["quantization_config"] else None
    if (model_dir / QUANTIZE_CONFIG_NAME).is_file():
        config["quantization_config"] = read_quantize_config(model_dir)
        return config, QUANTIZE_CONFIG_NAME
    return config, None


def read_quantize_config(model_dir: Path) -> dict:
    """quantize_config.json (AutoGPTQ's file, which describes GPTQ only) as a quantization_config: quant_method
    "gptq" where it names none, AutoGPTQ's `is_marlin_format` as the checkpoint_format "marlin" it means, and the
    format key as `gptq_format_key` reads it."""
    path = model_dir / QUANTIZE_CONFIG_NAME
    qcfg = read_json(path, QUANTIZE_CONFIG_NAME)
    qcfg.setdefault("quant_method", "gptq")
    if qcfg.get("is_marlin_format") is True:
        qcfg["checkpoint_format"] = "marlin"
    return gptq_format_key(qcfg, path)


def gptq_format_key(qcfg: dict, path: Path) -> dict:
    """qcfg, where a GPTQ config that spells its checkpoint format `format` (GPTQModel, which reads that key
    first) gets it as `checkpoint_format` too, the key quantkit reads; a config that spells it both ways must
    agree."""
    if qcfg.get("quant_method") == "gptq" and "format" in qcfg:
        stated = qcfg.setdefault("checkpoint_format", qcfg["format"])
        if stated != qcfg["format"]:
            raise QuantkitError(f"{path}: the quantization config says format {qcfg['format']!r} and "
                                f"checkpoint_format {stated!r}, which disagree")
    return qcfg


def read_index(model_dir: Path) -> dict[str, str] | None:
    """The weight map of model_dir's safetensors index (tensor name -> shard file name, a plain relative name), or
    None when there is no index. Whether the shards exist is the caller's to check."""
    index = model_dir / INDEX_NAME
    if not index.is_file():
        return None
    where = f"{index} is not a valid safetensors index"
    try:
        document = read_json(index, "safetensors index")
    except QuantkitError as e:
        raise QuantkitError(f"{where}: {e}") from None
    weight_map = field(document, "weight_map", dict, where)
    for name, filename in weight_map.items():
        relative_name(filename, f"{where}: tensor {name}")
    return weight_map


class TensorReader(Protocol):
    """Tensors by name, read one at a time: a checkpoint, or a view of a quantized one as its float tensors
    (formats/view.py). What the layer loaders (skeleton.materialize) read from."""

    def __contains__(self, name: str) -> bool: ...

    def names(self) -> list[str]: ...

    def get(self, name: str) -> Tensor: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def close(self) -> None: ...


class SafetensorsCheckpoint:
    """Name -> tensor access over a (possibly sharded) safetensors checkpoint; loads only what is asked for."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._headers: dict[str, dict] = {}
        self.weight_map = self._weight_map(model_dir)
        self._handles: dict[str, ShardHandle] = {}

    def _weight_map(self, model_dir: Path) -> dict[str, str]:
        """Tensor name -> file: the index's, or without one the single .safetensors file's, whatever its name
        (AutoGPTQ writes gptq_model-4bit-128g.safetensors), its header read and checked as every shard's is."""
        weight_map = read_index(model_dir)
        if weight_map is not None:
            missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
            if missing:
                raise QuantkitError(f"{model_dir / INDEX_NAME} names shard {missing[0]}, which is missing from "
                                    f"{model_dir}")
            return weight_map
        shards = sorted(model_dir.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise QuantkitError(f"{model_dir} holds only pickle weights ({pickles[0]}); quantkit never unpickles "
                                    "checkpoints. Convert them to safetensors first")
            raise QuantkitError(f"{model_dir} has no .safetensors weights")
        if len(shards) > 1:
            raise QuantkitError(f"{model_dir} has {len(shards)} safetensors files but no {INDEX_NAME}")
        return {name: shards[0].name for name in sorted(self.header(shards[0].name))}

    def header(self, filename: str) -> dict:
        """The header of one of the checkpoint's files, read once and checked (safetensors_header.read_header)."""
        if filename not in self._headers:
            self._headers[filename] = read_header(self.model_dir / filename)
        return self._headers[filename]

    def check_index(self) -> None:
        """Every tensor the index places in a shard is in that shard (headers only; no tensor data is read)."""
        by_file: dict[str, list[str]] = {}
        for name, filename in self.weight_map.items():
            by_file.setdefault(filename, []).append(name)
        for filename, names in by_file.items():
            present = self.header(filename)
            absent = [n for n in names if n not in present]
            if absent:
                raise self._misplaced(absent[0], filename, len(absent))

    def _misplaced(self, name: str, filename: str, count: int) -> QuantkitError:
        return QuantkitError(f"{self.model_dir / INDEX_NAME} places tensor {name} in {filename}, which does not "
                             f"contain it ({count} such tensor{'s' if count > 1 else ''})")

    def _entry(self, name: str) -> dict:
        """The header entry (dtype, shape, data_offsets) of tensor `name`."""
        if name not in self.weight_map:
            raise self._missing(name)
        filename = self.weight_map[name]
        header = self.header(filename)
        if name not in header:
            raise self._misplaced(name, filename, 1)
        return header[name]

    def _handle(self, filename: str) -> ShardHandle:
        if filename not in self._handles:
            self._handles[filename] = _open(self.model_dir / filename)
        return self._handles[filename]

    def _missing(self, name: str) -> QuantkitError:
        indexed = (self.model_dir / INDEX_NAME).is_file()
        where = f"{INDEX_NAME} does not list it" if indexed else "no weight file holds it"
        return QuantkitError(f"tensor {name} is missing from the checkpoint in {self.model_dir} ({where})")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> Tensor:
        return self._read(name, lambda handle: handle.get_tensor(name))

    def _read(self, name: str, read: Callable[[ShardHandle], Tensor]) -> Tensor:
        """read(handle of the shard holding `name`), its errors named after the tensor and the file."""
        if name not in self.weight_map:
            raise self._missing(name)
        filename = self.weight_map[name]
        try:
            return read(self._handle(filename))
        except Exception as e:  # safetensors raises its own error types for truncated or garbled data
            raise QuantkitError(f"cannot read tensor {name} from {self.model_dir / filename}: {e}") from None

    def get_as(self, name: str, dtype: torch.dtype, chunk_bytes: int = 8 << 20) -> Tensor:
        """Tensor `name` converted to `dtype`, read through the mapping a block of rows at a time and unmapped after
        each block. get(name).to(dtype) keeps every page read through the mapping resident beside the converted
        copy, which for a large embedding would set the peak of a whole quantize run while it is written out."""
        shape = self.shape(name)
        if len(shape) < 2:
            return self.get(name).to(dtype)
        out = torch.empty(shape, dtype=dtype)
        for start, block in self.blocks_as(name, dtype, chunk_bytes):
            out[start:start + len(block)] = block
        return out

    def blocks_as(self, name: str, dtype: torch.dtype, chunk_bytes: int = 8 << 20) -> Iterator[tuple[int, Tensor]]:
        """(first row, those rows converted to `dtype`) of tensor `name`, about chunk_bytes at a time, the mapping
        unmapped after each: a whole tensor looked at without it or its conversion ever held at once."""
        shape = self.shape(name)
        if len(shape) < 2:
            yield 0, self.get(name).to(dtype)
            return
        row_bytes = max(1, math.prod(shape[1:]) * max(dtype.itemsize, 4))
        step = max(1, chunk_bytes // row_bytes)
        for start in range(0, shape[0], step):
            block = self._read_rows(name, start, start + step)
            self.close()
            yield start, block.to(dtype)

    def _read_rows(self, name: str, start: int, stop: int) -> Tensor:
        return self._read(name, lambda handle: handle.get_slice(name)[start:stop])

    def is_floating(self, name: str) -> bool:
        """Whether tensor `name` holds floating-point numbers (F16, BF16, F32, F8_...; the header alone)."""
        return self._entry(name)["dtype"].startswith(("F", "BF"))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def close(self) -> None:
        self._handles.clear()


def _open(path: Path) -> ShardHandle:
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:
        raise QuantkitError(f"{path} is not a readable safetensors file: {e}") from None


def torch_dtype_of(config_dict: dict) -> torch.dtype:
    """config.json's dtype; float32 when it names none, or names something that is not a torch dtype."""
    name = config_dict.get("dtype") or config_dict.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).replace("torch.", ""), torch.float32)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


# config.json keys of the sizes a model skeleton is built from (GPT-2 spells two of them its own way), and the
# names that end a token embedding's weight in the supported architectures
_SKELETON_SIZES = {"num_hidden_layers": ("num_hidden_layers", "n_layer"), "hidden_size": ("hidden_size", "n_embd"),
                   "num_attention_heads": ("num_attention_heads", "n_head"), "vocab_size": ("vocab_size",)}
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "intermediate_size", "word_embed_proj_dim")
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "embed_in.weight")
_LAYER_INDEX = re.compile(r"(.+?)\.(\d+)\.")


def check_config_fits(config_dict: dict, checkpoint: SafetensorsCheckpoint) -> None:
    """config.json describes the weights beside it, checked from the tensor names and headers before any model
    is built from it (a lying num_hidden_layers or hidden_size would otherwise size the skeleton): its sizes are
    positive integers, the weights hold decoder layers numbered exactly 0..num_hidden_layers-1, and the
    token embedding is vocab_size x hidden_size (word_embed_proj_dim wide where the config sets it, as OPT's).
    The embedding is found by the names the supported architectures give it; other architectures (which verify's
    loaders may still read) get the size and layer checks only."""
    where = checkpoint.model_dir / "config.json"
    text = config_dict
    if config_dict.get("num_hidden_layers") is None and isinstance(config_dict.get("text_config"), dict):
        text = config_dict["text_config"]  # a composite model: its language model's sizes
    sizes, spelled = {}, {}
    for size, keys in _SKELETON_SIZES.items():
        spelled[size] = next((k for k in keys if text.get(k) is not None), keys[0])
        sizes[size] = positive_int(text, spelled[size], str(where))
    for key in _OPTIONAL_SIZES:
        if text.get(key) is not None:
            sizes[key] = positive_int(text, key, str(where))
    stacks: dict[str, set[int]] = {}  # "model.layers" -> the numbers N of the tensors named model.layers.N.*
    for name in checkpoint.names():
        match = _LAYER_INDEX.match(name)
        if match:
            stacks.setdefault(match.group(1), set()).add(int(match.group(2)))
    layers = sizes["num_hidden_layers"]
    if not any(len(found) == layers and min(found) == 0 and max(found) == layers - 1 for found in stacks.values()):
        prefix, found = max(stacks.items(), key=lambda item: len(item[1]), default=("layers", set()))
        held = f"{len(found)} numbered {min(found)} to {max(found)} ({prefix}.N)" if found else "none"
        raise QuantkitError(f"{where} says {spelled['num_hidden_layers']} is {layers}, but the weights in "
                            f"{checkpoint.model_dir} hold decoder layers {held}: config.json does not describe these "
                            "weights")
    embeddings = [n for n in checkpoint.names() if n.endswith(_EMBEDDING_SUFFIXES)]
    expected = (sizes["vocab_size"], sizes.get("word_embed_proj_dim", sizes["hidden_size"]))
    for name in embeddings:
        shape = checkpoint.shape(name)
        if shape != expected:
            raise QuantkitError(f"{where} implies a token embedding of {list(expected)} (vocab_size x hidden_size), "
                                f"but {name} is {list(shape)} in the checkpoint: config.json does not describe "
                                "these weights")
