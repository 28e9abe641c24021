"""Steady CPU timings: freed memory kept for reuse instead of handed back to the system.

glibc's ``malloc`` serves a block above its mmap threshold (128 KiB at
start, then adapting to the largest block freed so far) with a fresh
``mmap``, and hands it back on ``free``; it also trims the heap's free top
once that exceeds twice the threshold. Every page of such a block then
faults in again on first touch. A CPU training step allocates and frees
many blocks of megabytes (outputs, gradients, a convolution's workspace,
a decomposition's temporaries), so part of its time goes to page faults,
and how much depends on the process's allocation history. On this project's machine, vanilla's
training step of a 1x1 conv (64x192x28x28 input) faulted in 37,636 pages
every step and took 73-75 ms with the defaults, against no faults and
31-34 ms with freed memory reused; its depthwise conv step took 21-28 ms
against 14-16 ms (``python benchmarks/test_layers.py --layers dw3x3 pw1x1
linear --thresholds 0.8 --repeats 7 --methods vanilla asi --allocator
system``, then ``reuse``, twice in turn: the ``faults`` column).

:func:`reuse_freed_memory` fixes the state: every block comes from the
heap and freed memory stays mapped for the next allocation, which is
what the allocators PyTorch's CPU tuning guides recommend (jemalloc,
TCMalloc) do too. The benchmarks and ``tensorcompress run`` call it unless
given ``--allocator system``.
"""

from __future__ import annotations

import argparse
import ctypes
import platform

__all__ = [
    "ALLOCATORS",
    "ALLOCATOR_HELP",
    "add_allocator_argument",
    "minor_faults",
    "reuse_freed_memory",
    "use_allocator",
]

ALLOCATORS = ("reuse", "system")
"""``--allocator`` choices: freed memory reused (:func:`reuse_freed_memory`), or
the C library's defaults left as they are."""

ALLOCATOR_HELP = (
    "reuse: freed memory kept for the next allocation, so step times do not depend on "
    "page faults (default); system: the C library's defaults"
)
"""The ``--allocator`` option's help, the same in every command that takes it."""

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1


def reuse_freed_memory() -> bool:
    """Keep freed memory mapped and reuse it (glibc; elsewhere a no-op).

    Stops glibc from serving blocks with ``mmap`` (``M_MMAP_MAX`` 0: every
    block comes from the heap, whatever its size) and sets the heap's trim
    threshold to 2 GiB, for the whole process and from now on. Large
    temporaries then reuse pages already mapped instead of faulting fresh
    ones in, so step times stop depending on the allocation history. The
    cost: memory freed after a peak stays with the process instead of going
    back to the system (the peak itself is unchanged).

    Returns
    -------
    bool
        Whether the C library accepted both settings (False off glibc).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def add_allocator_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--allocator`` (one of :data:`ALLOCATORS`, default ``"reuse"``) to a command.

    Parameters
    ----------
    parser : argparse.ArgumentParser or argument group
        Where the option goes; pass its value to :func:`use_allocator`.
    """
    parser.add_argument("--allocator", choices=ALLOCATORS, default="reuse", help=ALLOCATOR_HELP)


def use_allocator(choice: str) -> str:
    """Apply an ``--allocator`` choice; returns a description for a report's header.

    Parameters
    ----------
    choice : {"reuse", "system"}
        ``"reuse"``: :func:`reuse_freed_memory`; ``"system"``: nothing.

    Returns
    -------
    str
        What the process now runs with, for a report's header.

    Raises
    ------
    ValueError
        If ``choice`` is not one of :data:`ALLOCATORS`.
    """
    if choice not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}, got {choice!r}")
    if choice == "system":
        return "allocator: the C library's defaults"
    if reuse_freed_memory():
        return "allocator: freed memory reused (glibc: no mmap, no trim)"
    return "allocator: the C library's defaults (reuse_freed_memory needs glibc)"


def minor_faults() -> int:
    """This process's minor page faults so far (pages mapped in on first touch; 0 off Unix)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
