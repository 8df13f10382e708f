"""Data-parallel training on ``torch.distributed``: gloo on loopback (CPU), and nccl.

Each distributed scenario runs this file as a script in ``WORLD_SIZE`` subprocesses
(the environment ``torchrun`` would set, read by :func:`kfe.distributed.init_from_env`);
the ranks write their results to files the tests compare with a single process on the
same global batch. The 2-rank training job runs once per backend and session (a module
fixture): ``gloo`` on the CPU always; ``nccl`` with one GPU per rank (and the single
process on the first GPU) where two CUDA devices are visible, skipped otherwise (nccl
does not put two ranks on one device).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kfe import KFEOptimizer, Registry, load_registry
from kfe.distributed import assign_owners, init_from_env, is_main_process, shutdown

WIDTHS = (64, 32, 16, 8, 4, 8, 16, 32, 64)
"""The MNIST auto-encoder's shape (784-1000-...-784) at reduced width: 8 Linear layers,
16 Kronecker factors."""
CODE = 4  # index of the linear code layer (no tanh after it)
GLOBAL_BATCH = 96  # > 65, the largest factor side: every factor is full rank
STEPS, SAVE_AT = 10, 5
SETTINGS: dict[str, Any] = dict(
    lr=0.05,
    damping=1.0,  # see TOLERANCE
    momentum=0.9,
    weight_decay=1e-4,
    factor_every=1,
    basis_every=3,  # refreshes at steps 0, 3, 6, 9
    lambda_every=2,
)
CONFIGS: dict[str, dict[str, Any]] = {
    "ekfac-ema": dict(rule="ekfac"),
    "ekfac-batch": dict(rule={"name": "ekfac", "estimator": "batch"}),
    "kfac": dict(rule="kfac"),
    "ekfac-all": dict(rule="ekfac", distributed_eigh="all"),
    "soap": dict(rule="adam", basis="shampoo"),
    "ekfac-fail": dict(rule="ekfac"),  # the eigh of one factor fails at one refresh
}
FAIL_STEP, FAIL_SIDE = 3, 65  # the 65 x 65 factor (the first layer's A) at step 3
EQUAL_TO_ONE_PROCESS = ("ekfac-ema", "ekfac-batch", "kfac", "ekfac-all", "ekfac-fail")
"""Not ``soap``: Adam in the eigenbasis of near-degenerate gradient singular vectors (the
layers after the 4-unit code) amplifies round-off: a 1e-15 relative change of the
gradient moves its first step by a few percent. Its ranks must still agree bitwise."""
TOLERANCE = {"kfac": 1e-12}
"""Relative tolerance against one process (float64). K-FAC agrees to round-off. EKFAC's
Lambda in the eigenvectors of the near-singular factors after the code layer (smallest
eigenvalue 1e-12 of the largest) inherits their ill-determination, by a few 1e-10 at
this damping (1e-6 at damping 0.1): the default for EKFAC is 1e-7."""
REFRESHES = len(range(0, STEPS, SETTINGS["basis_every"]))
TIMEOUT_S = 4.0
ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
BACKENDS = {"train": "gloo", "train-nccl": "nccl"}
"""The training scenario of each backend (gloo ranks on the CPU, nccl ranks on GPUs)."""
NCCL_READY = torch.cuda.device_count() >= 2 and dist.is_nccl_available()


# -- the model and the training loop, shared by the test process and the ranks -------


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(WIDTHS)):
        layers.append(nn.Linear(d_in, d_out))
        if i not in (CODE - 1, len(WIDTHS) - 2):
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).double()


def batches() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(STEPS, GLOBAL_BATCH, WIDTHS[0], generator=g, dtype=torch.float64)


def train(
    model: nn.Module,
    opt: KFEOptimizer,
    steps: range,
    rank: int = 0,
    world_size: int = 1,
    save_to: Path | None = None,
    device: torch.device = CPU,
) -> None:
    """Rank ``r`` of ``P`` trains on rows ``r::P`` of each global batch; the loss is the
    BCE summed over pixels, averaged over the (local) batch, so DDP's gradient average is
    the global batch's gradient. With ``save_to``, a checkpoint is saved before step
    ``SAVE_AT``."""
    data = batches()
    for s in steps:
        if save_to is not None and s == SAVE_AT:
            save(save_to, getattr(model, "module", model), opt)
        x = data[s, rank::world_size].to(device)
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x), x, reduction="sum") / x.shape[0]
        loss.backward()
        opt.step()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """As the ranks run: one thread (and no oversubscription on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def eigh_failure(opt: KFEOptimizer, name: str) -> Iterator[None]:
    """For ``ekfac-fail``: the solver fails on the ``FAIL_SIDE`` factor at ``FAIL_STEP``
    (on its owner rank only, under distribution: the others learn it by broadcast)."""
    import kfe.refresh

    real = kfe.refresh.robust_eigh

    def failing(factor: torch.Tensor, *args: Any) -> Any:
        if opt.steps_taken == FAIL_STEP and factor.shape[0] == FAIL_SIDE:
            return None
        return real(factor, *args)

    if name == "ekfac-fail":
        kfe.refresh.robust_eigh = failing  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "layer '0': eigendecomposition failed")
            yield
    finally:
        kfe.refresh.robust_eigh = real


def registry_for_tests() -> Registry:
    from conftest import BUILTIN_PLUGINS  # the ranks run this file as a script

    return load_registry(BUILTIN_PLUGINS)


def single_run(
    registry: Registry,
    name: str,
    steps: range,
    load: Path | None = None,
    device: torch.device = CPU,
) -> tuple[nn.Module, KFEOptimizer]:
    model = make_model().to(device)
    opt = KFEOptimizer(model, registry=registry, **SETTINGS, **CONFIGS[name])
    if load is not None:
        saved = torch.load(load, weights_only=True, map_location=device)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
    with eigh_failure(opt, name):
        train(model, opt, steps, device=device)
    return model, opt


def host(params: Any) -> list[torch.Tensor]:
    """Detached CPU copies of parameters (what the tests compare)."""
    return [p.detach().cpu().clone() for p in params]


def save(path: Path, model: nn.Module, opt: KFEOptimizer) -> None:
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)


# -- launching ranks ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    scenario: str, out: Path, world_size: int = 2, wait_for: int | None = None
) -> list[subprocess.CompletedProcess[str]]:
    """Run ``scenario`` on ``world_size`` ranks; with ``wait_for``, kill the others once
    that rank has exited (a rank left hanging on purpose)."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, scenario, str(out)],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    if wait_for is not None:
        procs[wait_for].wait(timeout=120)
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for rank, p in enumerate(procs):
        stdout, _ = p.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout))
        (out / f"rank{rank}.log").write_text(stdout)
    return results


def _check(results: list[subprocess.CompletedProcess[str]]) -> None:
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} failed:\n{r.stdout[-4000:]}"


# -- the ranks' side ----------------------------------------------------------------


def rank_train(out: Path, rank: int, world_size: int, device: torch.device) -> None:
    """Each config: train STEPS (checkpoint at SAVE_AT), then resume from that checkpoint
    and from the single process's, and record everything the tests compare."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    def wrap(model: nn.Module) -> nn.Module:
        ids = None if device.type == "cpu" else [device]
        return DDP(model.to(device), device_ids=ids)

    registry = registry_for_tests()
    results: dict[str, Any] = {}
    for name, settings in CONFIGS.items():
        model = make_model()
        ddp = wrap(model)
        opt = KFEOptimizer(ddp, registry=registry, **SETTINGS, **settings)

        saved_to = out / f"{name}-ws{world_size}.pt" if is_main_process() else None
        with eigh_failure(opt, name):
            train(ddp, opt, range(STEPS), rank, world_size, saved_to, device)
        comm = opt.communicator
        entry: dict[str, Any] = {
            "params": host(model.parameters()),
            "state": opt.state_dict(),
            "decompositions": opt.decompositions,
            "cost": opt.decomposition_cost,
            "owners": [[*k, v] for k, v in opt.eigh_owners.items()],
            "calls": dict(comm.calls),
        }
        torch.distributed.barrier()
        for source in (world_size, 1):  # resume from this run's checkpoint, and from 1 rank's
            resumed = make_model()
            saved = torch.load(
                out / f"{name}-ws{source}.pt", weights_only=True, map_location=device
            )
            resumed.load_state_dict(saved["model"])
            rddp = wrap(resumed)
            ropt = KFEOptimizer(rddp, registry=registry, **SETTINGS, **settings)
            ropt.load_state_dict(saved["opt"])
            with eigh_failure(ropt, name):
                train(rddp, ropt, range(SAVE_AT, STEPS), rank, world_size, device=device)
            entry[f"resumed-ws{source}"] = host(resumed.parameters())
        results[name] = entry
    torch.save(results, out / f"rank{rank}.pt")


def rank_fail(out: Path, rank: int, world_size: int, mode: str) -> None:
    """Rank 1 raises inside ``opt.step()`` (``dies``) or stops in it (``hangs``) at step 2,
    before the first collective; rank 0 records the error it gets and how long its step
    took. No DDP here (its import of ``torch._dynamo`` costs seconds): the optimizer's
    collectives are what is tested."""
    model = make_model()
    opt = KFEOptimizer(model, registry=registry_for_tests(), **SETTINGS, comm_timeout_s=TIMEOUT_S)
    if rank == 1:
        real = opt.source.batch_factors

        def failing(*args: Any) -> Any:
            if opt.steps_taken == 2:
                if mode == "hangs":
                    time.sleep(10 * TIMEOUT_S)
                raise RuntimeError("rank 1 fails on purpose")
            return real(*args)

        opt.source.batch_factors = failing  # type: ignore[method-assign]
    data = batches()
    for s in range(4):
        x = data[s, rank::world_size]
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(x), x, reduction="sum").backward()
        if rank != 0:
            opt.step()
            continue
        start = time.perf_counter()
        try:
            opt.step()
        except Exception as err:
            report = {
                "type": type(err).__name__,
                "message": str(err),
                "cause": type(err.__cause__).__name__,
                "elapsed": time.perf_counter() - start,
                "step": s,
            }
            (out / "error.json").write_text(json.dumps(report))
            return


def worker(scenario: str, out: Path) -> None:
    torch.set_num_threads(1)
    backend = BACKENDS.get(scenario, "gloo")
    rank, world_size = init_from_env(backend, timeout_s=60)
    assert (rank, world_size) == (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    if scenario in BACKENDS:  # init_from_env set the device to cuda:LOCAL_RANK for nccl
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else CPU
        rank_train(out, rank, world_size, device)
    else:
        rank_fail(out, rank, world_size, scenario)
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's teardown (seconds); results are on disk


# -- the tests ----------------------------------------------------------------------


@pytest.fixture(
    scope="module",
    params=[
        "train",
        pytest.param(
            "train-nccl",
            marks=pytest.mark.skipif(
                not NCCL_READY, reason="nccl: needs two visible CUDA devices, one per rank"
            ),
        ),
    ],
    ids=["gloo", "nccl"],
)
def two_ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The single-process runs (with their checkpoints at SAVE_AT), then the 2-rank job,
    on the CPU for gloo and on the first GPU for nccl."""
    scenario = request.param
    device = torch.device("cuda", 0) if BACKENDS[scenario] == "nccl" else CPU
    out = tmp_path_factory.mktemp(BACKENDS[scenario])
    registry = registry_for_tests()
    single = {}
    with one_thread():
        for name in CONFIGS:
            model, opt = single_run(registry, name, range(SAVE_AT), device=device)
            save(out / f"{name}-ws1.pt", model, opt)
            with eigh_failure(opt, name):
                train(model, opt, range(SAVE_AT, STEPS), device=device)
            single[name] = host(model.parameters())
    _check(launch(scenario, out))
    ranks = [
        torch.load(out / f"rank{r}.pt", weights_only=True, map_location="cpu") for r in range(2)
    ]
    return {"out": out, "single": single, "ranks": ranks, "registry": registry, "device": device}


def assert_params_close(
    actual: list[torch.Tensor], expected: list[torch.Tensor], name: str
) -> None:
    rtol = TOLERANCE.get(name, 1e-7)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * e.abs().max().item())


@pytest.mark.parametrize("name", EQUAL_TO_ONE_PROCESS)
def test_two_ranks_equal_one_process_on_the_global_batch(two_ranks, name) -> None:
    for rank in two_ranks["ranks"]:
        assert_params_close(rank[name]["params"], two_ranks["single"][name], name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ranks_hold_bitwise_identical_state(two_ranks, name) -> None:
    first, second = (r[name] for r in two_ranks["ranks"])
    for a, b in zip(first["params"], second["params"], strict=True):
        assert torch.equal(a, b)
    assert_identical(first["state"], second["state"])


def test_one_collective_per_statistic_update(two_ranks) -> None:
    steps = range(STEPS)
    factor_steps = len(steps)  # factor_every=1
    lambda_steps = sum(
        s % SETTINGS["lambda_every"] == 0 or s % SETTINGS["basis_every"] == 0 for s in steps
    )
    for rank in two_ranks["ranks"]:
        assert rank["ekfac-ema"]["calls"] == {
            "all_reduce:factor statistics": factor_steps,
            "all_reduce:squared projections": lambda_steps,
            "broadcast:eigenbases": 2 * REFRESHES,  # one per owner rank
        }
        assert rank["kfac"]["calls"] == {
            "all_reduce:factor statistics": factor_steps,
            "broadcast:eigenbases": 2 * REFRESHES,
        }
        # Shampoo's factors come from the averaged gradient: nothing to reduce
        assert rank["soap"]["calls"] == {"broadcast:eigenbases": 2 * REFRESHES}
        assert "broadcast:eigenbases" not in rank["ekfac-all"]["calls"]


def test_owner_assignment_balances_cubic_cost(two_ranks) -> None:
    model = make_model()
    sides = [
        d for m in model if isinstance(m, nn.Linear) for d in (m.in_features + 1, m.out_features)
    ]
    assert len(sides) == 16
    costs = [d**3 for d in sides]
    owners = assign_owners(costs, 2)
    ranks = two_ranks["ranks"]
    assert ranks[0]["ekfac-ema"]["owners"] == ranks[1]["ekfac-ema"]["owners"]
    assert [o for *_, o in ranks[0]["ekfac-ema"]["owners"]] == owners
    bound = sum(costs) / 2 + max(costs)
    for r, rank in enumerate(ranks):
        mine = [c for c, o in zip(costs, owners, strict=True) if o == r]
        assert rank["ekfac-ema"]["decompositions"] == REFRESHES * len(mine)
        assert rank["ekfac-ema"]["cost"] == REFRESHES * sum(mine) <= REFRESHES * bound
        # "all": every rank decomposes every factor
        assert rank["ekfac-all"]["decompositions"] == REFRESHES * 16
        assert rank["ekfac-all"]["cost"] == REFRESHES * sum(costs)
    assert sum(r["ekfac-ema"]["decompositions"] for r in ranks) == REFRESHES * 16


def test_a_failed_eigh_on_its_owner_is_counted_on_every_rank(two_ranks) -> None:
    owners = [o for *_, o in two_ranks["ranks"][0]["ekfac-fail"]["owners"]]
    assert owners[0] in (0, 1)  # the first layer's A: decomposed on one rank only
    for rank in two_ranks["ranks"]:
        first = rank["ekfac-fail"]["state"]["state"][0]  # the first layer's weight
        assert (first["eigh_failures"], first["refreshes"]) == (1, REFRESHES - 1)
        other = rank["ekfac-ema"]["state"]["state"][0]
        assert (other["eigh_failures"], other["refreshes"]) == (0, REFRESHES)


@pytest.mark.parametrize("name", ["ekfac-ema", "kfac"])
def test_checkpoint_moves_between_world_sizes(two_ranks, name) -> None:
    ranks, single = two_ranks["ranks"], two_ranks["single"][name]
    # saved by rank 0 of the 2-rank run, resumed on 2 ranks: the uninterrupted run, bitwise
    for rank in ranks:
        for a, b in zip(rank[name]["resumed-ws2"], rank[name]["params"], strict=True):
            assert torch.equal(a, b)
    # ... and resumed in one process: the same run, to float tolerance
    with one_thread():
        model, _ = single_run(
            two_ranks["registry"],
            name,
            range(SAVE_AT, STEPS),
            two_ranks["out"] / f"{name}-ws2.pt",
            two_ranks["device"],
        )
    assert_params_close(host(model.parameters()), ranks[0][name]["params"], name)
    # saved by one process, resumed on 2 ranks
    for rank in ranks:
        assert_params_close(rank[name]["resumed-ws1"], single, name)


@pytest.mark.parametrize(
    "mode",
    ["dies", pytest.param("hangs", marks=pytest.mark.slow)],  # hangs: waits TIMEOUT_S
)
def test_a_failing_rank_ends_the_run_with_a_clear_error(tmp_path, mode) -> None:
    results = launch(mode, tmp_path, wait_for=0)
    assert results[0].returncode == 0, results[0].stdout[-4000:]
    report = json.loads((tmp_path / "error.json").read_text())
    assert report["type"] == "CollectiveError"
    assert report["step"] == 2
    message = report["message"]
    assert "all_reduce of factor statistics" in message
    assert "optimizer step 2" in message and "rank 0 of 2" in message
    assert "Another rank probably died" in message
    assert report["cause"] != "NoneType"  # the backend's exception is chained
    assert report["elapsed"] < TIMEOUT_S + 5
    if mode == "hangs":
        assert report["elapsed"] > TIMEOUT_S * 0.9
        assert "timeout: 4 s" in message


@pytest.mark.slow  # three processes importing torch (and DDP's torch._dynamo)
def test_benchmark_quick(tmp_path) -> None:
    out = tmp_path / "bench.json"
    script = ROOT / "benchmarks" / "distributed_refresh.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--rounds", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "refresh speed-up" in result.stdout
    summary = json.loads(out.read_text())["summary"]
    dims = (64, 48, 32, 16, 4, 16, 32, 48, 64)  # the benchmark's --quick shape
    owners = assign_owners([d**3 for a, b in itertools.pairwise(dims) for d in (a + 1, b)], 2)
    counts = [r["decompositions"] for r in summary["2"]["ranks"]]
    assert counts == [owners.count(0), owners.count(1)]
    assert summary["2"]["calls"]["broadcast:eigenbases"] > 0
    assert summary["speedup"]["refresh"] > 0
    assert len(summary["round_speedups"]) == 2  # world sizes alternated, then pooled
    report = json.loads(out.read_text())
    for ranks in report["runs"].values():
        timed = [s for s in ranks[0]["steps"] if s["timed"]]
        assert len(timed) == 2 * 2 * 4  # rounds x quick cycles x steps per cycle


def test_single_process_uses_no_collective(registry) -> None:
    with one_thread():
        _, opt = single_run(registry, "ekfac-ema", range(4))
    assert not opt.communicator.active and not opt.communicator.calls
    assert opt.decompositions == 16 * 2  # steps 0 and 3
    assert set(opt.eigh_owners.values()) == {0}


def test_init_from_env_is_a_no_op_without_torchrun(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() == (0, 1)
    assert is_main_process()


def test_shutdown_leaves_the_group_and_is_a_no_op_without_one(tmp_path) -> None:
    shutdown()  # nothing initialised: nothing happens
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    dist.new_group()  # the optimizer's own group, as with comm_timeout_s
    assert dist.is_initialized()
    shutdown(barrier=True)  # one rank: the barrier returns at once
    assert not dist.is_initialized()


def test_assign_owners_is_a_greedy_balance() -> None:
    assert assign_owners([8, 1, 27, 27], 2) == [0, 1, 0, 1]
    assert assign_owners([5, 5, 5], 1) == [0, 0, 0]
    assert assign_owners([], 3) == []
    g = torch.Generator().manual_seed(0)
    for world_size in (2, 3, 5):
        costs = (torch.randint(1, 200, (40,), generator=g) ** 3).tolist()
        owners = assign_owners(costs, world_size)
        loads = [
            sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(world_size)
        ]
        assert max(loads) <= sum(costs) / world_size + max(costs)
        assert owners == assign_owners(costs, world_size)
    with pytest.raises(ValueError, match="world_size"):
        assign_owners([1], 0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_identical(a: Any, b: Any, path: str = "") -> None:
    """Bitwise equality of nested state (NaN equals NaN)."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b)), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_identical(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert_identical(u, v, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), path


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
