"""Model roots: the folders a server shares with its clients. A job names a model (or a data
file) under one of them, and nothing outside them is read (``..`` and symlinks out are refused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from allocator.service.infra.errors import ServiceError

__all__ = ["resolve_model_path"]


def resolve_model_path(model: Any, roots: list[Path]) -> Path:
    """The real path of ``model`` if it lies inside a configured root, else a 403.

    ``model`` is ``<root name>/<relative path>`` or an absolute path. Symlinks are resolved
    before the check, so ``..`` and links out of a root are refused alike.
    """
    if not isinstance(model, str) or not model or "\x00" in model:
        raise ServiceError(422, "invalid_parameter", "params.model must be a non-empty path string")
    if not roots:
        raise ServiceError(403, "model_roots_unset",
                           "this server has no model roots; start it with --model-root DIR")
    p = Path(model)
    if p.is_absolute():
        cands = [p]
    else:  # "<root name>/rest" first, then "rest" relative to each root
        cands = [r.joinpath(*p.parts[1:]) for r in roots if p.parts[0] == r.name]
        cands += [r / p for r in roots]

    def inside(real: Path) -> bool:
        return any(real == r or real.is_relative_to(r) for r in roots)

    for cand in cands:  # the first existing candidate decides (a link out of a root is refused)
        if cand.exists():
            if inside(cand.resolve()):
                return cand.resolve()
            break
    else:
        if any(inside(c.resolve()) for c in cands):
            raise ServiceError(404, "model_not_found",
                               f"model {model!r} does not exist under the model roots")
    raise ServiceError(403, "path_not_allowed",
                       f"model {model!r} is outside the configured model roots "
                       f"({', '.join(r.name for r in roots)}); use <root>/<dir>")
