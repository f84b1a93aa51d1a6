"""The command line: statistics of a checkpoint, and the distance between two.

`python -m modtensor stats [PATH]` and `python -m modtensor diff A B` (also the `modtensor`
script). Every figure is computed on bundles of the checkpoint's tensors, tensor by tensor, so
a checkpoint is never concatenated; `torch.load(mmap=True)` keeps large files on disk.

A checkpoint is a state_dict (names to tensors) saved with `torch.save`, or a dict holding one
under "state_dict", "model_state_dict" or "model" (a training checkpoint), or a `.safetensors`
file (with the optional safetensors package). It is read with `torch.load(weights_only=True)`,
which runs no code from the file, so a whole pickled `nn.Module` is refused with a hint to save
its state_dict: rebuilding a module means importing and running its pickled classes.

What the figures cover:

- Per-tensor rows: every selected tensor. Integer, bool and float8 tensors are converted for
  their statistics (to float32 up to 16 bits, where that is exact, float64 beyond); complex,
  quantized, sparse and meta tensors get blank statistics (nested ones are refused). A figure
  an empty tensor does not have (its mean, min, cosine...) is blank; its norm, L2 distance and
  NaN/inf counts are 0. The figures of float16/bfloat16 tensors are computed in float32, one
  tensor converted at a time, in the global row too: in float16 the L2 norm of 100 entries of
  1e4 is inf, a cosine of a tensor with itself 0.999, and bfloat16 keeps 3 significant digits.
- The global row: the selected float16/bfloat16/float32/float64 tensors (the weights). Integer
  and bool buffers such as BatchNorm's step counter would swamp the weights' figures, so they
  are left out of it (and named); only where no such tensor is selected does it cover the
  others, converted.
- `std` is the population standard deviation (`correction=0`): a tensor's values are all there
  is, and a one-element tensor then has std 0 rather than NaN.
- `--strategy` says how the global row combines the tensors: `concat` (the default) takes the
  statistics of all elements as one tensor; `weighted` the numel-weighted average of the
  per-tensor statistics (the mean and zero fraction are concat's; std, min, max and norm then
  describe a typical tensor); `per_param` gives per-tensor rows only. Counts are totals always.

Formats: `table` (4 significant digits, blanks as "-"); `json`, one object with "global" and
"tensors" (strict JSON: NaN and infinities as the strings "nan", "inf", "-inf"); `csv`, a header,
a row per tensor and a "(global)" row.

Exit status: 0 when the command ran (also when `diff` finds differences: its output says what
they are), 2 on a usage error or a file that cannot be read.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import json
import math
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

import modtensor as mt
from modtensor._bundle import _as_predicate
from modtensor._reduce_common import _LOW_PRECISION
from modtensor.recipes import _changed

__all__ = ["main"]

# Above these the work takes long enough for a progress bar (on a terminal only).
PROGRESS_MIN_BYTES = 128 * 2**20
PROGRESS_MIN_TENSORS = 1000
# Per-tensor rows are computed this many bytes of tensors at a time: the progress bar's step,
# and the most memory integer tensors converted for their statistics take at once (times 4).
CHUNK_BYTES = 64 * 2**20

_NATIVE = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_STRATEGIES = ("concat", "weighted", "per_param")
_STATS_COLUMNS = ("name", "dtype", "shape", "numel", "mean", "std", "min", "max", "l2", "zero_fraction", "nan", "inf")
_DIFF_COLUMNS = (
    "name", "status", "dtype_a", "dtype_b", "shape_a", "shape_b", "numel", "l2", "max_abs", "cosine",
    "changed_fraction",
)
_GLOBAL = "(global)"

Row = dict[str, Any]
StateDict = dict[str, torch.Tensor]


class CliError(Exception):
    """A problem the user can fix (a bad file, a selection that matches nothing): one line, exit 2."""


# -- loading ---------------------------------------------------------------------------------


class _Bar(Protocol):
    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


class _NoBar:
    def update(self, n: int = 1) -> object:
        return None

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _bar(desc: str, total: int, large: bool, unit: str = "B") -> Iterator[_Bar]:
    """A tqdm bar on stderr for large work when stderr is a terminal and tqdm is installed."""
    bar: _Bar = _NoBar()
    if large and sys.stderr.isatty():
        with contextlib.suppress(ImportError):
            tqdm = importlib.import_module("tqdm").tqdm
            bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_large(tensors: Sequence[torch.Tensor]) -> bool:
    return len(tensors) >= PROGRESS_MIN_TENSORS or sum(_nbytes(t) for t in tensors) >= PROGRESS_MIN_BYTES


def _first_line(error: BaseException, text: str | None = None) -> str:
    lines = [line.strip() for line in (str(error) if text is None else text).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    # A safetensors file starts with its JSON header's length (8 bytes) and then "{".
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path)


def _looks_like_torch_save(path: Path) -> bool:
    # torch.save writes a zip archive, or (the legacy format) a pickle, which opens with PROTO.
    with path.open("rb") as f:
        head = f.read(4)
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


def _load_torch(path: Path) -> Any:
    try:
        # mmap leaves the tensors on disk until read; the legacy (non-zip) format cannot do it.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # whatever torch.load raises on untrusted bytes means a bad file
        message = str(e)
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
        if refused:
            raise CliError(
                f"{path}: cannot be loaded safely: it pickles {_a(refused.group(1))} object, and "
                "torch.load(weights_only=True) loads only tensors and plain containers; for a "
                "whole model, save model.state_dict() instead"
            ) from None
        # torch's weights-only errors open with a paragraph on trust; the cause comes after.
        detail = _first_line(e, message.split("WeightsUnpickler error:", 1)[-1])
        if isinstance(e, EOFError):
            detail = "the file is empty or truncated"
        elif not _looks_like_torch_save(path):  # whatever the unpickler made of it ("101") means nothing
            detail = "not a torch.save or safetensors file"
        elif not isinstance(e, (RuntimeError, pickle.UnpicklingError)):  # not torch's own words
            detail = f"the file is corrupt or truncated: {type(e).__name__} while unpickling"
        raise CliError(f"{path}: not a readable PyTorch or safetensors checkpoint ({detail})") from None


def _load_safetensors(path: Path) -> StateDict:
    try:
        # Imported by name: an optional dependency, typed or not wherever mypy runs.
        safetensors = importlib.import_module("safetensors")
    except ImportError:
        raise CliError(
            f"{path}: reading .safetensors files needs the safetensors package: pip install safetensors"
        ) from None
    tensors: StateDict = {}
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys())
            large = len(names) >= PROGRESS_MIN_TENSORS or path.stat().st_size >= PROGRESS_MIN_BYTES
            with _bar(f"reading {path.name}", path.stat().st_size, large) as bar:
                for name in names:
                    tensors[name] = f.get_tensor(name)
                    bar.update(_nbytes(tensors[name]))
    except Exception as e:  # the same: a bad file, whatever safetensors raises for it
        raise CliError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    return tensors


def _a(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _as_state_dict(obj: Any, path: Path) -> StateDict:
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:  # a training checkpoint: {"model": state_dict, "epoch": ...}
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CliError(f"{path}: holds {_a(type(obj).__name__)}, not a state_dict (a mapping of names to tensors)")
    if not obj:
        raise CliError(f"{path}: holds an empty state_dict")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CliError(
                f"{path}: key {key!r} is {_a(type(key).__name__)}, not a name; a state_dict maps "
                "names (strings) to tensors"
            )
        if not isinstance(value, torch.Tensor):
            raise CliError(
                f"{path}: entry {key!r} holds {_a(type(value).__name__)}; expected a state_dict (a "
                f"mapping of names to tensors), or a dict with one under {' or '.join(map(repr, _NESTED_KEYS))}"
            )
        if value.is_nested:
            raise CliError(f"{path}: entry {key!r} is a nested tensor, which has no single shape; a "
                           "state_dict of a model holds none")
    # detach: a saved nn.Parameter comes back requiring grad
    return {key: value.detach() for key, value in obj.items()}


def _load(name: str) -> StateDict:
    path = Path(name)
    try:
        if not path.exists():
            raise CliError(f"{path}: no such file")
        if path.is_dir():
            raise CliError(f"{path}: is a directory, not a checkpoint file")
        obj = _load_safetensors(path) if _is_safetensors(path) else _load_torch(path)
    except OSError as e:
        raise CliError(f"{path}: {e.strerror or _first_line(e)}") from None
    return _as_state_dict(obj, path)


def _demo_state_dict() -> StateDict:
    """A small ConvNet for 28x28 images, freshly initialised with seed 0 (BatchNorm buffers too)."""
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 8, 5), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
        )
    return {name: t.detach() for name, t in model.state_dict().items()}


def _select(state: StateDict, args: argparse.Namespace) -> StateDict:
    # mt.bundle's selection rule (a name matches itself first, then as a glob), but not
    # mt.bundle(state, include=...) itself: a bundle promotes its tensors' dtypes on
    # construction, and float8 promotes with nothing.
    keep = _as_predicate(args.include, "--include")
    drop = _as_predicate(args.exclude, "--exclude")
    return {
        name: t for name, t in state.items()
        if (keep is None or keep(name, t)) and (drop is None or not drop(name, t))
    }


def _selection_error(args: argparse.Namespace, state: StateDict, where: str) -> CliError:
    flags = [f"--include {p!r}" for p in args.include or ()] + [f"--exclude {p!r}" for p in args.exclude or ()]
    return CliError(f"no tensor matches {' '.join(flags)}; {where} has {len(state)}: {_shorten(list(state))}")


def _shorten(names: Sequence[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", ... {len(names) - limit} more" if len(names) > limit else "")


# -- figures ---------------------------------------------------------------------------------


def _has_values(t: torch.Tensor) -> bool:
    """False for sparse and meta tensors (meta ones, saved from a model made on the meta device,
    hold no values): their statistics are blank."""
    return t.layout == torch.strided and not t.is_meta


def _for_stats(t: torch.Tensor) -> torch.Tensor | None:
    """`t` in a dtype that torch's reductions take, or None where its statistics are undefined."""
    if not _has_values(t):
        return None
    if t.dtype in _LOW_PRECISION:  # see _widened
        return t.float()
    if t.dtype in _NATIVE:
        return t
    if t.is_complex() or t.is_quantized:
        return None
    # bool, integers, float8: exact in float32 up to 16 bits, not beyond (int64 step counters)
    try:
        return t.to(torch.float32 if t.element_size() <= 2 else torch.float64)
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _widened(b: mt.ParameterBundle) -> mt.ParameterBundle:
    """A bundle of 16-bit floats in float32, for its figures: in float16 the L2 norm of 100
    entries of 1e4 is inf, and bfloat16 figures have 3 significant digits.

    Times a float32 `(1,)` one, which is exact and computed on demand, one tensor at a time
    (`b.float()` would convert the whole checkpoint at once).
    """
    # Under concat a bundle computes in its own dtype, float32 where 16-bit tensors sit beside
    # float32 ones (or float16 beside bfloat16); under weighted, each tensor in the tensor's.
    sixteen = b.strategy != "concat" and any(t.dtype in _LOW_PRECISION for t in b.tensors)
    if b.dtype not in _LOW_PRECISION and not sixteen:
        return b
    widened = b * torch.ones(1, dtype=torch.float32)
    assert isinstance(widened, mt.ParameterBundle)
    return widened


def _chunks(names: Sequence[str], tensors: Mapping[str, torch.Tensor]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for name in names:
        chunk.append(name)
        size += _nbytes(tensors[name])
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _totals(b: mt.ParameterBundle) -> mt.ParameterBundle:
    # Counts are totals under every strategy: a weighted average of NaN counts means nothing.
    return b.with_strategy("concat") if b.strategy == "weighted" else b


Figures = dict[str, Callable[..., torch.Tensor]]

# Each serves both the global row (a 0-d tensor) and per-tensor rows (under per_param: a bundle
# of per-tensor results). Counts use count_nonzero: torch's sum of a bool tensor is several
# times slower, and makes an int64 copy.
_STATS: Figures = {
    "mean": lambda b: b.mean(),
    "std": lambda b: b.std(correction=0),
    "min": lambda b: b.amin(),
    "max": lambda b: b.amax(),
    "l2": lambda b: b.norm(),
    "zeros": lambda b: torch.count_nonzero(_totals(b) == 0),
    "nan": lambda b: torch.count_nonzero(torch.isnan(_totals(b))),
    "inf": lambda b: torch.count_nonzero(torch.isinf(_totals(b))),
}

# mt.recipes.distance's figures. Not distance() itself: it makes its per-tensor figures in one
# loop, and the rows here are made a chunk at a time, for the progress bar.
_DISTANCES: Figures = {
    "l2": lambda a, b: torch.dist(a, b),
    "max_abs": lambda a, b: (a - b).abs().amax(),
    "cosine": lambda a, b: _cosine(a, b),
    "changed": lambda a, b: torch.count_nonzero(_changed(a, b)),  # a NaN left as it was is no change
}

def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Both sides in one dtype (a float32 and a float64 side); 16-bit ones come widened.
    wide = torch.promote_types(a.dtype, b.dtype)
    return F.cosine_similarity(a if a.dtype == wide else a.to(wide), b if b.dtype == wide else b.to(wide), dim=0)


# The figures an empty tensor has (the others, such as its min, do not exist).
_ON_EMPTY = {"l2": 0.0, "nan": 0, "inf": 0}
# Counts of elements, reported as fractions of numel.
_FRACTIONS = {"zeros": "zero_fraction", "changed": "changed_fraction"}


def _number(x: torch.Tensor) -> float | int:
    return int(x) if not x.is_floating_point() else float(x)


def _per_tensor(result: torch.Tensor) -> dict[str, float | int]:
    assert isinstance(result, mt.ParameterBundle)  # a reduction under per_param
    return {name: _number(value) for name, value in result.to_dict().items()}


def _with_fractions(row: Row) -> Row:
    def value(key: str, v: Any) -> Any:
        if key not in _FRACTIONS:
            return v
        return None if v is None or not row["numel"] else v / row["numel"]

    return {_FRACTIONS.get(key, key): value(key, v) for key, v in row.items()}


def _dtype_text(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _converted(side: StateDict, names: Sequence[str]) -> StateDict:
    return {n: c for n in names if (c := _for_stats(side[n])) is not None}


def _rows(sides: Sequence[StateDict], names: Sequence[str], figures: Figures, desc: str) -> dict[str, Row]:
    """Per-tensor figures of `names`, on per_param bundles of each side, a chunk at a time."""
    first = sides[0]
    rows: dict[str, Row] = {}
    for name in names:
        dtypes = [_dtype_text(side[name].dtype) for side in sides]
        row = {"dtype": dtypes[0]} if len(sides) == 1 else {"dtype_a": dtypes[0], "dtype_b": dtypes[1]}
        rows[name] = row | {"shape": list(first[name].shape), "numel": first[name].numel()} | dict.fromkeys(figures)
        if first[name].numel() == 0 and all(_for_stats(side[name]) is not None for side in sides):
            rows[name] |= {k: v for k, v in _ON_EMPTY.items() if k in figures}
    filled = [n for n in names if first[n].numel() > 0]  # per tensor, an empty one's min raises
    with _bar(desc, sum(_nbytes(first[n]) for n in filled), _is_large([first[n] for n in names])) as bar:
        for chunk in _chunks(filled, first):
            converted = [_converted(side, chunk) for side in sides]
            usable = [n for n in chunk if all(n in c for c in converted)]
            if usable:
                bundles = [mt.bundle({n: c[n] for n in usable}).per_param() for c in converted]
                for key, figure in figures.items():
                    for name, value in _per_tensor(figure(*bundles)).items():
                        rows[name][key] = value
            bar.update(sum(_nbytes(first[n]) for n in chunk))
    return {name: _with_fractions(row) for name, row in rows.items()}


def _global(sides: Sequence[StateDict], names: Sequence[str], figures: Figures, strategy: str) -> Row:
    """The figures of the floating-point tensors of `names` (of the others where there are none)."""
    covered = [n for n in names if all(side[n].dtype in _NATIVE and _has_values(side[n]) for side in sides)]
    tensors = [{n: side[n] for n in covered} for side in sides]
    if not covered:
        converted = [_converted(side, names) for side in sides]
        covered = [n for n in names if all(n in c for c in converted)]
        tensors = [{n: c[n] for n in covered} for c in converted]
    bundles = [mt.bundle(t, strategy=strategy) for t in tensors]
    row: Row = {"tensors": len(covered), "dtype": _dtype_text(bundles[0].dtype), "numel": bundles[0].numel()}
    bundles = [_widened(b) for b in bundles]
    row |= dict.fromkeys(figures)
    if not covered:  # only tensors without statistics, such as complex ones
        return _with_fractions(row) | {"not_in_global": list(names)}
    if row["numel"] == 0:
        row |= {k: v for k, v in _ON_EMPTY.items() if k in figures}
    else:
        large = _is_large([t for side in tensors for t in side.values()])
        with _bar("global", len(figures), large, unit="stat") as bar:
            for key, figure in figures.items():
                row[key] = _number(figure(*bundles))
                bar.update()
    return _with_fractions(row) | {"not_in_global": [n for n in names if n not in covered]}


# -- output ----------------------------------------------------------------------------------


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape) if shape else "()"


def _cell(value: Any) -> str:
    """A table cell: numbers compact (4 significant digits), blanks as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return _shape_text(value)
    return str(value)


def _table(columns: Sequence[str], rows: Sequence[Row]) -> str:
    cells = [list(columns)] + [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    text_columns = {"name", "dtype", "shape", "status", "dtype_a", "dtype_b", "shape_a", "shape_b"}
    lines = []
    for line in cells:
        parts = [v.ljust(w) if c in text_columns else v.rjust(w) for c, v, w in zip(columns, line, widths)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"


def _csv(columns: Sequence[str], rows: Sequence[Row]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        values = [row.get(c) for c in columns]
        writer.writerow(["" if v is None else _shape_text(v) if isinstance(v, list) else v for v in values])
    return out.getvalue()


def _json_value(value: Any) -> Any:
    # Strict JSON has no NaN or infinity: they are written as the strings "nan", "inf", "-inf".
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def _json(document: Mapping[str, Any]) -> str:
    return json.dumps(_json_value(dict(document)), indent=2, allow_nan=False) + "\n"


def _render_stats(path: str | None, strategy: str, rows: dict[str, Row], total: Row | None, fmt: str) -> str:
    if fmt == "json":
        return _json({"path": path, "strategy": strategy, "global": total, "tensors": rows})
    lines = [{"name": name} | row for name, row in rows.items()]
    if total is not None:
        lines.append({"name": _GLOBAL} | total)
    if fmt == "csv":
        return _csv(_STATS_COLUMNS, lines)
    text = _table(_STATS_COLUMNS, lines)
    if total is not None and total["not_in_global"]:
        left_out = [f"{n} ({rows[n]['dtype']})" for n in total["not_in_global"]]
        text += f"not in {_GLOBAL}: {_shorten(left_out)}\n"
    return text


def _render_diff(
    names: tuple[str, str], rows: dict[str, Row], total: Row | None,
    only_a: list[str], only_b: list[str], mismatched: dict[str, tuple[list[int], list[int]]], fmt: str,
) -> str:
    if fmt == "json":
        return _json({
            "a": names[0], "b": names[1], "global": total, "tensors": rows, "only_in_a": only_a, "only_in_b": only_b,
            "shape_mismatches": [{"name": n, "shape_a": sa, "shape_b": sb} for n, (sa, sb) in mismatched.items()],
        })
    lines = [{"name": n, "status": "compared", "shape_a": r["shape"], "shape_b": r["shape"]} | r
             for n, r in rows.items()]
    if fmt == "csv":
        lines += [{"name": n, "status": "only_in_a"} for n in only_a]
        lines += [{"name": n, "status": "only_in_b"} for n in only_b]
        lines += [{"name": n, "status": "shape_mismatch", "shape_a": sa, "shape_b": sb}
                  for n, (sa, sb) in mismatched.items()]
        if total is not None:
            lines.append({"name": _GLOBAL, "status": "compared"} | total)
        return _csv(_DIFF_COLUMNS, lines)
    for line in lines:
        same = line["dtype_a"] == line["dtype_b"]
        line["dtype"] = line["dtype_a"] if same else f"{line['dtype_a']}/{line['dtype_b']}"
    if total is not None:
        lines.append({"name": _GLOBAL} | total)
    text = _table(("name", "dtype", "shape", "numel", "l2", "max_abs", "cosine", "changed_fraction"), lines)
    if total is not None and total["not_in_global"]:
        text += f"not in {_GLOBAL}: {_shorten(total['not_in_global'])}\n"
    if only_a:
        text += f"only in {names[0]} ({len(only_a)}): {', '.join(only_a)}\n"
    if only_b:
        text += f"only in {names[1]} ({len(only_b)}): {', '.join(only_b)}\n"
    for name, (sa, sb) in mismatched.items():
        text += f"shape mismatch: {name} is {_shape_text(sa)} in {names[0]}, {_shape_text(sb)} in {names[1]}\n"
    return text


# -- commands --------------------------------------------------------------------------------


def _stats(args: argparse.Namespace) -> str:
    if args.path is None:
        print("modtensor: no PATH given: statistics of a built-in demo model (a small ConvNet, "
              "seed 0); run `modtensor stats CHECKPOINT` for yours", file=sys.stderr)
        state = _demo_state_dict()
    else:
        state = _load(args.path)
    selected = _select(state, args)
    if not selected:
        raise _selection_error(args, state, args.path or "the demo model")
    names = list(selected)
    with torch.no_grad():
        rows = _rows([selected], names, _STATS, "statistics")
        total = None if args.strategy == "per_param" else _global([selected], names, _STATS, args.strategy)
    return _render_stats(args.path, args.strategy, rows, total, args.format)


def _diff(args: argparse.Namespace) -> str:
    state_a, state_b = _load(args.a), _load(args.b)
    a, b = _select(state_a, args), _select(state_b, args)
    if not a and not b:
        raise _selection_error(args, state_a, args.a)
    only_a = [n for n in a if n not in b]
    only_b = [n for n in b if n not in a]
    common = [n for n in a if n in b]
    mismatched = {n: (list(a[n].shape), list(b[n].shape)) for n in common if a[n].shape != b[n].shape}
    compared = [n for n in common if n not in mismatched]
    total = None
    with torch.no_grad():
        rows = _rows([a, b], compared, _DISTANCES, "distances")
        if compared:
            total = _global([a, b], compared, _DISTANCES, "concat")
            del total["dtype"]  # each side has its own
    return _render_diff((args.a, args.b), rows, total, only_a, only_b, mismatched, args.format)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modtensor", description="Statistics of checkpoints, computed with modtensor bundles."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--include", action="append", metavar="GLOB",
                       help="only tensors whose name matches GLOB (repeatable)")
        p.add_argument("--exclude", action="append", metavar="GLOB",
                       help="leave out tensors whose name matches GLOB (repeatable)")
        p.add_argument("--format", choices=("table", "json", "csv"), default="table",
                       help="aligned text (default), one JSON object, or CSV rows")

    stats = commands.add_parser(
        "stats", help="per-tensor and global statistics of a checkpoint",
        description="Per-tensor and global statistics (numel, mean, population std, min, max, L2 "
                    "norm, fraction of zeros, NaN and inf counts) of a torch.save'd state_dict or a "
                    ".safetensors file. The global row covers the floating-point tensors.",
    )
    stats.add_argument("path", nargs="?", metavar="PATH", help="the checkpoint (default: a built-in demo model)")
    stats.add_argument(
        "--strategy", choices=_STRATEGIES, default="concat",
        help="the global row: concat = all elements as one tensor (default); weighted = the "
             "numel-weighted average of per-tensor statistics (counts stay totals); per_param = "
             "no global row",
    )
    common(stats)
    stats.set_defaults(run=_stats)

    diff = commands.add_parser(
        "diff", help="the distance between two checkpoints",
        description="L2 distance, max |a - b|, cosine similarity and fraction of changed entries, "
                    "globally and per tensor, of the tensors in both; then the names in only one "
                    "and the shape mismatches. Exits 0 when the comparison ran, whatever it found.",
    )
    diff.add_argument("a", metavar="A")
    diff.add_argument("b", metavar="B")
    common(diff)
    diff.set_defaults(run=_diff)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `modtensor` command line; return the exit status (0 ran, 2 usage or file
    error, 1 the output could not be written).

    `modtensor stats [PATH]` prints per-tensor and global statistics of a checkpoint (a
    `torch.save`d state_dict, or a `.safetensors` file); `modtensor diff A B` the distance
    between two. Both take `--include`/`--exclude` globs and `--format table|json|csv`. Errors
    are one line on stderr, never a traceback.

    Example:
        >>> import contextlib, io, json
        >>> from modtensor.cli import main
        >>> out = io.StringIO()
        >>> with contextlib.redirect_stdout(out):
        ...     status = main(["stats", "--format", "json", "--include", "0.*"])  # the demo model
        >>> report = json.loads(out.getvalue())
        >>> status, list(report["tensors"])[:2], report["global"]["numel"]
        (0, ['0.weight', '0.bias'], 208)
        >>> main(["stats", "no/such/file.pt"])  # and on stderr: modtensor: error: ...
        2
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on bad usage: return its status
        return e.code if isinstance(e.code, int) else 2
    try:
        text = args.run(args)
    except CliError as e:
        print(f"modtensor: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `modtensor stats big.pt | head`: the reader left, nothing is wrong
        _drop_stdout()
        return 0
    except OSError as e:  # a full disk (`> /dev/full`): the report was lost, so say so
        print(f"modtensor: error: cannot write the output: {e}", file=sys.stderr)
        _drop_stdout()
        return 1
    return 0


def _drop_stdout() -> None:
    # What stdout still buffers would fail again when Python flushes it at exit, with a
    # traceback: it goes to /dev/null instead.
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
