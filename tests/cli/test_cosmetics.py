"""CLI cosmetics: argparse error prefix, untruncated compare output off a terminal, plot title."""

from __future__ import annotations

from pathlib import Path

import pytest

from allocator.cli import main
from allocator.core.synth import synth_table
from allocator.core.table import CostTable


@pytest.mark.parametrize(("argv", "prefix"), [
    (["--bogus"], "bitalloc: error:"),
    (["no-such-verb"], "bitalloc: error:"),
    (["solve"], "bitalloc solve: error:"),
])
def test_argparse_errors_name_the_program_once(argv: list[str], prefix: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(prefix) and "bitalloc bitalloc" not in err, err


def test_compare_keeps_long_estimator_names_off_a_terminal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = ["hessian-trace-hutchinson-with-a-long-name", "output-consistent-fisher-long-name",
             "measured-kl-probe-estimator-long-name"]
    paths = []
    for k, name in enumerate(names):
        t = synth_table(n_units=12, seed=k)
        path = tmp_path / f"t{k}.parquet"
        CostTable(t.df, {**t.metadata, "estimator": name}).save(path)
        paths.append(str(path))
    assert main(["compare", *paths]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    for name in names:
        assert name in out, out


def test_frontier_plot_title_fits_a_long_model_path(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import numpy as np
    from matplotlib.figure import Figure

    from allocator.jobs import report

    saved: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self))
    model = "/home/someone/checkpoints/experiments/2026-11-30/" + "very-long-model-name-" * 4
    run = SimpleNamespace(rows=[], config=SimpleNamespace(model=model, bpw=3.0),
                          table=SimpleNamespace(metadata={"estimator": "hessian-proxy"}))
    front = SimpleNamespace(bpw=np.array([2.0, 3.0, 4.0]), cost=np.array([3.0, 2.0, 1.0]))
    report._plot(run, front, tmp_path / "f.png")  # type: ignore[arg-type]
    (fig,) = saved
    title = fig.axes[0].title
    assert "checkpoints" not in title.get_text() and "very-long-model-name" in title.get_text()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    box, page = title.get_window_extent(renderer), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and box.y1 <= page.y1, (box, page)
