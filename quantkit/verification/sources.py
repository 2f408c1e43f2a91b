"""Where verify reads each model's tensors: the base's checkpoint, a quantized checkpoint through its format's view,
or a GGUF file; and a float model filled from such a source, for the in-memory path."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantkit.errors import QuantkitError, first_line
from quantkit.formats.registry import GGUF, GGUF_SUFFIX, open_view
from quantkit.source.checkpoint import SafetensorsCheckpoint, TensorReader, read_config_dict, resolve_model_dir
from quantkit.source.skeleton import (
    build_skeleton,
    checkpoint_key_renamer,
    checkpoint_names,
    is_conv1d,
    materialize,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


def artifact_path(quantized: str) -> Path:
    """QUANTIZED as given: a .gguf file, or a checkpoint directory / cached repo id."""
    if quantized.endswith(GGUF_SUFFIX):
        path = Path(quantized)
        if not path.is_file():
            raise QuantkitError(f"{quantized}: no such GGUF file")
        return path
    return resolve_model_dir(quantized)


def model_config(model_dir: Path) -> PretrainedConfig:
    """The transformers config of a checkpoint directory, without its quantization_config (quantkit's loaders
    build the unquantized model and read the quantized tensors themselves)."""
    from transformers import AutoConfig

    read_config_dict(model_dir)  # checked as untrusted JSON before transformers reads it
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:
        raise QuantkitError(f"cannot read {model_dir}/config.json: {first_line(e)}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def open_source(path: Path, fmt: str | None, model: PreTrainedModel) -> TensorReader:
    """The tensors of the artifact at `path` in format `fmt` (None: unquantized) as `model` (its skeleton) names
    them: quantized Linears dequantized to float32 when read."""
    if fmt is None:
        return SafetensorsCheckpoint(path)
    if fmt == GGUF:
        from quantkit.formats.gguf import open_gguf

        return open_gguf(path, model.config)
    rename = checkpoint_key_renamer(model)

    def transposed(module: str) -> bool:
        try:
            return is_conv1d(model.get_submodule(rename(f"{module}.weight").removesuffix(".weight")))
        except AttributeError:
            return False
    return open_view(path, fmt, transposed)


def load_float(config: PretrainedConfig, path: Path, fmt: str | None) -> PreTrainedModel:
    """The whole model in memory with float32 weights read from its source (open_source)."""
    model = build_skeleton(config)
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    if tied:
        model.tie_weights()  # one tensor for both: the checkpoint holds it once, under the embedding's name
    source = open_source(path, fmt, model)
    try:
        materialize(model, "", source, torch.device("cpu"), torch.float32, checkpoint_names(model, source.names()))
    finally:
        source.close()
    if tied:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise QuantkitError(f"{path}: no tensor for {missing[0]}")
    return model


def float_bytes(config: PretrainedConfig) -> int:
    """Bytes the model's weights take in float32 (from its skeleton; nothing is loaded)."""
    model = build_skeleton(config)
    return sum(p.numel() for p in model.parameters()) * 4
