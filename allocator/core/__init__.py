"""Core types: formats, units, cost tables, budgets, bit plans, solve results and their files.

The bottom layer (see ``docs/architecture.md``): importing it needs pandas/pyarrow only, never
torch, and it imports nothing above it. The public names are re-exported by :mod:`allocator`.
"""
