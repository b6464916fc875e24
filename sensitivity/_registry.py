"""The estimator registry: name → class, loaded on first use (so ``import sensitivity`` imports
no estimator module and no torch). A module of its own, re-exported by :mod:`sensitivity`, so the
driver, the spec and the sharded and sequential runners look estimators up without importing
their own package.
"""

from __future__ import annotations

import importlib
from typing import Any

from allocator.core.errors import UnknownNameError
from sensitivity._base import BaseEstimator

__all__ = ["ESTIMATORS", "estimator_class", "get_estimator"]

#: name → "module:Class" (documented in each class's docstring with its paper).
ESTIMATORS: dict[str, str] = {
    "hessian-trace": "sensitivity._hessian_trace:HessianTraceEstimator",
    "hessian-eig": "sensitivity._hessian_eig:HessianEigEstimator",
    "fisher": "sensitivity._fisher:FisherEstimator",
    "gauss-newton": "sensitivity._gauss_newton:GaussNewtonEstimator",
    "salience": "sensitivity._salience:SalienceEstimator",
    "hessian-proxy": "sensitivity._salience:HessianProxyEstimator",
    "relevance": "sensitivity._relevance:RelevanceEstimator",
    "measured": "sensitivity._measured:MeasuredEstimator",
    "datafree": "sensitivity._datafree:DataFreeEstimator",
    "lim": "sensitivity._datafree:LimEstimator",
    "zd": "sensitivity._datafree:ZdEstimator",
}


def estimator_class(name: str) -> type[BaseEstimator]:
    if name not in ESTIMATORS:
        raise UnknownNameError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    module, cls = ESTIMATORS[name].split(":")
    found: type[BaseEstimator] = getattr(importlib.import_module(module), cls)
    return found


def get_estimator(name: str | BaseEstimator, **params: Any) -> BaseEstimator:
    """An estimator instance from a name (constructor ``params`` passed on) or an instance."""
    if isinstance(name, BaseEstimator):
        return name
    return estimator_class(name)(**params)
