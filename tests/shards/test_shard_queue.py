"""The shard queue on Optuna storage alone (no model): claims, duplicates, stale shards, clashes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from allocator.core.errors import InvalidParameterError  # noqa: E402
from sensitivity import shard_queue as q  # noqa: E402

FP = "f" * 64
SUMMARY = {"model": "m", "units": 5, "options": "int4-g128-asym"}


def _open(storage, n: int = 3, fp: str = FP, name: str = "estimate-q"):  # noqa: ANN001, ANN202
    study, n_shards = q.open_queue(storage, name, fingerprint=fp, n_shards=n, default_shards=8,
                                   summary=SUMMARY)
    q.ensure_queue(study, n_shards)
    return study, n_shards


def _drain(study, n: int, owner: str = "w") -> list[int]:  # noqa: ANN001
    got = []
    while (c := q.claim(study, n, owner)) is not None:
        assert q.record(study, c, {"rows": [c.shard]}, 1.0)
        got.append(c.shard)
    return got


def _complete(study) -> list[int]:  # noqa: ANN001
    from optuna.trial import TrialState

    return sorted(t.user_attrs["shard"] for t in study.get_trials(states=(TrialState.COMPLETE,)))


def test_every_shard_once_and_reopening_adds_nothing() -> None:
    storage = q.open_storage(None)
    study, n = _open(storage)
    assert n == 3 and sorted(_drain(study, n)) == [0, 1, 2]
    _open(storage)  # the same command again: the queue is complete, nothing is enqueued
    assert len(study.get_trials()) == 3 and q.claim(study, n, "w") is None
    done, pending = q.completed_payloads(study, n)
    assert pending == [] and {k: v["rows"] for k, v in done.items()} == {0: [0], 1: [1], 2: [2]}


def test_duplicate_enqueue_is_measured_once() -> None:
    storage = q.open_storage(None)
    study, n = _open(storage, n=2)
    study.enqueue_trial({"shard": 0}, user_attrs={"shard": 0})  # a racing opener's second copy
    assert sorted(_drain(study, n)) == [0, 1]
    assert _complete(study) == [0, 1]
    dup = [t for t in study.get_trials() if t.user_attrs.get("duplicate")]
    assert len(dup) == 1 and dup[0].state.name == "FAIL"


def test_a_trial_claimed_twice_is_recorded_by_its_last_owner() -> None:
    storage = q.open_storage(None)
    study, n = _open(storage, n=1)
    a = q.claim(study, n, "a")
    assert a is not None
    # What a lost SQLite race looks like: a second worker holds the same trial and wrote owner.
    b = q.Claim(trial=a.trial, shard=a.shard, owner="b")
    a.trial.set_user_attr("owner", "b")
    assert not q.record(study, a, {"rows": [1]}, 1.0)
    assert q.record(study, b, {"rows": [2]}, 1.0)
    assert q.completed_payloads(study, n)[0][0]["rows"] == [2]


def test_queue_exhausted_race_fails_the_extra_trial() -> None:
    storage = q.open_storage(None)
    study, n = _open(storage, n=1)
    c = q.claim(study, n, "a")
    assert c is not None
    study.enqueue_trial({"other": 1})  # waiting, but not a shard: treated as an exhausted queue
    assert q.claim(study, n, "b") is None
    states = sorted(t.state.name for t in study.get_trials())
    assert states == ["FAIL", "RUNNING"]


def test_stale_shards_are_requeued_live_ones_are_not(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    storage = q.open_storage(url)
    study, n = _open(storage, n=2)
    dead, live = q.claim(study, n, "dead"), q.claim(study, n, "live")
    assert dead is not None and live is not None
    dead.trial.set_user_attr("heartbeat", time.time() - 3600)
    assert q.requeue_stale(url, "estimate-q", 120.0) == [dead.shard]
    assert q.requeue_stale(url, "estimate-q", 120.0) == []  # idempotent
    assert _drain(study, n) == [dead.shard]
    assert not q.record(study, dead, {"rows": []}, 1.0)  # the dead worker's late answer is refused
    assert q.record(study, live, {"rows": []}, 1.0)
    assert _complete(study) == [0, 1]
    rows = q.shard_trials(url, "estimate-q")
    assert [r["state"] for r in rows].count("COMPLETE") == 2 and rows[0]["owner"] == "dead"


def test_a_failed_shard_is_enqueued_again_on_reopen() -> None:
    storage = q.open_storage(None)
    study, n = _open(storage, n=2)
    c = q.claim(study, n, "w")
    assert c is not None
    q.fail(study, c, "RuntimeError: out of memory")
    _open(storage, n=2)
    assert sorted(_drain(study, n)) == [0, 1] and _complete(study) == [0, 1]


def test_heartbeat_refreshes_while_running() -> None:
    storage = q.open_storage(None)
    study, n = _open(storage, n=1)
    c = q.claim(study, n, "w")
    assert c is not None
    c.trial.set_user_attr("heartbeat", 0.0)
    with q.heartbeat(c, 0.05):
        time.sleep(0.3)
    assert c.trial.user_attrs["heartbeat"] > time.time() - 5


def test_clashes_and_bad_inputs() -> None:
    storage = q.open_storage(None)
    _open(storage, n=3)
    with pytest.raises(InvalidParameterError, match=r"'estimate-q' holds another estimation.*--study"):
        _open(storage, n=3, fp="0" * 64)
    with pytest.raises(InvalidParameterError, match=r"'estimate-q' has 3 shards, got --shards 4"):
        _open(storage, n=4)
    assert q.open_queue(storage, "estimate-q", fingerprint=FP, n_shards=None, default_shards=8,
                        summary=SUMMARY)[1] == 3  # joining without --shards adopts the study's
    other = optuna.create_study(storage=storage, study_name="estimate-search")
    other.enqueue_trial({"x": 1})
    with pytest.raises(InvalidParameterError, match="not a sharded estimate"):
        _open(storage, name="estimate-search")
    with pytest.raises(InvalidParameterError, match="not a database URL"):
        q.storage_kind("not a url")
    assert q.storage_kind("postgresql://u:secret@h/db") == "postgresql"
    with pytest.raises(InvalidParameterError, match="--shards"):
        q.check_payload_size(3, "cost", [1.0] * (q.MAX_ATTR_BYTES // 4))
    with pytest.raises(InvalidParameterError, match="older_than_s"):
        q.requeue_stale(storage, "estimate-q", -1.0)
