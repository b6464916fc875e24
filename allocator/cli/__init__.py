"""The ``bitalloc`` command line: one module per verb, imported only when that verb runs.

Each verb module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Errors from the library (:class:`~allocator.core.errors.AllocatorError`) become one line on stderr
and exit code 2; there are no tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from allocator.core.errors import AllocatorError

__all__ = ["VERBS", "build_parser", "main"]

#: verb → module (each module: HELP, add_arguments, run).
VERBS: dict[str, str] = {
    "synth": "allocator.cli._synth",
    "estimate": "allocator.cli._estimate",
    "compare": "allocator.cli._compare",
    "solve": "allocator.cli._solve",
    "frontier": "allocator.cli._frontier",
    "search": "allocator.cli._search",
    "apply": "allocator.cli._apply",
    "evaluate": "allocator.cli._evaluate",
    "export": "allocator.cli._export",
    "serve": "allocator.cli._serve",
    "demo": "allocator.cli._demo",
    "run": "allocator.cli._run",
}


def _verb_module(verb: str) -> ModuleType | None:
    try:
        return importlib.import_module(VERBS[verb])
    except ModuleNotFoundError as exc:
        if exc.name == VERBS[verb]:
            return None  # verb not built in this installation
        raise


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse's own convention)
        # prog is "bitalloc" or "bitalloc VERB": print it as is (not "bitalloc bitalloc")
        self.exit(2, f"{self.prog}: error: {message}\n"
                     f"(see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bitalloc", description="Mixed-precision bit allocation for quantization.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for verb in VERBS:
        module = _verb_module(verb)
        if module is None:
            continue
        p = sub.add_parser(verb, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        code: int = args._run(args)
        return code
    except AllocatorError as exc:
        print(f"bitalloc {args.verb}: error: {_one_line(exc)}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        print(f"bitalloc {args.verb}: interrupted", file=sys.stderr)  # noqa: T201
        return 130
    except (OSError, MemoryError) as exc:
        print(f"bitalloc {args.verb}: error: {_one_line(exc)}", file=sys.stderr)  # noqa: T201
        return 1


def _one_line(exc: BaseException) -> str:
    """The message on one line: wrapped parser errors (pandas, pyarrow) may span several."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
