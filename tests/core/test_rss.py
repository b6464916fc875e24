"""Per-stage peak RSS (allocator/core/rss.py): freed memory goes back to the system at each stage
boundary, so a stage's peak is its own working set and not what an earlier stage left behind."""

from __future__ import annotations

import sys

import pytest

from allocator.core.rss import StageMeter, bound_heap, peak_rss_mb, release_free_memory, trim_heap

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim / mallopt")


def _rss_mb() -> float:
    import re
    from pathlib import Path

    m = re.search(r"^VmRSS:\s+(\d+)", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert m is not None
    return int(m[1]) / 1024


@glibc
@pytest.mark.parametrize("release", [release_free_memory, trim_heap])
def test_a_freed_transient_does_not_stay_resident(release) -> None:  # type: ignore[no-untyped-def]
    """200 MB of 64 KiB blocks (below any mmap threshold: served from the heap), the last one
    kept so the heap cannot shrink from its top by itself: after the release (with a garbage
    collection, or the trim alone that the factored sweep calls after each block) the RSS is
    back within 50 MB of where it started."""
    assert bound_heap()
    release()
    start = _rss_mb()
    keep = _heap_transient(200)
    assert release()
    assert _rss_mb() < start + 50
    del keep


def _heap_transient(mb: int) -> bytearray:
    """``mb`` MB of 64 KiB heap blocks, all freed but the last (which pins the heap's top, so
    glibc cannot give the rest back by itself); the survivor is returned."""
    blocks = [bytearray(64 << 10) for _ in range(mb * 16)]
    for b in blocks:
        b[::4096] = b"\1" * len(b[::4096])  # touch every page
    return blocks[-1]


@glibc
def test_meter_records_each_stage_from_the_released_level() -> None:
    meter = StageMeter()
    keep = _heap_transient(150)
    meter.lap("big")
    meter.lap("small")
    assert meter.per_stage and set(meter.peaks) == {"big", "small"}
    assert meter.peaks["big"] >= meter.peaks["small"] + 100  # the freed 150 MB left with the lap
    assert peak_rss_mb() > 0
    del keep


def test_meter_without_release_still_measures() -> None:
    meter = StageMeter(release=False)
    meter.lap("a")
    assert meter.peaks["a"] > 0 and meter.seconds["a"] >= 0
