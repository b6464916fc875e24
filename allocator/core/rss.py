"""Peak resident memory (RSS) of this process, stage by stage, without psutil.

On Linux the kernel keeps the high-water mark of the resident set (``VmHWM`` in
``/proc/self/status``) and resets it when ``5`` is written to ``/proc/self/clear_refs``, so a
stage's own peak is the mark read at its end after a reset at its start. Elsewhere (or when
``clear_refs`` cannot be written) only ``resource.getrusage``'s lifetime peak exists: the value of
a stage is then the process's peak so far, an upper bound, and :attr:`StageMeter.per_stage` says so.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

__all__ = ["StageMeter", "peak_rss_mb", "reset_peak_rss"]

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


class StageMeter:
    """Wall time (s) and peak RSS (MiB) of consecutive stages: :meth:`lap` closes the stage running
    since the previous lap (or construction) and starts the next. A name seen again (a stage that
    recurs, e.g. once per plan) adds its seconds and keeps the larger peak."""

    def __init__(self) -> None:
        import time

        self.per_stage = reset_peak_rss()
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        import time

        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self.peaks[name] = max(self.peaks.get(name, 0.0), round(peak_rss_mb(), 1))
        if self.per_stage:
            self.per_stage = reset_peak_rss()
        self._t = time.perf_counter()
