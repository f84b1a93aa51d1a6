import os

import pytest
from hypothesis import HealthCheck, settings

import modtensor as mt

# "ci" keeps the whole suite within a few minutes on two cores; "dev" digs deeper.
settings.register_profile(
    "ci", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# The library's own table, before any test or doctest registers handlers of its own.
_BUILTIN_TABLE = frozenset(func for func, _strategy in mt.ParameterBundle.HANDLERS)


@pytest.fixture
def builtin_table():
    return _BUILTIN_TABLE


@pytest.fixture(autouse=True)
def _plain_pytorch():
    """Every test starts and ends with nn.Module untouched and the default fallback."""
    mt.uninstall()
    with mt.fallback("materialize"):
        yield
    mt.uninstall()
