"""The command line on real files written here, its figures against torch.cat-based references."""

import csv
import io
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import modtensor as mt
from modtensor import cli

FIGURES = ("numel", "mean", "std", "min", "max", "l2", "zero_fraction", "nan", "inf")


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _reference(tensors):
    """The statistics of the concatenation, in float64."""
    x = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    return {
        "numel": x.numel(), "mean": x.mean(), "std": x.std(correction=0), "min": x.min(), "max": x.max(),
        "l2": x.norm(), "zero_fraction": (x == 0).double().mean(), "nan": x.isnan().sum(), "inf": x.isinf().sum(),
    }


def _assert_figures(got, want, rel=1e-5):
    # JSON writes non-finite numbers as strings and CSV writes everything as strings: float() reads both.
    for key, value in want.items():
        assert float(got[key]) == pytest.approx(float(value), rel=rel, abs=1e-6, nan_ok=True), key


def _state():
    torch.manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 2, 3, 3),
        "conv.bias": torch.randn(4).double(),
        "bn.weight": torch.ones(4),
        "bn.running_mean": torch.zeros(4),
        "bn.num_batches_tracked": torch.tensor(123456789, dtype=torch.int64),  # exact only in float64
        "mask": torch.tensor([True, False, True]),
        "fc.weight": torch.randn(3, 16).relu(),  # about half zeros
        "scale": torch.tensor(2.5),
    }


FLOATING = ["conv.weight", "conv.bias", "bn.weight", "bn.running_mean", "fc.weight", "scale"]


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(_state(), path)
    return path


def test_stats_json_per_tensor_and_global_match_the_concatenation(capsys, checkpoint):
    code, out, err = _run(capsys, "stats", checkpoint, "--format", "json")
    assert code == 0 and err == ""
    report = json.loads(out)
    state = _state()
    assert list(report["tensors"]) == list(state)
    for name, t in state.items():
        row = report["tensors"][name]
        assert row["dtype"] == str(t.dtype).removeprefix("torch.") and row["shape"] == list(t.shape)
        _assert_figures(row, _reference([t]))
    assert report["tensors"]["bn.num_batches_tracked"]["mean"] == 123456789  # float64, not float32
    # the global row: the floating-point tensors only
    assert report["global"]["not_in_global"] == ["bn.num_batches_tracked", "mask"]
    assert report["global"]["tensors"] == len(FLOATING)
    _assert_figures(report["global"], _reference([state[n] for n in FLOATING]))
    assert report["strategy"] == "concat" and report["path"] == str(checkpoint)


def test_stats_csv_rows_and_global_row(capsys, checkpoint):
    code, out, _ = _run(capsys, "stats", checkpoint, "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == list(cli._STATS_COLUMNS)
    state = _state()
    assert [r["name"] for r in rows] == [*state, "(global)"]
    for row in rows[:-1]:
        _assert_figures(row, _reference([state[row["name"]]]))
    assert rows[0]["shape"] == "4x2x3x3" and rows[-2]["shape"] == "()"
    _assert_figures(rows[-1], _reference([state[n] for n in FLOATING]))


def test_stats_table_is_aligned_and_compact(capsys, checkpoint):
    code, out, _ = _run(capsys, "stats", checkpoint)
    assert code == 0
    lines = out.splitlines()
    header, rows = lines[0], lines[1 : len(_state()) + 2]
    assert header.split() == list(cli._STATS_COLUMNS)
    assert rows[-1].startswith("(global)")
    # right-aligned numbers: every row ends where the header does
    assert {len(line) for line in [header, *rows]} == {len(header)}
    figures = json.loads(_run(capsys, "stats", checkpoint, "--format", "json")[1])["tensors"]["conv.weight"]
    assert rows[0].split() == [
        "conv.weight", "float32", "4x2x3x3", "72", *(f"{figures[k]:.4g}" for k in ("mean", "std", "min", "max", "l2")),
        "0", "0", "0",
    ]
    assert lines[-1] == "not in (global): bn.num_batches_tracked (int64), mask (bool)"


def test_safetensors_gives_the_same_figures_as_torch_save(capsys, tmp_path, checkpoint):
    path = tmp_path / "model.safetensors"
    save_file(_state(), path)
    _, from_pt, _ = _run(capsys, "stats", checkpoint, "--format", "json")
    code, from_st, err = _run(capsys, "stats", path, "--format", "json")
    assert code == 0 and err == ""
    pt, st = json.loads(from_pt), json.loads(from_st)
    assert set(st["tensors"]) == set(pt["tensors"])  # safetensors keeps its own order
    for name, row in pt["tensors"].items():
        assert st["tensors"][name] == row
    # the global row adds the tensors up in another order
    _assert_figures(st["global"], {k: v for k, v in pt["global"].items() if k in FIGURES})
    assert sorted(st["global"]["not_in_global"]) == sorted(pt["global"]["not_in_global"])
    # recognised by its header whatever the file is called
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(path.read_bytes())
    assert _run(capsys, "stats", renamed, "--format", "json")[0] == 0


def test_nan_and_inf(capsys, tmp_path):
    path = tmp_path / "bad.pt"
    w = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0])
    torch.save({"w": w, "ok": torch.ones(3)}, path)
    code, out, _ = _run(capsys, "stats", path, "--format", "json")
    assert code == 0
    report = json.loads(out)  # strict JSON: non-finite numbers are strings
    assert report["tensors"]["w"]["nan"] == 1 and report["tensors"]["w"]["inf"] == 2
    assert report["tensors"]["w"]["mean"] == "nan" and report["tensors"]["ok"]["mean"] == 1.0
    assert report["global"]["nan"] == 1 and report["global"]["inf"] == 2
    _assert_figures(report["tensors"]["w"], _reference([w]))
    _assert_figures(report["global"], _reference([w, torch.ones(3)]))
    assert "nan" in _run(capsys, "stats", path)[1]


def test_odd_dtypes_and_empty_tensors_do_not_crash(capsys, tmp_path):
    path = tmp_path / "odd.pt"
    f8 = torch.tensor([0.5, -2.0, 0.0]).to(torch.float8_e4m3fn)
    state = {
        "w": torch.randn(5), "empty": torch.empty(0, 3), "codes": torch.tensor([0, 200, 7], dtype=torch.uint8),
        "f8": f8, "c": torch.randn(2, dtype=torch.complex64),
    }
    torch.save(state, path)
    code, out, _ = _run(capsys, "stats", path, "--format", "json")
    assert code == 0
    rows = json.loads(out)["tensors"]
    _assert_figures(rows["codes"], _reference([state["codes"]]))
    _assert_figures(rows["f8"], _reference([f8.float()]))
    assert rows["empty"] | {"shape": None} == {
        "dtype": "float32", "shape": None, "numel": 0, "mean": None, "std": None, "min": None, "max": None,
        "l2": 0.0, "zero_fraction": None, "nan": 0, "inf": 0,
    }
    assert [rows["c"][k] for k in FIGURES] == [2] + [None] * 8
    assert json.loads(out)["global"]["not_in_global"] == ["codes", "f8", "c"]
    assert _run(capsys, "stats", path, "--format", "csv")[0] == 0
    assert _run(capsys, "stats", path)[0] == 0
    _, out, _ = _run(capsys, "stats", path, "--format", "json", "--include", "c")
    assert json.loads(out)["global"] == {
        "tensors": 0, "dtype": "float32", "numel": 0, "mean": None, "std": None, "min": None, "max": None,
        "l2": None, "zero_fraction": None, "nan": None, "inf": None, "not_in_global": ["c"],
    }
    code, out, _ = _run(capsys, "diff", path, path, "--format", "json")
    assert code == 0
    rows = json.loads(out)["tensors"]
    assert rows["codes"]["l2"] == 0 and rows["f8"]["changed_fraction"] == 0 and rows["c"]["l2"] is None
    assert rows["empty"]["l2"] == 0 and rows["empty"]["cosine"] is None


def test_sparse_and_meta_tensors_get_blank_statistics(capsys, tmp_path):
    # They hold no dense values (a meta tensor none at all); the docstring promised blanks for
    # sparse ones, and both crashed with torch's errors.
    path, meta = tmp_path / "sparse.pt", tmp_path / "meta.pt"
    w = torch.randn(5)
    torch.save({"w": w, "s": torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,))}, path)
    torch.save({"w": torch.empty(5, device="meta"), "s": torch.empty(4, device="meta")}, meta)
    code, out, _ = _run(capsys, "stats", path, "--format", "json")
    assert code == 0
    report = json.loads(out)
    assert [report["tensors"]["s"][k] for k in FIGURES] == [4] + [None] * 8
    assert report["global"]["not_in_global"] == ["s"]
    _assert_figures(report["global"], _reference([w]))
    code, out, _ = _run(capsys, "stats", meta, "--format", "json")
    assert code == 0 and json.loads(out)["global"]["not_in_global"] == ["w", "s"]
    for a, b in ((path, path), (path, meta)):
        code, out, _ = _run(capsys, "diff", a, b, "--format", "json")
        assert code == 0 and json.loads(out)["tensors"]["s"]["l2"] is None


def test_global_row_covers_integer_tensors_when_no_float_is_selected(capsys, checkpoint):
    code, out, _ = _run(capsys, "stats", checkpoint, "--include", "bn.num*", "--include", "mask", "--format", "json")
    assert code == 0
    report = json.loads(out)
    assert list(report["tensors"]) == ["bn.num_batches_tracked", "mask"]
    assert report["global"]["not_in_global"] == []
    state = _state()
    _assert_figures(report["global"], _reference([state["bn.num_batches_tracked"], state["mask"]]))


def test_strategies(capsys, checkpoint):
    state = _state()
    _, out, _ = _run(capsys, "stats", checkpoint, "--format", "json", "--strategy", "weighted")
    weighted = json.loads(out)["global"]
    refs = [_reference([state[n]]) for n in FLOATING]
    numel = sum(r["numel"] for r in refs)
    for key in ("mean", "std", "min", "max", "l2"):
        want = sum(float(r[key]) * r["numel"] for r in refs) / numel
        assert weighted[key] == pytest.approx(want, rel=1e-5), key
    concat = _reference([state[n] for n in FLOATING])
    _assert_figures(weighted, {k: concat[k] for k in ("numel", "mean", "zero_fraction", "nan", "inf")})

    _, out, _ = _run(capsys, "stats", checkpoint, "--format", "json", "--strategy", "per_param")
    assert json.loads(out)["global"] is None
    _, out, _ = _run(capsys, "stats", checkpoint, "--format", "csv", "--strategy", "per_param")
    assert "(global)" not in out
    code, _, err = _run(capsys, "stats", checkpoint, "--strategy", "mean")
    assert code == 2 and "invalid choice" in err


def test_include_and_exclude(capsys, checkpoint):
    _, out, _ = _run(capsys, "stats", checkpoint, "--format", "json", "--include", "*.weight", "--exclude", "bn.*")
    report = json.loads(out)
    assert list(report["tensors"]) == ["conv.weight", "fc.weight"]
    state = _state()
    _assert_figures(report["global"], _reference([state["conv.weight"], state["fc.weight"]]))
    code, out, err = _run(capsys, "stats", checkpoint, "--include", "decoder.*")
    assert code == 2 and out == ""
    assert err.startswith("modtensor: error: no tensor matches --include 'decoder.*';") and err.count("\n") == 1


def test_nested_training_checkpoints_legacy_format_and_parameters(capsys, tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    nested = tmp_path / "train.pt"
    torch.save({"model": model.state_dict(), "epoch": 3, "optimizer": {"lr": 0.1}}, nested)
    legacy = tmp_path / "legacy.pt"
    torch.save(dict(model.named_parameters()), legacy, _use_new_zipfile_serialization=False)
    for path in (nested, legacy):
        code, out, _ = _run(capsys, "stats", path, "--format", "json")
        assert code == 0
        _assert_figures(json.loads(out)["global"], _reference([model.weight.detach(), model.bias.detach()]))


def _write_module(path):
    torch.save(nn.Linear(2, 2), path)


def _write_bytes(data):
    return lambda path: path.write_bytes(data)


def _write_truncated(path):
    torch.save({"w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize(
    "name, write, message",
    [
        ("missing.pt", None, "no such file"),
        ("folder", lambda p: p.mkdir(), "is a directory"),
        ("corrupt.pt", _write_bytes(b"these bytes are no checkpoint"), "not a readable PyTorch or safetensors"),
        # the unpickler's own words were the detail: "(101)", "(pop from empty list)"
        ("text.pt", _write_bytes(b"hello world\n"), "checkpoint (not a torch.save or safetensors file)"),
        ("short.pt", _write_bytes(b"abc"), "checkpoint (not a torch.save or safetensors file)"),
        ("cut.pt", _write_bytes(b"\x80"), "(the file is corrupt or truncated: IndexError while unpickling)"),
        # a non-string key was blamed on its value: "entry 1 holds a Tensor"
        ("intkey.pt", lambda p: torch.save({1: torch.ones(2)}, p), "key 1 is an int, not a name"),
        ("empty.pt", _write_bytes(b""), "empty or truncated"),
        ("truncated.pt", _write_truncated, "not a readable PyTorch or safetensors"),
        ("module.pt", _write_module, "torch.nn.modules.linear.Linear"),
        ("epoch.pt", lambda p: torch.save({"w": torch.ones(2), "epoch": 3}, p), "entry 'epoch' holds an int"),
        ("list.pt", lambda p: torch.save([torch.ones(2)], p), "holds a list, not a state_dict"),
        ("nothing.pt", lambda p: torch.save({}, p), "empty state_dict"),
        ("nested.pt", lambda p: torch.save({"n": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])}, p),
         "entry 'n' is a nested tensor"),
        ("corrupt.safetensors", _write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"), "not a readable safetensors"),
    ],
)
def test_bad_files_give_one_line_and_status_2(capsys, tmp_path, name, write, message):
    path = tmp_path / name
    if write is not None:
        write(path)
    code, out, err = _run(capsys, "stats", path)
    assert code == 2 and out == ""
    assert err.startswith(f"modtensor: error: {path}: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    if name == "module.pt":
        assert "state_dict()" in err
    # diff reads the same way
    assert _run(capsys, "diff", path, path)[0] == 2


def test_safetensors_missing_names_the_install(capsys, monkeypatch, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, path)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now fails
    code, _, err = _run(capsys, "stats", path)
    assert code == 2 and "pip install safetensors" in err and err.count("\n") == 1


def _diff_states():
    torch.manual_seed(1)
    a = {
        "shared.weight": torch.randn(4, 3), "shared.bias": torch.zeros(4), "head.weight": torch.randn(2, 4),
        "steps": torch.tensor(10), "old": torch.ones(3),
    }
    b = {
        "shared.weight": a["shared.weight"] + 0.1 * torch.randn(4, 3) * (torch.rand(4, 3) > 0.5),
        "shared.bias": torch.zeros(4, dtype=torch.float64),
        "head.weight": torch.randn(2, 5),
        "steps": torch.tensor(25),
        "new": torch.zeros(1),
    }
    return a, b


def _distance_reference(pairs):
    x = torch.cat([a.reshape(-1).double() for a, _ in pairs])
    y = torch.cat([b.reshape(-1).double() for _, b in pairs])
    return {
        "l2": torch.dist(x, y), "max_abs": (x - y).abs().max(), "cosine": torch.nn.functional.cosine_similarity(x, y, dim=0),
        "changed_fraction": (x != y).double().mean(),
    }


@pytest.fixture
def two_checkpoints(tmp_path):
    a, b = _diff_states()
    torch.save(a, tmp_path / "a.pt")
    save_file(b, tmp_path / "b.safetensors")
    return tmp_path / "a.pt", tmp_path / "b.safetensors"


def test_diff_json(capsys, two_checkpoints):
    pa, pb = two_checkpoints
    code, out, err = _run(capsys, "diff", pa, pb, "--format", "json")
    assert code == 0 and err == ""
    report = json.loads(out)
    a, b = _diff_states()
    assert report["only_in_a"] == ["old"] and report["only_in_b"] == ["new"]
    assert report["shape_mismatches"] == [{"name": "head.weight", "shape_a": [2, 4], "shape_b": [2, 5]}]
    assert list(report["tensors"]) == ["shared.weight", "shared.bias", "steps"]
    for name in ("shared.weight", "shared.bias", "steps"):
        _assert_figures(report["tensors"][name], _distance_reference([(a[name], b[name])]))
    assert report["tensors"]["shared.bias"]["dtype_b"] == "float64"
    assert report["global"]["not_in_global"] == ["steps"]
    _assert_figures(report["global"], _distance_reference([(a[n], b[n]) for n in ("shared.weight", "shared.bias")]))
    # the figures of mt.recipes.distance
    names = ["shared.weight", "shared.bias"]
    want = mt.recipes.distance(mt.bundle({n: a[n] for n in names}), mt.bundle({n: b[n] for n in names}))
    assert report["global"]["l2"] == pytest.approx(want.l2, rel=1e-5)
    assert report["global"]["changed_fraction"] == want.changed_fraction
    for name in names:
        _assert_figures(report["tensors"][name], want.per_param[name])


def test_diff_csv_and_table(capsys, two_checkpoints):
    pa, pb = two_checkpoints
    code, out, _ = _run(capsys, "diff", pa, pb, "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["name"], r["status"]) for r in rows] == [
        ("shared.weight", "compared"), ("shared.bias", "compared"), ("steps", "compared"), ("old", "only_in_a"),
        ("new", "only_in_b"), ("head.weight", "shape_mismatch"), ("(global)", "compared"),
    ]
    assert (rows[5]["shape_a"], rows[5]["shape_b"]) == ("2x4", "2x5")
    a, b = _diff_states()
    _assert_figures(rows[0], _distance_reference([(a["shared.weight"], b["shared.weight"])]))
    _assert_figures(rows[-1], _distance_reference([(a[n], b[n]) for n in ("shared.weight", "shared.bias")]))

    code, out, _ = _run(capsys, "diff", pa, pb)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["name", "dtype", "shape", "numel", "l2", "max_abs", "cosine", "changed_fraction"]
    assert lines[2].split()[:3] == ["shared.bias", "float32/float64", "4"]
    assert lines[4].startswith("(global)")
    assert f"only in {pa} (1): old" in lines
    assert f"only in {pb} (1): new" in lines
    assert f"shape mismatch: head.weight is 2x4 in {pa}, 2x5 in {pb}" in lines


def test_diff_of_a_checkpoint_with_itself(capsys, checkpoint):
    code, out, _ = _run(capsys, "diff", checkpoint, checkpoint, "--format", "json", "--exclude", "bn.*")
    assert code == 0
    report = json.loads(out)
    assert report["global"]["l2"] == 0 and report["global"]["changed_fraction"] == 0
    assert report["global"]["cosine"] == pytest.approx(1.0)
    assert report["only_in_a"] == report["only_in_b"] == report["shape_mismatches"] == []
    assert "bn.weight" not in report["tensors"]


def test_nan_left_as_it_was_is_no_change(capsys, tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": torch.tensor([float("nan"), 1.0, 2.0, float("nan")])}, a)
    torch.save({"w": torch.tensor([float("nan"), 1.0, 3.0, 0.0])}, b)
    code, out, _ = _run(capsys, "diff", a, b, "--format", "json")
    assert code == 0 and json.loads(out)["tensors"]["w"]["changed_fraction"] == 0.5  # 2.0 -> 3.0, nan -> 0.0
    assert json.loads(_run(capsys, "diff", a, a, "--format", "json")[1])["global"]["changed_fraction"] == 0


def test_demo_without_a_path(capsys):
    code, out, err = _run(capsys, "stats")
    assert code == 0
    assert "demo model" in err and err.count("\n") == 1
    assert "0.weight" in out and "(global)" in out and "num_batches_tracked" in out
    _, again, _ = _run(capsys, "stats")
    assert again == out  # seeded
    _, out, _ = _run(capsys, "stats", "--format", "json")
    report = json.loads(out)
    assert report["path"] is None and report["global"]["numel"] > 0


def test_progress_bar_only_on_a_terminal(capsys, monkeypatch, checkpoint, tmp_path):
    _, unchunked, _ = _run(capsys, "stats", checkpoint, "--format", "json")
    monkeypatch.setattr(cli, "PROGRESS_MIN_BYTES", 0)
    monkeypatch.setattr(cli, "CHUNK_BYTES", 1)  # one tensor at a time: the same figures
    code, out, err = _run(capsys, "stats", checkpoint, "--format", "json")
    assert code == 0 and err == "" and out == unchunked  # not a terminal: no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, out, err = _run(capsys, "stats", checkpoint, "--format", "json")
    assert code == 0 and out == unchunked
    assert "statistics" in err and "global" in err
    save_file(_state(), tmp_path / "m.safetensors")
    code, _, err = _run(capsys, "diff", checkpoint, tmp_path / "m.safetensors", "--format", "json")
    assert code == 0 and "reading m.safetensors" in err and "distances" in err


def test_help_and_usage_errors_return_a_status(capsys):
    assert cli.main(["--help"]) == 0
    assert "stats" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert cli.main(["diff", "only-one.pt"]) == 2


def test_python_dash_m_end_to_end(checkpoint):
    run = subprocess.run(
        [sys.executable, "-m", "modtensor", "stats", str(checkpoint), "--format", "json"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["global"]["numel"] == sum(_state()[n].numel() for n in FLOATING)
    run = subprocess.run(
        [sys.executable, "-m", "modtensor", "stats", str(checkpoint) + ".missing"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("modtensor: error:") and "Traceback" not in run.stderr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_diff_of_a_16_bit_checkpoint_with_itself_has_cosine_one(capsys, tmp_path, dtype):
    # torch's cosine in float16 gives 0.999 for a tensor and itself, and the global row was inf
    # (float16 dot products overflowed); the figures are computed in float32.
    path = tmp_path / "half.pt"
    g = torch.Generator().manual_seed(0)
    torch.save({"w": torch.randn(300, 1000, generator=g).to(dtype), "b": torch.randn(300, generator=g).to(dtype)}, path)
    code, out, _ = _run(capsys, "diff", path, path, "--format", "json")
    assert code == 0
    report = json.loads(out)
    for row in (report["global"], *report["tensors"].values()):
        assert row["cosine"] == pytest.approx(1.0, abs=1e-4)  # float32 (torch: 1e-6 to 1e-5 here)


@pytest.mark.parametrize("strategy", ["concat", "weighted"])
def test_16_bit_figures_are_computed_in_float32(capsys, tmp_path, strategy):
    # They were computed in the tensors' own dtype: the L2 norm of 100 entries of 1e4 was inf in
    # float16, and bfloat16 figures had 3 significant digits.
    g = torch.Generator().manual_seed(0)
    state = {"big": torch.full((100,), 1e4, dtype=torch.float16),
             "bf": (torch.randn(5000, generator=g) * 0.5 + 1).to(torch.bfloat16)}
    path = tmp_path / "half.pt"
    torch.save(state, path)
    report = json.loads(_run(capsys, "stats", path, "--format", "json", "--strategy", strategy)[1])
    for name, t in state.items():
        _assert_figures(report["tensors"][name], _reference([t]))
        assert report["tensors"][name]["dtype"] == str(t.dtype).replace("torch.", "")
    if strategy == "concat":
        _assert_figures(report["global"], _reference(list(state.values())))
    else:
        # float16 beside bfloat16 makes a float32 bundle, whose weighted figures were each
        # tensor's in its own dtype: the float16 L2 norm of "big" (1e5) was inf, the global one too.
        refs = [_reference([t]) for t in state.values()]
        numel = sum(r["numel"] for r in refs)
        for key in ("mean", "std", "min", "max", "l2"):
            want = sum(float(r[key]) * r["numel"] for r in refs) / numel
            assert report["global"][key] == pytest.approx(want, rel=1e-5), key
    big = tmp_path / "big.pt"
    torch.save({"big": state["big"]}, big)
    report = json.loads(_run(capsys, "stats", big, "--format", "json", "--strategy", strategy)[1])
    assert report["global"]["l2"] == pytest.approx(1e5) and report["global"]["dtype"] == "float16"
    minus = tmp_path / "minus.pt"
    torch.save({"big": -state["big"]}, minus)
    report = json.loads(_run(capsys, "diff", big, minus, "--format", "json")[1])
    for row in (report["global"], report["tensors"]["big"]):
        assert row["l2"] == pytest.approx(2e5, rel=1e-5) and row["max_abs"] == 2e4
        assert row["cosine"] == pytest.approx(-1)


def test_a_name_with_glob_characters_selects_itself(capsys, tmp_path):
    # as mt.bundle's include: "w[0]" as a glob means "w0"
    path = tmp_path / "brackets.pt"
    torch.save({"w[0]": torch.ones(2), "w0": torch.zeros(3)}, path)
    _, out, _ = _run(capsys, "stats", path, "--format", "json", "--include", "w[0]")
    assert set(json.loads(out)["tensors"]) == {"w[0]", "w0"}


class _FullDisk(io.StringIO):
    def write(self, text):
        raise OSError(28, "No space left on device")


def test_an_output_that_cannot_be_written_is_one_line_and_status_1(monkeypatch, capsys):
    # (`modtensor stats > /dev/full` printed an OSError traceback)
    monkeypatch.setattr(sys, "stdout", _FullDisk())
    code = cli.main(["stats"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines()[-1] == "modtensor: error: cannot write the output: [Errno 28] No space left on device"
    assert "Traceback" not in err
