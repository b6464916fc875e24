"""Module-name regexes for targets that select modules by pattern (GPTQModel ``dynamic``,
llm-compressor ``targets``, llama.cpp tensor types): anchored, minimal, and valid alike in
Python ``re``, PCRE and ECMAScript.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["anchored_patterns"]


def anchored_patterns(
    names: Iterable[str], *, extra_leaves: Mapping[str, Sequence[str]] | None = None,
    suffix: str = "",
) -> list[str]:
    """Anchored regexes (``^…$``) whose union matches exactly ``names`` (+ ``extra_leaves``).

    Names sharing a parent are folded into a leaf alternation, then parents differing only in
    their last numeric component (the layer index) into an index alternation, so each pattern
    matches exactly the cross product it was built from. ``extra_leaves[parent]`` adds leaves
    (vLLM fused names) to a parent's alternation. Only ``\\.``, ``(…|…)``, ``^``, ``$`` are used:
    valid and equal in Python ``re``, PCRE and ECMAScript, and unchanged by lower-casing.
    """
    by_parent: dict[str, set[str]] = defaultdict(set)
    for n in names:
        parent, _, leaf = n.rpartition(".")
        by_parent[parent].add(leaf)
    for parent, extra in (extra_leaves or {}).items():
        if parent in by_parent:
            by_parent[parent].update(extra)
    # (head, tail, leaves) → layer indices; None marks a parent with no numeric component
    templ: dict[tuple[str, str | None, tuple[str, ...]], list[str]] = defaultdict(list)
    for parent, leaves in by_parent.items():
        parts = parent.split(".") if parent else []
        idx = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
        if idx is None:
            templ[(parent, None, tuple(sorted(leaves)))].append("")
        else:
            templ[(".".join(parts[:idx]), ".".join(parts[idx + 1:]), tuple(sorted(leaves)))].append(
                parts[idx])
    out: list[str] = []
    for (head, tail, leaf_names), indices in templ.items():
        pieces = [re.escape(head)] if head else []
        if tail is not None:
            pieces.append(_alt(sorted(indices, key=int)))
            if tail:
                pieces.append(re.escape(tail))
        pieces.append(_alt(leaf_names))
        out.append("^" + r"\.".join(pieces) + re.escape(suffix) + "$")
    return sorted(out)


def _alt(items: Sequence[str]) -> str:
    if len(items) == 1:
        return re.escape(items[0])
    return "(" + "|".join(re.escape(x) for x in items) + ")"
