"""Frontier uncertainty: σ of every point, the ±kσ band, measured overlays, plots and CLI."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import solvers
from allocator import Budget, CostTable
from allocator.cli import main
from allocator.core.errors import InvalidParameterError
from allocator.core.synth import synth_table
from solvers._frontier import MeasuredPoint, load_measured
from solvers._frontier_plot import MeasuredLike, band, frontier_figure, measured_points


def with_std(table: CostTable, std: np.ndarray) -> CostTable:
    df = table.df.copy()
    df["cost_std"] = std
    return CostTable(df, table.metadata)


def random_std(table: CostTable, seed: int) -> CostTable:
    rng = np.random.default_rng(seed)
    cost = table.df["cost"].to_numpy()
    std = cost * rng.uniform(0.0, 0.6, len(cost))
    std[rng.random(len(cost)) < 0.1] = 0.0  # some exactly known costs
    return with_std(table, std)


def direct_std(table: CostTable, choice: dict[str, str]) -> float:
    """σ of a plan straight from its (unit, option) rows — no solver code involved."""
    picked = pd.DataFrame({"unit": list(choice), "option": list(choice.values())})
    rows = picked.merge(table.df[["unit", "option", "cost_std"]], on=["unit", "option"],
                        how="left", validate="one_to_one")
    assert len(rows) == table.n_units and rows["cost_std"].notna().all()
    return float(np.sqrt((rows["cost_std"] ** 2).sum()))


@pytest.fixture(scope="module")
def table() -> CostTable:
    return random_std(synth_table(n_units=30, n_options=5, seed=11, ties=True), seed=0)


@pytest.mark.parametrize(("seed", "ties"), [(0, False), (1, True), (2, True), (3, False)])
def test_sigma_matches_every_rebuilt_plan(seed: int, ties: bool) -> None:
    t = random_std(synth_table(n_units=25, n_options=6, seed=seed, ties=ties), seed=seed + 100)
    f = solvers.frontier(t, budgets=[Budget(bpw=3.2), Budget(bpw=4.7)])
    assert f.cost_std is not None and len(f.cost_std) == len(f)
    assert (f.kind == "exact").sum() == 2
    for i in range(len(f)):
        want = direct_std(t, f.plan(i).choice)
        assert f.cost_std[i] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert [p.cost_std for p in f.points] == pytest.approx(list(f.cost_std))


def test_sigma_keeps_relative_precision_over_a_huge_range() -> None:
    # std falls by ~10^12 from the smallest to the largest option: a forward-only running sum
    # of variance deltas would leave the last points with garbage (absolute error ~1e-16·σ²_0).
    t = synth_table(n_units=200, n_options=7, seed=5)
    bits = t.df["bits"].to_numpy()
    rng = np.random.default_rng(1)
    t = with_std(t, 10.0 ** (6 - 2 * (bits - 2)) * rng.uniform(0.5, 1.5, len(bits)))
    f = solvers.frontier(t)
    assert f.cost_std is not None
    assert f.cost_std[0] / f.cost_std[-1] > 1e9
    for i in [0, 1, len(f) // 2, len(f) - 2, len(f) - 1]:
        assert f.cost_std[i] == pytest.approx(direct_std(t, f.plan(i).choice), rel=1e-9)


def test_no_cost_std_column_means_no_sigma(tmp_path: Path) -> None:
    t = synth_table(n_units=12, n_options=4, seed=2)
    f = solvers.frontier(t, budgets=[Budget(bpw=3.5)])
    assert f.cost_std is None and all(p.cost_std is None for p in f.points)
    assert "cost_std" not in f.to_frame().columns
    assert f.plot(tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    fig = frontier_figure(f)
    assert [tr.name for tr in fig.data] == ["convex hull (Lagrangian)", "exact MCKP"]
    assert "σ" not in fig.data[0].hovertemplate
    assert f.plot_interactive(tmp_path / "a.html").stat().st_size > 1_000_000


def test_frame_and_csv_carry_sigma(table: CostTable, tmp_path: Path) -> None:
    f = solvers.frontier(table, budgets=[Budget(bpw=3.5)])
    frame = f.to_frame()
    assert list(frame.columns) == ["size_bits", "bpw", "cost", "cost_std", "kind", "status"]
    back = pd.read_csv(f.save_csv(tmp_path / "f.csv"))
    assert f.cost_std is not None
    np.testing.assert_allclose(back["cost_std"], f.cost_std, rtol=1e-12)


def test_band_edges() -> None:
    cost = np.array([10.0, 4.0, 1.0, 0.5])
    std = np.array([1.0, 1.0, 1.0, 0.1])
    lo, hi = band(cost, std, 2.0, log_scale=False)
    np.testing.assert_allclose(lo, [8.0, 2.0, -1.0, 0.3])
    np.testing.assert_allclose(hi, [12.0, 6.0, 3.0, 0.7])
    lo, hi = band(cost, std, 2.0, log_scale=True)
    assert np.all(lo > 0) and np.all(lo < cost)
    np.testing.assert_allclose(lo, [8.0, 2.0, 0.15, 0.3])  # clipped to half the smallest value
    np.testing.assert_allclose(hi, [12.0, 6.0, 3.0, 0.7])


def test_png_with_band_and_measured_points(table: CostTable, tmp_path: Path) -> None:
    f = solvers.frontier(table, budgets=[Budget(bpw=3.5)])
    mid = float(f.cost[len(f) // 2])
    pts: list[MeasuredLike] = [MeasuredPoint(bpw=3.5, error=mid, label="plan A"),
                               (4.5, 0.8 * float(f.cost[-1]), "plan B"),
                               (3.0, -0.1)]  # off a log axis
    with_band = f.plot(tmp_path / "band.png", measured=pts, band_sigma=2.0).read_bytes()
    no_band = f.plot(tmp_path / "plain.png", measured=pts, band_sigma=0).read_bytes()
    assert with_band[:4] == no_band[:4] == b"\x89PNG" and len(with_band) > 10_000
    assert with_band != no_band
    linear = f.plot(tmp_path / "lin.png", measured=pts, log_cost=False)  # negative point shown
    assert linear.stat().st_size > 10_000


def f8_arrays(html: str) -> list[np.ndarray]:
    """The float64 arrays plotly embeds as base64 (with '/' escaped as \\u002f in the page)."""
    text = html.replace("\\u002f", "/")
    blocks = re.findall(r'\{"dtype":"f8","bdata":"([A-Za-z0-9+/=]+)"\}', text)
    return [np.frombuffer(base64.b64decode(b), dtype="<f8") for b in blocks]


def trace_names(html: str) -> list[str]:
    """Trace names of the figure embedded in the page, decoded as JSON whatever the escaping."""
    call = html[html.index("Plotly.newPlot("):]
    data_start = call.index("[")
    data, _ = json.JSONDecoder().raw_decode(call[data_start:])
    return [str(trace.get("name")) for trace in data]


def test_html_is_self_contained_and_holds_the_data(table: CostTable, tmp_path: Path) -> None:
    f = solvers.frontier(table, budgets=[Budget(bpw=3.5)])
    assert f.cost_std is not None
    page = f.plot_interactive(tmp_path / "f.html", measured=[(3.7, 1.5, "measured-XYZ")],
                              band_sigma=3.0)
    html = page.read_text(encoding="utf-8")
    assert len(html) > 1_000_000  # plotly.js embedded, no network needed
    assert '<script src="https://cdn.plot.ly' not in html and "measured-XYZ" in html
    hull = f.kind == "hull"
    arrays = f8_arrays(html)
    for want in (f.bpw[hull], f.cost[hull], (f.cost + 3 * f.cost_std)[hull]):
        assert any(a.shape == want.shape and np.allclose(a, want, rtol=1e-15) for a in arrays)

    fig = frontier_figure(f, measured=[(3.7, 1.5, "m")], band_sigma=3.0)
    names = [tr.name for tr in fig.data]
    assert names == ["+3σ", "±3σ (cost_std)", "convex hull (Lagrangian)", "exact MCKP", "measured"]
    line = fig.data[2]
    for key in ("bpw", "size", "cost", "σ", "kind"):
        assert key in line.hovertemplate
    np.testing.assert_allclose(np.asarray(line.customdata)[:, 1], f.cost_std[hull])
    np.testing.assert_allclose(np.asarray(line.customdata)[:, 0], f.size_bits[hull] / 8 / 2**20)
    exact = fig.data[3]
    np.testing.assert_allclose(exact.error_y.array, 3 * f.cost_std[~hull])
    assert fig.layout.yaxis.type == "log"


@pytest.mark.parametrize("bad", [
    {"bpw": float("nan"), "error": 1.0}, {"bpw": -3.0, "error": 1.0}, {"bpw": 0, "error": 1.0},
    {"bpw": 4.0, "error": float("inf")}, {"bpw": 4.0, "error": float("nan")},
    {"bpw": True, "error": 1.0}, {"bpw": "4", "error": 1.0},
    {"bpw": 4.0, "error": 1.0, "label": 3},
])
def test_measured_point_validation(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidParameterError) as err:
        MeasuredPoint(**bad)  # type: ignore[arg-type]
    assert "\n" not in str(err.value) and "measured point" in str(err.value)


def test_measured_sequence_and_band_sigma_validation(table: CostTable, tmp_path: Path) -> None:
    assert measured_points(None) == ()
    assert measured_points([(4, 1)]) == (MeasuredPoint(bpw=4.0, error=1.0),)
    f = solvers.frontier(table)
    for bad in ([(4.0,)], [(4.0, 1.0, "a", "b")], [4.0], "4,1", [(float("nan"), 1.0)]):
        with pytest.raises(InvalidParameterError):
            f.plot(tmp_path / "x.png", measured=bad)  # type: ignore[arg-type]
    for k in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidParameterError, match="band_sigma"):
            f.plot_interactive(tmp_path / "x.html", band_sigma=k)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.html").exists()


def test_load_measured(tmp_path: Path) -> None:
    good = tmp_path / "pts.csv"
    good.write_text("bpw,error,label\n3.5,0.2,mix A\n4.25,0.05,\n")
    assert load_measured(good) == (MeasuredPoint(bpw=3.5, error=0.2, label="mix A"),
                                   MeasuredPoint(bpw=4.25, error=0.05, label=""))
    bare = tmp_path / "bare.csv"
    bare.write_text("error,bpw\n0.1,4\n")
    assert load_measured(bare) == (MeasuredPoint(bpw=4.0, error=0.1),)
    cases = {"nolabel.csv": ("bpw,err\n3,1\n", "lack column"),
             "nan.csv": ("bpw,error\n3,1\nnan,2\n", "line 3"),
             "neg.csv": ("bpw,error\n-3,1\n", "> 0"),
             "text.csv": ("bpw,error\nfour,1\n", "'four' is not a number"),
             "empty.csv": ("", "cannot read"),
             "header.csv": ("bpw,error\n", "no rows")}
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InvalidParameterError, match=match):
            load_measured(tmp_path / name)
    with pytest.raises(InvalidParameterError, match="not found"):
        load_measured(tmp_path / "missing.csv")


def test_cli_round_trip(table: CostTable, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    src = table.save(tmp_path / "t.parquet")
    pts = tmp_path / "pts.csv"
    pts.write_text("bpw,error,label\n3.5,20,run-1\n4.5,5,run-2\n")
    out = {k: tmp_path / f"f.{k}" for k in ("csv", "png", "html")}
    assert main(["frontier", str(src), "-o", str(out["csv"]), "--plot", str(out["png"]),
                 "--html", str(out["html"]), "--band-sigma", "1.5", "--measured", str(pts),
                 "--bpw", "3.3"]) == 0
    text = capsys.readouterr().out
    assert "σ" in text and "interactive plot ->" in text
    f = solvers.frontier(table, budgets=[Budget(bpw=3.3)])
    frame = pd.read_csv(out["csv"])
    assert f.cost_std is not None
    np.testing.assert_allclose(frame["cost_std"], f.cost_std, rtol=1e-12)
    assert out["png"].read_bytes()[:4] == b"\x89PNG"
    names = trace_names(out["html"].read_text(encoding="utf-8"))
    assert "±1.5σ (cost_std)" in names and "measured" in names
    assert "run-2" in out["html"].read_text(encoding="utf-8")


@pytest.mark.parametrize(("content", "extra", "match"), [
    ("bpw,error\nnan,1\n", ["--plot", "p.png"], "line 2"),
    ("bpw,value\n3,1\n", ["--html", "p.html"], "lack column"),
    ("bpw,error\n3,1\n", [], "add --plot"),
    ("bpw,error\n3,1\n", ["--plot", "p.png", "--band-sigma", "-1"], "--band-sigma"),
])
def test_cli_bad_measured_is_one_line(table: CostTable, tmp_path: Path, content: str,
                                      extra: list[str], match: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = table.save(tmp_path / "t.parquet")
    pts = tmp_path / "pts.csv"
    pts.write_text(content)
    args = [a if not a.startswith("p.") else str(tmp_path / a) for a in extra]
    assert main(["frontier", str(src), "--measured", str(pts), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitalloc frontier: error:") and "\n" not in err and match in err
    assert not list(tmp_path.glob("p.*"))


def test_import_solvers_stays_light() -> None:
    code = ("import sys, solvers, solvers._frontier, solvers._frontier_plot; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'plotly') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_static_plot_leaves_the_pyplot_backend_alone(table: CostTable, tmp_path: Path) -> None:
    # A notebook's inline backend must survive a plot written to a file.
    code = ("import matplotlib; matplotlib.use('svg'); import solvers; "
            "from allocator.core.synth import synth_table; "
            "f = solvers.frontier(synth_table(n_units=5, n_options=3, seed=0)); "
            f"f.plot({str(tmp_path / 'f.png')!r}); "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg"
    assert (tmp_path / "f.png").stat().st_size > 1000
