"""Process memory readings for the load and generation benchmarks.

Peak resident memory is what decides whether a model fits on a host, and it is what the kernel's OOM killer
acts on, so that is what we measure: the high-water mark of the resident set (VmHWM / ru_maxrss, file-backed
pages included), not Python-level allocation counters that miss torch's and mmap's memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import resource
import sys

import psutil


def peak_rss_bytes() -> int:
    """The peak resident set size of this process so far, in bytes (since start or the last `reset_peak_rss`).

    On Linux this is VmHWM from /proc/self/status, the high-water mark of this process's own address space.
    `ru_maxrss` is the same number except in one case that matters for benchmarks: in a child started by
    fork+exec it never drops below the *parent's* RSS at the fork (the kernel carries the pre-exec image's peak
    over), so a subprocess measurement launched from a big parent would be meaningless. Elsewhere: ru_maxrss.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def current_rss_bytes() -> int:
    """The resident set size of this process now, in bytes."""
    return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> bool:
    """Reset the peak-RSS high-water mark to the current RSS, so a later `peak_rss_bytes` covers only what follows.

    Linux only (writing 5 to /proc/self/clear_refs, kernel >= 4.0); returns False where it is not supported, in
    which case the peak still includes whatever happened before (imports, say).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cap_onednn_primitive_cache(entries: int = 64) -> None:
    """Bound oneDNN's cache of compiled GEMMs (one per input shape, ~0.3 MB each here; 1024 by default) unless the
    user set ONEDNN_PRIMITIVE_CACHE_CAPACITY. Takes effect if called before oneDNN builds its first primitive.

    Why: a server's prefill passes come in ever new row counts, so the default cache grows for a long time: on the
    250M load test (benchmarks/serve_load.py) RSS rose 1366 -> 1419 -> 1448 MiB over three rounds by default and
    1311 -> 1337 -> 1343 MiB with 64 entries, at the same throughput (a step needs a handful of shapes; decode
    batches of up to 16 rows do not go through oneDNN at all).
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(int(entries)))


@functools.cache
def _glibc_malloc_trim():
    """libc's malloc_trim, looked up at first use (platform.libc_ver reads the interpreter's binary: not at import)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Give the free pages of every malloc arena back to the system (glibc's malloc_trim(0)); False elsewhere.

    Why: quantizing a checkpoint while it streams in makes fp32 temporaries of each tensor on torch's threads; freed,
    they stay in those threads' arenas, so the resident size after loading, and its peak, depended on how they
    happened to fall. Loading the 250M benchmark model with quantize="nf4", three times each: peak 0.27-0.37x of
    the fp32 weight bytes and 228-262 MiB resident after, without trimming; 0.23-0.25x and 161 MiB, trimming after
    every tensor.
    """
    trim = _glibc_malloc_trim()
    return bool(trim is not None and trim(0) >= 0)
