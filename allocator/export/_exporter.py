"""What passes between :func:`allocator.export.export_plan` and a target: the
:class:`ExportContext` it hands in (the plan, what is known about the model, the notes an export
collects), the :class:`ExportResult` it gets back, and the :class:`Exporter` protocol a target
module's ``EXPORTER`` follows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from allocator.core.errors import ExportError, UnknownNameError
from allocator.core.formats import QuantFormat, parse_format
from allocator.core.plan import BitPlan

__all__ = ["ExportContext", "ExportResult", "Exporter", "module_of"]

_GROUP_RE = re.compile(r"^(?P<module>.+)\[g=(?P<g>\d+)\]$")


def module_of(unit: str) -> tuple[str, int | None]:
    """``'m[g=3]'`` → ``('m', 3)``; a module unit → ``(unit, None)``."""
    m = _GROUP_RE.match(unit)
    return (m["module"], int(m["g"])) if m else (unit, None)


@dataclass(kw_only=True)
class ExportContext:
    """The plan plus what is known about the model, and the notes an export collects."""

    plan: BitPlan
    target: str
    lossy: bool = False
    model_names: frozenset[str] | None = None
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    arch: str | None = None  #: model family (HF ``model_type``), for GGUF tensor names
    notes: list[str] = field(default_factory=list)
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)

    def fail(self, message: str, *, lossy_hint: bool | str = False) -> ExportError:
        """A one-line error; ``lossy_hint`` names what --lossy would do instead."""
        what = "raise them to the highest setting" if lossy_hint is True else lossy_hint
        hint = f" (or pass --lossy to {what})" if what else ""
        return ExportError(f"{self.target}: {message}{hint}")

    def formats(self) -> dict[str, QuantFormat]:
        """unit → parsed option (unknown labels refused)."""
        out: dict[str, QuantFormat] = {}
        for unit, a in self.plan.assignments.items():
            try:
                out[unit] = parse_format(a.option)
            except UnknownNameError:
                raise self.fail(f"unit {unit!r} has option {a.option!r}, which is not in the format "
                                "catalogue; use fp16, int<b>-g<g>-<sym|asym> or a GGUF type") from None
        return out

    def in_features(self, module: str) -> int | None:
        shape = self.shapes.get(module)
        if not shape or len(shape) < 2:
            return None
        n = 1
        for d in shape[1:]:
            n *= d
        return n

    def params(self, module: str) -> int | None:
        shape = self.shapes.get(module)
        if not shape:
            return None
        n = 1
        for d in shape:
            n *= d
        return n


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    """The exported text (``text``, for the main file), extra files and what to tell the user.

    ``files`` maps a file-name suffix (``".json"``) to the content of a companion file written
    next to the main one. ``changed`` lists, in lossy mode, unit → (planned, exported) labels.
    """

    target: str
    text: str
    suffix: str
    files: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    changed: Mapping[str, tuple[str, str]] = field(default_factory=dict)


class Exporter(Protocol):
    NAME: str
    SUFFIX: str
    #: what ``base`` means for this target, or None when it takes none
    BASE_HELP: str | None

    def export(self, ctx: ExportContext, base: str | None) -> ExportResult: ...
