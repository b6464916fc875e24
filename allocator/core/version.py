"""The library's version, in a module of its own so core types can stamp it into what they write
without importing the :mod:`allocator` package that re-exports them."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
