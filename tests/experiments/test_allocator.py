"""The allocator setting of the benchmarks and ``tensorcompress run``."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tensorcompress.experiments.allocator import ALLOCATORS, use_allocator

# Three 16 MiB blocks written and freed, twice, after two warm-up cycles: the
# page faults of the timed cycles, in a fresh process with the given setting.
_CYCLES = """
import ctypes, sys
from tensorcompress.experiments.allocator import minor_faults, use_allocator
print(use_allocator(sys.argv[1]), file=sys.stderr)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 16 << 20
def cycle():
    blocks = [libc.malloc(n) for _ in range(3)]
    for b in blocks:
        ctypes.memset(b, 1, n)
    for b in blocks:
        libc.free(b)
cycle(); cycle()
before = minor_faults()
cycle(); cycle()
print(minor_faults() - before)
"""
_PAGES = 2 * 3 * (16 << 20) // 4096  # pages written by the timed cycles


def _faults(choice: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _CYCLES, choice], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_reuse_maps_freed_blocks_once() -> None:
    # With the C library's defaults, glibc hands the freed 48 MiB back and
    # every cycle faults its pages in again (minor_faults counts them);
    # reusing them faults none.
    reused, system = _faults("reuse"), _faults("system")
    assert reused < 0.02 * _PAGES
    assert system > 0.5 * _PAGES


def test_choices() -> None:
    assert ALLOCATORS == ("reuse", "system")
    assert "defaults" in use_allocator("system")
    with pytest.raises(ValueError, match="allocator must be one of"):
        use_allocator("jemalloc")
