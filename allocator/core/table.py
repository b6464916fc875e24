"""The cost table: one row per (unit, option), validated on construction and on load.

Schema (``design.md``): required ``unit, params, option, bits, size_bits, cost``; optional
``cost_std``, ``tie`` and any numeric resource column a :class:`~allocator.core.budget.Budget` may cap.
Beyond the schema, construction refuses tables whose plan totals would overflow (Σ params over
2**53, a column whose largest plan sums past float64) and rows whose ``size_bits`` disagree with
the format catalogue's accounting of their option label (see ``docs/input-validation.md``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from allocator.core.errors import InvalidCostTableError, InvalidParameterError, UnknownNameError
from allocator.core.formats import QuantFormat, StorageConvention, parse_format
from allocator.core.table_format import TABLE_FORMAT, TABLE_VERSION, read_table_file, write_table_file
from allocator.core.version import __version__

__all__ = [
    "MAX_TOTAL_PARAMS",
    "REQUIRED_COLUMNS",
    "SIZE_BITS_RTOL",
    "TABLE_FORMAT",
    "TABLE_VERSION",
    "CostTable",
    "TableIndex",
]

REQUIRED_COLUMNS: tuple[str, ...] = ("unit", "params", "option", "bits", "size_bits", "cost")
_RESERVED = (*REQUIRED_COLUMNS, "cost_std", "tie")
#: Largest Σ params over a table's units (2**53): totals stay exact in float64 and far from the
#: int64 wrap-around, so bpw = Σ size_bits / Σ params is always meaningful.
MAX_TOTAL_PARAMS = 2**53
#: Relative slack allowed between a row's ``size_bits`` and params × the bits per weight that
#: the format catalogue gives its option label (covers rounding and partial last groups).
SIZE_BITS_RTOL = 0.05


def _rows(df: pd.DataFrame, mask: Any, limit: int = 3) -> str:
    bad = df.loc[mask, ["unit", "option"]].head(limit)
    shown = ", ".join(f"row {i} ({u!s}, {o!s})" for i, u, o in bad.itertuples())
    n = int(np.count_nonzero(np.asarray(mask)))
    return shown + (f" and {n - limit} more" if n > limit else "")


@dataclass(frozen=True, eq=False)
class TableIndex:
    """Integer codes of the rows, computed once at validation and shared by every solver.

    ``unit_codes[r]`` indexes ``units`` (first-appearance order); ``option_codes[r]`` indexes
    ``options`` (sorted labels, so the same label has the same code in every unit).
    """

    unit_codes: np.ndarray
    units: np.ndarray
    option_codes: np.ndarray
    options: np.ndarray


def _build_index(df: pd.DataFrame) -> TableIndex:
    u_codes, u_names = pd.factorize(df["unit"], sort=False)
    o_codes, o_names = pd.factorize(df["option"], sort=True)
    return TableIndex(np.asarray(u_codes, np.int64), np.asarray(u_names, dtype=object),
                      np.asarray(o_codes, np.int64), np.asarray(o_names, dtype=object))


class CostTable:
    """A validated, immutable cost table with its metadata.

    Build one from a DataFrame, from per-unit arrays (:meth:`from_unit_costs`) or from a file
    (:meth:`load`). The DataFrame returned by :attr:`df` is a copy-on-write view: treat it as
    read-only.

    Example:
        >>> t = CostTable.from_unit_costs(
        ...     units=["fc1", "fc2"], params=[100, 200],
        ...     options=["int4-g128-asym", "fp16"], cost=[[1.0, 0.0], [2.0, 0.0]])
        >>> t.n_units, t.total_params
        (2, 300)
    """

    __slots__ = ("_df", "_fingerprint", "_index", "metadata")

    def __init__(self, df: pd.DataFrame, metadata: Mapping[str, Any] | None = None) -> None:
        self._df, self._index = self._validated(df)
        self.metadata: dict[str, Any] = {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            **dict(metadata or {}),
        }
        self.metadata.setdefault("created", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        self.metadata.setdefault("library_version", __version__)
        self._fingerprint: str | None = None

    # ---------------------------------------------------------------- validation
    @staticmethod
    def _validated(df: pd.DataFrame) -> tuple[pd.DataFrame, TableIndex]:
        if not isinstance(df, pd.DataFrame):
            raise InvalidCostTableError(f"cost table must be a pandas DataFrame, got {type(df).__name__}")
        missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
        if missing:
            raise InvalidCostTableError(
                f"cost table is missing column(s) {missing}; required: {list(REQUIRED_COLUMNS)}"
            )
        if len(df) == 0:
            raise InvalidCostTableError("cost table has no rows; estimate at least one unit × option")
        out = df.reset_index(drop=True).copy()
        out["unit"] = out["unit"].astype(str)
        out["option"] = out["option"].astype(str)
        for col in ("bits", "size_bits", "cost", "params"):
            try:
                out[col] = pd.to_numeric(out[col], errors="raise").astype(np.float64)
            except (ValueError, TypeError) as exc:
                raise InvalidCostTableError(f"column {col!r} must be numeric: {exc}") from None
        CostTable._check_values(out)
        params = out["params"].to_numpy()
        if np.any(params != np.round(params)):
            raise InvalidCostTableError(
                f"'params' must be whole numbers: {_rows(out, params != np.round(params))}"
            )
        if np.any(params > MAX_TOTAL_PARAMS):
            big = params > MAX_TOTAL_PARAMS
            raise InvalidCostTableError(
                f"'params' {params[big][0]:.6g} is too large ({_rows(out, big)}): bitalloc sums "
                f"at most 2**53 = {MAX_TOTAL_PARAMS:.3g} weights; 'params' counts weights, "
                "not bits or bytes"
            )
        out["params"] = out["params"].astype(np.int64)
        index = _build_index(out)
        n_opts = len(index.options)
        key = index.unit_codes * n_opts + index.option_codes
        # The first row of each (unit, option) key wins the reversed scatter; later rows are dups.
        first = np.full(len(index.units) * n_opts, -1, dtype=np.int64)
        first[key[::-1]] = np.arange(len(out))[::-1]
        dup = first[key] != np.arange(len(out))
        if dup.any():
            raise InvalidCostTableError(
                f"duplicate (unit, option) rows: {_rows(out, dup)}; keep one row per pair"
            )
        params = out["params"].to_numpy()
        p0 = np.empty(len(index.units), dtype=np.int64)
        p0[index.unit_codes] = params
        bad = params != p0[index.unit_codes]
        if bad.any():
            raise InvalidCostTableError(
                f"inconsistent 'params' within a unit: {_rows(out, bad)}; "
                "every row of a unit needs the same params"
            )
        total = float(p0.astype(np.float64).sum())
        if total > MAX_TOTAL_PARAMS:
            raise InvalidCostTableError(
                f"total params over {len(p0)} units is {total:.6g}, more than 2**53 = "
                f"{MAX_TOTAL_PARAMS:.3g} that bitalloc sums exactly (int64 totals would wrap); "
                "'params' counts weights, not bits or bytes"
            )
        CostTable._check_sums(out, index)
        CostTable._check_sizes(out, index)
        if "tie" in out.columns:
            CostTable._check_ties(out)
        return out, index

    @staticmethod
    def _check_sums(out: pd.DataFrame, index: TableIndex) -> None:
        """Every plan total (Σ over units) must be a finite float64, or solvers compare infs."""
        for col in out.columns:
            if col in ("unit", "option", "tie", "params", "bits"):
                continue
            v = out[col].to_numpy(np.float64)
            with np.errstate(over="ignore"):
                if np.isfinite(v.sum()):
                    continue  # values are ≥ 0, so no plan sums to more than every row
                worst = np.zeros(len(index.units))
                np.maximum.at(worst, index.unit_codes, v)
                total = worst.sum()
            if not np.isfinite(total):
                raise InvalidCostTableError(
                    f"column {col!r} totals overflow: the largest plan sums to more than "
                    f"{np.finfo(np.float64).max:.3g} (largest value {v.max():.6g}); rescale "
                    f"{col!r} (divide every row by the same factor)"
                )

    @staticmethod
    def _check_sizes(out: pd.DataFrame, index: TableIndex) -> None:
        """``size_bits`` ≈ params × the label's bits per weight (:data:`SIZE_BITS_RTOL`).

        Labels the catalogue parses are checked; per-channel labels (``-ch-``) only within
        [b, b + overhead] bits per weight, since the table does not record input features.
        GPTQ-convention labels (``-gptq``) may add up to 32 bits per weight for the ``g_idx``.
        Unknown (custom) labels cannot be checked and are taken as given.
        """
        n = len(index.options)
        lo, hi = np.full(n, -np.inf), np.full(n, np.inf)
        for code, label in enumerate(index.options):
            try:
                fmt = parse_format(str(label))
            except UnknownNameError:
                continue
            if fmt.group_size == -1:  # per channel: overhead/in_features, in_features ≥ 1
                lo[code], hi[code] = fmt.bits, fmt.bits + (16.0 if fmt.symmetric else 32.0)
            else:
                lo[code] = hi[code] = fmt.bits_per_weight()
            if fmt.convention is StorageConvention.GPTQ:
                # a GPTQ checkpoint may also count its int32 g_idx (32·in bits, 32/out per
                # weight: GPTQModel's accounting, allocator.export.palettes); out is not recorded
                hi[code] += 32.0
        if not np.isfinite(lo).any():
            return
        bpw = out["size_bits"].to_numpy() / out["params"].to_numpy(np.float64)
        codes = index.option_codes
        bad = (bpw < lo[codes] * (1 - SIZE_BITS_RTOL)) | (bpw > hi[codes] * (1 + SIZE_BITS_RTOL))
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            a, b = lo[codes[r]], hi[codes[r]]
            want = f"{a:.6g}" if a == b else f"{a:.6g}..{b:.6g}"
            raise InvalidCostTableError(
                f"'size_bits' does not match the option's storage: {_rows(out, bad)}; row {r} "
                f"has {out['size_bits'].iat[r]:.6g} bits for {out['params'].iat[r]} params "
                f"({bpw[r]:.6g} bits/weight) but {out['option'].iat[r]!r} stores {want} "
                f"bits/weight (±{SIZE_BITS_RTOL:.0%}); set size_bits = params × bits per weight "
                "(allocator.core.formats), overheads included"
            )

    @staticmethod
    def _check_values(out: pd.DataFrame) -> None:
        for col, lo_ok in (("params", False), ("bits", False), ("size_bits", False), ("cost", True)):
            v = out[col].to_numpy()
            bad = ~np.isfinite(v) | ((v < 0) if lo_ok else (v <= 0))
            if bad.any():
                need = "finite and ≥ 0" if lo_ok else "finite and > 0"
                raise InvalidCostTableError(
                    f"column {col!r} must be {need}: {_rows(out, bad)} "
                    f"(e.g. value {v[bad][0]!r}); fix or drop these rows"
                )
        for col in out.columns:
            if col in ("unit", "option", "tie") or col in REQUIRED_COLUMNS:
                continue
            try:
                v = pd.to_numeric(out[col], errors="raise").to_numpy(np.float64)
            except (ValueError, TypeError):
                raise InvalidCostTableError(
                    f"extra column {col!r} must be numeric (a resource a budget can cap)"
                ) from None
            bad = ~np.isfinite(v) | (v < 0)
            if bad.any():
                raise InvalidCostTableError(
                    f"column {col!r} must be finite and ≥ 0: {_rows(out, bad)}"
                )
            out[col] = v

    @staticmethod
    def _check_ties(out: pd.DataFrame) -> None:
        tie = out["tie"].where(out["tie"].notna(), "").astype(str)
        out["tie"] = tie
        tied = out.loc[tie != "", ["unit", "option", "tie"]]
        if tied.empty:
            return
        per_unit = tied.groupby("unit", sort=False).agg(
            tie=("tie", "nunique"), first=("tie", "first"),
            options=("option", lambda s: tuple(sorted(s))),
        )
        if (per_unit["tie"] > 1).any():
            u = per_unit.index[per_unit["tie"] > 1][0]
            raise InvalidCostTableError(f"unit {u!r} has several tie ids; give each unit one tie id")
        n_sets = per_unit.groupby("first")["options"].nunique()
        if (n_sets > 1).any():
            g = n_sets.index[n_sets > 1][0]
            members = per_unit.index[per_unit["first"] == g].tolist()[:4]
            raise InvalidCostTableError(
                f"tie group {g!r} has units with different option sets ({members}); "
                "tied units must offer the same options"
            )
        untied_rows = out.loc[tie == "", "unit"].unique()
        both = set(untied_rows) & set(per_unit.index)
        if both:
            raise InvalidCostTableError(
                f"unit {sorted(both)[0]!r} has rows with and without a tie id; use one id on every row"
            )

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_unit_costs(
        cls,
        *,
        units: Sequence[str],
        params: Sequence[int],
        options: Sequence[str | QuantFormat],
        cost: Any,
        cost_std: Any | None = None,
        in_features: Sequence[int | None] | None = None,
        tie: Sequence[str | None] | None = None,
        resources: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> CostTable:
        """Build a table from an (n_units × n_options) cost matrix; sizes come from the catalogue.

        ``resources`` maps an extra column name to an (n_units × n_options) array.
        """
        fmts = [o if isinstance(o, QuantFormat) else parse_format(o) for o in options]
        n, k = len(units), len(fmts)
        c = np.asarray(cost, dtype=np.float64)
        if c.shape != (n, k):
            raise InvalidParameterError(f"cost has shape {c.shape}; expected (n_units, n_options) = {(n, k)}")
        if len(params) != n:
            raise InvalidParameterError(f"params has {len(params)} entries for {n} units")
        feats = list(in_features) if in_features is not None else [None] * n
        try:
            p = np.asarray(params, dtype=np.int64)
        except (OverflowError, TypeError, ValueError):
            raise InvalidParameterError(
                f"params must be whole numbers below 2**53, got {str(params)[:80]}"
            ) from None
        bpw = np.empty((n, k))
        for j, f in enumerate(fmts):
            if f.group_size == -1:  # per channel: overhead depends on each unit's input features
                bpw[:, j] = [f.bits_per_weight(x) for x in feats]
            else:
                bpw[:, j] = f.bits_per_weight()
        data: dict[str, Any] = {
            "unit": np.repeat(np.asarray(units, dtype=object), k),
            "params": np.repeat(p, k),
            "option": np.tile(np.asarray([f.name for f in fmts], dtype=object), n),
            "bits": np.tile(np.asarray([float(f.bits) for f in fmts]), n),
            "size_bits": (bpw * p[:, None]).ravel(),
            "cost": c.ravel(),
        }
        if cost_std is not None:
            data["cost_std"] = np.asarray(cost_std, dtype=np.float64).reshape(n * k)
        if tie is not None:
            data["tie"] = np.repeat(np.asarray([t or "" for t in tie], dtype=object), k)
        for name, arr in (resources or {}).items():
            data[name] = np.asarray(arr, dtype=np.float64).reshape(n * k)
        return cls(pd.DataFrame(data), metadata)

    # ---------------------------------------------------------------- accessors
    @property
    def df(self) -> pd.DataFrame:
        """The rows (read-only by convention; copy before changing)."""
        return self._df

    @property
    def index(self) -> TableIndex:
        """Integer codes of units and options per row (see :class:`TableIndex`)."""
        return self._index

    @property
    def units(self) -> list[str]:
        """Unit ids in order of first appearance."""
        return list(self._index.units)

    @property
    def n_units(self) -> int:
        return len(self._index.units)

    @property
    def options(self) -> list[str]:
        """Distinct option labels, sorted."""
        return list(self._index.options)

    @property
    def unit_params(self) -> np.ndarray:
        """params of each unit, in :attr:`units` order."""
        p = np.empty(self.n_units, dtype=np.int64)
        p[self._index.unit_codes] = self._df["params"].to_numpy()
        return p

    @property
    def total_params(self) -> int:
        return int(self.unit_params.sum())

    @property
    def resource_columns(self) -> list[str]:
        """Extra numeric columns a budget may cap (besides ``size_bits``)."""
        return [c for c in self._df.columns if c not in _RESERVED]

    @property
    def has_ties(self) -> bool:
        return "tie" in self._df.columns and bool((self._df["tie"] != "").any())

    def __len__(self) -> int:
        return len(self._df)

    def __repr__(self) -> str:
        return (f"CostTable(units={self.n_units}, rows={len(self)}, "
                f"params={self.total_params}, sha256={self.fingerprint[:12]})")

    @property
    def fingerprint(self) -> str:
        """sha256 of the content, independent of row order (metadata excluded)."""
        if self._fingerprint is None:
            cols = sorted(self._df.columns)
            row_hashes = pd.util.hash_pandas_object(self._df[cols], index=False).to_numpy()
            h = hashlib.sha256(json.dumps(cols).encode())
            h.update(np.sort(row_hashes).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def subset(self, units: Iterable[str]) -> CostTable:
        """A table with only the given units (metadata kept)."""
        keep = set(units)
        return CostTable(self._df[self._df["unit"].isin(keep)], self.metadata)

    @classmethod
    def concat(cls, tables: Sequence[CostTable], metadata: Mapping[str, Any] | None = None) -> CostTable:
        """Merge tables over disjoint units (e.g. shards of one estimation)."""
        if not tables:
            raise InvalidParameterError("concat needs at least one table")
        meta = dict(metadata if metadata is not None else tables[0].metadata)
        return cls(pd.concat([t.df for t in tables], ignore_index=True), meta)

    # ---------------------------------------------------------------- IO
    def save(self, path: str | Path) -> Path:
        """Write ``.parquet`` (default), ``.csv`` (+ ``.meta.json`` sidecar) or ``.json``."""
        return write_table_file(self._df, self.metadata, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> CostTable:
        """Read and validate a table written by :meth:`save` (or by hand in the same schema)."""
        return cls(*read_table_file(Path(path)))
