"""Bayesian search: budget is hard, warm start is never beaten by a worse answer, resumes, prunes."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping

import numpy as np
import pytest

import solvers
from allocator import Budget, CostTable, InvalidParameterError, SolveStatus, check_plan
from solvers._bayesian import BayesianSolver
from solvers._search_space import lower_hull


class Interacting:
    """Additive table cost plus a penalty when neighbouring units both go below ``low_bits``.

    The additive optimum ignores the penalty, so a search that evaluates the real objective
    can beat it — the situation the Bayesian solver exists for.
    """

    def __init__(self, table: CostTable, penalty: float, low_bits: int = 4) -> None:
        df = table.df.set_index(["unit", "option"])
        self.cost = df["cost"].to_dict()
        self.bits = df["bits"].to_dict()
        self.units = table.units
        self.penalty = penalty
        self.low_bits = low_bits
        self.calls = 0

    def __call__(self, choice: Mapping[str, str]) -> float:
        self.calls += 1
        base = sum(self.cost[(u, o)] for u, o in choice.items())
        low = [self.bits[(u, choice[u])] < self.low_bits for u in self.units]
        return base + self.penalty * sum(a and b for a, b in zip(low, low[1:], strict=False))


class Stepping(Interacting):
    """The same objective revealed over 4 'batches' (running mean), for pruning."""

    def evaluate_steps(self, choice: Mapping[str, str]) -> Iterator[float]:
        final = self(choice)
        for k in range(1, 5):
            yield final * (1 + 0.5 / k)
        yield final


def test_lower_hull_drops_dominated_and_concave_points() -> None:
    size = np.array([1.0, 2.0, 3.0, 4.0, np.inf])
    cost = np.array([10.0, 9.5, 3.0, 4.0, 0.0])
    assert lower_hull(size, cost).tolist() == [0, 2]


def test_table_objective_never_worse_than_warm_start(table: CostTable) -> None:
    budget = Budget(bpw=3.5)
    exact = solvers.solve(table, budget, solver="mckp")
    r = BayesianSolver(n_trials=15).solve(table, budget, seed=0)
    assert r.status is SolveStatus.FEASIBLE and r.plan is not None
    assert check_plan(r.plan, table, budget) == []
    assert r.objective == pytest.approx(exact.objective)  # the warm start is the optimum
    assert r.stats["trials"] == 15


def _true_optimum(table: CostTable, budget: Budget, penalty: float, low_bits: int) -> float:
    """Exhaustive optimum of :class:`Interacting` over int2..int6 (5^8 plans, vectorised)."""
    df = table.df.set_index(["unit", "option"])
    bits = np.arange(2, 7)
    cost = np.array([[df.loc[(u, f"int{b}-g128-asym"), "cost"] for b in bits] for u in table.units])
    size = np.array([[df.loc[(u, f"int{b}-g128-asym"), "size_bits"] for b in bits] for u in table.units])
    combos = np.array(list(itertools.product(range(len(bits)), repeat=len(table.units))))
    idx = np.arange(len(table.units))
    fits = combos[size[idx, combos].sum(1) <= budget.size_cap_bits(table.total_params)]
    low = bits[fits] < low_bits
    return float((cost[idx, fits].sum(1) + penalty * (low[:, 1:] & low[:, :-1]).sum(1)).min())


def test_real_objective_beats_the_additive_optimum(table: CostTable) -> None:
    budget = Budget(bpw=4.0)
    ev = Interacting(table, penalty=0.02, low_bits=5)
    exact = solvers.solve(table, budget, solver="mckp")
    assert exact.plan is not None
    warm_value = ev(exact.plan.choice)
    best = _true_optimum(table, budget, 0.02, 5)
    assert best < 0.8 * warm_value  # the instance really rewards search (guards the test itself)
    found = []
    for seed in range(3):
        r = BayesianSolver(evaluator=ev, n_trials=60, radius=2, prune=False).solve(table, budget, seed=seed)
        assert r.plan is not None and check_plan(r.plan, table, budget) == []
        assert r.stats["measured_error"] == pytest.approx(ev(r.plan.choice))
        assert best - 1e-12 <= r.stats["measured_error"] <= warm_value
        found.append(r.stats["measured_error"])
    assert sum(f < 0.9 * warm_value for f in found) >= 2, (found, warm_value, best)


def test_fill_spends_the_slack_and_repair_restores_the_budget(table: CostTable) -> None:
    from solvers._problem import build_problem
    from solvers._search_space import build_search_space, fill, repair

    problem = build_problem(table, Budget(bpw=4.0))
    warm = np.zeros(problem.n_items, dtype=np.int64)  # every unit at its smallest option
    space = build_search_space(problem, warm, radius=10)
    idx = np.arange(problem.n_items)
    filled = fill(problem, space, warm)
    assert problem.size[idx, filled].sum() <= problem.cap * (1 + 1e-12)
    assert problem.cost[idx, filled].sum() < problem.cost[idx, warm].sum()
    # no single further step up fits: the slack is spent
    slack = problem.cap - problem.size[idx, filled].sum()
    for i, cand in enumerate(space.candidates):
        up = cand[problem.size[i, cand] > problem.size[i, filled[i]]]
        assert up.size == 0 or problem.size[i, up[0]] - problem.size[i, filled[i]] > slack
    top = np.array([c[-1] for c in space.candidates])
    repaired = repair(problem, space, top)
    assert problem.size[idx, repaired].sum() <= problem.cap * (1 + 1e-12)


def test_same_seed_same_plan(table: CostTable) -> None:
    budget = Budget(bpw=3.0)
    a = BayesianSolver(evaluator=Interacting(table, 1e-3), n_trials=20).solve(table, budget, seed=3)
    b = BayesianSolver(evaluator=Interacting(table, 1e-3), n_trials=20).solve(table, budget, seed=3)
    assert a.plan is not None and b.plan is not None and a.plan.choice == b.plan.choice


def test_pruning_stops_bad_trials_early(table: CostTable) -> None:
    import optuna

    storage = optuna.storages.InMemoryStorage()
    ev = Stepping(table, penalty=1e-2)
    BayesianSolver(evaluator=ev, n_trials=40, radius=2, storage=storage, study_name="p").solve(
        table, Budget(bpw=3.5), seed=0)
    states = [t.state for t in optuna.load_study(study_name="p", storage=storage).trials]
    assert optuna.trial.TrialState.PRUNED in states


def test_resume_continues_the_same_study(tmp_path, table: CostTable) -> None:  # type: ignore[no-untyped-def]
    import optuna

    url = f"sqlite:///{tmp_path / 's.db'}"
    BayesianSolver(n_trials=8, storage=url, study_name="r").solve(table, Budget(bpw=3.0), seed=0)
    BayesianSolver(n_trials=14, storage=url, study_name="r").solve(table, Budget(bpw=3.0), seed=0)
    trials = optuna.load_study(study_name="r", storage=url).trials
    assert len(trials) == 14
    assert sorted(t.number for t in trials) == list(range(14))


def test_study_for_another_space_is_refused(tmp_path, table: CostTable) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 's.db'}"
    BayesianSolver(n_trials=3, storage=url, study_name="x").solve(table, Budget(bpw=3.0), seed=0)
    # A clashing study is a user error; it must not silently mix two searches.
    with pytest.raises(InvalidParameterError, match="different search space"):
        BayesianSolver(n_trials=3, storage=url, study_name="x", radius=3).solve(table, Budget(bpw=3.0))


def test_infeasible_budget_is_a_status(table: CostTable) -> None:
    r = BayesianSolver(n_trials=3).solve(table, Budget(bpw=1.0))
    assert r.status is SolveStatus.INFEASIBLE and r.min_feasible is not None


@pytest.mark.parametrize("kw", [{"n_trials": 0}, {"radius": -1}, {"local_every": -1}])
def test_bad_parameters(kw: dict[str, int]) -> None:
    with pytest.raises(InvalidParameterError):
        BayesianSolver(**kw)


def test_block_granularity_moves_whole_blocks(table: CostTable) -> None:
    from solvers._bayesian import search_space
    from solvers._problem import build_problem

    budget = Budget(bpw=3.5)
    problem = build_problem(table, budget)
    exact = solvers.solve(table, budget, solver="mckp")
    assert exact.plan is not None
    space = search_space(problem, exact.plan.choice, radius=1, granularity="block")
    assert space.names == ["block.0", "block.1", "block.2", "block.3"]  # 8 units in 4 layers
    assert space.decode([0, 0, 0, 0]).tolist() == space.space.warm.tolist()
    up = space.decode([1, 0, 0, 0])
    moved = np.flatnonzero(up != space.space.warm)
    assert set(moved.tolist()) <= {0, 1} and moved.size >= 1  # only layer 0's two units move
    r = BayesianSolver(n_trials=12, granularity="block").solve(table, budget, seed=0)
    assert r.plan is not None and check_plan(r.plan, table, budget) == []
    assert r.objective == pytest.approx(exact.objective)  # table cost: nothing beats the optimum


def test_unknown_granularity_is_refused() -> None:
    with pytest.raises(InvalidParameterError, match="granularity 'layer' is unknown"):
        BayesianSolver(granularity="layer")


def test_warm_neighbours_are_distinct_plans_after_the_budget_repair(table: CostTable) -> None:
    from solvers._bayesian import search_space
    from solvers._problem import build_problem

    budget = Budget(bpw=3.5)
    problem = build_problem(table, budget)
    exact = solvers.solve(table, budget, solver="mckp")
    assert exact.plan is not None
    space = search_space(problem, exact.plan.choice, radius=2)
    queued = list(space.neighbours(problem, 6))
    plans = {space._budgeted(problem, p).tobytes() for p in queued}
    assert len(queued) >= 2 and len(plans) == len(queued)


def test_pareto_front_without_a_model_uses_the_table_cost(tmp_path, table: CostTable) -> None:  # type: ignore[no-untyped-def]
    from allocator.jobs.search import SearchSpec, run_pareto

    path = tmp_path / "t.parquet"
    table.save(path)
    front = run_pareto(SearchSpec(table_path=str(path), budget={"bpw": 4.0}, n_trials=20, seed=0,
                                  radius=2), population_size=6)
    assert len(front) >= 2
    for p in front:
        assert check_plan(p.plan, table, Budget(bpw=4.0)) == []
        assert p.error == pytest.approx(p.plan.summary.predicted_cost)
    assert all(b.error < a.error for a, b in zip(front, front[1:], strict=False))
