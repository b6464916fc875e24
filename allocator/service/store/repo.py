"""Repository functions for cost tables and plans (plain keyword-only functions on a Session).

Tables are stored as parquet blobs with their metadata and deduplicated by
:attr:`~allocator.core.table.CostTable.fingerprint`; decoded tables are cached per process (they are
immutable, so the cache only has to forget deleted ids).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from allocator.core.budget import Budget
from allocator.core.result import SolveResult
from allocator.core.table import CostTable
from allocator.service.infra.errors import not_found
from allocator.service.parquet import table_from_parquet, table_to_parquet
from allocator.service.store.models import PlanRecord, TableRecord

__all__ = [
    "TableCache",
    "add_plan",
    "add_table",
    "delete_plan",
    "delete_table",
    "get_plan",
    "get_table_record",
    "list_plans",
    "list_tables",
    "load_table",
    "new_id",
    "table_from_parquet",
    "table_to_parquet",
]


def new_id() -> str:
    return uuid.uuid4().hex


class TableCache:
    """A small thread-safe LRU of decoded tables by id."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, CostTable] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> CostTable | None:
        with self._lock:
            table = self._items.get(key)
            if table is not None:
                self._items.move_to_end(key)
            return table

    def put(self, key: str, table: CostTable) -> None:
        if self._size == 0:
            return
        with self._lock:
            self._items[key] = table
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def drop(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)


def add_table(session: Session, *, table: CostTable, name: str) -> tuple[TableRecord, bool]:
    """Store ``table`` unless one with the same fingerprint exists; returns (record, created)."""
    found = session.scalars(select(TableRecord).where(TableRecord.fingerprint == table.fingerprint)).first()
    if found is not None:
        return found, False
    blob = table_to_parquet(table)
    rec = TableRecord(
        id=new_id(), fingerprint=table.fingerprint, name=name[:255], n_units=table.n_units,
        n_rows=len(table), total_params=table.total_params, options=table.options,
        resource_columns=table.resource_columns,
        meta={k: v for k, v in _jsonable(table.metadata).items()}, size_bytes=len(blob),
        created_at=time.time(), blob=blob,
    )
    session.add(rec)
    try:
        session.commit()
    except IntegrityError:  # a concurrent upload of the same table won the race
        session.rollback()
        found = session.scalars(
            select(TableRecord).where(TableRecord.fingerprint == table.fingerprint)).first()
        if found is None:
            raise
        return found, False
    return rec, True


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    import json

    out: dict[str, Any] = json.loads(json.dumps(meta, default=str))
    return out


def get_table_record(session: Session, table_id: str) -> TableRecord:
    rec = session.get(TableRecord, table_id)
    if rec is None:
        raise not_found("table", table_id)
    return rec


def load_table(session: Session, table_id: str, cache: TableCache | None = None) -> CostTable:
    """The decoded table (from the cache when possible)."""
    if cache is not None and (hit := cache.get(table_id)) is not None:
        return hit
    blob = session.scalars(select(TableRecord.blob).where(TableRecord.id == table_id)).first()
    if blob is None:
        raise not_found("table", table_id)
    table = table_from_parquet(blob)
    if cache is not None:
        cache.put(table_id, table)
    return table


def list_tables(session: Session, *, limit: int, offset: int) -> tuple[list[TableRecord], int]:
    count = session.scalar(select(func.count()).select_from(TableRecord)) or 0
    rows = session.scalars(select(TableRecord).order_by(TableRecord.created_at.desc(), TableRecord.id)
                           .limit(limit).offset(offset)).all()
    return list(rows), int(count)


def delete_table(session: Session, table_id: str, cache: TableCache | None = None) -> None:
    """Delete a table and its plans (explicitly: SQLite only cascades with foreign keys on)."""
    get_table_record(session, table_id)
    session.execute(delete(PlanRecord).where(PlanRecord.table_id == table_id))
    session.execute(delete(TableRecord).where(TableRecord.id == table_id))
    session.commit()
    if cache is not None:
        cache.drop(table_id)


def add_plan(session: Session, *, table_id: str, result: SolveResult, budget: Budget,
             job_id: str | None = None) -> PlanRecord:
    rec = PlanRecord(
        id=new_id(), table_id=table_id, status=str(result.status), solver=result.solver,
        budget=budget.to_dict(), objective=_finite(result.objective), bound=_finite(result.bound),
        gap=_finite(result.gap), seconds=float(result.seconds), message=result.message,
        min_feasible=_finite(result.min_feasible),
        stats={k: _finite(v) for k, v in dict(result.stats).items()},
        plan=_jsonable(result.plan.to_dict()) if result.plan is not None else None,
        job_id=job_id, created_at=time.time(),
    )
    session.add(rec)
    session.commit()
    return rec


def _finite(x: Any) -> Any:
    """JSON has no inf/NaN: store None instead (a bound of -inf means 'no bound')."""
    import math

    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def get_plan(session: Session, plan_id: str) -> PlanRecord:
    rec = session.get(PlanRecord, plan_id)
    if rec is None:
        raise not_found("plan", plan_id)
    return rec


def list_plans(session: Session, *, table_id: str | None, limit: int,
               offset: int) -> tuple[list[PlanRecord], int]:
    where = [PlanRecord.table_id == table_id] if table_id else []
    count = session.scalar(select(func.count()).select_from(PlanRecord).where(*where)) or 0
    rows = session.scalars(select(PlanRecord).where(*where)
                           .order_by(PlanRecord.created_at.desc(), PlanRecord.id)
                           .limit(limit).offset(offset)).all()
    return list(rows), int(count)


def delete_plan(session: Session, plan_id: str) -> None:
    get_plan(session, plan_id)
    session.execute(delete(PlanRecord).where(PlanRecord.id == plan_id))
    session.commit()
