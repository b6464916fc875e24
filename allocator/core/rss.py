"""Peak resident memory (RSS) of this process, stage by stage, without psutil.

On Linux the kernel keeps the high-water mark of the resident set (``VmHWM`` in
``/proc/self/status``) and resets it when ``5`` is written to ``/proc/self/clear_refs``, so a
stage's own peak is the mark read at its end after a reset at its start. Elsewhere (or when
``clear_refs`` cannot be written) only ``resource.getrusage``'s lifetime peak exists: the value of
a stage is then the process's peak so far, an upper bound, and :attr:`StageMeter.per_stage` says so.

Freed memory is not always returned: glibc keeps freed blocks below its mmap threshold in the heap
(and raises that threshold after each large free), so a stage's transients — an inert-unit
forward, a pass's quantization deltas — stayed resident into the next stage (measured on
SmolLM2-135M: 590 MB held after the inert-unit check, docs/memory.md). :func:`bound_heap` fixes
the threshold so large buffers are mapped and unmapped, and :func:`release_free_memory` hands
the heap's free pages back at each stage boundary; neither changes a value computed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import sys
from functools import cache
from pathlib import Path

__all__ = ["MMAP_THRESHOLD", "StageMeter", "bound_heap", "peak_rss_mb", "release_free_memory",
           "reset_peak_rss", "trim_heap"]

#: Bytes from which glibc serves an allocation with its own mapping, returned on free (the
#: default starts at 128 KiB and grows up to 32 MiB with each large free, after which tensors of
#: a few MiB — a unit's deltas, a row's logits — are recycled inside the heap and stay resident).
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers (malloc.h)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss_mb() -> float:
    """The process's resident-set high-water mark in MiB (since the last reset, where resets work)."""
    try:
        m = re.search(r"^VmHWM:\s+(\d+)\s*kB", _STATUS.read_text(encoding="ascii"), re.MULTILINE)
    except OSError:
        m = None
    if m is not None:
        return int(m[1]) / 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS; False where the platform cannot."""
    try:
        _CLEAR_REFS.write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


@cache
def _libc() -> ctypes.CDLL | None:
    """glibc, where this process runs on it (the only libc with ``malloc_trim`` / ``mallopt``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def bound_heap(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations of ≥ ``threshold`` bytes from their own mappings, for the rest of the
    process (fixing the threshold also stops glibc from raising it); False where not glibc."""
    libc = _libc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def trim_heap() -> bool:
    """Return the heap's free pages to the system (``malloc_trim``), no garbage collection: cheap
    enough to call once per block of a sweep, whose many sub-MiB tensors (one row's activations
    and cotangents) otherwise fragment the heap and raise the resident size block after block.
    False where not glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def release_free_memory() -> bool:
    """Collect garbage and return the heap's free pages to the system (``malloc_trim``);
    False where only the collection ran."""
    gc.collect()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


class StageMeter:
    """Wall time (s) and peak RSS (MiB) of consecutive stages: :meth:`lap` closes the stage running
    since the previous lap (or construction) and starts the next. A name seen again (a stage that
    recurs, e.g. once per plan) adds its seconds and keeps the larger peak.

    With ``release`` (the default) the process's heap is bounded (:func:`bound_heap`) and each
    lap returns freed memory (:func:`release_free_memory`) before the next stage's mark is reset,
    so a stage's peak is its own working set, not what earlier stages left in the heap."""

    def __init__(self, *, release: bool = True) -> None:
        import time

        self.release = release
        if release:
            bound_heap()
            release_free_memory()
        self.per_stage = reset_peak_rss()
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        import time

        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self.peaks[name] = max(self.peaks.get(name, 0.0), round(peak_rss_mb(), 1))
        if self.release:
            release_free_memory()
        if self.per_stage:
            self.per_stage = reset_peak_rss()
        self._t = time.perf_counter()
