"""Integrity checks of the formats read through formats/ (bitsandbytes, AWQ, compressed-tensors, FP8) and of GGUF
files: headers and the small tensors only (bitsandbytes' quant_state), never a model."""
from __future__ import annotations

from pathlib import Path

from quantkit.errors import QuantkitError, first_line
from quantkit.formats.registry import GGUF, open_view
from quantkit.formats.view import ACTIVATIONS_QUANTIZED
from quantkit.source.gguf_header import read_header as read_gguf_header
from quantkit.verification.integrity_report import MAX_LISTED, UNCHECKED_WORDS, IntegrityReport, Unchecked

FLOAT_GGUF_TYPES = ("F32", "F16", "BF16", "F64")  # GGUF tensor types that are not quantized
FLOAT_WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors dtypes an unquantized weight may have


def check_view(model_dir: Path, fmt: str, qcfg: dict, headers: dict, report: IntegrityReport) -> None:
    """A format read through its view (formats/): its settings are ones quantkit reads, every quantized Linear
    has its parts, of shapes that agree, and no weight is stored in a quantized dtype without them (headers
    only)."""
    try:
        view = open_view(model_dir, fmt)
    except QuantkitError as e:
        report.errors.append(first_line(e))
        return
    report.quantization = report.quantization or {"quant_method": qcfg["quant_method"], **view.layout.settings}
    report.quantized_modules = len(view.modules)
    if view.layout.settings.get(ACTIVATIONS_QUANTIZED):
        report.notes.append(f"this {fmt} checkpoint also quantizes activations at inference; quantkit reads its "
                            "weights only, so the metrics measure the weight quantization alone")
    problems: list[str] = []
    for name in view.names():
        if view.is_quantized(name):
            try:
                view.shape(name)
            except QuantkitError as e:
                problems.append(first_line(e))
        elif name.endswith(".weight") and headers.get(name, {}).get("dtype") not in FLOAT_WEIGHT_DTYPES:
            problems.append(f"tensor {name} is stored as {headers.get(name, {}).get('dtype')} without the {fmt} "
                            f"tensors that scale it ({name.removesuffix('weight')}{view.layout.marker} is missing)")
    view.close()
    report.errors.extend(problems[:MAX_LISTED])
    if len(problems) > MAX_LISTED:
        report.errors.append(f"... and {len(problems) - MAX_LISTED} more tensor problems")


def check_gguf(path: Path, report: IntegrityReport) -> None:
    """A GGUF file's header, every part of it inside the file; its tensor types as the quantization."""
    report.unchecked = [Unchecked.FILE_HASHES, Unchecked.BASE_MODEL]
    report.notes.append("a GGUF file records no quantkit.json manifest, so these go unchecked: "
                        f"{'; '.join(UNCHECKED_WORDS[u] for u in report.unchecked)}")
    try:
        header = read_gguf_header(path)
    except QuantkitError as e:
        report.errors.append(first_line(e))
        return
    types: dict[str, int] = {}
    for t in header.tensors:
        types[t.ggml_type.name] = types.get(t.ggml_type.name, 0) + 1
    report.quantization = {"quant_method": GGUF, "architecture": header.architecture, "types": types}
    report.quantized_modules = sum(n for kind, n in types.items() if kind not in FLOAT_GGUF_TYPES)
