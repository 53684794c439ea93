"""glibc's malloc, tuned for a long-running exporter whose collectors run on worker threads.

Why (bench/bench_memory.py, the whole exporter synced to 10,000 Services / 50,000
endpoints in IPVS mode, steady RSS after its scrapes): untuned, 142 MB. glibc
raises its mmap threshold, and with it the trim threshold (to 64 MiB), each time
a large block is freed: after the first big decode the heap's free top is never
handed back. A fixed threshold keeps the trim threshold at its default: 127 MB.
Handing the free pages back once after the first diff (the list's decode, the
first whole read of the live table and the first full diff are transients):
120 MB. Arenas (glibc makes up to 8 per core for threads that allocate at once,
and memory freed in one serves only that one) limited to 2: 1 to 3 MB more off
the steady RSS, up to 10 MB off the peak.

All best effort: on another libc (musl), without ctypes, or with the symbols
missing, nothing happens but one debug line. ``MALLOC_ARENA_MAX`` or
``MALLOC_MMAP_THRESHOLD_`` in the environment (a user's) wins over ``tune``.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENAS = 2
# Blocks this big or bigger are mmap'd and unmapped when freed. 16 MiB: the per-scrape
# buffers of a 10,000-service IPVS table (about 4 MB each) stay in the heap, as fast
# as untuned (1 MiB made a re-read with a changed shape about 20% slower).
MMAP_THRESHOLD = 16 << 20


def _glibc():
    """The process's own C library when it is glibc, else None (one debug line)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        return libc
    except Exception as err:  # noqa: BLE001 - any failure means: not glibc, leave malloc alone
        log.debug("malloc tuning off: %s", err)
        return None


def tune() -> bool:
    """Fix the mmap threshold and cap the arenas (call before any thread starts). True if glibc took both."""
    libc = _glibc()
    if libc is None:
        return False
    done = True
    for name, param, value in (("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                               ("MALLOC_ARENA_MAX", M_ARENA_MAX, ARENAS)):
        if os.environ.get(name):
            continue  # set by whoever runs us: glibc already read it
        try:
            done = bool(libc.mallopt(param, value)) and done
        except Exception as err:  # noqa: BLE001
            log.debug("mallopt(%d) failed: %s", param, err)
            done = False
    return done


def trim() -> bool:
    """Hand the free pages of every arena back to the kernel (``malloc_trim(0)``).

    Costs a walk of the free lists (under a millisecond at 10,000 Services): call it
    after a large transient is freed (a table read anew), not on a path that freed
    nothing. True if memory was released.
    """
    libc = _glibc()
    if libc is None:
        return False
    try:
        return bool(libc.malloc_trim(0))
    except Exception as err:  # noqa: BLE001
        log.debug("malloc_trim failed: %s", err)
        return False
