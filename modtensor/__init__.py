"""modtensor: treat a model's parameters as one tensor, without copying them."""

from modtensor import _autograd, _indexing, _inplace, _like, _order, _pairwise, _pointwise, _reductions  # noqa: F401  (fill the table)
from modtensor import recipes
from modtensor._bundle import ParameterBundle, bundle, is_bundle
from modtensor._bundle import Selector as Selector, Source as Source  # type aliases of the signatures
from modtensor._dispatch import Handler as Handler, fallback
from modtensor._strategies import Weights as Weights
from modtensor._errors import MaterializationWarning, UnsupportedOperationError
from modtensor._extend import (
    Reduction,
    ReduceArgs,
    ReductionCall,
    Strategy,
    implements,
    register_reduction,
    register_strategy,
    strategies,
)
from modtensor._install import install, installed, uninstall

__version__ = "0.1.0"

__all__ = [
    "Handler",
    "MaterializationWarning",
    "ParameterBundle",
    "Reduction",
    "ReduceArgs",
    "ReductionCall",
    "Selector",
    "Source",
    "Strategy",
    "UnsupportedOperationError",
    "Weights",
    "bundle",
    "fallback",
    "implements",
    "install",
    "installed",
    "is_bundle",
    "recipes",
    "register_reduction",
    "register_strategy",
    "strategies",
    "uninstall",
]
