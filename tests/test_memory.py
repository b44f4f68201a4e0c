"""gyrfalcon.memory: the fixed mmap threshold the server sets (glibc), checked in a child process so the test
process's allocator is left as it was."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CHILD = r"""
import ctypes, sys
from gyrfalcon.memory import current_rss_bytes, fix_mmap_threshold
assert fix_mmap_threshold(1 << 20)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
# 4 MiB blocks, written and freed 20 times: each is its own mapping, unmapped on free, so nothing stays resident.
# (Without the fixed threshold glibc raises it to 4 MiB at the first free and keeps later blocks in the heap.)
before = current_rss_bytes()
for _ in range(20):
    p = libc.malloc(4 << 20)
    ctypes.memset(p, 1, 4 << 20)
    libc.free(p)
grown = current_rss_bytes() - before
print(grown)
sys.exit(0 if grown < (2 << 20) else 1)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt's M_MMAP_THRESHOLD is glibc's")
def test_fixed_mmap_threshold_returns_freed_blocks_to_the_system():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_fix_mmap_threshold_is_a_no_op_elsewhere(monkeypatch):
    from gyrfalcon import memory

    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert memory.fix_mmap_threshold() is False
