"""A GGUF output assembled from the finished steps: every tensor's GGUF name, type and size planned first (the
file's header lists them), then llama.cpp's metadata and tokenizer, then the tensors one at a time. The decoder
layers' Linears come as the steps stored their blocks; the other tensors are read from the base, the 2-D ones
rounded to nearest onto llama.cpp's grid for the type the mix gives them (llama-quantize does the same)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantkit import __version__
from quantkit.config import CalibSpec, QuantSpec
from quantkit.errors import QuantkitError
from quantkit.run.gguf_output import BLOCKS_SUFFIX, TYPE_SUFFIX, GGUFLayout
from quantkit.run.model import Skeleton, Source
from quantkit.run.resume import RunState
from quantkit.run.step_report import without_timings
from quantkit.solve.ggml_grids import GGML_TYPES, choose_grid, nearest_codes
from quantkit.source.experts import expert_blocks
from quantkit.source.skeleton import linear_modules, weight_matrix
from quantkit.untrusted import sha256_file
from quantkit.write.ggml_blocks import pack
from quantkit.write.gguf_file import TORCH_DTYPES, GGUFFileWriter, rows_permutation, tensor_plan
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


def write_gguf_output(source: Source, state: RunState, skeleton: Skeleton, layout: GGUFLayout, path: Path,
                      with_side_files: bool, calib: CalibSpec, repo_id: str | None, spec: QuantSpec) -> dict[str, str]:
    """The .gguf file at `path` (in staging), and with_side_files (a hub-cache output) a model card and quantkit's
    manifest beside it; returns the sha256 of every file in its folder that the output holds."""
    plan = _plan(source, state, skeleton, layout, spec)
    with GGUFFileWriter.for_model(path, source.config_dict, source.model_dir, layout.file_type) as writer:
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


def _plan(source: Source, state: RunState, skeleton: Skeleton, layout: GGUFLayout, spec: QuantSpec) -> list[Planned]:
    """Every tensor of the file in llama.cpp's layer order (write/gguf_file.tensor_plan), typed: the steps' blocks
    as they stored them, the base's other tensors as the mix gives them (F16 for Linears --skip keeps)."""
    from_steps: dict[str, tuple[int, str]] = {}  # base tensor -> (step, ggml type)
    for i in range(len(skeleton.layers)):
        tensors = state.layer_tensors(i)
        for key, type_id in tensors.items():
            if key.endswith(TYPE_SUFFIX):
                module = key.removesuffix(TYPE_SUFFIX)
                ggml = TYPE_NAMES.get(int(type_id.reshape(-1)[0]))
                if ggml is None or f"{module}{BLOCKS_SUFFIX}" not in tensors:
                    raise QuantkitError(f"internal error: step {i} holds {key} without blocks of a known type")
                from_steps[f"{module}.weight"] = (i, ggml)
    plan = []
    for p in tensor_plan(layout.config, source.checkpoint):
        if p.hf_name in skeleton.discarded:
            continue
        if p.hf_name in from_steps:
            step, ggml = from_steps.pop(p.hf_name)
            plan.append(Planned(p.hf_name, p.gguf_name, p.shape, ggml, step))
            continue
        ggml = layout.type_of(p.hf_name, p.shape)
        if ggml in GGML_TYPES and p.hf_name.startswith(f"{skeleton.prefix}.") and _skipped(p.hf_name, skeleton, spec):
            ggml = "F16"
        plan.append(Planned(p.hf_name, p.gguf_name, p.shape, ggml))
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
            data = tensors[f"{t.source.removesuffix('.weight')}{BLOCKS_SUFFIX}"].numpy()
        elif t.ggml in TORCH_DTYPES:
            data = source.checkpoint.get_as(t.source, TORCH_DTYPES[t.ggml]).numpy()
        else:
            weight = source.checkpoint.get_as(t.source, torch.float32)
            grid = choose_grid(weight, t.ggml)
            data = pack(nearest_codes(weight, grid), grid)
        order = rows_permutation(t.source, layout.config)
        yield data if order is None else data[order.numpy()]


def _type_counts(plan: list[Planned]) -> dict[str, int]:
    """How many tensors of the file hold each type."""
    counts: dict[str, int] = {}
    for t in plan:
        counts[t.ggml] = counts.get(t.ggml, 0) + 1
    return counts
