import os

import pytest
from hypothesis import HealthCheck, settings

import modtensor as mt
from modtensor import _dispatch, _kernels, _pairwise, _selection, _strategies

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


_REAL_SIZES = {"TINY_NUMEL": _dispatch.TINY_NUMEL, "PACK_NUMEL": _strategies.PACK_NUMEL}


@pytest.fixture
def real_sizes(monkeypatch):
    """The library's own sizes for tiny bundles and packed segments (see below)."""
    monkeypatch.setattr(_dispatch, "TINY_NUMEL", _REAL_SIZES["TINY_NUMEL"])
    monkeypatch.setattr(_strategies, "PACK_NUMEL", _REAL_SIZES["PACK_NUMEL"])


@pytest.fixture(autouse=True)
def _per_tensor_paths(monkeypatch):
    """Hypothesis' bundles are tiny, so they would all be reduced on their concatenation (see
    `TINY_NUMEL`) or in packed segments, and the per-tensor partials and combines would go
    untested. So by default both are off; tests/test_packing.py runs the table with them on."""
    monkeypatch.setattr(_dispatch, "TINY_NUMEL", 0)
    monkeypatch.setattr(_strategies, "PACK_NUMEL", 0)


@pytest.fixture(autouse=True)
def _plain_pytorch():
    """Every test starts and ends with nn.Module untouched and the default fallback."""
    mt.uninstall()
    with mt.fallback("materialize"):
        yield
    mt.uninstall()


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunked reading shrunk, so that Hypothesis' small tensors are read a chunk at a time
    (where no gradient is recorded), also by torch.dist of two bundles that exist."""
    monkeypatch.setattr(_selection, "_CHUNK", 5)
    monkeypatch.setattr(_pairwise, "DIST_CHUNK_NUMEL", 6)


@pytest.fixture
def small_kernels(monkeypatch):
    """The kernels' sizes shrunk, so that Hypothesis' small tensors take every path of
    modtensor/_kernels.py (rows, tail rows, several blocks, the moments' three paths)."""
    monkeypatch.setattr(_kernels, "MIN_NUMEL", 1)
    monkeypatch.setattr(_kernels, "NORM_ROWS_NUMEL", 1)
    monkeypatch.setattr(_kernels, "DIFF_ROWS_NUMEL", 1)
    monkeypatch.setattr(_kernels, "NARROW_MIN_NUMEL", 1)
    monkeypatch.setattr(_kernels, "DIST_MAX_NUMEL", 0)
    monkeypatch.setattr(_kernels, "POWERS_MIN_NUMEL", 1)
    monkeypatch.setattr(_kernels, "ROW", 3)
    monkeypatch.setattr(_kernels, "BLOCK", 6)  # a multiple of ROW, as the real sizes
    monkeypatch.setattr(_kernels, "DIST_PACK_NUMEL", 4)  # distances: packs of pairs up to 4 elements, blocks past
    # moments: none below 2 elements, in float64 for 2-4, from 5 by rows of 3 in blocks of 6
    monkeypatch.setattr(_kernels, "MOMENTS_MIN_NUMEL", 2)
    monkeypatch.setattr(_kernels, "MOMENTS_ROWS_NUMEL", 5)
    monkeypatch.setattr(_kernels, "MOMENTS_BLOCK", 6)
    monkeypatch.setattr(_kernels, "MOMENTS_WIDE_ROWS", 2)  # rows widened to float64 two at a time
