"""gyrfalcon.memory: the bound on oneDNN's primitive cache that `gyrfalcon serve` sets."""

from __future__ import annotations

from gyrfalcon.memory import cap_onednn_primitive_cache


def test_onednn_cache_cap_is_set_unless_the_user_chose_one(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    cap_onednn_primitive_cache(64)
    import os

    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    cap_onednn_primitive_cache(64)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"


def test_release_free_heap_returns_freed_memory():
    """On glibc, memory freed into the heap (small blocks, below the mmap threshold) goes back to the system."""
    import platform
    import subprocess
    import sys

    import pytest

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    child = r"""
import ctypes, sys
from gyrfalcon.memory import current_rss_bytes, release_free_heap
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.malloc.argtypes = [ctypes.c_size_t]
blocks, keep = [], []
for _ in range(1600):  # 100 MiB of 64 KiB blocks (heap, not mmap), each followed by a small block that stays live,
    blocks.append(libc.malloc(64 << 10))  # so the freed blocks cannot merge into the heap's top and be trimmed by
    keep.append(libc.malloc(64))  # free() itself: they stay resident until malloc_trim
for p in blocks:
    ctypes.memset(p, 1, 64 << 10)
for p in blocks:
    libc.free(p)
before = current_rss_bytes()
assert release_free_heap()
freed = before - current_rss_bytes()
print(freed >> 20)
sys.exit(0 if freed > (80 << 20) else 1)
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
