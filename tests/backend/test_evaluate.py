"""Evaluation metrics against hand computations; reference caching; held-out evaluation."""

from __future__ import annotations

import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from allocator.backend import (  # noqa: E402
    ReferenceOutputs,
    apply_plan,
    clear_reference_cache,
    evaluate,
    next_token_nll,
    reference_outputs,
    retrieval_agreement,
)
from allocator.core.errors import InvalidParameterError  # noqa: E402


def test_next_token_nll_by_hand() -> None:
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]]])  # [1, 3, 2]
    ids = torch.tensor([[0, 1, 0]])
    mask = torch.tensor([[1, 1, 0]])
    s, n = next_token_nll(logits, ids, mask)
    # only t=0 → target 1 counts (t=1's target is padding): −log softmax([0, 0])[1] = log 2
    # unmasked, t=1 → target 0 adds −log softmax([2, 0])[0] = log(1 + e⁻²)
    assert n == 1 and s == pytest.approx(math.log(2))
    s2, n2 = next_token_nll(logits, ids, None)
    assert n2 == 2 and s2 == pytest.approx(math.log(2) + math.log(1 + math.exp(-2)))


def test_retrieval_agreement_by_hand() -> None:
    ref = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert retrieval_agreement(ref, ref, k=1) == 1.0
    # swapping the geometry of rows 2/3 changes the 1-NN of rows 0 and 1 only
    other = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    # ref 1-NN: 0→1, 1→0, 2→3, 3→2 ; other 1-NN: 0→2, 1→3, 2→0, 3→1  → no overlap
    assert retrieval_agreement(ref, other, k=1) == 0.0
    # k=2 over queries 0..1: ref {1,3}/{0,3}; other {2,3}/{3,2} → overlaps 1/2 and 1/2
    assert retrieval_agreement(ref, other, k=2, n_queries=2) == pytest.approx(0.5)
    with pytest.raises(InvalidParameterError):
        retrieval_agreement(ref[:1], ref[:1])


class Lm(torch.nn.Module):
    """A causal "LM" whose logits are a linear map of one-hot inputs (hand-checkable)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(5, 5)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None, use_cache: bool = False) -> Any:
        from types import SimpleNamespace

        x = torch.nn.functional.one_hot(input_ids, 5).float()
        return SimpleNamespace(logits=self.proj(x))


def test_causal_metrics_by_hand() -> None:
    clear_reference_cache()
    model = Lm()
    batches = [{"input_ids": torch.tensor([[1, 2, 3, 4], [0, 1, 2, 0]]),
                "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}]
    ref = reference_outputs(model, batches, kind="causal_lm", model_fingerprint="lm")
    assert reference_outputs(model, batches, kind="causal_lm", model_fingerprint="lm") is ref
    fp_logits = ref.outputs[0].clone()
    with torch.no_grad():
        model.proj.weight.mul_(0.5)
    rep = evaluate(model, batches, ref)
    q_logits = model(**batches[0]).logits.detach()
    lp_r, lp_q = torch.log_softmax(fp_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    kl = (lp_r.exp() * (lp_r - lp_q)).sum(-1)
    m = batches[0]["attention_mask"].bool()
    assert rep.metrics["kl"] == pytest.approx(float(kl[m].mean()))
    nll = [-lp_q[0, t, batches[0]["input_ids"][0, t + 1]] for t in range(3)]
    nll += [-lp_q[1, t, batches[0]["input_ids"][1, t + 1]] for t in range(2)]
    assert rep.metrics["perplexity"] == pytest.approx(math.exp(float(sum(nll)) / 5))
    assert rep.error == rep.metrics["kl"] and rep.n_tokens == 7
    nll_fp = [-lp_r[0, t, batches[0]["input_ids"][0, t + 1]] for t in range(3)]
    nll_fp += [-lp_r[1, t, batches[0]["input_ids"][1, t + 1]] for t in range(2)]
    assert rep.metrics["perplexity_fp"] == pytest.approx(math.exp(float(sum(nll_fp)) / 5))


def test_classifier_accuracy_by_hand() -> None:
    refs = [torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])]
    outs = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    batches = [{"input_ids": torch.zeros(3, 1, dtype=torch.long), "labels": torch.tensor([0, 1, 1])}]
    rep = evaluate(torch.nn.Identity(), batches, ReferenceOutputs(kind="classifier", outputs=refs),
                   forward=lambda _m, _b, _k: outs)
    assert rep.metrics["accuracy"] == pytest.approx(2 / 3)  # predictions 0, 0, 1
    assert rep.metrics["agreement"] == pytest.approx(1 / 3)


def test_encoder_on_held_out_minilm(minilm: Any, held_out: list, state: Any, tmp_path: Any) -> None:
    clear_reference_cache()
    ref = reference_outputs(minilm.model, held_out, kind="encoder", model_fingerprint=minilm.fingerprint,
                            cache_dir=tmp_path)
    same = evaluate(minilm.model, held_out, ref)
    assert same.metrics["cosine"] == pytest.approx(1.0, abs=1e-6) and same.metrics["retrieval@5"] == 1.0
    clear_reference_cache()  # now it comes back from the disk cache
    again = reference_outputs(minilm.model, held_out, kind="encoder",
                              model_fingerprint=minilm.fingerprint, cache_dir=tmp_path)
    assert torch.equal(again.outputs[0], ref.outputs[0]) and len(list(tmp_path.iterdir())) == 1
    from allocator.core.plan import BitPlan
    from allocator.core.table import CostTable
    from allocator.core.units import discover_units

    units = discover_units(minilm.model)
    errs = []
    for opt in ("int2-g128-asym", "int4-g128-asym"):
        t = CostTable.from_unit_costs(units=[u.name for u in units], params=[u.params for u in units],
                                      options=[opt], cost=[[0.0]] * len(units))
        minilm.model.load_state_dict(state)
        apply_plan(minilm.model, BitPlan.from_choice(t, dict.fromkeys(t.units, opt)))
        errs.append(evaluate(minilm.model, held_out, ref))
    assert errs[0].error > errs[1].error > 0
    assert errs[0].metrics["retrieval@5"] <= errs[1].metrics["retrieval@5"]


def test_causal_per_text_sums_reproduce_the_metrics() -> None:
    """Per row: Σ KL over its real tokens, its token count, Σ NLL and its target count; the
    metrics are exactly their ratios of sums, and a row's sums do not depend on its batch."""
    clear_reference_cache()
    model = Lm()
    batches = [{"input_ids": torch.tensor([[1, 2, 3, 4], [0, 1, 2, 0]]),
                "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])},
               {"input_ids": torch.tensor([[4, 3, 2, 1]]), "attention_mask": torch.tensor([[1, 1, 0, 0]])}]
    ref = reference_outputs(model, batches, kind="causal_lm")
    with torch.no_grad():
        model.proj.weight.mul_(0.5)
    rep = evaluate(model, batches, ref)
    s = rep.samples
    assert s is not None and s.n == rep.n_samples == 3
    assert list(s.columns["tokens"]) == [4, 3, 2] and list(s.columns["targets"]) == [3, 2, 1]
    assert rep.n_tokens == 9
    # by hand, row by row
    kl_rows, nll_rows = [], []
    for b, r in zip(batches, ref.outputs, strict=True):
        q = model(**b).logits.detach()
        lp_r, lp_q = torch.log_softmax(r.double(), -1), torch.log_softmax(q.double(), -1)
        kl = (lp_r.exp() * (lp_r - lp_q)).sum(-1)
        for i in range(q.shape[0]):
            m = b["attention_mask"][i].bool()
            kl_rows.append(float(kl[i][m].sum()))
            ids = b["input_ids"][i]
            nll_rows.append(float(sum(-lp_q[i, t, ids[t + 1]] for t in range(int(m.sum()) - 1))))
    assert list(s.columns["kl"]) == pytest.approx(kl_rows, rel=1e-12)
    assert list(s.columns["nll"]) == pytest.approx(nll_rows, rel=1e-12)
    # the report's metrics are the samples' ratios of sums, to the last bit
    assert dict(rep.metrics) == s.values()
    assert rep.metrics["kl"] == pytest.approx(sum(kl_rows) / 9, rel=1e-12)
    assert rep.metrics["perplexity"] == pytest.approx(math.exp(sum(nll_rows) / 6))
    # the same row alone in its batch: the same sums
    alone = [{k: v[1:2] for k, v in batches[0].items()}]
    one = evaluate(model, alone, ReferenceOutputs(kind="causal_lm", outputs=[ref.outputs[0][1:2]]))
    assert one.samples is not None
    for col in ("kl", "tokens", "nll", "targets", "nll_fp"):
        assert one.samples.columns[col][0] == pytest.approx(s.columns[col][1], rel=1e-12)
    # every metric has an interval around its value, deterministic given the seed
    ci = rep.intervals(draws=200, seed=0)
    assert set(ci) == set(rep.metrics) and ci == rep.intervals(draws=200, seed=0)
    assert all(c.lo <= c.value <= c.hi for c in ci.values())


def test_classifier_per_sample_sums_by_hand() -> None:
    refs = [torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])]
    outs = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    batches = [{"input_ids": torch.zeros(3, 1, dtype=torch.long), "labels": torch.tensor([0, 1, 1])}]
    rep = evaluate(torch.nn.Identity(), batches, ReferenceOutputs(kind="classifier", outputs=refs),
                   forward=lambda _m, _b, _k: outs)
    s = rep.samples
    assert s is not None
    assert list(s.columns["correct"]) == [1, 0, 1] and list(s.columns["agree"]) == [1, 0, 0]
    assert s.columns["kl"][0] == 0.0 and s.columns["kl"][1] > 0
    assert dict(rep.metrics) == s.values()
    # against itself: every paired difference is 0, nothing is worse
    cmp = rep.compare(rep, draws=100)
    assert set(cmp) == {"agreement", "kl", "accuracy"} and not any(c.worse for c in cmp.values())


def test_encoder_per_text_sums_reproduce_the_metrics(minilm: Any, held_out: list, state: Any) -> None:
    from allocator.core.plan import BitPlan
    from allocator.core.table import CostTable
    from allocator.core.units import discover_units

    clear_reference_cache()
    ref = reference_outputs(minilm.model, held_out, kind="encoder", model_fingerprint=minilm.fingerprint)
    units = discover_units(minilm.model)
    t = CostTable.from_unit_costs(units=[u.name for u in units], params=[u.params for u in units],
                                  options=["int3-g128-asym"], cost=[[0.0]] * len(units))
    apply_plan(minilm.model, BitPlan.from_choice(t, dict.fromkeys(t.units, "int3-g128-asym")))
    rep = evaluate(minilm.model, held_out, ref, n_queries=10)
    s = rep.samples
    assert s is not None and s.n == rep.n_samples == 16
    assert dict(rep.metrics) == s.values()
    assert list(s.columns["query"]) == [1.0] * 10 + [0.0] * 6
    emb = torch.cat([minilm.model(**{k: v for k, v in b.items() if k != "labels"}).last_hidden_state
                     .mul(b["attention_mask"].unsqueeze(-1)).sum(1)
                     .div(b["attention_mask"].sum(1, keepdim=True)) for b in held_out]).detach()
    r = torch.cat(list(ref.outputs))
    cos = torch.nn.functional.cosine_similarity(r.double(), emb.double(), dim=-1)
    assert list(s.columns["cos_distance"]) == pytest.approx((1 - cos).tolist(), abs=1e-6)
    assert rep.metrics["retrieval@5"] == pytest.approx(retrieval_agreement(r, emb, k=5, n_queries=10))
    assert rep.metrics["cos_distance"] > 0
