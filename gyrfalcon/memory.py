"""Process memory readings for the load and generation benchmarks.

Peak resident memory is what decides whether a model fits on a host, and it is what the kernel's OOM killer
acts on, so that is what we measure: the high-water mark of the resident set (VmHWM / ru_maxrss, file-backed
pages included), not Python-level allocation counters that miss torch's and mmap's memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fix_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Have glibc serve every allocation of at least `nbytes` with its own mapping, returned to the system when it
    is freed; True when set (glibc on Linux), else False and nothing changes.

    Why: glibc raises its mmap threshold each time it frees a mapped block (up to 32 MiB), and from then on large
    blocks come from the heap. A server's activations change size with every mix of prefill chunks, so the heap
    fragments and its resident size creeps up round after round. Measured with oneDNN GEMMs of 72 different row
    counts, three rounds: 495 -> 512 -> 512 MiB by default, 443 -> 444 -> 444 MiB with a fixed 1 MiB threshold.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False
