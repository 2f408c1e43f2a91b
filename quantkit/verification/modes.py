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


def evaluation_device(device: str, streamed: bool) -> torch.device:
    """--device for the chosen mode: the whole-model paths run on the CPU; layer by layer, auto is the GPU when
    there is one."""
    if device not in DEVICES:
        raise QuantkitError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if not streamed or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise QuantkitError("--device cuda: torch sees no CUDA device here (a CPU build of torch, or no GPU); use "
                            "--device cpu")
    return torch.device("cuda" if device == "auto" else device)


def streams(stream: str, device: str, loader: str, max_memory: int | None) -> bool:
    """Whether to evaluate layer by layer: auto does with quantkit's loader (it holds one layer of each model
    whatever their size, reports each layer's error, and runs on a GPU), unless --max-memory asks for the whole
    models with offloaded layers. An explicit --device cuda is refused where the models would be held whole."""
    if stream not in STREAM_CHOICES:
        raise QuantkitError(f"unknown stream mode {stream!r}; use one of {', '.join(STREAM_CHOICES)}")
    if loader != "quantkit":
        if stream == "on":
            raise QuantkitError(f"--stream on reads the models through quantkit's own loader; --loader {loader} "
                                "loads them whole: use one or the other")
        if device == "cuda":
            raise QuantkitError(f"--loader {loader} evaluates on the CPU; use --device cpu or auto")
        return False
    if stream == "off" or (stream == "auto" and max_memory is not None):
        if device == "cuda":
            raise QuantkitError("the whole-model evaluation (--stream off, --max-memory) runs on the CPU; a GPU "
                                "evaluates layer by layer (--stream on or auto)")
        return False
    return True


def generations_skipped(qpath: Path, fmt: str | None, bdir: Path | None, bfmt: str | None,
                        max_memory: int | None) -> str | None:
    """Why the generations after a streamed evaluation cannot hold both models whole, or None when they can
    (within --max-memory's offloading for GPTQ and unquantized checkpoints, else in the RAM available)."""
    if max_memory is not None:
        other = next((f for f in (fmt, bfmt) if f not in IN_MEMORY_TIERS), None)
        return None if other is None else f"--max-memory offloads GPTQ checkpoints only, not {other}"
    return None if fits_in_memory(qpath, fmt, bdir, bfmt) else "they do not fit in the RAM available"
