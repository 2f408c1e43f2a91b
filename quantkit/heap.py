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

Raising the threshold while a CPU run's activations wait on disk (spill.ActivationsOnDisk) makes a layer's
forward temporaries reuse freed heap blocks instead of pages the kernel must zero: SmolLM2 at 128 x 512 tokens
162 -> 131 s at 16 MiB. It was built and taken out: the heap then grows with every mini-batch of a pass (a
2-layer bfloat16 model of tests/test_memory.py: 659 MB with 8 samples, 888 MB with 256; at 1 MiB 633 and 634
MB), so peak memory would grow with the calibration set again.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


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


def release_large_frees_at_once() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process; False where the C library is not glibc."""
    mallopt = _glibc_call("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; peak memory may creep with depth")
    return ok


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
