"""The library's warning and error types."""

from __future__ import annotations

__all__ = ["MaterializationWarning", "UnsupportedOperationError"]


class MaterializationWarning(UserWarning):
    """Warned when an operation falls back to building the explicit concatenation.

    The result is still exactly right; the warning says that a full copy of the
    bundle was made to get it.

    Example:
        >>> import warnings, torch, modtensor as mt
        >>> b = mt.bundle([torch.ones(2), torch.zeros(3)])
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = torch.cumsum(b, 0)
        >>> caught[0].category is mt.MaterializationWarning
        True
    """

    __module__ = "modtensor"


class UnsupportedOperationError(RuntimeError):
    """Raised when a function cannot run on a bundle without silently going wrong.

    That is any function outside the dispatch table while `mt.fallback("error")`
    is in force, and always for in-place operations the table does not cover
    (they would write into a temporary copy instead of the parameters).

    It is a RuntimeError, not a TypeError: torch turns a TypeError raised in `b += 1` into
    NotImplemented, and Python would then silently rebind `b` to `b + 1` instead.

    Example:
        >>> import torch, modtensor as mt
        >>> b = mt.bundle([torch.ones(2)])
        >>> with mt.fallback("error"):
        ...     torch.cumsum(b, 0)
        Traceback (most recent call last):
        ...
        modtensor.UnsupportedOperationError: torch.cumsum is not in the dispatch table ...
    """

    __module__ = "modtensor"
