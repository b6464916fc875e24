"""``bitalloc demo``: the whole pipeline on the bundled MiniLM (built-in corpus, or --data)."""

from __future__ import annotations

import argparse

from allocator.cli._run import add_common, config_from_args, execute

HELP = "run the whole pipeline on the bundled MiniLM (estimate, frontier, solve, apply, evaluate)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, out="bitalloc-demo", estimator="gauss-newton", calib=16, evals=64)


def run(args: argparse.Namespace) -> int:
    return execute(config_from_args(args, "minilm"))
