"""``bitalloc estimate``: score every unit × option of a model with a sensitivity estimator."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from allocator.cli._common import add_device_argument, add_for_argument, console, device_from_args
from sensitivity import DEFAULT_BATCH_SIZE, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN

if TYPE_CHECKING:
    from sensitivity import EstimateSpec, Sharding

HELP = "estimate a cost table (unit × option sensitivities) for a model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local Hugging Face model directory, 'minilm' or 'tiny-llama'")
    p.add_argument("--method", required=True,
                   help="estimator: hessian-trace, hessian-eig, fisher, gauss-newton, salience, "
                   "hessian-proxy, measured, relevance, datafree, lim, zd")
    p.add_argument("--data", help="calibration texts: .txt (one text per paragraph, blank-line "
                   "separated), .jsonl with a 'text' field, or builtin:DOMAIN (default: the built-in mix)")
    p.add_argument("--options", help="option spec, e.g. 'int2..8-g128-asym,fp16' (default)")
    p.add_argument("--quantizer", choices=("rtn", "gptq", "ggml"), default=None,
                   help="how each ΔW = Q(W) − W is formed: rtn (default; ggml with --for llamacpp), "
                   "gptq (GPTQ of each unit from its input Hessian on the calibration data) or ggml "
                   "(llama.cpp's quantizers for GGUF options, imatrix from the data; docs/quantizer.md)")
    add_for_argument(p, "estimate")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"calibration texts (default {DEFAULT_SAMPLES})")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"tokens per text (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"texts per batch (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--groups", type=int, help="split weights into groups of G input columns")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only units matching this glob, e.g. 'model.layers.0.*' (a module "
                   "selects everything under it; repeatable; as in 'bitalloc run')")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out units matching this glob, e.g. '*.o_proj' or 'pooler' "
                   "(repeatable)")
    p.add_argument("--kinds", default="linear",
                   help="comma-separated module kinds: linear, conv, embedding (default linear)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="estimator parameter (JSON value), e.g. --param max_probes=50 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    add_device_argument(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--sequential", action="store_true",
                   help="one transformer block in memory at a time, read from the model's safetensors "
                        "(hessian-proxy, salience, gauss-newton, fisher; docs/sequential.md)")
    p.add_argument("-o", "--output", default="table.parquet",
                   help="output file (.parquet, .csv or .json; default table.parquet)")
    g = p.add_argument_group("sharding: work split over workers that share an Optuna storage; "
                             "other machines join with the same command. measured splits the "
                             "units; gauss-newton, fisher, salience, hessian-proxy and relevance "
                             "the calibration batches")
    g.add_argument("--storage", help="Optuna storage URL: sqlite:///estimate.db or postgresql://... "
                   "(default: in memory, this process only)")
    g.add_argument("--study", help="study name, stored as estimate-NAME (default: from the model, "
                   "data and options fingerprint); re-run to resume")
    g.add_argument("--shards", type=int, help="shards in the queue (default: the study's, else 4 "
                   "per local worker)")
    g.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    g.add_argument("--stale-after", type=float, default=120.0, metavar="SECONDS",
                   help="requeue a running shard with no heartbeat for this long (default 120)")
    g.add_argument("--wait", action="store_true",
                   help="wait until every shard is complete (taking over stale ones), then write")
    g.add_argument("--max-shards", type=int, metavar="N",
                   help="stop each local worker after N shards (bounded jobs; re-run to go on)")


def sharding(args: argparse.Namespace, method: str) -> Sharding | None:
    """The :class:`~sensitivity.Sharding` of the sharding flags, None when none is used (they
    need ``measured``, sharded by unit, or a batch-additive estimator, sharded by batch)."""
    from allocator.core.errors import InvalidParameterError
    from sensitivity import Sharding, get_estimator

    used = [f for f, on in (("--storage", args.storage is not None), ("--study", args.study is not None),
                            ("--shards", args.shards is not None), ("--workers", args.workers != 1),
                            ("--wait", args.wait), ("--max-shards", args.max_shards is not None))
            if on]
    if not used:
        return None
    if method != "measured" and not get_estimator(method).batch_additive():
        raise InvalidParameterError(
            f"{used[0]} shards 'measured' (by unit) and the batch-additive estimators (by batch), "
            f"not {method!r}, whose statistics do not add over batches; drop {used[0]} or "
            "use another --method")
    if args.sequential:
        raise InvalidParameterError("--sequential runs in one process; drop --storage / --workers")
    return Sharding(storage=args.storage, study=args.study, n_shards=args.shards,
                    workers=args.workers, stale_after_s=args.stale_after, wait=args.wait,
                    max_shards=args.max_shards)


def estimate_spec(args: argparse.Namespace, options: str | None) -> EstimateSpec:
    """The one :class:`~sensitivity.EstimateSpec` of the command line, execution included
    (``--param`` names are checked against the estimator's declared parameters here, before any
    model loads)."""
    from allocator.core.errors import InvalidParameterError
    from sensitivity import ESTIMATORS, EstimateSpec, check_estimator_params, parse_estimator_params

    try:
        params = parse_estimator_params(args.param)
        if params and args.method in ESTIMATORS:
            check_estimator_params(args.method, params)
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"--param: {exc}") from None
    shards = sharding(args, args.method) if args.method in ESTIMATORS else None
    return EstimateSpec(
        method=args.method, params=params, data=args.data, options=options,
        samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
        include=tuple(args.include), exclude=tuple(args.exclude), groups=args.groups,
        kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()), seed=args.seed,
        device=device_from_args(args), progress=not args.no_progress,
        quantizer=args.quantizer or _default_quantizer(args), sequential=args.sequential,
        sharding=shards)


def _default_quantizer(args: argparse.Namespace) -> str:
    """ggml for --for llamacpp (rtn with --sequential, which supports rtn only), else rtn."""
    from allocator.model.quant.quantizer import default_quantizer

    return "rtn" if args.sequential else default_quantizer(getattr(args, "consumer", None))


def run(args: argparse.Namespace) -> int:
    from allocator.export.palettes import palette_options, table_for_model
    from sensitivity import ShardsPending, estimate

    consumer = getattr(args, "consumer", None)
    options = palette_options(consumer, args.options, args.groups)
    spec = estimate_spec(args, options)
    if spec.sharding is not None and not getattr(args, "verbose", False):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one summary line, not per trial
    try:
        table = estimate(args.model, spec)
    except ShardsPending as pending:
        out = pending.outcome
        console().print(f"{out.study}: {out.n_shards - len(out.pending)}/{out.n_shards} shards "
                        f"complete ({out.measured} here); shards {list(out.pending)} are running "
                        f"elsewhere. The command that finishes the last one writes the table; re-run "
                        f"this one (or add --wait) to write it to {args.output}")
        return 0
    table = table_for_model(table, consumer, args.model)
    path = table.save(args.output)
    meta = table.metadata
    how = {"sequential": " (sequential)", "sharded": ""}.get(str(spec.execution), "")
    shards = meta.get("sharded")
    where = (f", {shards['n_shards']} shards in {shards['study']}" if shards else "")
    peak = (f", peak {meta['peak_params']:,} parameters in memory" if "peak_params" in meta else "")
    console().print(f"{args.method}{how}: {table.n_units} units × {len(table.options)} options{where}, "
                    f"{table.total_params:,} params{peak}, {meta.get('seconds', 0):.1f} s -> {path}")
    _say_consumer(table)
    return 0


def _say_consumer(table: Any) -> None:
    """What ``--for`` changed: the consumer, its tie groups and the units it leaves out."""
    consumer = table.metadata.get("consumer")
    if consumer is None:
        return
    ties = table.df["tie"][table.df["tie"] != ""].nunique() if "tie" in table.df else 0
    dropped = table.metadata.get("consumer_dropped") or {}
    left = "".join(f"; left out {u} ({why})" for u, why in list(dropped.items())[:3])
    more = f" (+{len(dropped) - 3} more)" if len(dropped) > 3 else ""
    console().print(f"for {consumer}: {len(table.options)} options, {ties} tie group(s){left}{more}",
                    markup=False)
