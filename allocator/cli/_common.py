"""Helpers shared by CLI verbs: console output, budgets from flags, resource caps."""

from __future__ import annotations

import argparse
from typing import Any

from allocator.core.budget import Budget
from allocator.core.errors import InvalidParameterError

__all__ = ["add_budget_arguments", "add_for_argument", "budget_from_args", "console", "parse_caps"]


def console() -> Any:
    """A rich console on stdout (imported lazily: rich is only needed for pretty output)."""
    from rich.console import Console

    return Console(highlight=False)


def parse_caps(items: list[str] | None) -> dict[str, float]:
    """``["bops=1e9", "latency_us=300"]`` → ``{"bops": 1e9, "latency_us": 300.0}``."""
    caps: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidParameterError(f"--max expects COLUMN=VALUE, got {item!r}")
        try:
            caps[name] = float(value)
        except ValueError:
            raise InvalidParameterError(f"--max {item!r}: {value!r} is not a number") from None
    return caps


def add_budget_arguments(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--bpw", type=float, help="average bits per weight, overheads included")
    g.add_argument("--size-bytes", type=float, help="total size of the quantized units in bytes")
    p.add_argument("--max", action="append", metavar="COL=V",
                   help="cap a numeric resource column of the table (repeatable)")
    p.add_argument("--min-bits", type=float, help="no unit below this many payload bits")
    p.add_argument("--max-bits", type=float, help="no unit above this many payload bits")


def budget_from_args(args: argparse.Namespace) -> Budget:
    return Budget(bpw=args.bpw, size_bytes=args.size_bytes, max=parse_caps(args.max),
                  min_bits=args.min_bits, max_bits=args.max_bits)


def add_for_argument(p: argparse.ArgumentParser, what: str) -> None:
    """``--for CONSUMER``: the options and ties that consumer stores (``allocator.export.palettes``)."""
    from allocator.export.palettes import PALETTES

    p.add_argument("--for", dest="consumer", choices=tuple(PALETTES), metavar="CONSUMER",
                   help=f"{what} exactly what CONSUMER stores ({', '.join(PALETTES)}), so "
                        "`export --to CONSUMER` needs no --lossy (docs/exports.md)")


def add_device_argument(p: argparse.ArgumentParser, *, cpu_only: str | None = None) -> None:
    """``--device``: where the model and its batches run. ``cpu_only`` names a verb whose
    pipeline does not take a device yet: it accepts ``cpu`` and refuses the rest clearly."""
    tail = f" ({cpu_only} runs on the CPU only for now)" if cpu_only else ""
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help=f"cpu (default), cuda, cuda:1, mps{tail}")


def device_from_args(args: argparse.Namespace, *, cpu_only: str | None = None) -> str:
    """The checked ``--device`` (:func:`allocator.model.device.check_device`): one line naming the
    value and the fix, before any model loads."""
    from allocator.model.device import check_device

    device = check_device(getattr(args, "device", "cpu"))
    if cpu_only and device != "cpu":
        raise InvalidParameterError(f"--device {device}: bitalloc {cpu_only} runs on the CPU only "
                                    f"for now; use --device cpu (estimate, apply and evaluate take "
                                    f"--device {device})")
    return device
