"""Run the shipped conformance suite over every registered solver (skipping missing backends)."""

from __future__ import annotations

from typing import Any

import pytest

import solvers
from allocator.core.errors import UnknownNameError
from allocator.testing.solver_conformance import InputValidationConformance, SolverConformance

#: Search solvers evaluate in a loop; fewer trials keep the suite fast (the contract is the same).
_FAST: dict[str, dict[str, Any]] = {"bayesian": {"n_trials": 6, "n_warm": 1}}


def _param(name: str) -> Any:
    cls = solvers.solver_class(name)
    needs = ", ".join(cls.REQUIRED_MODULES)
    mark = pytest.mark.skipif(not cls.is_available(), reason=f"{name} needs {needs}")
    return pytest.param(name, marks=mark, id=name)


class TestAllSolvers(SolverConformance):
    @pytest.fixture(params=[_param(n) for n in solvers.SOLVERS], scope="class")
    def solver(self, request: pytest.FixtureRequest) -> solvers.BaseSolver:
        return solvers.solver_class(request.param)(**_FAST.get(request.param, {}))


class TestInputValidation(InputValidationConformance):
    pass


def test_every_registered_solver_is_covered() -> None:
    # the suite parametrises over SOLVERS itself; this guards the registry's shape
    assert list(solvers.SOLVERS)[0] == "mckp"
    for name in solvers.SOLVERS:
        assert solvers.solver_class(name).name == name


def test_unknown_solver_names_the_choices() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown solver 'nope'.*'mckp'"):
        solvers.get_solver("nope")
