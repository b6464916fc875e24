"""Shard an estimate over worker processes that share an Optuna storage.

An :class:`~sensitivity.EstimateSpec` with a :class:`~sensitivity.Sharding` says everything a
worker needs (model, data, options, filters, storage URL, study name), so a worker on another
machine joins with the same spec (:func:`sensitivity.estimate` dispatches it here):
``bitalloc estimate tiny-llama --method measured --storage postgresql://... --study s1
--workers 4``. Every worker loads the model and data, discovers the units and checks the
study's fingerprint; the shards are claimed from the queue of :mod:`sensitivity.shard_queue`.
Two ways to split (:func:`sensitivity._spec.sharded_methods` lists the methods):

* ``measured`` shards by **unit**: the units are split by
  :func:`sensitivity._measured.shard_units`, each claimed shard is measured with
  :func:`~sensitivity._measured.measure_units` and its rows stored in its trial; once every
  shard is COMPLETE, :func:`~sensitivity._measured.merge_measured` assembles the table.
* the batch-additive estimators (:class:`~sensitivity._base.BatchAdditiveEstimator`:
  gauss-newton, fisher, salience, hessian-proxy, relevance) shard by **calibration batch**:
  the batch indices are split the same interleaved way, a shard computes the estimator's
  :class:`~sensitivity._base.Partial` (sums and counts over its batches, every random draw
  seeded per batch) and stores it in its trial as JSON (arrays as base64 float64, split over
  ``partial:<i>`` attributes of ≤ 256 KiB), and the merge adds the partials and runs the
  estimator's finish once. Each shard holds every unit, so the merge is exact up to the order of
  the float additions. Not batch-additive, so refused: ``hessian-eig`` (power iteration: every
  iteration is a pass over all the data) and ``hessian-trace`` (a probe is a pass over all the
  data, and the probes stop once the full-data traces are precise enough).

Either way the merged table is the one a single-process run would give (same rows and
metadata; costs equal to float round-off between machines, thread counts and summation order).

Resuming: re-running the same command fails RUNNING shards whose heartbeat is older than
``stale_after_s``, enqueues every shard without a waiting, running or complete trial and
measures those; a finished shard is never measured again. In-memory storage cannot be shared,
so ``workers > 1`` needs an RDB URL (SQLite file or PostgreSQL).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sensitivity.shard_queue as q
from allocator.core.errors import AllocatorError, InvalidParameterError
from allocator.core.table import CostTable
from sensitivity._spec import EstimateSpec, Sharding

if TYPE_CHECKING:
    import optuna

    from sensitivity._driver import PreparedEstimate
    from sensitivity._measured import MeasuredEstimator

__all__ = ["ShardJob", "ShardOutcome", "ShardsPending", "estimate_fingerprint", "run_shard_worker",
           "run_shards"]

log = logging.getLogger(__name__)

STUDY_PREFIX = "estimate-"
SHARDS_PER_WORKER = 4  #: default shards per local worker: balance, and little lost to a crash
#: A batch shard's partial statistics are stored in chunks of this many characters (well under
#: shard_queue.MAX_ATTR_BYTES once JSON-escaped) ...
PARTIAL_CHUNK_CHARS = 1 << 18
#: ... and refused above this in all (salience keeps a d × d input Hessian per module: 8·d² B).
MAX_PARTIAL_BYTES = 64 << 20


def _by_batch(spec: EstimateSpec) -> bool:
    """Whether ``spec`` shards by calibration batch (else by unit: ``measured``)."""
    return spec.method != "measured"


@dataclass(frozen=True, kw_only=True)
class ShardJob:
    """Everything a shard worker needs: the model (a path or name: every worker loads it) and
    the :class:`~sensitivity.EstimateSpec` with its :class:`~sensitivity.Sharding`; plain data
    so it crosses process boundaries."""

    model: str
    spec: EstimateSpec

    def __post_init__(self) -> None:
        if not isinstance(self.model, str | os.PathLike):
            raise InvalidParameterError(
                f"a sharded estimate loads the model in every worker: pass its directory or "
                f"name, not {type(self.model).__name__}")
        object.__setattr__(self, "model", os.fspath(self.model))
        if self.spec.sharding is None:
            raise InvalidParameterError("this spec has no sharding; pass sharding=Sharding(...)")

    @property
    def sharding(self) -> Sharding:
        assert self.spec.sharding is not None  # checked above
        return self.spec.sharding


@dataclass(frozen=True, kw_only=True)
class ShardOutcome:
    """What a sharded run left: the merged table once every shard is complete."""

    study: str
    n_shards: int
    measured: int  #: shards measured (or, by batch, computed) by this run's processes
    pending: tuple[int, ...]  #: shards not complete yet (running elsewhere, or failed)
    table: CostTable | None


class ShardsPending(AllocatorError):
    """:func:`sensitivity.estimate` of a sharded spec whose shards are not all complete yet
    (running elsewhere, or stopped by ``max_shards``): nothing failed; ``outcome`` says which are
    pending, and re-running the same spec (or ``wait``) writes the table."""

    def __init__(self, outcome: ShardOutcome) -> None:
        done = outcome.n_shards - len(outcome.pending)
        super().__init__(f"{outcome.study}: {done}/{outcome.n_shards} shards complete "
                         f"({outcome.measured} here); shards {list(outcome.pending)} are running "
                         f"elsewhere. The run that finishes the last one writes the table; re-run "
                         f"the same estimate (or wait) to get it")
        self.outcome = outcome


def estimate_fingerprint(prep: PreparedEstimate) -> str:
    """sha256 of what fixes the rows: model and data content, units, options, seed, and the
    method's parameters (``measured``: metric and token cap; by batch: the method, its
    parameters and the batch count)."""
    est: Any = prep.estimator
    what = {"model": prep.loaded.fingerprint, "data": prep.metadata.get("data_fingerprint"),
            "kind": prep.ctx.model_kind, "units": [[u.name, u.params] for u in prep.ctx.units],
            "options": [o.name for o in prep.ctx.options], "seed": prep.ctx.seed}
    if _by_batch(prep.spec):
        what |= {"method": prep.spec.method, "params": est.params(),
                 "batches": len(prep.ctx.batches)}
    else:  # the keys of the first sharded release: its studies keep their fingerprint
        what |= {"metric": est.metric, "max_tokens": est.max_tokens}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _prepare(job: ShardJob, progress: bool) -> PreparedEstimate:
    from sensitivity._driver import prepare

    # each worker prepares the whole-model estimate and runs its shards of it
    params = {k: v for k, v in job.spec.params.items() if k != "workers"}
    return prepare(job.model, dataclasses.replace(job.spec, params=params, progress=progress,
                                                  sharding=None))


@dataclass(frozen=True, kw_only=True, eq=False)
class _Queue:
    """A worker's view of the queue: the study and the shards (unit indices, or batch indices
    for a batch-additive method) it holds."""

    storage: optuna.storages.BaseStorage
    study: optuna.Study
    name: str
    shards: list[list[int]]


def _open(job: ShardJob, prep: PreparedEstimate, storage: optuna.storages.BaseStorage,
          default_shards: int) -> _Queue:
    from sensitivity._measured import shard_units

    fp = estimate_fingerprint(prep)
    sh = job.sharding
    name = STUDY_PREFIX + (sh.study.strip() if sh.study else fp[:12])
    summary = {"model": prep.loaded.name, "units": len(prep.ctx.units),
               "options": ",".join(o.name for o in prep.ctx.options), "method": prep.spec.method}
    by_batch = _by_batch(prep.spec)
    if by_batch:  # more shards than batches would only leave shards empty
        default_shards = max(1, min(default_shards, len(prep.ctx.batches)))
    study, n_shards = q.open_queue(storage, name, fingerprint=fp, n_shards=sh.n_shards,
                                   default_shards=default_shards, summary=summary)
    # the same interleaved split for batches as for units (a short last batch lands anywhere)
    shards = shard_units(len(prep.ctx.batches) if by_batch else len(prep.ctx.units), n_shards)
    if not by_batch:
        biggest = max(len(s) for s in shards) * len(prep.ctx.options)
        # refuse before measuring, not after: a float of 17 digits and an exponent per entry
        q.check_payload_size(0, "cost", [-1.2345678901234567e-05] * biggest)
    q.requeue_stale(storage, study, sh.stale_after_s)
    q.ensure_queue(study, len(shards))
    return _Queue(storage=storage, study=study, name=name, shards=shards)


def _measure(prep: PreparedEstimate, items: list[int]) -> tuple[dict[str, Any], float]:
    """The payload of one shard and its seconds: by unit, the unit names, cost and cost_std rows
    and info; by batch, the batch ids and the partial statistics."""
    if _by_batch(prep.spec):
        return _partial_payload(prep, items)
    return _measure_units(prep, items)


def _partial_payload(prep: PreparedEstimate, batches: list[int]) -> tuple[dict[str, Any], float]:
    from sensitivity._base import BatchAdditiveEstimator
    from sensitivity._driver import seeded

    est = prep.estimator
    if not isinstance(est, BatchAdditiveEstimator):  # check_shardable let it through: a bug
        raise RuntimeError(f"estimator {est.name!r} has no partial statistics")
    start = time.perf_counter()
    # seeded as a single-process run; the estimator's own draws are seeded per batch
    with seeded(prep.ctx.seed):
        part = est.partial(prep.loaded.model, prep.ctx.subset(batches))
    seconds = time.perf_counter() - start
    text = json.dumps(part.to_json(), separators=(",", ":"))
    if len(text) > MAX_PARTIAL_BYTES:
        raise InvalidParameterError(
            f"{prep.spec.method}: one shard's statistics take {len(text):,} bytes (> "
            f"{MAX_PARTIAL_BYTES:,}); they do not shrink with more shards, so estimate fewer "
            f"units per study (--include/--exclude) or use another method (hessian-proxy keeps "
            f"only the diagonal)")
    chunks = [text[i:i + PARTIAL_CHUNK_CHARS] for i in range(0, len(text), PARTIAL_CHUNK_CHARS)]
    payload: dict[str, Any] = {"batches": list(part.batches), "partial_chunks": len(chunks),
                               **{f"partial:{i}": c for i, c in enumerate(chunks)},
                               "seconds": round(seconds, 3), "host": socket.gethostname(),
                               "device": prep.ctx.device}
    return payload, seconds


def _measure_units(prep: PreparedEstimate, units: list[int]) -> tuple[dict[str, Any], float]:
    from sensitivity._driver import seeded
    from sensitivity._measured import measure_units

    est: Any = prep.estimator
    start = time.perf_counter()
    with seeded(prep.ctx.seed):
        rows = measure_units(prep.loaded.model, prep.ctx, units, metric=est.metric,
                             max_tokens=est.max_tokens)
    seconds = time.perf_counter() - start
    info = {k: rows.info[k] for k in ("metric", "n_batches", "n_blocks") if k in rows.info}
    payload = {"units": [prep.ctx.units[i].name for i in units], "cost": rows.cost.tolist(),
               "cost_std": rows.cost_std.tolist(), "info": info, "seconds": round(seconds, 3),
               "host": socket.gethostname(), "device": prep.ctx.device}
    return payload, seconds


def _work(job: ShardJob, prep: PreparedEstimate, queue: _Queue, worker: int,
          run_id: str) -> int:
    """Claim and run shards until none is waiting; returns how many this worker recorded."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{run_id}:{worker}"
    beat = max(0.5, min(30.0, job.sharding.stale_after_s / 4))
    done, cap = 0, job.sharding.max_shards
    while (cap is None or done < cap) and (c := q.claim(queue.study, len(queue.shards), owner)):
        log.info("%s: worker %d measures shard %d/%d", queue.name, worker, c.shard + 1,
                 len(queue.shards))
        try:
            with q.heartbeat(c, beat):
                payload, seconds = _measure(prep, queue.shards[c.shard])
        except BaseException as exc:  # interrupted or crashed: hand the shard back at once
            q.fail(queue.study, c, f"{type(exc).__name__}: {exc}")
            raise
        done += q.record(queue.study, c, payload, seconds)
    return done


def run_shard_worker(job: ShardJob, worker: int = 0, *,
                     default_shards: int = SHARDS_PER_WORKER, run_id: str | None = None) -> int:
    """Join (or create) the queue and run shards until none is waiting (a spawned local
    process); returns the number of shards it recorded. Other machines use :func:`run_shards`."""
    prep = _prepare(job, progress=False)
    queue = _open(job, prep, q.open_storage(job.sharding.storage), default_shards)
    return _work(job, prep, queue, worker, run_id or uuid.uuid4().hex[:12])


def _worker_entry(job: ShardJob, worker: int, threads: int, default_shards: int,
                  run_id: str, verbosity: int) -> None:
    import optuna
    import torch

    optuna.logging.set_verbosity(verbosity)  # spawned: the parent's setting is not inherited
    torch.set_num_threads(threads)
    run_shard_worker(job, worker, default_shards=default_shards, run_id=run_id)


def run_shards(job: ShardJob) -> ShardOutcome:
    """Run the shards with ``sharding.workers`` processes on this machine (others may join);
    merge when every shard is complete. :func:`sensitivity.estimate` calls it for a spec with
    ``sharding``; the outcome says what is still pending elsewhere."""
    import optuna
    import torch

    workers = job.sharding.workers
    prep = _prepare(job, progress=job.spec.progress)
    storage = q.open_storage(job.sharding.storage)
    default_shards = SHARDS_PER_WORKER * workers
    queue = _open(job, prep, storage, default_shards)  # before the children: one creator
    threads = max(1, torch.get_num_threads() // workers)
    run_id = uuid.uuid4().hex[:12]  # in every owner token of this run's processes
    ctx = mp.get_context("spawn")  # torch and fork do not mix
    procs = [ctx.Process(target=_worker_entry,
                         args=(job, w, threads, default_shards, run_id,
                               optuna.logging.get_verbosity()))
             for w in range(1, workers)]
    for p in procs:
        p.start()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _work(job, prep, queue, 0, run_id)
    finally:
        torch.set_num_threads(before)
        for p in procs:
            p.join()
    failed = [p.exitcode for p in procs if p.exitcode]
    if job.sharding.wait:
        _wait(job, prep, queue, run_id)
    outcome = _outcome(job, prep, queue, run_id)
    if failed and outcome.table is None:
        raise AllocatorError(f"{len(failed)} estimate worker(s) failed (exit codes {failed}); shards "
                             f"{list(outcome.pending)} are not measured: fix the error above and "
                             f"re-run the same command")
    return outcome


def _wait(job: ShardJob, prep: PreparedEstimate, queue: _Queue, run_id: str) -> None:
    """Poll until every shard is complete, measuring any that go stale or fail meanwhile."""
    while q.completed_payloads(queue.study, len(queue.shards))[1]:
        time.sleep(job.sharding.poll_s)
        q.requeue_stale(queue.storage, queue.study, job.sharding.stale_after_s)
        q.ensure_queue(queue.study, len(queue.shards))
        _work(job, prep, queue, 0, run_id)


def _outcome(job: ShardJob, prep: PreparedEstimate, queue: _Queue,
             run_id: str) -> ShardOutcome:
    done, pending = q.completed_payloads(queue.study, len(queue.shards))
    table = None if pending else _merge(job, prep, queue, done)
    mine = sum(1 for a in done.values() if f":{run_id}:" in str(a.get("owner", "")))
    return ShardOutcome(study=queue.name, n_shards=len(queue.shards), measured=mine,
                        pending=tuple(pending), table=table)


def _merge(job: ShardJob, prep: PreparedEstimate, queue: _Queue,
           done: Mapping[int, Mapping[str, Any]]) -> CostTable:
    """One table from every shard's rows, as the single-process estimator would write it."""
    if _by_batch(prep.spec):
        table = _merge_partials(prep, queue, done)
    else:
        table = _merge_rows(prep, queue, done)
    seconds = sum(float(done[k]["seconds"]) for k in done)
    sharded = {"n_shards": len(queue.shards), "storage": q.storage_kind(job.sharding.storage),
               "study": queue.name, "hosts": sorted({str(done[k]["host"]) for k in done}),
               "shard_seconds": round(seconds, 3), "by": "batch" if _by_batch(prep.spec) else "unit"}
    return CostTable(table.df, {**table.metadata, "sharded": sharded, "seconds": round(seconds, 3)})


def _merge_partials(prep: PreparedEstimate, queue: _Queue,
                    done: Mapping[int, Mapping[str, Any]]) -> CostTable:
    """Add every shard's partial statistics and finish once (in shard order: deterministic)."""
    from sensitivity._base import BatchAdditiveEstimator, Partial

    est = prep.estimator
    if not isinstance(est, BatchAdditiveEstimator):
        raise RuntimeError(f"estimator {est.name!r} has no partial statistics")
    parts = []
    for k, batches in enumerate(queue.shards):
        attrs = done[k]
        if attrs.get("batches") != [prep.ctx.batch_id(i) for i in batches]:
            raise InvalidParameterError(f"shard {k} of study {queue.name!r} holds other batches; "
                                        "delete the study and estimate again")
        try:
            text = "".join(str(attrs[f"partial:{i}"]) for i in range(int(attrs["partial_chunks"])))
        except (KeyError, TypeError, ValueError):
            raise InvalidParameterError(f"shard {k} of study {queue.name!r} has no complete "
                                        "partial statistics; delete the study and estimate "
                                        "again") from None
        parts.append(Partial.from_json(json.loads(text)))
    return est.finish(prep.loaded.model, prep.ctx, parts, metadata=prep.metadata)


def _merge_rows(prep: PreparedEstimate, queue: _Queue,
                done: Mapping[int, Mapping[str, Any]]) -> CostTable:
    import numpy as np

    from sensitivity._base import UnitCosts
    from sensitivity._measured import MeasuredRows, merge_measured

    parts = []
    for k, units in enumerate(queue.shards):
        attrs = done[k]
        if attrs.get("units") != [prep.ctx.units[i].name for i in units]:
            raise InvalidParameterError(f"shard {k} of study {queue.name!r} holds other units; "
                                        "delete the study and estimate again")
        cost, std = np.asarray(attrs["cost"], dtype=np.float64), np.asarray(attrs["cost_std"])
        parts.append(MeasuredRows(unit_indices=tuple(units), cost=cost, cost_std=std,
                                  batch_means=np.zeros((*cost.shape, 0)), info=attrs["info"]))
    cost, std = merge_measured(parts, len(prep.ctx.units))
    merged = _merged_estimator(prep.estimator, UnitCosts(cost=cost, cost_std=std,
                                                         info=dict(done[0]["info"])))
    return merged.estimate(prep.loaded.model, prep.ctx, metadata=prep.metadata)


def _merged_estimator(base: Any, costs: Any) -> MeasuredEstimator:
    """A ``measured`` estimator with the same parameters whose costs are the merged shards, so
    the table and its metadata are built by the same code as a single-process run."""
    from sensitivity._measured import MeasuredEstimator

    class _Merged(MeasuredEstimator):
        def _costs(self, model: Any, ctx: Any) -> Any:
            return costs

    return _Merged(metric=base.metric, max_tokens=base.max_tokens)
