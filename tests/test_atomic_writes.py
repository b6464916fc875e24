"""Atomic writes (allocator.core.atomic) and the writers that use them: exports, frontier CSV and
plots, compare CSV. A write that fails half-way must leave the previous file intact."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from allocator.core.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from allocator.core.synth import synth_table

OLD = "previous complete content\n"


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_helpers(tmp_path, umask022):  # type: ignore[no-untyped-def]
    out = tmp_path / "sub" / "a.txt"
    assert atomic_write_text(out, "hello") == out and out.read_text() == "hello"
    assert _mode(out) == 0o644  # what open() would give under the umask
    atomic_write_bytes(out, b"\x00\x01", mode=0o600)
    assert out.read_bytes() == b"\x00\x01" and _mode(out) == 0o600
    with atomic_path(tmp_path / "plot.png") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".plot.png.")
        tmp.write_bytes(b"png")
    assert _left(tmp_path) == ["plot.png", "sub"]


def test_failed_write_keeps_the_old_file(tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "a.txt"
    out.write_text(OLD)
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert out.read_text() == OLD and _left(tmp_path) == ["a.txt"]
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(out, "bad \ud800 text")
    assert out.read_text() == OLD and _left(tmp_path) == ["a.txt"]


def _half_then_fail(_self: Any, path: Any, *_a: Any, **_k: Any) -> None:
    Path(path).write_text("half a file")
    raise OSError("No space left on device")


def test_export_write_is_atomic(tmp_path):  # type: ignore[no-untyped-def]
    from allocator.export import ExportResult, write_result

    out = tmp_path / "plan.txt"
    out.write_text(OLD)
    good = ExportResult(target="llamacpp", text="new\n", suffix=".txt", files={".json": "{}"})
    bad = ExportResult(target="llamacpp", text="ok \ud800", suffix=".txt")  # not encodable
    with pytest.raises(UnicodeEncodeError):
        write_result(bad, out)
    assert out.read_text() == OLD and _left(tmp_path) == ["plan.txt"]
    assert write_result(good, out) == [out, tmp_path / "plan.json"]
    assert out.read_text() == "new\n" and (tmp_path / "plan.json").read_text() == "{}"


def test_frontier_csv_and_plot_are_atomic(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    import solvers

    f = solvers.frontier(synth_table(n_units=6, n_options=3, seed=0))
    csv, png = tmp_path / "f.csv", tmp_path / "f.png"
    csv.write_text(OLD)
    png.write_text(OLD)
    f.save_csv(csv)
    assert pd.read_csv(csv).shape[0] == len(f)
    csv.write_text(OLD)
    monkeypatch.setattr(pd.DataFrame, "to_csv", _half_then_fail)
    with pytest.raises(OSError, match="No space"):
        f.save_csv(csv)
    assert csv.read_text() == OLD
    monkeypatch.undo()

    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", _half_then_fail)
    with pytest.raises(OSError, match="No space"):
        f.plot(png)
    assert png.read_text() == OLD and _left(tmp_path) == ["f.csv", "f.png"]
    monkeypatch.undo()
    f.plot(png)
    assert png.read_bytes()[:4] == b"\x89PNG"  # the format still follows the suffix


def test_compare_csv_is_atomic(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    from allocator.cli import main

    paths = [str(synth_table(n_units=6, n_options=3, seed=s).save(tmp_path / f"t{s}.parquet"))
             for s in range(2)]
    out = tmp_path / "pairs.csv"
    assert main(["compare", *paths, "--csv", str(out)]) == 0
    assert "spearman" in out.read_text().lower()
    out.write_text(OLD)
    monkeypatch.setattr(pd.DataFrame, "to_csv", _half_then_fail)
    assert main(["compare", *paths, "--csv", str(out)]) != 0
    assert out.read_text() == OLD
    assert _left(tmp_path) == ["pairs.csv", "t0.parquet", "t1.parquet"]


def _half_text_then_fail(self: Path, *_a: Any, **_k: Any) -> None:
    with open(self, "w") as fh:
        fh.write("half a file")
    raise OSError("No space left on device")


def test_tables_and_plans_use_the_one_writer(tmp_path, umask022, monkeypatch):  # type: ignore[no-untyped-def]
    # CostTable.save (parquet, CSV + sidecar, JSON) and BitPlan.save go through allocator.core.atomic:
    # every file is fsync'd before the rename makes it visible, the umask is read but never set to
    # 0 (which races with other threads creating files), and a failed write keeps the old file.
    import pyarrow.parquet as pq

    import solvers
    from allocator import Budget, CostTable
    from allocator.core.plan import BitPlan

    real_fsync, real_umask = os.fsync, os.umask
    synced: list[int] = []
    umasks: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(os, "umask", lambda m: (umasks.append(m), real_umask(m))[1])
    table = synth_table(n_units=4, n_options=3, seed=0)
    plan = solvers.solve(table, Budget(bpw=4.0)).plan
    paths = [table.save(tmp_path / f"t{s}") for s in (".parquet", ".csv", ".json")]
    paths.append(plan.save(tmp_path / "plan.json"))
    assert len(synced) == 5  # parquet, CSV, its sidecar, JSON, plan
    assert 0 not in umasks
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "plan.json", "t.csv", "t.json", "t.meta.json", "t.parquet"]
    assert all(_mode(p) == 0o644 for p in tmp_path.iterdir())
    assert CostTable.load(paths[0]).fingerprint == table.fingerprint
    assert BitPlan.load(paths[3]).choice == plan.choice

    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(pq, "write_table", _half_then_fail)
    monkeypatch.setattr(pd.DataFrame, "to_csv", _half_then_fail)
    monkeypatch.setattr(Path, "write_text", _half_text_then_fail)
    for path, save in [(paths[0], table.save), (paths[1], table.save), (paths[2], table.save),
                       (paths[3], plan.save)]:
        with pytest.raises(OSError, match="No space"):
            save(path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
