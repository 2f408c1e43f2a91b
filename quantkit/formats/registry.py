"""Which format a quantized artifact is in, from its files (or named by the user), and the view that reads it."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.formats import awq, bitsandbytes, compressed_tensors, fp8, gptq
from quantkit.formats.view import DequantizedCheckpoint, PackedLinears
from quantkit.source.checkpoint import SafetensorsCheckpoint, read_config
from quantkit.source.gguf_header import GGUF_SUFFIX as GGUF_SUFFIX

# a format's name -> its layout for the checkpoint's quantization_config (validated); GGUF is a file of its own
LAYOUTS: dict[str, Callable[[dict], PackedLinears]] = {gptq.FORMAT: gptq.layout,
                                                       bitsandbytes.FORMAT: bitsandbytes.layout,
                                                       awq.FORMAT: awq.layout,
                                                       compressed_tensors.FORMAT: compressed_tensors.layout,
                                                       fp8.FORMAT: fp8.layout}
GGUF = "gguf"
# quantization_config.quant_method -> the format quantkit reads it as
QUANT_METHODS = {"gptq": gptq.FORMAT, "bitsandbytes": bitsandbytes.FORMAT, "awq": awq.FORMAT,
                 "compressed-tensors": compressed_tensors.FORMAT, "fp8": fp8.FORMAT}


def formats() -> tuple[str, ...]:
    """Every format `--format` accepts."""
    return (*LAYOUTS, GGUF)


def detect_format(path: Path, named: str | None = None) -> str | None:
    """The format of the artifact at `path` (a checkpoint folder or a .gguf file); None when it is not quantized.
    `named` (--format) must agree with what the files say."""
    if named is not None and named not in formats():
        raise QuantkitError(f"unknown format {named!r}; use one of {', '.join(formats())}")
    if path.is_file() and path.suffix == GGUF_SUFFIX:
        found: str | None = GGUF
    elif path.is_file():
        raise QuantkitError(f"{path} is a file but not a .gguf; give a checkpoint folder or a GGUF file")
    else:
        config, _ = read_config(path)
        qcfg = config.get("quantization_config") or {}
        method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
        if qcfg and method not in QUANT_METHODS:
            raise QuantkitError(f"{path}: quantization_config.quant_method = {method!r} is not a format quantkit "
                                f"reads ({', '.join(formats())})")
        found = QUANT_METHODS[str(method)] if qcfg else None
    if named is not None and found != named:
        raise QuantkitError(f"{path} is {'not quantized' if found is None else f'in the {found} format'}, not "
                            f"{named} (--format)")
    return found


def open_view(path: Path, fmt: str, transposed: Callable[[str], bool] = lambda module: False) -> DequantizedCheckpoint:
    """The checkpoint at `path` read through its format's layout (safetensors formats; GGUF has its own reader)."""
    config, _ = read_config(path)
    layout = LAYOUTS[fmt](config.get("quantization_config") or {})
    return DequantizedCheckpoint(SafetensorsCheckpoint(path), layout, transposed)
