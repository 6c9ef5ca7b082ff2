"""Give freed tensor memory back to the operating system (glibc's malloc), so a device's resident
memory follows what training holds rather than the worst moment so far.

glibc serves large allocations with mmap and returns them on free, but each such free also raises
its mmap threshold, up to 32 MiB. After a few freed tensors, most of a transformer's weights-sized
temporaries (the quantizer's and dequantizer's, a layer's activations) come from the heap instead,
where a freed block in the middle is kept, never returned. Measured on the Qwen2.5-0.5B shape
(benchmarks/edge_train.py): a 4-bit load whose tensors are 0.77 GB left 2.3 GB resident with the
dynamic threshold and 1.1 GB with a fixed one. A fixed threshold turns the adjustment off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # <malloc.h>
DEFAULT_THRESHOLD = 1 << 20  # 1 MiB: small tensors stay on the heap (cheap), large ones are mapped


def return_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for the rest of the process; False where there is no glibc
    (macOS, musl), which then keeps its own policy."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError) as e:
        log.debug("mallopt unavailable: %s", e)
        return False
    if ok:
        log.debug("glibc mmap threshold fixed at %d bytes", threshold)
    return ok
