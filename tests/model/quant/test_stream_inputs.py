"""stream_inputs: every hooked module's input rows, with the forward cut short only when that is
safe (each module called exactly once), and the same rows either way."""

from __future__ import annotations

import torch

from allocator.model.outputs import PROBE_TOKENS, probe_batch, rows_within
from allocator.model.quant.inputs import stream_inputs
from tests.sensitivity._tiny import llama_batches, tiny_llama


def _rows(model: torch.nn.Module, modules: list[str], batches: list[dict[str, torch.Tensor]]
          ) -> dict[str, torch.Tensor]:
    got: dict[str, list[torch.Tensor]] = {}
    stream_inputs(model, modules, batches, lambda b: model(**b, use_cache=False),
                  lambda name, x: got.setdefault(name, []).append(x.clone()))
    return {k: torch.cat(v) for k, v in got.items()}


def _calls(model: torch.nn.Module, name: str) -> list[int]:
    seen: list[int] = []
    model.get_submodule(name).register_forward_hook(lambda *_: seen.append(1))
    return seen


def test_forward_stops_after_the_last_hooked_module_with_the_same_rows() -> None:
    model = tiny_llama(layers=3)
    batches = llama_batches(rows=3, width=6, n=2)
    head = _calls(model, "lm_head")
    last_block = _calls(model, "model.layers.2")
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    got = _rows(model, modules, batches)
    assert head == [1] and last_block == [1]  # only the probe ran the whole model

    # the rows a full forward sees, padding dropped as stream_inputs does
    want: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    for m in modules:
        model.get_submodule(m).register_forward_pre_hook(
            lambda _mod, inp, m=m: want[m].append(inp[0].detach().clone()))
    for b in batches:
        with torch.no_grad():
            model(**b, use_cache=False)
    for m in modules:
        mask = torch.cat([b["attention_mask"] for b in batches]).bool()
        full = torch.cat(want[m])[mask]
        torch.testing.assert_close(got[m], full)


class _Twice(torch.nn.Module):
    """One Linear called twice per forward (shared weights, as ALBERT's layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.tail = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.lin(self.lin(x)))


def test_a_module_called_twice_is_never_cut_short() -> None:
    torch.manual_seed(0)
    model = _Twice()
    tail = _calls(model, "tail")
    batches = [{"x": torch.randn(3, 4)}, {"x": torch.randn(2, 4)}]
    got: list[torch.Tensor] = []
    stream_inputs(model, ["lin"], batches, lambda b: model(**b), lambda _n, x: got.append(x))
    assert len(tail) == 3  # the probe and both batches ran to the end
    assert [int(x.shape[0]) for x in got] == [3, 3, 2, 2]  # both calls of every batch, no probe rows


def test_probe_batch_keeps_one_short_sample() -> None:
    b = {"input_ids": torch.zeros(4, 100, dtype=torch.long),
         "attention_mask": torch.ones(4, 100, dtype=torch.long), "pixel_values": torch.zeros(4, 3, 8, 8)}
    p = probe_batch(b)
    assert p["input_ids"].shape == (1, PROBE_TOKENS) and p["attention_mask"].shape == (1, PROBE_TOKENS)
    assert p["pixel_values"].shape == (1, 3, 8, 8)


def test_rows_within_bounds_a_large_vocabulary_batch() -> None:
    model = tiny_llama(vocab=1000)
    assert rows_within(model, "causal_lm", 128, 16, budget=4 * 1000 * 128 * 3) == 3
    assert rows_within(model, "causal_lm", 128, 16, budget=1) == 1
    assert rows_within(model, "encoder", 128, 16, budget=1) == 16
