"""Write docs/API.md from the public docstrings: `python docs/gen_api.py`.

tests/test_docs.py renders it again and fails when the committed file is stale.
"""

from __future__ import annotations

import inspect
import pathlib
from typing import Any

import modtensor as mt

OUT = pathlib.Path(__file__).resolve().parent / "API.md"

# ParameterBundle's own API; the torch.Tensor methods it inherits are documented by torch.
BUNDLE_MEMBERS = (
    "names", "tensors", "strategy", "options", "group", "grad", "data", "requires_grad", "left_out", "items",
    "to_dict", "derive", "per_param", "weighted", "with_strategy", "materialize", "split", "describe",
    "implements", "HANDLERS",
)

# Members whose value is data, not a documented object: their entry's text.
DATA_MEMBERS = {
    "HANDLERS": (
        "The class's dispatch table, `{(torch function, strategy name): handler}`; the strategy\n"
        "`\"*\"` serves every strategy, a specific one wins. Each subclass has its own, which\n"
        "inherits its parent's entries (registered before or after it) except those it registered\n"
        "itself. Register with `implements`; read it, do not write it.\n"
    ),
}

# The public type aliases of the signatures: a Union or Callable carries no docstring of its own.
ALIASES = {
    "Handler": "What `implements` registers: `handler(func, types, args, kwargs) -> result`, or\n"
    "`NotImplemented` to send the call to the fallback.\n",
    "Selector": "What `mt.bundle(include=, exclude=)` takes: a glob pattern, a list of them, a predicate\n"
    "`(name, tensor) -> bool`, or None.\n",
    "Source": "What `mt.bundle` bundles: an `nn.Module`, a `Mapping[str, Tensor]`, an iterable of tensors\n"
    "or of `(name, tensor)` pairs, or a `ParameterBundle`.\n",
    "Weights": "What `ParameterBundle.weighted` takes: None (each tensor's numel), a mapping of names or\n"
    "glob patterns to floats, a callable `(name, tensor) -> float`, or one float per tensor.\n",
}


def _alias(name: str, obj: Any) -> str:
    spelled = repr(obj)
    for long, short in (("collections.abc.", ""), ("typing.", ""), ("torch.nn.modules.module.", "nn."),
                        ("ForwardRef('ParameterBundle')", "ParameterBundle")):
        spelled = spelled.replace(long, short)
    return f"### `mt.{name}`\n\n{ALIASES[name]}\nA type alias: `{spelled}`.\n"


def _signature(obj: Any) -> str:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    # The modules use postponed annotations: show them as written, not as quoted strings.
    params = [
        p.replace(annotation=p.annotation.strip("'") if isinstance(p.annotation, str) else p.annotation)
        for p in signature.parameters.values()
    ]
    ret = signature.return_annotation
    ret = ret.strip("'") if isinstance(ret, str) else ret
    return str(signature.replace(parameters=params, return_annotation=ret))


def _entry(title: str, obj: Any, level: str = "###") -> str:
    doc = inspect.getdoc(obj) or ""
    signature = "" if isinstance(obj, property) or inspect.isclass(obj) else _signature(obj)
    return f"{level} `{title}{signature}`\n\n{doc}\n"


def render() -> str:
    """The text of docs/API.md."""
    parts = [
        "# API reference\n",
        "Generated from the docstrings by `python docs/gen_api.py`; do not edit by hand.\n",
        "## modtensor\n",
    ]
    for name in mt.__all__:
        obj = getattr(mt, name)
        if inspect.ismodule(obj):
            continue
        if name in ALIASES:
            parts.append(_alias(name, obj))
            continue
        parts.append(_entry(f"mt.{name}", obj))
        if obj is mt.ParameterBundle:
            for member in BUNDLE_MEMBERS:
                title = f"ParameterBundle.{member}"
                if member in DATA_MEMBERS:
                    parts.append(f"#### `{title}`\n\n{DATA_MEMBERS[member]}")
                    continue
                static = inspect.getattr_static(obj, member)
                # a classmethod as it is called: bound, without `cls`
                parts.append(_entry(title, getattr(obj, member) if isinstance(static, classmethod) else static, "####"))
    parts.append("## modtensor.recipes\n")
    for name in mt.recipes.__all__:
        parts.append(_entry(f"mt.recipes.{name}", getattr(mt.recipes, name)))
    return "\n".join(parts)


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
