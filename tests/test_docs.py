"""Every public name has a docstring with an example (run by pytest's doctest collection)."""

import inspect

import pytest

import modtensor as mt


def _gen_api():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "docs" / "gen_api.py"
    spec = importlib.util.spec_from_file_location("gen_api", path)
    gen_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_api)
    return gen_api


@pytest.mark.parametrize("name", mt.__all__)
def test_public_names_have_a_docstring_with_an_example(name):
    obj = getattr(mt, name)
    if name in _gen_api().ALIASES:  # a type alias carries no docstring: docs/gen_api.py describes it
        return
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), f"mt.{name} has no docstring"
    assert ">>>" in doc, f"mt.{name}'s docstring has no runnable example"


def _bundle_members():
    """ParameterBundle's own public methods and properties: those torch.Tensor lacks, and the
    Tensor attributes whose meaning the bundle changes (documented where defined)."""
    import torch

    redefined = {"grad", "data", "requires_grad", "split"}
    for name in sorted(dir(mt.ParameterBundle)):
        if name.startswith("_") or (hasattr(torch.Tensor, name) and name not in redefined):
            continue
        owner = next(c for c in mt.ParameterBundle.__mro__ if name in vars(c))
        member = vars(owner)[name]
        if owner.__module__.startswith("modtensor") and (callable(member) or isinstance(member, (property, classmethod))):
            yield name


@pytest.mark.parametrize("member", list(_bundle_members()))
def test_bundle_methods_have_examples(member):
    assert ">>>" in (inspect.getdoc(getattr(mt.ParameterBundle, member)) or ""), f"ParameterBundle.{member}"


@pytest.mark.parametrize("name", mt.recipes.__all__)
def test_recipes_have_a_docstring_with_an_example(name):
    # mt.recipes.DistanceReport, what distance() returns, had a summary line only.
    assert ">>>" in (inspect.getdoc(getattr(mt.recipes, name)) or ""), f"mt.recipes.{name}"


def test_every_public_name_is_exported_and_in_the_reference():
    # mt.Handler, mt.Weights, mt.Selector and mt.Source are in the public signatures (and
    # typed as re-exports), but were missing from __all__, so from docs/API.md too.
    public = {name for name in vars(mt) if not name.startswith("_") and not inspect.ismodule(getattr(mt, name))}
    assert public <= set(mt.__all__)
    reference = _gen_api().render()
    for name in mt.__all__:
        assert f"### `mt.{name}" in reference or inspect.ismodule(getattr(mt, name)), name


def test_api_reference_is_in_sync():
    # docs/API.md is generated from the docstrings; regenerate it with `python docs/gen_api.py`.
    gen_api = _gen_api()
    assert gen_api.OUT.read_text() == gen_api.render(), "docs/API.md is stale: run `python docs/gen_api.py`"


def _readme_block(heading: str) -> str:
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


def test_readme_quickstart_runs_top_to_bottom():
    # A reader runs the quickstart as written, given the names it takes as known (data and
    # models of the same structure). It once wrote into the parameters between the loss's
    # forward and its backward(), which then raised torch's "modified by an inplace operation".
    import copy

    torch = pytest.importorskip("torch")
    code = _readme_block("## Quickstart")
    first, rest = code.split("\nb = mt.bundle(model)", 1)
    namespace: dict = {}
    exec(first, namespace)
    model = namespace["model"]
    torch.manual_seed(0)
    namespace.update(
        x=torch.randn(2, 3, 8, 8), y=torch.randn(2, 8, 6, 6), reference=copy.deepcopy(model),
        ema=copy.deepcopy(model), base=copy.deepcopy(model), finetuned=[copy.deepcopy(model) for _ in range(2)],
    )
    try:
        exec("b = mt.bundle(model)" + rest, namespace)
    finally:
        mt.uninstall()
    assert namespace["b"].names == ("0.weight", "0.bias", "2.weight", "2.bias")  # as its comment says
    assert mt.is_bundle(namespace["merged"])


def test_docstring_examples_are_run_by_pytest():
    # The `>>>` examples checked above are executed by pytest's doctest collection of the
    # package: `python -m pytest` (as the README runs it) must collect modtensor/ with doctests.
    import pathlib

    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    config = tomllib.loads((pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    options = config["tool"]["pytest"]["ini_options"]
    assert "modtensor" in options["testpaths"] and "--doctest-modules" in options["addopts"].split()


def _readme() -> str:
    import pathlib

    return (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_register_reduction_signature_is_the_real_one():
    # The README spelled the first parameter `func` (it is `funcs`) and the options after
    # `finalize` as positional (they are keyword-only).
    import re

    line = re.search(r"`mt\.register_reduction\((.*?)\)`", _readme())[1]
    documented = [p.strip().split("=")[0] for p in line.split(",")]
    signature = inspect.signature(mt.register_reduction)
    real = []
    for p in signature.parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and "*" not in real:
            real.append("*")
        real.append(p.name)
    assert documented == real


def test_readme_layout_names_every_module():
    import pathlib

    layout = _readme().split("## Layout", 1)[1]
    package = pathlib.Path(mt.__file__).parent
    modules = [p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert [m for m in modules if f"`{m}`" not in layout and f"/{m}`" not in layout] == []


def _semantics_row_names(start: str) -> set[str]:
    """The op names in the examples column of the README's Semantics table row `start`."""
    import re

    line = next(line for line in _readme().splitlines() if line.startswith(f"| {start}"))
    cell = re.sub(r"\([^)]*\)", "", line.split("|")[2]).replace("`", "")
    names = {part.strip().split(".")[-1] for part in re.split(r"[,/]", cell) if part.strip()}
    return {"matmul" if n == "@" else n for n in names}


def test_readme_op_lists_are_the_dispatch_table():
    from modtensor._like import LIKE_FUNCTIONS
    from modtensor._order import ORDER_FUNCTIONS
    from modtensor._pairwise import PAIRWISE_FUNCTIONS
    from modtensor._reductions import REDUCTION_FUNCTIONS

    import torch

    from modtensor._inplace import INPLACE_FUNCTIONS

    assert _semantics_row_names("reductions") == set(REDUCTION_FUNCTIONS) | {"vector_norm"}
    assert {torch.linalg.vector_norm, torch.linalg.norm} <= set(REDUCTION_FUNCTIONS["norm"])
    in_place = {n for n in _semantics_row_names("in place") if n.endswith("_") and " " not in n}
    assert len(in_place) > 10 and in_place <= set(INPLACE_FUNCTIONS)
    assert _semantics_row_names("bundle with bundle") == set(PAIRWISE_FUNCTIONS)
    assert _semantics_row_names("order statistics") == {f.__name__ for f in ORDER_FUNCTIONS}
    assert _semantics_row_names("new bundles like it") == {f.__name__ for f in LIKE_FUNCTIONS}
