"""Output-consistent curvature against the exact Gauss–Newton matrix Jᵀ H_D J of tiny models.

J comes from ``torch.autograd.functional.jacobian`` of the evaluator's output tensor
(:func:`forward_outputs`) with respect to one unit block; H_D is the metric's Hessian in the
output (softmax Fisher for KL, (I − ê êᵀ)/‖e‖² for 1 − cos), itself checked against autograd and
finite differences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _tiny import llama_batches, tiny_bert, tiny_llama  # noqa: E402

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_options  # noqa: E402
from allocator.core.units import discover_units, unit_weight  # noqa: E402
from allocator.model.distortion import cosine_distance, kl_divergence  # noqa: E402
from allocator.model.outputs import forward_outputs  # noqa: E402
from allocator.model.quant import fake_quantize  # noqa: E402
from sensitivity import ESTIMATORS, EstimateContext, get_estimator, quant_errors  # noqa: E402
from sensitivity._curvature.output_metric import (  # noqa: E402
    cosine_cotangent,
    cosine_output_hessian,
    kl_cotangent,
    softmax_fisher,
)
from sensitivity._loss import differentiable_attention  # noqa: E402

OPTIONS = parse_options("int2..4-g8-asym")


# ------------------------------------------------------------------ exact GN of a unit block
@dataclass
class ExactGN:
    """Per unit: the exact GN block (1/T) Σ_p J_pᵀ H_p J_p as a [n, n] matrix."""

    blocks: list[torch.Tensor]

    def quadratic(self, i: int, delta: torch.Tensor) -> float:
        d = delta.reshape(-1).double()
        return 0.5 * float(d @ self.blocks[i] @ d)

    def row_quadratic(self, i: int, delta: torch.Tensor) -> float:
        """½ Σ_r ΔW_r GN_rr ΔW_rᵀ: the block's output-row blocks only (weights flattened by row)."""
        d = delta.double()
        rows, cols = d.shape
        per_row = torch.diagonal(self.blocks[i].reshape(rows, cols, rows, cols), dim1=0, dim2=2)
        return 0.5 * float(torch.einsum("rc,cdr,rd->", d, per_row, d))

    def trace(self, i: int) -> float:
        return float(torch.trace(self.blocks[i]))


def _output_hessians(out: torch.Tensor, batch, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """H_D per output position ([P, C, C]) and the position weights (1 counted, 0 not)."""
    out = out.detach().double()
    if kind == "encoder":
        return cosine_output_hessian(out), torch.ones(out.shape[0], dtype=torch.float64)
    flat = out.reshape(-1, out.shape[-1])
    w = torch.ones(flat.shape[0], dtype=torch.float64)
    if kind == "causal_lm":
        w = batch["attention_mask"].reshape(-1).double()
    return softmax_fisher(torch.softmax(flat, -1)), w


def _output_of_block(model, batch, kind: str, name: str, w0: torch.Tensor, cols: tuple[int, int]):
    """block ↦ the evaluator's output with the unit's columns replaced by ``block``."""
    def f(block: torch.Tensor) -> torch.Tensor:
        w = torch.cat([w0[:, :cols[0]], block, w0[:, cols[1]:]], dim=1)
        with differentiable_attention(), \
                torch.nn.utils.stateless._reparametrize_module(model, {name: w}):
            return forward_outputs(model, batch, kind)

    return f


def exact_gn(model, batches, units, kind: str) -> ExactGN:
    blocks = []
    for unit in units:
        name = unit.module + ".weight"
        w0 = model.get_submodule(unit.module).weight.detach()
        lo, hi = unit.columns or (0, w0.shape[1])
        total, positions = None, 0.0
        for b in batches:
            f = _output_of_block(model, b, kind, name, w0, (lo, hi))
            block = w0[:, lo:hi].clone()
            out = f(block)
            jac = torch.autograd.functional.jacobian(f, block).double()
            jac = jac.reshape(-1, out.shape[-1], block.numel())  # [P, C, n]
            h, weight = _output_hessians(out, b, kind)
            part = torch.einsum("p,pci,pcd,pdj->ij", weight, jac, h, jac)
            total = part if total is None else total + part
            positions += float(weight.sum())
        blocks.append(total / positions)
    return ExactGN(blocks)


def _deltas(model, units, options) -> list[list[torch.Tensor]]:
    out = []
    for u in units:
        w = unit_weight(model, u).detach().float()
        out.append([fake_quantize(w, f) - w for f in options])
    return out


def _ctx(model, batches, units, kind: str, seed: int = 0) -> EstimateContext:
    return EstimateContext(batches=batches, units=units, options=OPTIONS, model_kind=kind,
                           seed=seed, progress=False)


def _matrix(table, column: str = "cost") -> np.ndarray:
    return table.df[column].to_numpy().reshape(table.n_units, -1)


def _assert_converged(est: np.ndarray, sem: np.ndarray, exact: np.ndarray, rtol: float,
                      k: float = 4.0) -> None:
    """Within k standard errors, and (many probes: the sampling noise is small) within rtol.

    The reported SEM is over samples, and the exact form is over the same samples, so the
    z-test is loose; the relative bound is the sharp check (a 2× factor error fails it)."""
    z = np.abs(est - exact) / np.maximum(sem, 1e-300)
    assert z.max() < k, (z.max(), est, exact)
    np.testing.assert_allclose(est, exact, rtol=rtol, atol=0)


# ------------------------------------------------------------------ tiny models
class TinyImageClassifier(torch.nn.Module):
    """A 2-layer MLP on ``pixel_values`` (a ViT-style batch without input_ids)."""

    @dataclass
    class Out:
        logits: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc1 = torch.nn.Linear(12, 8)
        self.fc2 = torch.nn.Linear(8, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0.0, 0.7)

    def forward(self, pixel_values: torch.Tensor) -> TinyImageClassifier.Out:
        return self.Out(self.fc2(torch.tanh(self.fc1(pixel_values.flatten(1)))))


@pytest.fixture(scope="module")
def llama():
    model, batches = tiny_llama(), llama_batches()
    units = discover_units(model, group_columns=8, include=r"v_proj|down_proj|lm_head")
    return model, batches, units, exact_gn(model, batches, units, "causal_lm")


@pytest.fixture(scope="module")
def bert():
    model = tiny_bert()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 31, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    units = discover_units(model, include=r"layer\.0\.(attention\.self\.value|output\.dense)")
    return model, batches, units, exact_gn(model, batches, units, "encoder")


@pytest.fixture(scope="module")
def classifier():
    model = TinyImageClassifier().eval()
    g = torch.Generator().manual_seed(6)
    batches = [{"pixel_values": torch.randn(5, 3, 2, 2, generator=g)} for _ in range(2)]
    units = discover_units(model)
    return model, batches, units, exact_gn(model, batches, units, "classifier")


CASES = {"llama": "causal_lm", "bert": "encoder", "classifier": "classifier"}


# ------------------------------------------------------------------ (4), (5): output metric H_D
def test_cosine_hessian_matches_autograd_and_finite_differences() -> None:
    g = torch.Generator().manual_seed(0)
    e = torch.randn(6, generator=g, dtype=torch.float64) * 3
    h = cosine_output_hessian(e)
    exact = torch.autograd.functional.hessian(lambda x: cosine_distance(e, x), e.clone())
    torch.testing.assert_close(h, exact, rtol=1e-9, atol=1e-12)
    for _ in range(3):
        d = torch.randn(6, generator=g, dtype=torch.float64)
        step = 1e-4
        fd = (cosine_distance(e, e + step * d) + cosine_distance(e, e - step * d)
              - 2 * cosine_distance(e, e)) / step**2
        assert float(d @ h @ d) == pytest.approx(float(fd), rel=1e-5)
    assert torch.linalg.eigvalsh(h).min() > -1e-12  # PSD: the projector over ‖e‖²


def test_cosine_cotangents_have_the_cosine_hessian_as_covariance() -> None:
    g = torch.Generator().manual_seed(1)
    e = torch.randn(4, generator=g, dtype=torch.float64) * 2
    z = torch.randn(200_000, 4, generator=g, dtype=torch.float64)
    v = cosine_cotangent(e.expand(len(z), 4), z)
    cov = v.T @ v / len(z)
    torch.testing.assert_close(cov, cosine_output_hessian(e), atol=0.01 / float(e @ e) * 4, rtol=0)


def test_softmax_fisher_is_the_kl_hessian_and_the_cotangent_covariance() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, generator=g, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    fisher = softmax_fisher(p)
    exact = torch.autograd.functional.hessian(lambda x: kl_divergence(logits, x), logits.clone())
    torch.testing.assert_close(fisher, exact, rtol=1e-9, atol=1e-12)
    u = torch.rand(200_000, generator=g, dtype=torch.float64)
    v = kl_cotangent(logits.expand(len(u), 5), u)
    assert v.mean(0).abs().max() < 5e-3  # E[v] = p − E[onehot(y)] = 0
    torch.testing.assert_close(v.T @ v / len(u), fisher, atol=4e-3, rtol=0)


# ------------------------------------------------------------------ (1) GN quadratic form
@pytest.mark.parametrize("case", list(CASES))
def test_gauss_newton_converges_to_the_exact_quadratic_form(case, request) -> None:
    model, batches, units, exact = request.getfixturevalue(case)
    kind = CASES[case]
    table = get_estimator("gauss-newton", correlations="unit", probes=1024, chunk=2).estimate(
        model, _ctx(model, batches, units, kind))
    deltas = _deltas(model, units, OPTIONS)
    want = np.array([[exact.quadratic(i, d) for d in deltas[i]] for i in range(len(units))])
    est, sem = _matrix(table), _matrix(table, "cost_std")
    assert (want > 0).all() and (sem > 0).all()
    _assert_converged(est, sem, want, rtol=0.12)
    assert table.metadata["output_metric"] == ("cos" if kind == "encoder" else "kl")


def test_gauss_newton_keeps_within_unit_correlations(llama) -> None:
    # the diagonal drops the off-diagonal GN terms; gauss-newton must not
    model, batches, units, exact = llama
    deltas = _deltas(model, units, OPTIONS)
    full = np.array([[exact.quadratic(i, d) for d in deltas[i]] for i in range(len(units))])
    diag = np.array([[0.5 * float((torch.diagonal(exact.blocks[i]) * d.reshape(-1).double() ** 2)
                                  .sum()) for d in deltas[i]] for i in range(len(units))])
    assert np.abs(full / diag - 1).max() > 0.2  # the test model has real correlations
    table = get_estimator("gauss-newton", correlations="unit", probes=256).estimate(
        model, _ctx(model, batches, units, "causal_lm"))
    est = _matrix(table)
    assert np.abs(np.log(est / full)).mean() < np.abs(np.log(diag / full)).mean()


@pytest.mark.parametrize("case", list(CASES))
def test_row_form_converges_to_the_exact_row_blocks(case, request) -> None:
    model, batches, units, exact = request.getfixturevalue(case)
    table = get_estimator("gauss-newton", correlations="rows", probes=1024, chunk=2).estimate(
        model, _ctx(model, batches, units, CASES[case]))
    deltas = _deltas(model, units, OPTIONS)
    want = np.array([[exact.row_quadratic(i, d) for d in deltas[i]] for i in range(len(units))])
    assert (want > 0).all()
    _assert_converged(_matrix(table), _matrix(table, "cost_std"), want, rtol=0.05)
    assert table.metadata["estimator_params"]["correlations"] == "rows"


def test_row_form_keeps_the_row_correlations_and_is_less_noisy(llama) -> None:
    """Between the diagonal and the whole block: the row blocks keep the correlations inside a
    row, and with few probes their estimate is nearer its exact value (over the same samples:
    the error is the probes' noise alone) than the whole-block one is to its own."""
    model, batches, units, exact = llama
    deltas = _deltas(model, units, OPTIONS)
    want = {"rows": np.array([[exact.row_quadratic(i, d) for d in deltas[i]] for i in range(len(units))]),
            "unit": np.array([[exact.quadratic(i, d) for d in deltas[i]] for i in range(len(units))])}
    diag = np.array([[0.5 * float((torch.diagonal(exact.blocks[i]) * d.reshape(-1).double() ** 2)
                                  .sum()) for d in deltas[i]] for i in range(len(units))])
    assert np.abs(want["rows"] / diag - 1).max() > 0.1  # correlations inside rows are real here
    noise = {}
    for c in ("rows", "unit"):
        errs = [np.abs(np.log(_matrix(get_estimator("gauss-newton", correlations=c, probes=2).estimate(
            model, _ctx(model, batches, units, "causal_lm", seed=seed))) / want[c])).mean()
            for seed in range(4)]
        noise[c] = float(np.mean(errs))
    # modest here (16-row units, a few tokens: every row sees the same sampled labels)
    assert noise["rows"] < 0.9 * noise["unit"], noise


# ------------------------------------------------------------------ (2) trace and diagonal
@pytest.mark.parametrize("case", list(CASES))
def test_gn_trace_matches_the_exact_block_trace(case, request) -> None:
    model, batches, units, exact = request.getfixturevalue(case)
    ctx = _ctx(model, batches, units, CASES[case])
    table = get_estimator("hessian-trace", probes=512, chunk=3).estimate(model, ctx)
    meta = table.metadata
    trace, sem = np.asarray(meta["trace"]), np.asarray(meta["trace_sem"])
    want = np.array([exact.trace(i) for i in range(len(units))])
    _assert_converged(trace, sem, want, rtol=0.05)
    assert (trace > 0).all() and meta["curvature"] == "gauss-newton"
    n = np.array([u.params for u in units])
    np.testing.assert_allclose(_matrix(table), (trace / n)[:, None] * quant_errors(
        model, units, OPTIONS), rtol=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_model_fisher_matches_the_exact_gn_diagonal(case, request) -> None:
    model, batches, units, exact = request.getfixturevalue(case)
    table = get_estimator("fisher", probes=512).estimate(
        model, _ctx(model, batches, units, CASES[case]))
    deltas = _deltas(model, units, OPTIONS)
    want = np.array([[0.5 * float((torch.diagonal(exact.blocks[i]) * d.reshape(-1).double() ** 2)
                                  .sum()) for d in deltas[i]] for i in range(len(units))])
    _assert_converged(_matrix(table), _matrix(table, "cost_std"), want, rtol=0.05)


# ------------------------------------------------------------------ (3) sign, seeds, modes
def test_costs_nonnegative_deterministic_and_mode_independent(llama) -> None:
    model, batches, units, _ = llama
    ctx = _ctx(model, batches, units, "causal_lm", seed=7)
    a = get_estimator("gauss-newton", probes=2, chunk=1, per_sample="loop").estimate(model, ctx)
    b = get_estimator("gauss-newton", probes=2, chunk=3, per_sample="vmap").estimate(model, ctx)
    c = get_estimator("gauss-newton", probes=2).estimate(model, _ctx(model, batches, units,
                                                                      "causal_lm", seed=8))
    assert (_matrix(a) >= 0).all() and (_matrix(a) > 0).all()
    np.testing.assert_allclose(_matrix(a), _matrix(b), rtol=1e-5)
    np.testing.assert_allclose(_matrix(a, "cost_std"), _matrix(b, "cost_std"), rtol=1e-4)
    assert not np.allclose(_matrix(a), _matrix(c))
    again = get_estimator("gauss-newton", probes=2, chunk=1, per_sample="loop").estimate(model, ctx)
    assert again.fingerprint == a.fingerprint
    assert a.metadata["samples"] == 6 and a.metadata["output_probes"] == 2
    assert a.metadata["positions"] == int(sum(int(b_["attention_mask"].sum()) for b_ in batches))


def test_weights_and_flags_untouched(bert) -> None:
    model, batches, units, _ = bert
    before = [unit_weight(model, u).detach().clone() for u in units]
    get_estimator("gauss-newton", probes=1).estimate(model, _ctx(model, batches, units, "encoder"))
    for u, w in zip(units, before, strict=True):
        assert torch.equal(unit_weight(model, u), w)
        assert model.get_submodule(u.module).weight.grad is None
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_registered_and_bad_parameters() -> None:
    assert ESTIMATORS["gauss-newton"] == "sensitivity._gauss_newton:GaussNewtonEstimator"
    with pytest.raises(InvalidParameterError, match="probes"):
        get_estimator("gauss-newton", probes=0)
    with pytest.raises(InvalidParameterError, match="chunk"):
        get_estimator("gauss-newton", chunk=0)
    with pytest.raises(InvalidParameterError, match="per_sample"):
        get_estimator("gauss-newton", per_sample="batch")
    with pytest.raises(InvalidParameterError, match="correlations"):
        get_estimator("gauss-newton", correlations="columns")
    with pytest.raises(InvalidParameterError, match="probes"):
        get_estimator("hessian-trace", probes=0)


# ------------------------------------------------------------------ (4) streamed gradients
def test_streamed_reduce_equals_autograd_and_keeps_a_callers_gradients() -> None:
    """The loop mode reduces each weight's gradient as autograd accumulates it and drops it:
    same terms as torch.autograd.grad of every leaf at once, an unreachable leaf counts as zero,
    and gradients the caller had on the weights are put back."""
    from sensitivity._curvature.reductions import UnitReduction, streamed_reduce

    model = tiny_llama(hidden=12, layers=2)
    units = discover_units(model, group_columns=8, include=r"q_proj|down_proj|lm_head")
    leaves = [model.get_submodule(u.module).weight for u in units]
    leaves = list({id(t): t for t in leaves}.values())
    index = [next(k for k, t in enumerate(leaves) if t is model.get_submodule(u.module).weight)
             for u in units]
    stray = torch.nn.Parameter(torch.ones(3, 4))  # reaches no output
    reduce = UnitReduction([*units, units[0]], [*index, len(leaves)],
                           lambda g, i: (g.double() ** 2).sum().reshape(1) + i)
    batch = llama_batches()[0]
    prior = torch.full_like(leaves[0], 7.0)
    leaves[0].grad = prior
    for t in leaves:
        t.requires_grad_(True)
    out = forward_outputs(model, batch, "causal_lm")
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    got = streamed_reduce(out, [*leaves, stray], cot, reduce)
    grads = torch.autograd.grad(out, leaves, grad_outputs=cot, retain_graph=True)
    want = reduce([*grads, torch.zeros_like(stray)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert got[-1].item() == len(units)  # the stray leaf's unit: zero gradient + its position
    assert leaves[0].grad is prior and all(t.grad is None for t in leaves[1:])
