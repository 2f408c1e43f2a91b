"""A GGUF output assembled from the finished steps: every tensor's GGUF name, type and size planned first (the
file's header lists them), then llama.cpp's metadata and tokenizer, then the tensors one at a time. The decoder
layers' Linears come as the steps stored their blocks; the other tensors are read from the base, the 2-D ones
rounded to nearest onto llama.cpp's grid for the type the mix gives them (llama-quantize does the same)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantkit import __version__
from quantkit.config import CalibSpec, QuantSpec
from quantkit.errors import QuantkitError
from quantkit.run.assemble import tokenizer_copy
from quantkit.run.gguf_output import BLOCKS_SUFFIX, TYPE_SUFFIX, GGUFLayout
from quantkit.run.model import Skeleton, Source
from quantkit.run.resume import RunState
from quantkit.run.step_report import without_timings
from quantkit.solve.ggml_grids import GGML_TYPES, choose_grid, nearest_codes
from quantkit.source.experts import expert_blocks
from quantkit.source.skeleton import linear_modules, weight_matrix
from quantkit.untrusted import sha256_file
from quantkit.write.ggml_blocks import pack
from quantkit.write.gguf_file import TORCH_DTYPES, GGUFFileWriter, model_name, rows_permutation, tensor_plan
from quantkit.write.manifest import MANIFEST_NAME, write_manifest
from quantkit.write.model_card import render_gguf_card

TYPE_NAMES = {t.type_id: name for name, t in GGML_TYPES.items()}  # a step's stored type id -> its name


@dataclass(frozen=True)
class Planned:
    """One tensor of the file: where it comes from and how it is stored."""
    source: str  # the base checkpoint's tensor name
    name: str  # its GGUF name
    shape: tuple[int, ...]  # as the checkpoint holds it ([out, in] for a Linear)
    ggml: str  # a GGML_TYPES name, or F32/F16
    step: int | None = None  # the step whose blocks it is (None: read from the base)


def check_gguf_layer(layout: GGUFLayout, spec: QuantSpec, where: str, layer: nn.Module) -> None:
    """A decoder layer a GGUF output can hold: no Mixture-of-Experts block, and rows that fit llama.cpp's blocks."""
    if expert_blocks(layer):
        raise QuantkitError(f"{where} holds Mixture-of-Experts experts; quantkit writes GGUF files for dense models "
                            "(use --format gptq for this one)")
    shapes = {n: (weight_matrix(m).shape[0], weight_matrix(m).shape[1]) for n, m in linear_modules(layer).items()}
    layout.check_linears(where, shapes, spec)


def check_gguf_model(source: Source, skeleton: Skeleton, layout: GGUFLayout, spec: QuantSpec) -> None:
    """Before any work: every tensor of the file has its GGUF name and a type llama.cpp's blocks hold, and the
    metadata and tokenizer can be written (a tokenizer llama.cpp's files cannot hold, a rope kind it does not
    read): what write_gguf_output would refuse after the last layer, refused first."""
    _plan(source, skeleton, layout, spec, state=None)
    with tokenizer_copy(source.model_dir, source.config_dict) as tokenizer_dir:
        GGUFFileWriter.for_model(Path(os.devnull), source.config_dict, tokenizer_dir, layout.file_type,
                                 name=model_name(source.config_dict, source.model_dir)).close()


def write_gguf_output(source: Source, state: RunState, skeleton: Skeleton, layout: GGUFLayout, path: Path,
                      with_side_files: bool, calib: CalibSpec, repo_id: str | None, spec: QuantSpec) -> dict[str, str]:
    """The .gguf file at `path` (in staging), and with_side_files (a hub-cache output) a model card and quantkit's
    manifest beside it; returns the sha256 of every file in its folder that the output holds."""
    plan = _plan(source, skeleton, layout, spec, state)
    name = model_name(source.config_dict, source.model_dir)
    with tokenizer_copy(source.model_dir, source.config_dict) as tokenizer_dir, \
            GGUFFileWriter.for_model(path, source.config_dict, tokenizer_dir, layout.file_type, name=name) as writer:
        for t in plan:
            writer.declare(t.name, t.shape, t.ggml)
        writer.start()
        for t, data in zip(plan, _tensor_bytes(plan, source, state, layout)):
            writer.write(t.name, data)
        writer.finish()
    source.unmap()
    hashes = {path.name: sha256_file(path)}
    if not with_side_files:
        return hashes
    card = path.parent / "README.md"
    card.write_text(render_gguf_card(repo_id=repo_id, source=source.label(), spec=spec, calib=calib,
                                     version=__version__, file_name=path.name, size_bytes=path.stat().st_size,
                                     types=_type_counts(plan)))
    hashes[card.name] = sha256_file(card)
    hashes[MANIFEST_NAME] = write_manifest(
        path.parent, source=source.label(), model_type=source.config_dict.get("model_type"), spec=spec, calib=calib,
        compute=None, layers=[without_timings(r) for r in state.reports], hashes=hashes)
    return hashes


def _plan(source: Source, skeleton: Skeleton, layout: GGUFLayout, spec: QuantSpec,
          state: RunState | None) -> list[Planned]:
    """Every tensor of the file in llama.cpp's layer order (write/gguf_file.tensor_plan), typed as the mix gives
    them (F16 for Linears --skip keeps); with the run's state, which step holds each quantized Linear's blocks
    (its report names them)."""
    from_steps: dict[str, int] = {}  # base tensor -> the step whose blocks it is
    for i, report in enumerate(state.reports if state is not None else []):
        from_steps.update({f"{skeleton.prefix}.{i}.{linear}.weight": i for linear in report["losses"]})
    plan = []
    for p in tensor_plan(layout.config, source.checkpoint):
        if p.hf_name in skeleton.discarded:
            continue
        in_layer = p.hf_name.startswith(f"{skeleton.prefix}.")
        ggml = "F16" if in_layer and _skipped(p.hf_name, skeleton, spec) else layout.type_of(p.hf_name, p.shape)
        plan.append(Planned(p.hf_name, p.gguf_name, p.shape, ggml, from_steps.pop(p.hf_name, None)))
    if from_steps:
        raise QuantkitError(f"internal error: quantized {sorted(from_steps)[0]} is not a tensor of the base")
    return plan


def _skipped(name: str, skeleton: Skeleton, spec: QuantSpec) -> bool:
    """Whether base tensor `name` of a decoder layer is a Linear's weight that --skip keeps in float."""
    within = name.removeprefix(f"{skeleton.prefix}.").split(".", 1)[-1].removesuffix(".weight")
    return name.endswith(".weight") and spec.skips(within)


def _tensor_bytes(plan: list[Planned], source: Source, state: RunState, layout: GGUFLayout) -> Iterator[np.ndarray]:
    """Each planned tensor's bytes in plan order, one at a time (a step's file is read once, when first needed)."""
    step, tensors = -1, {}
    for t in plan:
        if t.step is not None:
            if t.step != step:
                step, tensors = t.step, state.layer_tensors(t.step)
            data = _step_blocks(tensors, t)
        elif t.ggml in TORCH_DTYPES:
            data = source.checkpoint.get_as(t.source, TORCH_DTYPES[t.ggml]).numpy()
        else:
            data = _rounded_rows(source, t)
        order = rows_permutation(t.source, layout.config)
        yield data if order is None else data[order.numpy()]


def _step_blocks(tensors: dict[str, torch.Tensor], t: Planned) -> np.ndarray:
    """A Linear's blocks as its step stored them, which must be of the type the plan gives it."""
    module = t.source.removesuffix(".weight")
    blocks, type_id = tensors.get(f"{module}{BLOCKS_SUFFIX}"), tensors.get(f"{module}{TYPE_SUFFIX}")
    if blocks is None or type_id is None or TYPE_NAMES.get(int(type_id.reshape(-1)[0])) != t.ggml:
        raise QuantkitError(f"internal error: step {t.step} holds no {t.ggml} blocks for {t.source}")
    return blocks.numpy()


def _rounded_rows(source: Source, t: Planned) -> np.ndarray:
    """A base tensor rounded to nearest onto llama.cpp's grid for its type, a block of rows at a time (a block's
    grid depends on its own row alone): neither the float tensor nor its codes are ever held whole."""
    kind = GGML_TYPES[t.ggml]
    out = np.empty((t.shape[0], t.shape[1] // kind.block * kind.block_bytes), dtype=np.uint8)
    for start, rows in source.checkpoint.blocks_as(t.source, torch.float32):
        grid = choose_grid(rows, t.ggml)
        out[start:start + len(rows)] = pack(nearest_codes(rows, grid), grid)
    return out


def _type_counts(plan: list[Planned]) -> dict[str, int]:
    """How many tensors of the file hold each type."""
    counts: dict[str, int] = {}
    for t in plan:
        counts[t.ggml] = counts.get(t.ggml, 0) + 1
    return counts
