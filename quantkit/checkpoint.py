"""Finding and reading a base checkpoint: config.json plus safetensors shards, one tensor at a time."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .errors import QuantkitError
from .hub import cached_snapshot, hub_cache_dir, looks_like_repo_id

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise QuantkitError(f"{model_dir} has no config.json; is it a Hugging Face model directory?")
    try:
        return json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantkitError(f"{cfg_path} is not valid JSON: {e}") from None


class SafetensorsCheckpoint:
    """Name -> tensor access over a (possibly sharded) safetensors checkpoint; loads only what is asked for."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.weight_map = self._weight_map(model_dir)
        self._handles: dict[str, object] = {}

    @staticmethod
    def _weight_map(model_dir: Path) -> dict[str, str]:
        index = model_dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise QuantkitError(f"{index} is not a valid safetensors index: {e}") from None
            missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
            if missing:
                raise QuantkitError(f"{index} names shard {missing[0]}, which is missing from {model_dir}")
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
        return {name: shards[0].name for name in _open(shards[0]).keys()}

    def check_index(self) -> None:
        """Every tensor the index places in a shard is in that shard (headers only; no tensor data is read)."""
        by_file: dict[str, list[str]] = {}
        for name, filename in self.weight_map.items():
            by_file.setdefault(filename, []).append(name)
        for filename, names in by_file.items():
            present = set(self._handle(filename).keys())
            absent = [n for n in names if n not in present]
            if absent:
                raise QuantkitError(f"{self.model_dir / INDEX_NAME} places tensor {absent[0]} in {filename}, which does not "
                                    f"contain it ({len(absent)} such tensor{'s' if len(absent) > 1 else ''})")

    def _handle(self, filename: str):
        if filename not in self._handles:
            self._handles[filename] = _open(self.model_dir / filename)
        return self._handles[filename]

    def _missing(self, name: str) -> QuantkitError:
        where = f"{INDEX_NAME} does not list it" if (self.model_dir / INDEX_NAME).is_file() else "no weight file holds it"
        return QuantkitError(f"tensor {name} is missing from the checkpoint in {self.model_dir} ({where})")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> Tensor:
        return self._read(name, lambda handle: handle.get_tensor(name))

    def _read(self, name: str, read):
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
        copy: SmolLM2's float32 embedding (113 MB) set the peak of a whole quantize run while it was written out."""
        shape = self.shape(name)
        if len(shape) < 2:
            return self.get(name).to(dtype)
        out = torch.empty(shape, dtype=dtype)
        row_bytes = max(1, out[0].numel() * max(out.element_size(), 4))
        step = max(1, chunk_bytes // row_bytes)
        for start in range(0, shape[0], step):
            out[start:start + step] = self._read(name, lambda handle: handle.get_slice(name)[start:start + step])
            self.close()
        return out

    def is_floating(self, name: str) -> bool:
        """Whether tensor `name` holds floating-point numbers (F16, BF16, F32, F8_...; the header alone)."""
        return self._read(name, lambda handle: handle.get_slice(name).get_dtype()).startswith(("F", "BF"))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._read(name, lambda handle: handle.get_slice(name).get_shape()))

    def close(self) -> None:
        self._handles.clear()


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:
        raise QuantkitError(f"{path} is not a readable safetensors file: {e}") from None


def torch_dtype_of(config_dict: dict) -> torch.dtype:
    name = config_dict.get("dtype") or config_dict.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)
