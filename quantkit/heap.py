"""Keep freed tensor memory from staying resident (glibc only; elsewhere a no-op).

glibc serves allocations above its mmap threshold with mmap and returns them to the system on free, but after each
such free it raises the threshold (up to 32 MB on 64-bit), so the next layer's tensors come from the heap instead.
Freed heap blocks stay resident and fragment, and peak RSS then creeps up layer after layer: on an 8-layer model it
was 5-30 % above the 2-layer peak, differing run to run. Fixing the threshold (mallopt turns off the adjustment)
keeps every tensor of 1 MiB or more in its own mapping, released the moment it is freed.

Fresh mappings are paid for in page faults; asking torch for transparent huge pages (2 MiB) for its large
tensors makes those 512 times fewer. torch reads that setting once, when it is imported, so the command line
sets it before anything imports torch; the Python API gets the threshold alone.

Measured on SmolLM2-135M (4-bit g64, 32 x 512 calibration, 2 cores): peak RSS 1310 -> 874 MB, wall time
252 -> 270 s with the threshold alone; with huge pages as well, 245 -> 233 s against the threshold alone.
The synthetic 2- and 8-layer models of tests/test_memory.py peak within 3 % of each other instead of up to
30 % apart.

While a CPU run's calibration activations wait on disk (spill.ActivationsOnDisk), nothing long-lived is left to
fragment the heap, and `reusing_heap_blocks` raises the threshold to 16 MiB: a layer's forward temporaries (a
4096-token mini-batch's hidden states are 9.4 MB on SmolLM2, its MLP's 25 MB) are then served from blocks freed
by the previous mini-batch instead of pages the kernel must zero. SmolLM2 at 128 x 512 tokens: 162 -> 131 s for a
peak of 624 -> 645 MB (one run each; 32 MiB: 133 s, 656 MB). With the activations in the heap the same change cost
up to 195 MB (a GPTAQ run), which is why it waits for them to be on disk.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20
REUSE_THRESHOLD_BYTES = 16 << 20  # while nothing long-lived is in the heap (reusing_heap_blocks)


@functools.cache
def _glibc_call(name: str, *argtypes):
    """The C library's function `name` with its argument types set, or None where there is none (macOS,
    Windows, musl without mallopt or malloc_trim)."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


def release_large_frees_at_once(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold (1 MiB by default) for this process; False where the C library is not glibc."""
    mallopt = _glibc_call("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    ok = mallopt(M_MMAP_THRESHOLD, threshold) == 1
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; peak memory may creep with depth")
    return ok


@contextlib.contextmanager
def reusing_heap_blocks():
    """Within: freed blocks below REUSE_THRESHOLD_BYTES stay in the heap for the next allocation of their size
    (module docstring); afterwards the threshold is back at MMAP_THRESHOLD_BYTES. Only for stretches where
    nothing large outlives a mini-batch."""
    release_large_frees_at_once(REUSE_THRESHOLD_BYTES)
    try:
        yield
    finally:
        release_large_frees_at_once()


def return_free_heap() -> bool:
    """Hand the heap's free pages back to the system (glibc's malloc_trim); False where there is no such call.

    Memory below the mmap threshold that is freed stays resident in the heap: tokenizing the calibration text
    leaves about 50 MB behind on SmolLM2, and each layer's small frees add a creep of about 2 MB a layer. Both
    count in every later peak unless returned."""
    malloc_trim = _glibc_call("malloc_trim", ctypes.c_size_t)
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


def request_huge_pages() -> None:
    """Ask torch to back tensors of 2 MiB or more with transparent huge pages (where the kernel allows them only
    on request, as in its default "madvise" mode). No effect once torch is imported; a user's setting wins."""
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
