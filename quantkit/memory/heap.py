"""Where freed tensor memory goes (glibc only; elsewhere a no-op): back to the system at once, or kept for reuse.

glibc serves allocations above its mmap threshold with mmap and returns them to the system on free, but after each
such free it raises the threshold (up to 32 MiB on 64-bit), so later tensors come from the heap instead. Freed heap
blocks stay resident and fragment, and peak memory then creeps up layer after layer. `release_large_frees_at_once`
fixes the threshold (mallopt turns off the adjustment), so every tensor of 1 MiB or more has its own mapping,
released the moment it is freed.

Fresh mappings are paid for in page faults, and a CPU run's calibration forwards allocate and free the same
temporaries mini-batch after mini-batch. `reusing_freed_memory` therefore lets the heap serve a pass's forward
temporaries and keep them between mini-batches (no trimming of the heap's top), then hands everything back when the
pass ends. Two things keep that flat: the window covers only the forwards, so the layer's weights, Hessians and
solves stay in their own mappings and do not pin the heap's top; and torch's huge pages stay off (torch's default),
because torch then aligns every tensor of 2 MiB or more to 2 MiB, which glibc serves only from a free block 2 MiB
larger than the tensor: the heap would grow by one temporary every mini-batch.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20
HEAP_SERVES_AT_MOST = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit
DEFAULT_TRIM_THRESHOLD = 128 << 10  # glibc's: a free top of the heap larger than this is returned at once
KEEP_HEAP_TOP = 1 << 30  # within a reuse window: never trimmed while it lasts


@functools.cache
def _glibc_call(name: str, *argtypes: type) -> Callable[..., int] | None:
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

    Memory below the mmap threshold that is freed stays resident in the heap: what tokenizing the calibration
    text leaves behind, and each layer's small frees. Both count in every later peak unless returned."""
    malloc_trim = _glibc_call("malloc_trim", ctypes.c_size_t)
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


@contextlib.contextmanager
def reusing_freed_memory(largest_temporary_bytes: int) -> Iterator[None]:
    """Within: allocations up to `largest_temporary_bytes` (a mini-batch's widest activation; at most 32 MiB) come
    from glibc's heap, and what is freed stays there for the next mini-batch's temporaries instead of being paid
    for again in page faults. On exit the threshold is 1 MiB again and the heap's free pages go back to the
    system, so the window adds nothing to memory outside it. Not for overlapping use from several threads."""
    mallopt = _glibc_call("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        yield
        return
    # + 1 MiB: a block's header makes an allocation of exactly the threshold's size go to mmap
    mallopt(M_MMAP_THRESHOLD, min(max(largest_temporary_bytes + (1 << 20), MMAP_THRESHOLD_BYTES), HEAP_SERVES_AT_MOST))
    mallopt(M_TRIM_THRESHOLD, KEEP_HEAP_TOP)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        return_free_heap()
