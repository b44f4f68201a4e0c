"""Process memory readings for the load and generation benchmarks.

Peak resident memory is what decides whether a model fits on a host, and it is what the kernel's OOM killer
acts on, so that is what we measure: `ru_maxrss` (the high-water mark of the resident set, file-backed pages
included), not Python-level allocation counters that miss torch's and mmap's memory.
"""

from __future__ import annotations

import resource
import sys

import psutil


def peak_rss_bytes() -> int:
    """The peak resident set size of this process so far, in bytes (since start or the last `reset_peak_rss`)."""
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
