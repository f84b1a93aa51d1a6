"""Static checks of the public API's types, run by mypy (see pyproject.toml), not by pytest.

A subclass of ParameterBundle gets its own class back from what derives a bundle, as it
does at run time (tests/test_downstream.py).
"""

from collections.abc import Callable
from typing import Any

import torch
from typing_extensions import assert_type

import modtensor as mt


class Mine(mt.ParameterBundle):
    pass


def derived_bundles_keep_the_subclass(b: Mine, plain: mt.ParameterBundle) -> None:
    assert_type(b.derive([torch.zeros(2)]), Mine)
    assert_type(b.grad, Mine | None)
    assert_type(b.data, Mine)
    assert_type(b.per_param(), Mine)
    assert_type(b.weighted(), Mine)
    assert_type(b.with_strategy("concat"), Mine)
    assert_type(b.split(torch.zeros(2)), Mine)
    assert_type(plain.derive([torch.zeros(2)]), mt.ParameterBundle)
    assert_type(mt.bundle(torch.nn.Linear(2, 2)), mt.ParameterBundle)


def tensor_methods_return_bundles_of_the_class(b: Mine, plain: mt.ParameterBundle, t: torch.Tensor) -> None:
    # Elementwise ops, conversions and operators give a bundle of the receiver's class; in-place
    # ops the bundle itself. What is not a bundle keeps torch's types.
    assert_type(b.clone(), Mine)
    assert_type(b.detach(), Mine)
    assert_type(b.float(), Mine)
    assert_type(b.to(torch.float64), Mine)
    assert_type(b.type(torch.float64), Mine)
    assert_type(b.abs(), Mine)
    assert_type(b.add(t), Mine)
    assert_type(b.add_(1), Mine)
    assert_type(b.requires_grad_(), Mine)
    assert_type(b - b, Mine)
    assert_type(b * 2, Mine)
    assert_type(2 * b, Mine)
    assert_type(1 - b, Mine)
    assert_type(b**2, Mine)
    assert_type(-b, Mine)
    assert_type(abs(b), Mine)
    assert_type(b > 0, Mine)
    assert_type(b == b, Mine)
    assert_type(b.real, Mine)
    assert_type(b.clone().names, tuple[str, ...])
    assert_type(b.float().per_param(), Mine)
    assert_type(b.detach().to_dict(), dict[str, torch.Tensor])
    assert_type(plain.clone(), mt.ParameterBundle)
    assert_type(plain - plain, mt.ParameterBundle)
    assert_type(plain * 2, mt.ParameterBundle)
    assert_type(-plain, mt.ParameterBundle)
    assert_type(plain.float(), mt.ParameterBundle)
    assert_type(plain.abs(), mt.ParameterBundle)
    assert_type(plain.add_(1), mt.ParameterBundle)
    assert_type(plain.detach(), mt.ParameterBundle)
    assert_type(b.type(), str)
    assert_type(b == None, bool)  # noqa: E711 - as for a tensor
    assert_type(b.frexp(), torch.return_types.frexp)
    c = b
    c += 1
    c *= t
    assert_type(c, Mine)


def the_signatures_type_aliases_are_public(source: mt.Source, include: mt.Selector, weights: mt.Weights, handler: mt.Handler) -> None:
    mt.bundle(source, include=include).weighted(weights)
    mt.implements(torch.cumsum)(handler)


def mine_fused(b: Mine, args: mt.ReduceArgs) -> torch.Tensor:
    return b.derive(b.tensors).materialize().sum()


def mine_parse(b: Mine, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> mt.ReduceArgs:
    return mt.ReduceArgs("mine", b.dtype, b.numel())


def a_subclass_reduction_takes_the_subclass() -> None:
    # A reduction registered for a subclass gets that subclass's bundles, and may say so.
    mt.register_reduction(
        torch.cumsum, partial=lambda t, offset, a: t.sum(), combine=lambda s, a: torch.stack(s).sum(),
        parse=mine_parse, fused=mine_fused, bundle_type=Mine,
    )
    mt.Reduction(parse=mine_parse, partial=lambda t, offset, a: t.sum(), combine=lambda s, a: s[0], fused=mine_fused)
