"""Distributed bundles in real multi-process gloo groups on the CPU, against the unsharded model.

One run per world size (2 and 4) executes every check of `distributed_checks.py` in every rank;
each check is then one test here, so a failure names the check and shows each rank's traceback.
Processes are forked from a fork server that has imported torch once (a fresh interpreter per
rank costs several seconds); a hang fails after a deadline instead of blocking the suite.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distributed_checks
import modtensor as mt
from modtensor._strategies import STRATEGIES

WORLD_SIZES = (2, 4)
DEADLINE_S = 120  # the whole run of one world size; a normal one takes a few seconds

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is unavailable in this build of torch",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(world: int, out_dir: Path) -> dict[int, dict[str, str | None]]:
    import torch.multiprocessing as tmp

    # A fork server that imported these once forks each rank ready to run (where there is
    # none, as on Windows, each rank starts a fresh interpreter).
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        multiprocessing.forkserver.set_forkserver_preload(
            ["torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.tensor", "torch.nn.parallel"]
        )
    modtensor_dir = str(Path(mt.__file__).resolve().parent)
    context = tmp.start_processes(
        distributed_checks.run,
        args=(world, _free_port(), str(out_dir), modtensor_dir),
        nprocs=world,
        join=False,
        start_method=method,
    )
    deadline = time.monotonic() + DEADLINE_S
    problem = None
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in context.processes:
                    p.kill()
                problem = f"the ranks did not finish within {DEADLINE_S} s (a hang?)"
                break
    except Exception as e:  # outside the checks (setup, teardown), or a rank that died
        problem = f"a rank failed outside the checks: {e}"
    # Each rank wrote what ran so far: the checks that did not run report the problem.
    results = {}
    for r in range(world):
        path = out_dir / f"rank{r}.json"
        results[r] = json.loads(path.read_text()) if path.exists() else {}
        if problem:
            results[r]["problem"] = problem
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[int, dict[str, str | None]]]:
    return {world: _run(world, tmp_path_factory.mktemp(f"world{world}")) for world in WORLD_SIZES}


@pytest.mark.parametrize("name", list(distributed_checks.CHECKS))
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_distributed(results: dict[int, dict[int, dict[str, str | None]]], world: int, name: str) -> None:
    ranks = results[world]
    setup = [f"rank {r}: {out['setup']}" for r, out in ranks.items() if out.get("setup")]
    assert not setup, "\n".join(setup)
    outcomes = {r: out.get(name, f"the check did not run: {out.get('problem')}") for r, out in ranks.items()}
    if all(o is not None and o.startswith("skip:") for o in outcomes.values()):
        pytest.skip(str(outcomes[0])[len("skip: ") :])
    failed = {r: o for r, o in outcomes.items() if o is not None}
    assert not failed, "\n".join(f"--- rank {r} of {world} ---\n{o}" for r, o in failed.items())


def test_group_needs_an_initialized_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        mt.bundle([torch.ones(2)], group=object())


def test_single_process_group() -> None:
    """A group of one process in this process: the distributed path end to end, in milliseconds."""
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        w = torch.randn(3, 4, requires_grad=True)
        b = mt.bundle({"w": w, "v": torch.ones(2)}, group=dist.group.WORLD)
        assert b.group is dist.group.WORLD and b.shape == (14,)
        reference = torch.cat([w.reshape(-1), torch.ones(2)])
        for f in (torch.sum, torch.mean, torch.std, torch.amax, torch.linalg.vector_norm):
            torch.testing.assert_close(f(b), f(reference))
        (b**2).sum().backward()
        torch.testing.assert_close(w.grad, 2 * w.detach())
        with pytest.raises(mt.UnsupportedOperationError, match="torch.argmax on ParameterBundle of 2 tensors"):
            torch.argmax(b)
        assert "(shards of rank 0 of 1)" in b.describe()

        class Largest(mt.Strategy):
            name = "largest_of_tensors"

            def reduce(self, call):  # type: ignore[no-untyped-def]
                return max(float(call.per_tensor(i)) for i in range(len(call.bundle.names)))

        mt.register_strategy(Largest())
        try:
            with pytest.raises(mt.UnsupportedOperationError, match="has no distributed form"):
                b.with_strategy("largest_of_tensors").sum()
        finally:
            del STRATEGIES["largest_of_tensors"]
        torch.testing.assert_close(b.per_param().sum().to_dict()["v"], torch.tensor(2.0))
    finally:
        dist.destroy_process_group()


def test_out_is_what_is_refused_on_a_distributed_bundle() -> None:
    """`torch.sum(b, 0, out=t)` said torch.sum "is not in the dispatch table": it is; out= is not taken."""
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        b = mt.bundle({"w": torch.randn(3, 4), "v": torch.ones(2)}, group=dist.group.WORLD)
        for call in (lambda: torch.sum(b, 0, out=torch.empty(())), lambda: torch.linalg.vector_norm(b, out=torch.empty(()))):
            with pytest.raises(mt.UnsupportedOperationError, match="takes no out= \\(call it without out=") as caught:
                call()
            assert "not in the dispatch table" not in str(caught.value)
        with pytest.raises(mt.UnsupportedOperationError, match="does not take these arguments") as caught:
            torch.all(b, dim=())
        assert "not in the dispatch table" not in str(caught.value)
        with pytest.raises(mt.UnsupportedOperationError, match="torch.cumsum .* is not in the dispatch table"):
            torch.cumsum(b, 0)
        torch.testing.assert_close(torch.sum(b, 0), b.materialize().sum())  # what works
    finally:
        dist.destroy_process_group()
