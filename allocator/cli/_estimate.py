"""``bitalloc estimate``: score every unit × option of a model with a sensitivity estimator."""

from __future__ import annotations

import argparse
import json
from typing import Any

from allocator.cli._common import console

HELP = "estimate a cost table (unit × option sensitivities) for a model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local Hugging Face model directory, 'minilm' or 'tiny-llama'")
    p.add_argument("--method", required=True,
                   help="estimator: hessian-trace, hessian-eig, fisher, salience, hessian-proxy, "
                   "measured, relevance, datafree, lim, zd")
    p.add_argument("--data", help="calibration texts: .txt (one text per paragraph, blank-line "
                   "separated) or .jsonl with a 'text' field (default: the built-in corpus)")
    p.add_argument("--options", help="option spec, e.g. 'int2..8-g128-asym,fp16' (default)")
    p.add_argument("--samples", type=int, default=32, help="calibration texts (default 32)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per text (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="texts per batch (default 8)")
    p.add_argument("--groups", type=int, help="split weights into groups of G input columns")
    p.add_argument("--include", help="regex: only modules whose name matches")
    p.add_argument("--exclude", help="regex: skip modules whose name matches")
    p.add_argument("--kinds", default="linear",
                   help="comma-separated module kinds: linear, conv, embedding (default linear)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="estimator parameter (JSON value), e.g. --param max_probes=50 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("-o", "--output", default="table.parquet",
                   help="output file (.parquet, .csv or .json; default table.parquet)")


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["max_probes=50", "probe_mode=loop"]`` → ``{"max_probes": 50, "probe_mode": "loop"}``."""
    from allocator.errors import InvalidParameterError

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InvalidParameterError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw  # a bare word is a string (probe_mode=loop)
    return out


def run(args: argparse.Namespace) -> int:
    from allocator.errors import InvalidParameterError
    from sensitivity import run_estimate

    params = parse_params(args.param)
    try:
        table = run_estimate(
            args.model, method=args.method, data=args.data, options=args.options,
            samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
            include=args.include, exclude=args.exclude, groups=args.groups,
            kinds=[k.strip() for k in args.kinds.split(",") if k.strip()], seed=args.seed,
            device=args.device, progress=not args.no_progress, estimator_params=params)
    except TypeError as exc:  # an unknown --param reaches the estimator's constructor
        if "unexpected keyword" in str(exc):
            raise InvalidParameterError(f"--param: {exc}; see the estimator's parameters in "
                                        "docs/sensitivity.md") from None
        raise
    path = table.save(args.output)
    meta = table.metadata
    console().print(f"{args.method}: {table.n_units} units × {len(table.options)} options, "
                    f"{table.total_params:,} params, {meta.get('seconds', 0):.1f} s -> {path}")
    return 0
