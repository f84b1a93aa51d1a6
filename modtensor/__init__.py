"""modtensor: treat a model's parameters as one tensor, without copying them."""

from modtensor import _indexing, _pairwise, _pointwise, _reductions  # noqa: F401  (fill the table)
from modtensor._bundle import ParameterBundle, bundle
from modtensor._dispatch import fallback
from modtensor._errors import MaterializationWarning, UnsupportedOperationError
from modtensor._install import install, installed, uninstall

implements = ParameterBundle.implements

__version__ = "0.1.0.dev0"

__all__ = [
    "MaterializationWarning",
    "ParameterBundle",
    "UnsupportedOperationError",
    "bundle",
    "fallback",
    "implements",
    "install",
    "installed",
    "uninstall",
]
