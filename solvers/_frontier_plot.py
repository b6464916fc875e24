"""Drawing a frontier: the ±kσ band of its predicted cost and measured points on top.

Static plots use matplotlib (a bare Agg-rendered Figure), interactive ones plotly with plotly.js embedded in
the HTML page (it opens offline). Both are imported inside the functions that draw, so
``import solvers`` stays free of them.

Example:
    >>> mix = MeasuredPoint(bpw=3.5, error=0.21, label="mix")
    >>> measured_points([(4, 0.1), mix])
    (MeasuredPoint(bpw=4.0, error=0.1, label=''), MeasuredPoint(bpw=3.5, error=0.21, label='mix'))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from allocator.core.atomic import atomic_path
from allocator.core.errors import InvalidParameterError

if TYPE_CHECKING:
    from solvers._frontier import Frontier

__all__ = ["MeasuredLike", "MeasuredPoint", "band", "frontier_figure", "load_measured",
           "measured_points", "plot_html", "plot_static"]

log = logging.getLogger(__name__)

_HULL_LABEL = "convex hull (Lagrangian)"
_COLUMNS_HINT = "columns bpw,error[,label]"


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidParameterError(
            f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class MeasuredPoint:
    """A plan evaluated on the model: its bits per weight and its measured error.

    ``error`` is in the units of the table's ``cost`` (e.g. the measured increase of the loss)
    so it can sit on the predicted frontier. It may be negative (evaluation noise); such points
    are left out of log-scale plots with a warning.
    """

    bpw: float
    error: float
    label: str = ""

    def __post_init__(self) -> None:
        bpw = _real("measured point bpw", self.bpw)
        err = _real("measured point error", self.error)
        if not (math.isfinite(bpw) and bpw > 0):
            raise InvalidParameterError(
                f"measured point bpw must be finite and > 0, got {self.bpw!r}; "
                "give the plan's bits per weight")
        if not math.isfinite(err):
            raise InvalidParameterError(
                f"measured point error must be finite, got {self.error!r}; "
                "drop points whose evaluation failed")
        if not isinstance(self.label, str):
            raise InvalidParameterError(
                f"measured point label must be a string, got {type(self.label).__name__}")
        object.__setattr__(self, "bpw", bpw)
        object.__setattr__(self, "error", err)


MeasuredLike = MeasuredPoint | tuple[object, ...]


def measured_points(items: Sequence[MeasuredLike] | None) -> tuple[MeasuredPoint, ...]:
    """Validate ``MeasuredPoint`` objects or ``(bpw, error[, label])`` tuples."""
    if items is None:
        return ()
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise InvalidParameterError(
            f"measured must be a sequence of points, got {type(items).__name__}; "
            "pass [MeasuredPoint(...), ...] or [(bpw, error, label), ...]")
    out: list[MeasuredPoint] = []
    for i, it in enumerate(items):
        if isinstance(it, MeasuredPoint):
            out.append(it)
        elif isinstance(it, tuple | list) and len(it) in (2, 3):
            label = it[2] if len(it) == 3 else ""
            bpw, err = it[0], it[1]
            out.append(MeasuredPoint(bpw=bpw, error=err, label=label))  # type: ignore[arg-type]
        else:
            raise InvalidParameterError(
                f"measured[{i}] is {it!r}; give a MeasuredPoint or a (bpw, error[, label]) tuple")
    return tuple(out)


def load_measured(path: str | Path) -> tuple[MeasuredPoint, ...]:
    """Measured points from a CSV with ``bpw,error[,label]`` columns (one line per plan)."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise InvalidParameterError(
            f"measured points file {str(p)!r} not found; give a CSV with {_COLUMNS_HINT}")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as exc:  # parser, encoding and empty-file errors
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise InvalidParameterError(
            f"cannot read measured points {str(p)!r} ({first}); write a CSV with {_COLUMNS_HINT}"
        ) from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ("bpw", "error") if c not in df.columns]
    if missing:
        raise InvalidParameterError(
            f"measured points {str(p)!r} lack column(s) {missing} (have {list(df.columns)}); "
            f"use {_COLUMNS_HINT}")
    if df.empty:
        raise InvalidParameterError(f"measured points {str(p)!r} have no rows; add one per plan")
    labels = df["label"] if "label" in df.columns else pd.Series([""] * len(df))
    out: list[MeasuredPoint] = []
    for line, (b, e, lab) in enumerate(zip(df["bpw"], df["error"], labels, strict=True), 2):
        try:
            out.append(MeasuredPoint(bpw=_parse(b, "bpw"), error=_parse(e, "error"),
                                     label=str(lab).strip()))
        except InvalidParameterError as exc:
            raise InvalidParameterError(f"{str(p)!r} line {line}: {exc}") from None
    return tuple(out)


def _parse(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidParameterError(
            f"{name} {text!r} is not a number; fix or drop the line") from None


def _check_sigma(band_sigma: float) -> float:
    k = _real("band_sigma", band_sigma)
    if not (math.isfinite(k) and k >= 0):
        raise InvalidParameterError(
            f"band_sigma must be finite and ≥ 0, got {band_sigma!r}; 0 draws no band")
    return k


def band(cost: np.ndarray, std: np.ndarray, k: float, *, log_scale: bool
         ) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper edge ``cost ∓ k·σ``.

    On a log axis an edge at or below 0 cannot be drawn: it is clipped to half the smallest
    positive value drawn (cost or lower edge), i.e. the band runs to the bottom of the plot.
    """
    hi = cost + k * std
    lo = cost - k * std
    if log_scale:
        positive = np.concatenate([cost[cost > 0], lo[lo > 0]])
        floor = 0.5 * float(positive.min()) if positive.size else np.nan
        lo = np.where(lo > 0, lo, floor)
    return lo, hi


def _use_log(f: Frontier, log_cost: bool) -> bool:
    return log_cost and bool((f.cost > 0).any())


def _shown(points: tuple[MeasuredPoint, ...], log_scale: bool) -> tuple[MeasuredPoint, ...]:
    if not log_scale:
        return points
    keep = tuple(p for p in points if p.error > 0)
    if len(keep) < len(points):
        log.warning("%d measured point(s) with error ≤ 0 left out of the log-scale plot",
                    len(points) - len(keep))
    return keep


def _prepare(f: Frontier, measured: Sequence[MeasuredLike] | None, band_sigma: float,
             log_cost: bool) -> tuple[bool, float, tuple[MeasuredPoint, ...]]:
    k = _check_sigma(band_sigma)
    log_scale = _use_log(f, log_cost)
    return log_scale, k, _shown(measured_points(measured), log_scale)




def plot_static(f: Frontier, path: str | Path, *, measured: Sequence[MeasuredLike] | None = None,
                band_sigma: float = 2.0, log_cost: bool = True) -> Path:
    """Matplotlib figure of :meth:`Frontier.plot <solvers._frontier.Frontier.plot>`."""
    log_scale, k, points = _prepare(f, measured, band_sigma, log_cost)
    # A bare Figure renders with Agg without touching pyplot's global backend (Jupyter keeps inline).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.subplots()
    hull = f.kind == "hull"
    exact = ~hull
    ax.plot(f.bpw[hull], f.cost[hull], "-", color="C0", lw=1.2, label=_HULL_LABEL)
    yerr = None
    if f.cost_std is not None and k > 0:
        lo, hi = band(f.cost, f.cost_std, k, log_scale=log_scale)
        ax.fill_between(f.bpw[hull], lo[hull], hi[hull], color="C0", alpha=0.2, lw=0,
                        label=f"±{k:g}σ (cost_std)")
        yerr = np.vstack([(f.cost - lo)[exact], (hi - f.cost)[exact]])
    if exact.any():
        ax.errorbar(f.bpw[exact], f.cost[exact], yerr=yerr, fmt="o", ms=5, color="C1",
                    capsize=3, label="exact MCKP")
    if points:
        ax.plot([p.bpw for p in points], [p.error for p in points], "s", ms=6, color="C3",
                label="measured")
        for p in points:
            if p.label:
                ax.annotate(p.label, (p.bpw, p.error), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (overhead included)")
    ax.set_ylabel("predicted cost" + (" / measured error" if points else ""))
    ax.set_title(f"Pareto frontier ({f.table.n_units} units)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:  # the temp name keeps the suffix savefig reads the format from
        fig.savefig(tmp)
    return out


def frontier_figure(f: Frontier, *, measured: Sequence[MeasuredLike] | None = None,
                    band_sigma: float = 2.0, log_cost: bool = True) -> Any:
    """The plotly ``Figure`` behind :func:`plot_html` (band, hull, exact and measured traces)."""
    log_scale, k, points = _prepare(f, measured, band_sigma, log_cost)
    import plotly.graph_objects as go

    fig = go.Figure()
    hull = f.kind == "hull"
    exact = ~hull
    has_std = f.cost_std is not None
    std = f.cost_std if f.cost_std is not None else np.full(len(f), np.nan)
    custom = np.column_stack([f.size_bits / 8 / 2**20, std])
    hover = ("bpw %{x:.4f}<br>size %{customdata[0]:,.2f} MiB<br>cost %{y:.6g}"
             + ("<br>σ %{customdata[1]:.3g}" if has_std else "")
             + "<br>kind %{text}<extra></extra>")
    lo = hi = None
    if has_std and k > 0:
        lo, hi = band(f.cost, std, k, log_scale=log_scale)
        fig.add_trace(go.Scatter(x=f.bpw[hull], y=hi[hull], mode="lines", line={"width": 0},
                                 hoverinfo="skip", showlegend=False, name=f"+{k:g}σ"))
        fig.add_trace(go.Scatter(x=f.bpw[hull], y=lo[hull], mode="lines", line={"width": 0},
                                 fill="tonexty", fillcolor="rgba(31,119,180,0.2)",
                                 hoverinfo="skip", name=f"±{k:g}σ (cost_std)"))
    fig.add_trace(go.Scatter(x=f.bpw[hull], y=f.cost[hull], mode="lines", name=_HULL_LABEL,
                             line={"color": "rgb(31,119,180)", "width": 1.5},
                             customdata=custom[hull], text=f.kind[hull].astype(str),
                             hovertemplate=hover))
    if exact.any():
        err = None
        if lo is not None and hi is not None:
            err = {"type": "data", "symmetric": False, "array": (hi - f.cost)[exact],
                   "arrayminus": (f.cost - lo)[exact]}
        fig.add_trace(go.Scatter(x=f.bpw[exact], y=f.cost[exact], mode="markers",
                                 name="exact MCKP", marker={"size": 8, "color": "darkorange"},
                                 error_y=err, customdata=custom[exact],
                                 text=f.kind[exact].astype(str), hovertemplate=hover))
    if points:
        fig.add_trace(go.Scatter(
            x=[p.bpw for p in points], y=[p.error for p in points], mode="markers+text",
            name="measured", text=[p.label for p in points], textposition="top right",
            marker={"size": 9, "symbol": "square", "color": "crimson"},
            hovertemplate="measured %{text}<br>bpw %{x:.4f}<br>error %{y:.6g}<extra></extra>"))
    fig.update_layout(title=f"Pareto frontier ({f.table.n_units} units)",
                      xaxis_title="bits per weight (overhead included)",
                      yaxis_title="predicted cost" + (" / measured error" if points else ""),
                      yaxis_type="log" if log_scale else "linear", template="plotly_white",
                      hovermode="closest")
    return fig


def plot_html(f: Frontier, path: str | Path, *, measured: Sequence[MeasuredLike] | None = None,
              band_sigma: float = 2.0, log_cost: bool = True) -> Path:
    """Write :func:`frontier_figure` as one self-contained HTML page (plotly.js embedded)."""
    fig = frontier_figure(f, measured=measured, band_sigma=band_sigma, log_cost=log_cost)
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.write_html(tmp, include_plotlyjs=True, full_html=True)  # embedded: works offline
    return out
