"""A work queue of estimation shards on Optuna storage (in-memory, SQLite file or PostgreSQL).

One study per estimation. Its user attributes say what it measures (``fingerprint`` of model,
data, units and options; ``n_shards``), and each shard k is a trial enqueued with the fixed
parameter ``shard = k``. Workers claim trials with :meth:`optuna.Study.ask` (the RDB storage
moves a WAITING trial to RUNNING in one conditional update), store their rows in the trial's
user attributes and tell COMPLETE. The module knows nothing about models: the payload of a
shard is plain JSON.

Liveness: a claimed trial carries ``heartbeat`` (unix seconds, refreshed by a thread). A
RUNNING trial whose heartbeat is older than ``older_than_s`` belongs to a dead worker:
:func:`requeue_stale` fails it and enqueues the shard again. Optuna's ``skip_if_exists`` is
not used to enqueue, because it also skips shards whose only trials FAILED — the ones a resumed
run must measure.

Races: two processes opening the queue at once may both enqueue shard k, and SQLite can hand one
WAITING trial to two workers. Neither records a shard twice: of the live trials of a shard only
the lowest-numbered one is measured (:func:`claim`), and only the last worker to write a trial's
``owner`` attribute tells it COMPLETE (:func:`record`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError

if TYPE_CHECKING:
    import optuna

__all__ = [
    "KIND",
    "MAX_ATTR_BYTES",
    "Claim",
    "check_payload_size",
    "claim",
    "completed_payloads",
    "ensure_queue",
    "fail",
    "heartbeat",
    "open_queue",
    "open_storage",
    "record",
    "requeue_stale",
    "shard_trials",
    "storage_kind",
]

log = logging.getLogger(__name__)

KIND = "bitalloc.estimate-shards"  #: ``bitalloc`` user attribute of a shard-queue study
#: Largest JSON of one trial attribute: rows of ~25 bytes per float, so 37 units × 7 options is
#: ~7 KB; a shard that needs more should be split (``--shards``), not stored as a blob.
MAX_ATTR_BYTES = 1 << 20


@dataclass(frozen=True, kw_only=True, eq=False)
class Claim:
    """A shard this worker holds: the live Optuna trial and the owner token it wrote."""

    trial: optuna.Trial
    shard: int
    owner: str


def storage_kind(url: str | None) -> str:
    """``memory``, ``sqlite``, ``postgresql``, ... — the backend only, never credentials."""
    if url is None:
        return "memory"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return str(make_url(url).get_backend_name())
    except ArgumentError:
        raise InvalidParameterError(
            f"storage {url.split('@')[-1]!r} is not a database URL; pass sqlite:///estimate.db "
            "or postgresql://user@host/db"
        ) from None


def open_storage(url: str | None) -> optuna.storages.BaseStorage:
    """In-memory storage for None, else an RDB storage (the schema is created if missing)."""
    import optuna

    if url is None:
        return optuna.storages.InMemoryStorage()
    kind = storage_kind(url)
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy/driver errors vary; report one line
        msg = " ".join(str(exc).split())[:200]
        raise InvalidParameterError(f"cannot open {kind} storage for the estimate: {msg}; check "
                                    "--storage (sqlite:///estimate.db or postgresql://...)") from None


def open_queue(storage: optuna.storages.BaseStorage, name: str, *, fingerprint: str,
               n_shards: int | None, default_shards: int,
               summary: Mapping[str, Any]) -> tuple[optuna.Study, int]:
    """Create or join study ``name``; returns it and its ``n_shards``.

    Raises:
        InvalidParameterError: the study measures something else, or has another shard count.
    """
    import optuna

    # The sampler is never consulted for the shard (a fixed parameter); random is the cheapest.
    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                sampler=optuna.samplers.RandomSampler())
    attrs = study.user_attrs
    if "bitalloc" not in attrs and not study.get_trials(deepcopy=False):
        for key, value in {"bitalloc": KIND, "fingerprint": fingerprint,
                           "n_shards": n_shards or default_shards, "summary": dict(summary)}.items():
            study.set_user_attr(key, value)
        attrs = study.user_attrs
    _check_study(name, attrs, fingerprint, n_shards)
    return study, int(attrs["n_shards"])


def _check_study(name: str, attrs: Mapping[str, Any], fingerprint: str, n_shards: int | None) -> None:
    fix = "pass another --study name (or delete the study)"
    if attrs.get("bitalloc") != KIND:
        raise InvalidParameterError(f"study {name!r} exists and is not a sharded estimate; {fix}")
    if attrs.get("fingerprint") != fingerprint:
        held = attrs.get("summary", {})
        raise InvalidParameterError(
            f"study {name!r} holds another estimation ({held.get('model')}, {held.get('units')} "
            f"units, options {held.get('options')}); rerun with the same model, data, options and "
            f"seed, or {fix}"
        )
    if n_shards is not None and n_shards != attrs.get("n_shards"):
        raise InvalidParameterError(
            f"study {name!r} has {attrs.get('n_shards')} shards, got --shards {n_shards}; pass "
            f"--shards {attrs.get('n_shards')} (or omit it), or {fix}"
        )


def _live_shards(study: optuna.Study) -> set[int]:
    from optuna.trial import TrialState

    live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    return {int(t.user_attrs["shard"]) for t in study.get_trials(deepcopy=False, states=live)
            if "shard" in t.user_attrs}


def ensure_queue(study: optuna.Study, n_queue: int) -> list[int]:
    """Enqueue every shard 0..n_queue−1 that has no waiting, running or complete trial."""
    missing = sorted(set(range(n_queue)) - _live_shards(study))
    for k in missing:
        study.enqueue_trial({"shard": k}, user_attrs={"shard": k})
    return missing


def claim(study: optuna.Study, n_queue: int, owner: str) -> Claim | None:
    """Pop the next shard for this worker, or None when no shard is waiting."""
    from optuna.trial import TrialState

    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial = study.ask()
        if "shard" not in trial.user_attrs:  # the queue ran dry between the check and the ask
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            return None
        shard = trial.suggest_int("shard", 0, n_queue - 1)
        trial.set_user_attr("owner", owner)
        trial.set_user_attr("heartbeat", time.time())
        if _superseded(study, trial.number, shard):
            trial.set_user_attr("duplicate", True)
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            continue
        return Claim(trial=trial, shard=shard, owner=owner)
    return None


def _superseded(study: optuna.Study, number: int, shard: int) -> bool:
    """Whether another trial of ``shard`` is complete, or live with a lower number."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False):
        if t.number == number or t.user_attrs.get("shard") != shard:
            continue
        if t.state is TrialState.COMPLETE:
            return True
        if t.state in (TrialState.WAITING, TrialState.RUNNING) and t.number < number:
            return True
    return False


@contextmanager
def heartbeat(c: Claim, interval_s: float) -> Iterator[None]:
    """Refresh ``heartbeat`` on the claimed trial every ``interval_s`` while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval_s):
            try:
                c.trial.set_user_attr("heartbeat", time.time())
            except Exception as exc:  # noqa: BLE001 - a missed beat only delays a takeover
                log.debug("shard %d: heartbeat failed: %s", c.shard, exc)

    thread = threading.Thread(target=beat, name=f"shard-{c.shard}-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def check_payload_size(shard: int, key: str, value: Any) -> None:
    """Refuse a trial attribute whose JSON exceeds :data:`MAX_ATTR_BYTES`."""
    size = len(json.dumps(value))
    if size > MAX_ATTR_BYTES:
        raise InvalidParameterError(
            f"shard {shard} would store {size:,} bytes of {key!r} in one trial (> {MAX_ATTR_BYTES:,}); "
            f"use more shards (--shards)"
        )


def record(study: optuna.Study, c: Claim, payload: Mapping[str, Any], value: float) -> bool:
    """Store the shard's payload and tell COMPLETE; False when another worker owns the trial."""
    from optuna.exceptions import UpdateFinishedTrialError

    for key, item in payload.items():
        check_payload_size(c.shard, key, item)
    try:
        if c.trial.user_attrs.get("owner") != c.owner:
            log.info("shard %d: trial %d was claimed twice; the other worker records it",
                     c.shard, c.trial.number)
            return False
        for key, item in payload.items():
            c.trial.set_user_attr(key, item)
        study.tell(c.trial, value)
    except UpdateFinishedTrialError:
        return False
    return True


def fail(study: optuna.Study, c: Claim, reason: str) -> None:
    """Tell FAIL (the shard is enqueued again by the next :func:`ensure_queue`)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        c.trial.set_user_attr("error", reason[:500])
        study.tell(c.trial, state=TrialState.FAIL, skip_if_finished=True)
    except UpdateFinishedTrialError:
        pass


def _last_beat(t: optuna.trial.FrozenTrial) -> float:
    beat = t.user_attrs.get("heartbeat")
    if isinstance(beat, int | float):
        return float(beat)
    return t.datetime_start.timestamp() if t.datetime_start is not None else 0.0


def requeue_stale(storage: optuna.storages.BaseStorage | str | None, study: str | optuna.Study,
                  older_than_s: float, *, now: float | None = None) -> list[int]:
    """Fail RUNNING shards whose heartbeat is older than ``older_than_s`` and enqueue them again.

    ``study`` is a name in ``storage`` or an open study (then ``storage`` is not used).
    Returns the requeued shard numbers. Clocks of the machines should agree to well within
    ``older_than_s``.
    """
    import optuna
    from optuna.trial import TrialState

    if not older_than_s >= 0:
        raise InvalidParameterError(f"older_than_s must be ≥ 0, got {older_than_s!r}")
    if isinstance(study, optuna.Study):
        s = study
    elif storage is None:
        raise InvalidParameterError(f"study {study!r}: pass its storage URL to requeue its shards")
    else:
        s = optuna.load_study(study_name=study, storage=storage)
    now = time.time() if now is None else now
    stale = [t for t in s.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
             if "shard" in t.user_attrs and now - _last_beat(t) > older_than_s]
    for t in stale:
        log.warning("shard %s: trial %d has no heartbeat for %.0f s; requeued",
                    t.user_attrs["shard"], t.number, now - _last_beat(t))
        s.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    shards = {int(t.user_attrs["shard"]) for t in stale} - _live_shards(s)
    for k in sorted(shards):
        s.enqueue_trial({"shard": k}, user_attrs={"shard": k})
    return sorted(shards)


def completed_payloads(study: optuna.Study, n_queue: int) -> tuple[dict[int, dict[str, Any]], list[int]]:
    """The user attributes of each shard's COMPLETE trial (lowest number) and the missing shards."""
    from optuna.trial import TrialState

    done: dict[int, dict[str, Any]] = {}
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                    key=lambda t: t.number):
        k = t.user_attrs.get("shard")
        if isinstance(k, int) and 0 <= k < n_queue and k not in done:
            done[k] = dict(t.user_attrs)
    return done, [k for k in range(n_queue) if k not in done]


def shard_trials(storage: optuna.storages.BaseStorage | str, study: str) -> list[dict[str, Any]]:
    """Every trial of a shard queue as plain dicts (number, state, shard, owner, host)."""
    import optuna

    s = optuna.load_study(study_name=study, storage=storage)
    return [{"number": t.number, "state": t.state.name, "shard": t.user_attrs.get("shard"),
             "owner": t.user_attrs.get("owner"), "host": t.user_attrs.get("host")}
            for t in s.get_trials(deepcopy=False)]
