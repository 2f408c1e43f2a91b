"""How many calibration samples go through a decoder layer in one forward."""
from __future__ import annotations

import torch

MLP_BATCH_TOKENS = 4096  # tokens per calibration mini-batch on a GPU
CPU_BATCH_TOKENS = 1024  # and on a CPU, where the heap reuses a mini-batch's temporaries (memory/heap.py)


def calibration_batch_size(seq_len: int, device: torch.device) -> int:
    """Windows of seq_len tokens per forward: about MLP_BATCH_TOKENS tokens on a GPU, CPU_BATCH_TOKENS on a CPU, so
    a forward's temporaries stay small whatever --samples is. On a CPU the heap keeps them from one mini-batch to the
    next (memory.heap.reusing_freed_memory), and small mini-batches are then both faster and leaner than large ones
    (docs/BENCHMARKS.md)."""
    tokens = CPU_BATCH_TOKENS if device.type == "cpu" else MLP_BATCH_TOKENS
    return max(1, tokens // seq_len)
