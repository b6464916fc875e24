"""``salience`` (SliM-LLM) and ``hessian-proxy`` (BAQ) against hand computations on a Linear."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_options  # noqa: E402
from allocator.core.units import discover_units  # noqa: E402
from allocator.model.quant import fake_quantize  # noqa: E402
from sensitivity import EstimateContext, get_estimator  # noqa: E402
from sensitivity._salience import InputHessian, inverse_cholesky_diag  # noqa: E402

OPTIONS = parse_options("int2..3-g4-asym,int8-g4-sym")


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, input_ids, attention_mask=None):  # noqa: ANN001, ANN201
        return self.fc(self.emb(input_ids))


@pytest.fixture()
def net():
    model = Net().eval()
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 10, (3, 5), generator=g)
        mask = torch.ones(3, 5, dtype=torch.long)
        mask[1, 3:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    # the tokens the hooks must see: valid positions only
    x = torch.cat([model.emb(b["input_ids"])[b["attention_mask"].bool()] for b in batches]).detach().double()
    return model, batches, x


def _ctx(model, batches, groups=None) -> EstimateContext:
    return EstimateContext(batches=batches, units=discover_units(model, group_columns=groups),
                           options=OPTIONS, model_kind="generic", progress=False)


def test_input_hessian_streaming_equals_direct() -> None:
    x = torch.randn(20, 4, dtype=torch.float64)
    acc = InputHessian(4, diagonal=False)
    for part in (x[:7], x[7:]):
        acc.add_batch(part)
    torch.testing.assert_close(acc.finalize(), 2 * x.T @ x / 20)


def test_hessian_proxy_by_hand(net) -> None:
    model, batches, x = net
    h_diag = 2 * (x**2).mean(0)
    w = model.fc.weight.detach()
    expected = [float(((fake_quantize(w, f) - w).double() ** 2 * h_diag).sum()) for f in OPTIONS]
    cost = get_estimator("hessian-proxy").estimate(model, _ctx(model, batches)).df["cost"]
    np.testing.assert_allclose(cost.to_numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("groups", [None, 4])
def test_salience_by_hand(net, groups) -> None:
    model, batches, x = net
    h = 2 * x.T @ x / x.shape[0]
    hd = h + 0.01 * torch.diag(h).mean() * torch.eye(8, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)  # H⁻¹ = UᵀU
    d = torch.diag(u)
    torch.testing.assert_close(inverse_cholesky_diag(h), d)
    w = model.fc.weight.detach().double()
    table = get_estimator("salience").estimate(model, _ctx(model, batches, groups))
    spans = [(0, 8)] if groups is None else [(0, 4), (4, 8)]
    expected, salience = [], []
    for lo, hi in spans:
        wb, db = w[:, lo:hi], d[lo:hi]
        salience.append(float((wb**2 / db**2).sum()))
        for f in OPTIONS:
            dw = fake_quantize(wb.float(), f).double() - wb
            # ½ Σ δ_j (ΔW_j / w_j)² written with δ explicitly (w has no zero entries here)
            delta = wb**2 / db**2
            expected.append(0.5 * float((delta * (dw / wb) ** 2).sum()))
    np.testing.assert_allclose(table.df["cost"].to_numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(table.metadata["salience"], salience, rtol=1e-6)


def test_dead_input_column_and_non_linear_units(net) -> None:
    model, batches, _ = net
    with torch.no_grad():
        model.emb.weight[:, 2] = 0.0  # column 2 of fc's input is always zero
    table = get_estimator("salience").estimate(model, _ctx(model, batches))
    assert np.isfinite(table.df["cost"]).all()
    ctx = EstimateContext(batches=batches, units=discover_units(model, kinds=["embedding"]),
                          options=OPTIONS, progress=False)
    with pytest.raises(InvalidParameterError, match="Linear units only"):
        get_estimator("hessian-proxy").estimate(model, ctx)
    with pytest.raises(InvalidParameterError, match="percdamp"):
        get_estimator("salience", percdamp=0)


class TwoLayer(Net):
    def __init__(self) -> None:
        super().__init__()
        self.fc2 = torch.nn.Linear(5, 4)

    def forward(self, input_ids, attention_mask=None):  # noqa: ANN001, ANN201
        return self.fc2(torch.relu(self.fc(self.emb(input_ids))))


def test_salience_in_passes_equals_one_pass(net) -> None:
    _, batches, _ = net
    model = TwoLayer().eval()
    ctx = _ctx(model, batches)
    one = get_estimator("salience").estimate(model, ctx)
    # a budget below one module's H: every module gets a pass of its own
    split = get_estimator("salience", hessian_budget_mb=1e-6).estimate(model, ctx)
    assert one.metadata["passes"] == 1 and split.metadata["passes"] == 2
    np.testing.assert_array_equal(split.df["cost"].to_numpy(), one.df["cost"].to_numpy())
    with pytest.raises(InvalidParameterError, match="hessian_budget_mb must be a number > 0"):
        get_estimator("salience", hessian_budget_mb=0)
