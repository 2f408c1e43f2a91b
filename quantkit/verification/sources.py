"""Where verify reads each model's tensors: the base's checkpoint, a quantized checkpoint through its format's view,
or a GGUF file; and a float model filled from such a source, for the in-memory path."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantkit.errors import QuantkitError, first_line
from quantkit.formats.registry import GGUF, GGUF_SUFFIX, open_view
from quantkit.source.checkpoint import (
    CONFIG_NAME,
    SafetensorsCheckpoint,
    TensorReader,
    read_config_dict,
    resolve_model_dir,
)
from quantkit.source.hub import model_root
from quantkit.source.skeleton import (
    build_skeleton,
    checkpoint_key_renamer,
    checkpoint_names,
    is_conv1d,
    materialize,
)
from quantkit.untrusted import inside

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


def artifact_path(quantized: str) -> Path:
    """QUANTIZED as given: a .gguf file, a checkpoint directory / cached repo id, or a directory / cached repo id
    that holds one GGUF file and no config.json (a GGUF published in the hub cache), as that file (folder_gguf)."""
    if quantized.endswith(GGUF_SUFFIX):
        path = Path(quantized)
        if not path.is_file():
            raise QuantkitError(f"{quantized}: no such GGUF file")
        return path
    folder = resolve_model_dir(quantized)
    return folder_gguf(folder) or folder


def folder_gguf(folder: Path) -> Path | None:
    """The one .gguf file of `folder` when it holds no config.json; None when it holds a config.json or no GGUF
    file. Refused (one line) when it holds several, or when the file is a link leading outside the folder (for a
    hub-cache snapshot, outside its repo folder: source/hub.model_root)."""
    if (folder / CONFIG_NAME).exists():
        return None
    found = sorted(p for p in folder.iterdir() if p.suffix == GGUF_SUFFIX and p.is_file())
    if len(found) > 1:
        raise QuantkitError(f"{folder} holds {len(found)} GGUF files ({', '.join(p.name for p in found[:3])}"
                            f"{', ...' if len(found) > 3 else ''}) and no config.json; give the path of one")
    if not found:
        return None
    path = found[0]
    if path.is_symlink() and not inside(path, model_root(folder)):
        raise QuantkitError(f"{path} is a link to {path.resolve()}, outside the model; quantkit reads only files "
                            "that belong to it")
    return path


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
