"""The base model a run reads: its directory, config and checkpoint (opened and closed here, read through
resume.HashedReads), and its skeleton on the meta device with the decoder layers found in it."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from torch import nn

from quantkit.run.resume import HashedReads
from quantkit.source.checkpoint import SafetensorsCheckpoint, read_config_dict, resolve_model_dir
from quantkit.source.skeleton import (
    build_skeleton,
    check_tensors,
    checkpoint_names,
    decoder_layers,
    discarded_on_load,
    load_config,
    stored_tensors,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class Source:
    model: str  # as the caller named it: a directory or a repo id in the hub cache
    model_dir: Path
    config_dict: dict  # config.json as it is
    config: Any  # the transformers config made from it
    reads: HashedReads  # the checkpoint; each tensor read through `get` is hashed (what each saved step came from)

    @property
    def checkpoint(self) -> SafetensorsCheckpoint:
        """The checkpoint, read through `reads` (which forwards everything but `get` to the one it wraps)."""
        return cast(SafetensorsCheckpoint, self.reads)

    def unmap(self) -> None:
        """Drop the checkpoint's file mappings (reopened by the next read): pages read through them stop counting
        as this process's memory."""
        self.reads.close()

    def label(self) -> str:
        """The model as outputs name it: a repo id as given, a directory as its absolute path."""
        return self.model if not Path(self.model).is_dir() else str(Path(self.model).resolve())


@dataclass
class Skeleton:
    model: PreTrainedModel  # the transformers model on the meta device: modules get weights one at a time
    prefix: str  # the decoder layers' module path, e.g. "model.layers"
    layers: nn.ModuleList
    names: Callable[[str], str]  # module parameter name -> the checkpoint's name (skeleton.checkpoint_names)
    discarded: frozenset[str] = frozenset()  # base tensors transformers drops on load (skeleton.discarded_on_load)

    def output_name(self, i: int, linear: str) -> str:
        """Layer i's Linear `linear` (named within the layer) as the checkpoint names it, e.g. Mixtral's
        model.layers.0.block_sparse_moe.experts.3.w1: packed tensors keep the base checkpoint's names."""
        return self.names(f"{self.prefix}.{i}.{linear}.weight").removesuffix(".weight")

    def name_in_layer(self, i: int, linear: str) -> str:
        """output_name within the layer (block_sparse_moe.experts.3.w1): how reports and quantization_config's
        modules_in_block_to_quantize name a Linear."""
        return self.output_name(i, linear).removeprefix(f"{self.prefix}.{i}.")


@contextlib.contextmanager
def opened(model: str) -> Iterator[Source]:
    """The base model `model` (a directory or a cached repo id), its checkpoint closed when the block ends."""
    model_dir = resolve_model_dir(model)
    config_dict = read_config_dict(model_dir)
    config = load_config(model_dir, config_dict)
    checkpoint = SafetensorsCheckpoint(model_dir)
    try:
        yield Source(model, model_dir, config_dict, config, HashedReads(checkpoint))
    finally:
        checkpoint.close()


def skeleton_of(source: Source) -> Skeleton:
    model = build_skeleton(source.config)
    prefix, layers = decoder_layers(model, source.config.num_hidden_layers)
    names = source.checkpoint.names()
    return Skeleton(model, prefix, layers, checkpoint_names(model, names), discarded_on_load(model, names))


def check_layer_tensors(source: Source, skeleton: Skeleton) -> None:
    """Every tensor the decoder layers read is where the index says and of the shape the config implies (headers
    only): a missing, misplaced or misshapen tensor fails now, not hours later at its layer."""
    source.checkpoint.check_index()
    for i, layer in enumerate(skeleton.layers):
        check_tensors(layer, f"{skeleton.prefix}.{i}", source.checkpoint, skeleton.names)


def layer_tensor_names(source: Source, skeleton: Skeleton) -> list[list[str]]:
    """The base tensors each decoder layer reads."""
    return [[full for _, full, _, _ in stored_tensors(layer, f"{skeleton.prefix}.{i}", source.checkpoint,
                                                      skeleton.names)]
            for i, layer in enumerate(skeleton.layers)]
