"""Where verify evaluates: the device, and whether both models are streamed one decoder layer at a time
(streamed.py) or held whole in memory. Both give the same numbers; streaming fits any size, runs on a GPU and
measures each layer's error. Generations need both models whole: after a streamed evaluation they run in memory
where the models fit in RAM."""
from __future__ import annotations

from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.verification.loading import IN_MEMORY_TIERS, fits_in_memory

DEVICES = ("auto", "cpu", "cuda")
STREAM_CHOICES = ("auto", "on", "off")


def evaluation_device(device: str) -> torch.device:
    """--device: auto is the GPU when there is one."""
    if device not in DEVICES:
        raise QuantkitError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise QuantkitError("--device cuda: torch sees no CUDA device here (a CPU build of torch, or no GPU); use "
                            "--device cpu")
    return torch.device(device)


def streams(stream: str, device: torch.device, loader: str, max_memory: int | None) -> bool:
    """Whether to evaluate layer by layer: auto does with quantkit's loader (it holds one layer of each model
    whatever their size, reports each layer's error, and runs on a GPU), unless --max-memory asks for the whole
    models with offloaded layers."""
    if loader != "quantkit":
        if stream == "on":
            raise QuantkitError(f"--stream on reads the models through quantkit's own loader; --loader {loader} "
                                "loads them whole: use one or the other")
        if device.type != "cpu":
            raise QuantkitError(f"--loader {loader} evaluates on the CPU; use --device cpu")
        return False
    if stream == "off" or (stream == "auto" and max_memory is not None):
        if device.type != "cpu":
            raise QuantkitError("the whole-model evaluation (--stream off, --max-memory) runs on the CPU; a GPU "
                                "evaluates layer by layer (--stream on or auto)")
        return False
    return True


def generations_skipped(qpath: Path, fmt: str | None, bdir: Path | None, max_memory: int | None) -> str | None:
    """Why the generations after a streamed evaluation cannot hold both models whole, or None when they can
    (within --max-memory's offloading for GPTQ and unquantized checkpoints, else in the RAM available)."""
    if max_memory is not None:
        return None if fmt in IN_MEMORY_TIERS else f"--max-memory offloads GPTQ checkpoints only, not {fmt}"
    return None if fits_in_memory(qpath, fmt, bdir) else "they do not fit in the RAM available"
