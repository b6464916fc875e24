from __future__ import annotations

import pytest

from allocator.core.errors import ExportError
from allocator.core.units import discover_units
from allocator.export import export_plan

from .conftest import linear_names, make_plan, random_pick, shapes_of
from .consumers import llamacpp_rules, llamacpp_type

gguf = pytest.importorskip("gguf")

EXACT = {"int4-g32-sym": "q4_0", "int4-g32-asym": "q4_1", "int8-g32-sym": "q8_0", "fp16": "f16"}


def _tensors(model, arch) -> dict[str, str]:
    """GGUF tensor name → HF module, from gguf-py's own TensorNameMap (every weight module)."""
    n_blocks = 1 + max(int(p) for n, _ in model.named_modules() for p in n.split(".") if p.isdigit())
    tmap = gguf.get_tensor_name_map(arch, n_blocks)
    out = {}
    for name, module in model.named_modules():
        if getattr(module, "weight", None) is not None:
            t = tmap.get_name(name)
            if t is not None:
                out[f"{t}.weight"] = name
    return out


@pytest.mark.parametrize(("model_name", "arch"), [("llama", gguf.MODEL_ARCH.LLAMA),
                                                  ("minilm", gguf.MODEL_ARCH.BERT)])
def test_llamacpp_tensor_type_file(model_name: str, arch, request) -> None:
    model = request.getfixturevalue(model_name)
    units = discover_units(model, exclude="pooler")  # BERT's pooler has no GGUF tensor
    small = ["q8_0", "q4_0", "int4-g32-sym", "int4-g32-asym", "fp16"]
    opts = [*small, "q4_K", "q6_K", "iq4_xs"]

    def pick(u, rng):  # 256-weight blocks only where the rows hold whole blocks
        ok = opts if u.in_features % 256 == 0 else small
        return ok[int(rng.integers(len(ok)))]

    plan = make_plan(units, opts, pick, seed=7)
    res = export_plan(plan, "llamacpp", model_names=linear_names(model), shapes=shapes_of(model))
    assert "#" not in res.text  # the file has no comment syntax
    rules = llamacpp_rules(res.text)
    assert all(p.startswith("^") and p.endswith(r"\.weight$") for p, _ in rules)
    tensors = _tensors(model, arch)
    assert {tensors[t] for t in tensors} >= set(plan.choice)
    for tensor, module in tensors.items():
        got, n_hits = llamacpp_type(rules, tensor)
        assert n_hits <= 1, tensor  # non-overlapping: first-wins and last-wins agree
        if module in plan.choice:
            opt = plan.choice[module]
            assert got == EXACT.get(opt, opt), tensor
        else:
            assert got is None, tensor
    assert any("llama-quantize --tensor-type-file" in n for n in res.notes)


def test_llamacpp_refusals(llama, minilm) -> None:
    units = discover_units(llama)
    plan = make_plan(units, ["int4-g128-asym", "q8_0"], random_pick(["int4-g128-asym", "q8_0"]))
    with pytest.raises(ExportError, match="no ggml type stores exactly"):
        export_plan(plan, "llamacpp")
    lossy = export_plan(plan, "llamacpp", lossy=True)
    assert all(v == ("int4-g128-asym", "q4_K") for v in lossy.changed.values())
    with pytest.raises(ExportError, match="not quantized"):
        export_plan(plan, "llamacpp", lossy=True, base="F16")
    pooled = make_plan(discover_units(minilm), ["q8_0"], lambda u, rng: "q8_0")
    with pytest.raises(ExportError, match="pooler.dense.*no GGUF tensor"):
        export_plan(pooled, "llamacpp")
    k_plan = make_plan(discover_units(minilm, exclude="pooler"), ["q4_K"], lambda u, rng: "q4_K")
    with pytest.raises(ExportError, match="not a multiple of q4_K's block of 256"):
        export_plan(k_plan, "llamacpp", shapes=shapes_of(minilm))


def test_llamacpp_builtin_llama_map_agrees_with_gguf_py(llama) -> None:
    from allocator.export.llamacpp import gguf_tensor_name

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, len(llama.model.layers))
    for name, _ in llama.named_modules():
        ours = gguf_tensor_name(name, "llama", len(llama.model.layers))
        if ours is not None:
            assert ours == tmap.get_name(name), name
