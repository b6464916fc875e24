"""Progress bars for long estimator loops (tqdm on stderr, with ETA; silent when disabled)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(total: int | None, desc: str, enabled: bool) -> Iterator[Any]:
    """A tqdm bar of ``total`` steps (``update(n)``), closed on exit; a no-op bar when disabled.

    Bars do not stay on screen after they finish (``leave=False``): an estimator runs several.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
