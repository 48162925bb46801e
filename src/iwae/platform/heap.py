"""Keep the memory a process frees for its next allocation, instead of handing it back to the OS.

A training step or an evaluation pass allocates and frees the same buffers again and again. By default glibc's
malloc hands large freed blocks back to the OS (blocks above a threshold are mapped and unmapped one by one, and
the top of the heap is trimmed), so the next step faults the same pages in again, zero-filled by the kernel.
A step's time must not go to faulting in pages it has used before.
``retain_freed_memory`` makes malloc keep what it frees: every block comes from the heap (none is mapped on its
own), the heap is never trimmed, and all threads share one arena. The process then holds on to its peak memory
until it exits. The ``iwae`` command calls it first thing; a program using the library calls
it itself, before its first tensor operation (the arena setting applies to threads started after it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
NEVER_TRIM = 2**31 - 1  # mallopt takes an int


@functools.cache
def retain_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (see the module docstring). Returns whether it could:
    False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    settings = ((M_TRIM_THRESHOLD, NEVER_TRIM), (M_MMAP_MAX, 0), (M_ARENA_MAX, 1))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
