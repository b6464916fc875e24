"""``--device``: every verb that runs a model takes it; estimate / apply / evaluate run on CUDA
and match the CPU (skipped without a GPU); a device this machine lacks is one clear line.

Without a GPU the device cannot be exercised for real, so the CPU tests check what can be
checked honestly: the flag is parsed and validated by every verb, an unusable device fails
before any model loads, and the checked device reaches ``load_model`` and the batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from allocator.cli import main  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available())")
OPTIONS = "int4-g32-asym,int8-g32-asym,fp16"


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mixed int4 / int8 / fp16 plan for the bundled tiny-llama (datafree costs, CPU)."""
    import solvers
    from allocator.core.budget import Budget
    from sensitivity import EstimateSpec, estimate

    table = estimate("tiny-llama", EstimateSpec(method="datafree", options=OPTIONS, progress=False))
    plan = solvers.solve(table, Budget(bpw=6.0)).plan
    assert plan is not None and len(set(plan.choice.values())) > 1
    return Path(plan.save(tmp_path_factory.mktemp("device") / "plan.json"))


def _last_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


def _verbs(plan: Path, device: str) -> list[list[str]]:
    return [["estimate", "tiny-llama", "--method", "datafree", "--device", device],
            ["apply", "tiny-llama", str(plan), "--device", device],
            ["evaluate", "tiny-llama", str(plan), "--device", device],
            ["run", "tiny-llama", "--bpw", "4", "--device", device],
            ["demo", "--bpw", "4", "--device", device],
            ["search", "t.parquet", "--bpw", "4", "--device", device]]


def test_a_bad_device_name_is_one_line_for_every_verb(plan_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    for argv in _verbs(plan_path, "gpu0"):
        assert main(argv) == 2, argv
        last = _last_error(capsys)
        assert last.startswith("bitalloc") and "--device 'gpu0' is not a device name" in last, last


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_one_line_for_every_verb(plan_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    for argv in _verbs(plan_path, "cuda"):
        assert main(argv) == 2, argv
        last = _last_error(capsys)
        assert "--device cuda: CUDA is not available here" in last and "use --device cpu" in last, last


def test_the_checked_device_reaches_the_model_and_the_batches(plan_path: Path, monkeypatch,
                                                              capsys) -> None:  # type: ignore[no-untyped-def]
    """apply --method gptq and evaluate load the model on --device and hand the quantizer and the
    forwards batches on the model's device (on this machine: cpu, spelled ``cpu:0``)."""
    import allocator.backend as backend
    import allocator.model.loading as loading

    seen: dict[str, list[Any]] = {"load": [], "batches": []}
    real_load, real_apply, real_ref = loading.load_model, backend.apply_plan, backend.reference_outputs

    def load(*a: Any, **kw: Any) -> Any:
        seen["load"].append(kw.get("device"))
        return real_load(*a, **kw)

    def where(model: Any, batches: Any) -> None:
        param = next(model.parameters()).device
        seen["batches"] += [(v.device, param) for b in batches or [] for v in b.values()
                            if isinstance(v, torch.Tensor)]

    def apply(model: Any, plan: Any, **kw: Any) -> Any:
        where(model, kw.get("calibration"))
        return real_apply(model, plan, **kw)

    def ref(model: Any, batches: Any, **kw: Any) -> Any:
        where(model, batches)
        return real_ref(model, batches, **kw)

    monkeypatch.setattr(loading, "load_model", load)
    monkeypatch.setattr(backend, "apply_plan", apply)
    monkeypatch.setattr(backend, "reference_outputs", ref)
    small = ["--seq-len", "16", "--device", "cpu:0"]
    assert main(["apply", "tiny-llama", str(plan_path), "--method", "gptq", "--samples", "2",
                 *small]) == 0
    assert main(["evaluate", "tiny-llama", str(plan_path), "--samples", "4", *small]) == 0
    assert "applied" in capsys.readouterr().out
    assert seen["load"] == ["cpu", "cpu"]  # normalised by check_device, passed to load_model
    assert seen["batches"] and all(b == p for b, p in seen["batches"])


def test_gptq_hessians_live_on_the_layer_device() -> None:
    from allocator.model.quant.gptq import HessianAccumulator

    # meta tensors have a device but no data: enough to see where the accumulator is created
    acc = HessianAccumulator(8, device="meta")
    acc.add_batch(torch.zeros(3, 8, device="meta"))
    assert acc.H.device.type == "meta" and acc.nsamples == 3


# ----------------------------------------------------------------------------- on a GPU
@needs_cuda
@pytest.mark.parametrize("method", ["datafree", "fisher", "gauss-newton"])
def test_estimate_on_cuda_matches_cpu(method: str, tmp_path: Path) -> None:
    from allocator.core.table import CostTable

    tables = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.parquet"
        assert main(["estimate", "tiny-llama", "--method", method, "--options", OPTIONS,
                     "--samples", "8", "--seq-len", "32", "--batch-size", "4", "--no-progress",
                     "--device", device, "-o", str(out)]) == 0
        tables[device] = CostTable.load(out)
    cpu, gpu = (tables[d].df.sort_values(["unit", "option"]) for d in ("cpu", "cuda"))
    assert tables["cuda"].metadata["device"].startswith("cuda")
    assert list(cpu["unit"]) == list(gpu["unit"]) and list(cpu["option"]) == list(gpu["option"])
    # float32 kernels differ between devices: equal within rounding, same ranking
    np.testing.assert_allclose(gpu["cost"], cpu["cost"], rtol=2e-2, atol=1e-9)


@needs_cuda
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_apply_and_evaluate_on_cuda_match_cpu(method: str, plan_path: Path) -> None:
    from allocator.backend import apply_plan, evaluate, reference_outputs, verify
    from allocator.core.plan import BitPlan
    from allocator.model.data import CalibrationData
    from allocator.model.loading import load_model

    plan = BitPlan.load(plan_path)
    results = {}
    for device in ("cpu", "cuda"):
        lm = load_model("tiny-llama", device=device)
        calib = list(CalibrationData.from_corpus(lm.tokenizer, split="calibration", n_samples=4,
                                                 seq_len=32, batch_size=2).to(device))
        held = list(CalibrationData.from_corpus(lm.tokenizer, split="evaluation", n_samples=4,
                                                seq_len=32, batch_size=2).to(device))
        ref = reference_outputs(lm.model, held, kind=lm.kind)
        apply_plan(lm.model, plan, method=method, calibration=calib)
        assert verify(lm.model, plan).ok
        weights = {n: p.detach().cpu() for n, p in lm.model.named_parameters()}
        results[device] = (weights, evaluate(lm.model, held, ref).metrics)
    (w_cpu, m_cpu), (w_gpu, m_gpu) = results["cpu"], results["cuda"]
    for name, w in w_cpu.items():
        # a weight on a rounding boundary may land one level apart: compare in bulk
        close = torch.isclose(w_gpu[name], w, rtol=1e-3, atol=1e-5).float().mean()
        assert close > 0.99, name
    for k, v in m_cpu.items():
        assert m_gpu[k] == pytest.approx(v, rel=2e-2), k


@needs_cuda
def test_cli_apply_and_evaluate_on_cuda(plan_path: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["apply", "tiny-llama", str(plan_path), "--device", "cuda",
                 "-o", str(tmp_path / "q")]) == 0
    assert main(["evaluate", "tiny-llama", str(plan_path), "--samples", "4", "--seq-len", "32",
                 "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "verify: ok" in out and "cuda" in out
    # the pipeline verbs take cpu only for now, and say so in one line
    for argv in (["run", "tiny-llama", "--bpw", "4", "--device", "cuda"],
                 ["demo", "--bpw", "4", "--device", "cuda"]):
        assert main(argv) == 2
        assert "runs on the CPU only for now" in _last_error(capsys)
