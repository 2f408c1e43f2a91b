"""`quantkit convert`: a GPTQ checkpoint repacked losslessly into llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks, one GGUF file.

No calibration and no rounding of codes: each quantized Linear keeps its GPTQ codes, and each 32-wide block of
its columns takes the scale (and zero point) of the GPTQ group its columns belong to:
- 4 bits, every zero point the middle code 8: Q4_0, d = scale, codes unchanged; (q - 8)·d is GPTQ's
  scale·(q - zero), bit for bit.
- 4 bits, any other zero point: Q4_1, d = scale, m = float16(-scale·zero); q·d + m differs from GPTQ's value by
  the float16 rounding of the min: at most ½ ulp_fp16(scale·zero) (2^-11·|scale·zero|), plus the float32
  rounding of the sum, which GPTQ's value does not have.
- 8 bits, every zero point 128: Q8_0, d = scale, code q stored as the int8 q - 128, bit for bit.
Refused, each with one line naming the reason and the nearest command that works (quantize the base straight
to GGUF): 2- and 3-bit (llama.cpp's Q2_K/Q3_K quantize their scales, so no block holds GPTQ's exactly), 8-bit
with other zero points (no 8-bit block with a min), a group size that is not a multiple of 32, a row whose
length is not, act-order whose groups are not whole 32-column blocks (g_idx permuted), formats other than
GPTQ's v1 "gptq" and v2 "gptq_v2". Float tensors are written as llama.cpp's converter writes an F16 model:
F16, and F32 for 1-D tensors and norms; llama's q/k rows are permuted whole (write/gguf_model.py), packed or not.

The checkpoint is untrusted: verification/integrity.py checks its settings, every quantized Linear's tensor shapes,
dtypes and g_idx range, and its float tensors, before anything is planned; the layout is read through
formats/view.py. Every quantized Linear's type is decided from its zero points and g_idx (small tensors) before
the file's header is written; then each tensor is read, repacked and written in turn, into the temporary file
.OUT.convert-partial beside OUT that is renamed over it at the end, under the lock .OUT.convert-lock (a second
convert to OUT is refused; one killed leaves its partial file, which the next removes). The tokenizer readers
(transformers, gguf's SpecialVocab) read private copies of the vetted tokenizer files (run/assemble.tokenizer_copy).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from quantkit.config import DEFAULT_GGUF_TYPE
from quantkit.errors import QuantkitError
from quantkit.formats.gguf import natural_key
from quantkit.formats.registry import open_view
from quantkit.formats.view import DequantizedCheckpoint
from quantkit.run.assemble import tokenizer_copy
from quantkit.solve.ggml_grids import GGML_TYPES, ZERO_CODE, BlockGrid
from quantkit.source.checkpoint import read_config, resolve_model_dir
from quantkit.source.gguf_header import GGUF_MAGIC, GGUF_SUFFIX
from quantkit.untrusted import fsync_dir, not_symlink
from quantkit.verification.integrity import check_integrity, raise_for
from quantkit.write.ggml_blocks import pack
from quantkit.write.gguf_file import (
    HEAD,
    TORCH_DTYPES,
    GGUFFileWriter,
    float_type,
    gguf_architecture,
    gguf_tensor_name,
    model_name,
    rows_permutation,
)
from quantkit.write.gguf_mix import file_type_id
from quantkit.write.gguf_model import add_model_metadata, extra_tensors, model_shape
from quantkit.write.gguf_vocab import add_tokenizer
from quantkit.write.gptq_format import zero_offset
from quantkit.write.packing import unpack_qweight, unpack_qzeros
from quantkit.write.publish import exclusive

BLOCK = GGML_TYPES["Q4_0"].block  # 32 weights of a row share one d (and m) in every type convert writes
GPTQ_FORMATS = ("gptq", "gptq_v2")  # checkpoint_format values convert reads (v1 stores zero - 1)
SYMMETRIC_TYPE = {4: "Q4_0", 8: "Q8_0"}  # bits -> the block type of a grid whose zero is its middle code
ASYMMETRIC_TYPE = {4: "Q4_1"}  # bits -> the block type with a min; 8 bits has none in llama.cpp's files
LOW_BITS = (2, 3)  # GPTQ widths whose only llama.cpp blocks (Q2_K/Q3_K) would round the scales
NEAREST_TYPE = {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0", (8, False): "Q8_0"}
DEFAULT_NEAREST = DEFAULT_GGUF_TYPE  # for settings no block type matches
PER_ROW = -1  # GPTQ's group_size for one group per row
FLOAT_ORDER = ("F16", "F32")  # the summary lists the block types first (most tensors first), then these
PARTIAL_SUFFIX = ".convert-partial"  # .OUT.convert-partial: the file being written, renamed over OUT when complete
LOCK_SUFFIX = ".convert-lock"  # .OUT.convert-lock: held while writing, so two converts never write one OUT


def partial_path(out: Path) -> Path:
    """The one temporary file a convert to `out` writes (a killed run's is removed by the next one)."""
    return out.with_name(f".{out.name}{PARTIAL_SUFFIX}")


def lock_path(out: Path) -> Path:
    """The lock file of converts to `out`; it stays beside OUT, empty, as the lock's (write/publish.exclusive)."""
    return out.with_name(f".{out.name}{LOCK_SUFFIX}")


def nearest_command(bits: object = None, sym: object = True) -> str:
    """The command that makes a GGUF file from the base model instead, of the block type nearest the settings."""
    gguf_type = NEAREST_TYPE.get((bits, bool(sym)), DEFAULT_NEAREST) if isinstance(bits, int) else DEFAULT_NEAREST
    return f"quantize the base model to GGUF instead: quantkit quantize BASE --format gguf --gguf-type {gguf_type}"


@dataclass(frozen=True)
class Settings:
    """The GPTQ settings convert needs, checked."""
    bits: int
    group_size: int
    sym: bool
    fmt: str


@dataclass
class ConvertResult:
    """What `quantkit convert` wrote: tensors by ggml type, and the Q4_1 tensors whose min float16 rounded."""
    path: str
    types: dict[str, int] = field(default_factory=dict)
    min_rounded: list[str] = field(default_factory=list)

    @property
    def tensors(self) -> int:
        return sum(self.types.values())

    @property
    def lossless(self) -> bool:
        return not self.min_rounded

    def summary(self) -> str:
        """`wrote OUT.gguf (N tensors: a Q4_0, b F16, c F32; lossless)`: block types by count, then floats."""
        blocks = sorted((kv for kv in self.types.items() if kv[0] not in FLOAT_ORDER), key=lambda kv: (-kv[1], kv[0]))
        floats = [(name, self.types[name]) for name in FLOAT_ORDER if name in self.types]
        counts = ", ".join(f"{n} {name}" for name, n in blocks + floats)
        k = len(self.min_rounded)
        exact = "lossless" if self.lossless else f"min rounded to float16 in {k} tensor{'s' if k != 1 else ''}"
        return f"wrote {self.path} ({self.tensors} tensors: {counts}; {exact})"

    def to_dict(self) -> dict:
        return {"path": self.path, "tensors": self.tensors, "types": self.types, "lossless": self.lossless,
                "min_rounded": self.min_rounded}


def gptq_settings(model_dir: Path, config: dict) -> Settings:
    """The checkpoint's GPTQ settings, refused in one line (reason and nearest command) where no lossless repack
    exists: not GPTQ, another checkpoint_format, 2/3 bits, a group size that is not a multiple of 32."""
    qcfg = config.get("quantization_config")
    if not qcfg:
        raise QuantkitError(f"{model_dir} is not quantized (no quantization_config), so there are no GPTQ codes to "
                            f"repack; {nearest_command()}")
    method, bits, sym = qcfg.get("quant_method"), qcfg.get("bits"), qcfg.get("sym", True)
    if method != "gptq":
        raise QuantkitError(f"{model_dir}: format {method!r}: convert repacks GPTQ checkpoints only; "
                            f"{nearest_command(bits, sym)}")
    fmt = qcfg.get("checkpoint_format", "gptq")
    if fmt not in GPTQ_FORMATS:
        raise QuantkitError(f"{model_dir}: format checkpoint_format {fmt!r}: convert reads "
                            f"{' and '.join(GPTQ_FORMATS)}; {nearest_command(bits, sym)}")
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SYMMETRIC_TYPE:
        why = (f"no llama.cpp block holds {bits}-bit GPTQ groups exactly (Q2_K/Q3_K quantize their scales)"
               if bits in LOW_BITS else "expected 4 or 8")
        raise QuantkitError(f"{model_dir}: bits {bits!r}: {why}; convert repacks 4- and 8-bit checkpoints; "
                            f"{nearest_command(bits, sym)}")
    if not isinstance(sym, bool):
        raise QuantkitError(f"{model_dir}: sym {sym!r}: expected true or false")
    group = qcfg.get("group_size", PER_ROW)
    if not isinstance(group, int) or isinstance(group, bool) or (group != PER_ROW and (group <= 0 or group % BLOCK)):
        raise QuantkitError(f"{model_dir}: group size {group!r} is not a multiple of {BLOCK}, the weights of a row "
                            f"that share one scale in llama.cpp's blocks; {nearest_command(bits, sym)}")
    return Settings(bits, group, sym, fmt)


def block_groups(g_idx: Tensor) -> Tensor:
    """The GPTQ group of each 32-column block [K/32] from g_idx [K]; ValueError when a block's columns lie in
    more than one group (act-order with permuted groups) or K is not a whole number of blocks."""
    k = g_idx.numel()
    if k % BLOCK:
        raise ValueError(f"group size: in_features {k} is not a multiple of {BLOCK}, llama.cpp's block")
    blocks = g_idx.reshape(k // BLOCK, BLOCK)
    mixed = (blocks != blocks[:, :1]).any(dim=1)
    if bool(mixed.any()):
        b = int(mixed.nonzero()[0])
        groups = sorted(set(blocks[b].tolist()))
        shown = ", ".join(map(str, groups[:4])) + (", ..." if len(groups) > 4 else "")
        raise ValueError(f"act-order with permuted groups: columns {b * BLOCK}-{b * BLOCK + BLOCK - 1} belong to "
                         f"{len(groups)} GPTQ groups ({shown}), and a llama.cpp block of {BLOCK} holds one scale")
    return blocks[:, 0].long()


def block_grid(qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, fmt: str) -> tuple[BlockGrid, bool]:
    """One GPTQ Linear's scales and zero points as a llama.cpp grid over its [N, K] codes, and whether a Q4_1
    min was rounded to float16 (else the grid's values are GPTQ's bit for bit). ValueError naming the reason
    where no lossless grid exists."""
    if bits not in SYMMETRIC_TYPE:
        raise ValueError(f"bits {bits}: convert repacks 4- and 8-bit GPTQ")
    middle = ZERO_CODE[SYMMETRIC_TYPE[bits]]  # the zero point of a symmetric grid, which Q4_0/Q8_0 subtract
    n, k = scales.shape[1], g_idx.numel()
    groups = block_groups(g_idx)                                               # [K/32]
    zeros = (unpack_qzeros(qzeros, bits, n).t() + zero_offset(fmt))[:, groups]  # [N, K/32]
    d = scales.t()[:, groups].contiguous()                                     # [N, K/32]
    if d.dtype != torch.float16:
        exact = d.to(torch.float16)
        if not torch.equal(exact.to(d.dtype), d):
            raise ValueError(f"scales are {str(d.dtype).removeprefix('torch.')} values float16 cannot hold exactly")
        d = exact
    if bool((zeros == middle).all()):
        return BlockGrid(GGML_TYPES[SYMMETRIC_TYPE[bits]], {"d": d}, (n, k)), False
    if bits not in ASYMMETRIC_TYPE:
        raise ValueError(f"{bits}-bit asymmetric (zero points other than {middle}): llama.cpp has no {bits}-bit "
                         "block with a min")
    exact_min = -d.float() * zeros.float()  # exact in float32: an 11-bit scale times a zero below 2**5
    m = exact_min.to(torch.float16)
    if not bool(torch.isfinite(m).all()):
        raise ValueError("a min (-scale x zero) is beyond float16's range")
    rounded = not torch.equal(m.float(), exact_min)
    return BlockGrid(GGML_TYPES[ASYMMETRIC_TYPE[bits]], {"d": d, "m": m}, (n, k)), rounded


def repack(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int,
           fmt: str) -> tuple[np.ndarray, str, bool]:
    """One GPTQ Linear as llama.cpp block bytes uint8 [N, row bytes], their type name, and whether a min rounded."""
    grid, rounded = block_grid(qzeros, scales, g_idx, bits, fmt)
    codes = unpack_qweight(qweight, bits, g_idx.numel()).to(torch.uint8)  # Q8_0's code is q itself: q - 128 stored
    return pack(codes, grid), grid.type.name, rounded


@dataclass(frozen=True)
class Planned:
    """One tensor of the file: the checkpoint tensor (a quantized Linear's weight, or a float one) it comes from."""
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    type_name: str
    quantized: bool


def convert(model: str | Path, out: str | Path, *, overwrite: bool = False) -> ConvertResult:
    """Repack the GPTQ checkpoint `model` (a folder or a cached repo id) into the GGUF file `out`, losslessly (see
    the module docstring); `out` appears complete or not at all, and replaces a GGUF file only with overwrite."""
    out_path = Path(out).expanduser()
    _refuse_out(out_path, overwrite)
    model_dir = resolve_model_dir(str(model))
    config, _ = read_config(model_dir)
    settings = gptq_settings(model_dir, config)
    float_config = {k: v for k, v in config.items() if k != "quantization_config"}
    arch = gguf_architecture(float_config)
    model_shape(float_config)  # every size the metadata and the permutation use, checked before any work
    raise_for(check_integrity(model_dir, fmt="gptq"))
    view = open_view(model_dir, "gptq")
    try:
        result = ConvertResult(str(out_path))
        plan = _plan(view, float_config, settings, result)
        partial, lock = partial_path(out_path), lock_path(out_path)
        # the tokenizer readers get private copies of the vetted side files: a link leading outside the model is
        # refused here, and nothing else of the checkpoint's folder is theirs to read
        with tokenizer_copy(model_dir, float_config) as tokenizer_dir, \
                exclusive(lock, f"{out_path} (lock {lock})"):
            _refuse_out(out_path, overwrite)  # again, under the lock: another convert may have written it
            partial.unlink(missing_ok=True)  # a killed convert's leftover; the lock says no live one writes it
            try:
                _write(partial, view, plan, arch, float_config, model_dir, tokenizer_dir, settings)
                _refuse_out(out_path, overwrite)  # again: another program may have made it while converting
                os.replace(partial, out_path)
            finally:
                partial.unlink(missing_ok=True)
        fsync_dir(out_path.parent)
    finally:
        view.close()
    return result


def _refuse_out(out: Path, overwrite: bool) -> None:
    """OUT is a new .gguf file, or with overwrite an existing GGUF file (its first bytes say so)."""
    if out.suffix != GGUF_SUFFIX:
        raise QuantkitError(f"{out}: the output of convert is one GGUF file, named *{GGUF_SUFFIX}")
    not_symlink(out, "output file")
    if out.is_dir():
        raise QuantkitError(f"{out} is a directory; convert writes one {GGUF_SUFFIX} file")
    if not out.exists():
        if not out.parent.is_dir():
            raise QuantkitError(f"{out.parent} is not a directory; create it first")
        return
    if not overwrite:
        raise QuantkitError(f"{out} already exists; pass --overwrite to replace it")
    with out.open("rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise QuantkitError(f"{out} exists and is not a GGUF file; convert replaces only GGUF files")


def _refusal(module: str, error: ValueError, settings: Settings) -> QuantkitError:
    return QuantkitError(f"{module}: {error}; {nearest_command(settings.bits, settings.sym)}")


def _plan(view: DequantizedCheckpoint, config: dict, settings: Settings, result: ConvertResult) -> list[Planned]:
    """Every tensor of the file, its type decided from the small tensors (zero points, scales, g_idx) of each
    quantized Linear; the refusals all come here, before anything is written."""
    checkpoint = view.checkpoint
    planned = []
    for name in view.names():
        gguf_name = gguf_tensor_name(name, config)
        if gguf_name is None:
            continue  # what llama.cpp does not write: rotary buffers, a tied head
        shape = tuple(view.shape(name))
        if view.is_quantized(name):
            module = name.removesuffix(".weight")
            parts = {s: checkpoint.get(f"{module}.{s}") for s in ("qzeros", "scales", "g_idx")}
            try:
                grid, rounded = block_grid(parts["qzeros"], parts["scales"], parts["g_idx"], settings.bits,
                                           settings.fmt)
            except ValueError as e:
                raise _refusal(module, e, settings) from None
            if rounded:
                result.min_rounded.append(gguf_name)
            planned.append(Planned(name, gguf_name, shape, grid.type.name, True))
        else:
            if not checkpoint.is_floating(name):
                raise QuantkitError(f"{checkpoint.model_dir}: tensor {name} is {checkpoint.get(name).dtype}, neither "
                                    "a float tensor nor part of a quantized Linear")
            planned.append(Planned(name, gguf_name, shape, float_type(gguf_name, shape, "F16"), False))
    if not model_shape(config).tied and not any(p.hf_name == HEAD for p in planned):
        raise QuantkitError(f"{checkpoint.model_dir}: config.json does not tie the output head to the embeddings, "
                            f"and the checkpoint holds no {HEAD} (nor lm_head.qweight)")
    planned.sort(key=lambda p: natural_key(p.gguf_name))
    result.types = dict(Counter(p.type_name for p in planned))
    return planned


def _write(path: Path, view: DequantizedCheckpoint, plan: list[Planned], arch: str, config: dict, model_dir: Path,
           tokenizer_dir: Path, settings: Settings) -> None:
    """The GGUF file at `path`: metadata, tokenizer, then each planned tensor read, repacked and written in turn.
    model_dir names the model; tokenizer_dir is the private copy of its tokenizer files (tokenizer_copy)."""
    checkpoint = view.checkpoint
    extras = extra_tensors(config)
    quantized = Counter(p.type_name for p in plan if p.quantized).most_common(1)
    if not quantized:
        raise QuantkitError(f"{model_dir}: none of its quantized Linears has a place in llama.cpp's GGUF layout")
    file_type = file_type_id(quantized[0][0])  # llama.cpp's "mostly" type: that of most quantized tensors
    with GGUFFileWriter(path, arch) as writer:
        add_model_metadata(writer.kv, config, name=model_name(config, model_dir), file_type=file_type)
        add_tokenizer(writer.kv, tokenizer_dir, config, arch)
        for p in plan:
            writer.declare(p.gguf_name, p.shape, p.type_name)
        for name, values in extras.items():
            writer.declare(name, values.shape, "F32")
        writer.start()
        for p in plan:
            if p.quantized:
                module = p.hf_name.removesuffix(".weight")
                parts = {s: checkpoint.get(f"{module}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}
                data, type_name, _ = repack(**parts, bits=settings.bits, fmt=settings.fmt)
                if type_name != p.type_name:  # the checkpoint changed under us between the two reads
                    raise QuantkitError(f"{module}: its tensors changed while converting")
            else:
                tensor = checkpoint.get_as(p.hf_name, TORCH_DTYPES[p.type_name])
                if not bool(torch.isfinite(tensor).all()):
                    raise QuantkitError(f"tensor {p.hf_name} holds values beyond {p.type_name}'s range")
                data = tensor.numpy()
            rows = rows_permutation(p.hf_name, config)
            writer.write(p.gguf_name, data if rows is None else data[rows.numpy()])
            del data
        for name, values in extras.items():
            writer.write(name, values)
        writer.finish()
