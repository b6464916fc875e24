"""Test helpers shipped with bitalloc: the solver conformance suite (needs pytest + hypothesis)
and the estimator conformance suite (needs pytest, torch and transformers).

Import :mod:`allocator.testing.solver_conformance` or
:mod:`allocator.testing.estimator_conformance` from a test module; nothing here is imported by
:mod:`allocator` itself.
"""

from __future__ import annotations

__all__: list[str] = []
