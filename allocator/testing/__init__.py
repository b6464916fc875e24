"""Test helpers shipped with bitalloc: the solver conformance suite (needs pytest + hypothesis).

Import :mod:`allocator.testing.solver_conformance` from a test module; nothing here is imported
by :mod:`allocator` itself.
"""

from __future__ import annotations

__all__: list[str] = []
