"""Data-parallel training on ``torch.distributed``: bucketed reductions, owned refreshes.

Under ``DistributedDataParallel`` every rank sees ``1/P`` of the global batch, and DDP
averages the gradients. :class:`kfe.KFEOptimizer` keeps every rank's state equal to a
single process's on the global batch by reducing what is computed from *local* data,
once per statistic update, in one flat buffer (not one collective per layer):

- the batch Kronecker factors of every block, before the EMA (a mean over ranks of
  means over equal local batches is the global mean):

  .. math::  A = \\frac1P \\sum_r A_r, \\qquad B = \\frac1P \\sum_r B_r ;

- EKFAC's per-example squared projections ``E_i[(U_B^T G_i U_A)^2]``, in the new basis.

The eigendecompositions, the expensive part of a refresh, are split: each factor (``A``
and ``B`` of every block separately) has one *owner* rank, chosen by a greedy balance
of the ``d^3`` costs (:func:`assign_owners`), which decomposes it, aligns the new
eigenvectors to the old ones, and broadcasts the outcome (eigenvalues, eigenvectors,
success) in one flat buffer per owner. Every rank then holds bitwise the same bases.

Every collective goes through :class:`Communicator`, which counts and times them and
turns a failure (a dead or hung rank, a timeout) into a :class:`CollectiveError` that
names the collective and the optimizer step. In a single process (``torch.distributed``
not initialised, or world size 1) nothing here runs: no collective, no buffer.

Launching: :func:`init_from_env` initialises the process group from ``torchrun``'s
environment, see ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from kfe.eigh import Solved
from kfe.profiling import phase

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "CollectiveError",
    "Communicator",
    "assign_owners",
    "init_from_env",
    "is_main_process",
    "shutdown",
    "world",
]

DEFAULT_TIMEOUT_S = 600.0
"""Default process-group timeout of :func:`init_from_env` (torch's own NCCL default)."""


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only process): the one that logs and saves."""
    return world()[0] == 0


def init_from_env(
    backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[int, int]:
    """Initialise the default process group from ``torchrun``'s environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    Without ``WORLD_SIZE`` (a plain ``python script.py``) it does nothing and returns
    ``(0, 1)``; if the group is already initialised it returns its ``(rank, size)``.

    Args:
        backend: ``"nccl"``, ``"gloo"``, ...; default ``nccl`` when CUDA is available,
            else ``gloo``. With CUDA, the device is set to ``cuda:LOCAL_RANK``.
        timeout_s: the process group's timeout: a collective that does not complete
            within it (DDP's gradient all-reduce, the optimizer's reductions, unless
            ``comm_timeout_s`` gives them their own) fails instead of hanging.

    Returns:
        ``(rank, world_size)``.
    """
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    if dist.is_initialized():
        return world()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE is set but {', '.join(missing)} not: launch with torchrun "
            "(or set every rendezvous variable)"
        )
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
    elif "nccl" in backend:
        raise RuntimeError(f"backend {backend!r} needs a CUDA device for LOCAL_RANK={local_rank}")
    dist.init_process_group(
        backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s)
    )
    return rank, size


def shutdown(barrier: bool = False) -> None:
    """Destroy the default process group and every group made from it (the optimizer's
    own, with ``comm_timeout_s``), if one is initialised; otherwise do nothing.

    Call it when a distributed run ends: a process that exits with live groups leaves
    their worker threads to the interpreter's teardown, which can abort it ("terminate
    called without an active exception") after all its work succeeded. With
    ``barrier``, first wait until every rank is here, so that no rank closes its
    connections while a peer still uses them (that too can abort the peer at exit: seen
    in about half of the 2-rank benchmark's quick runs on one machine without it). Only
    on a path every rank reaches: after an error on one rank the barrier would wait for
    the process group's timeout. Even so, with torch 2.13 gloo's threads abort about one
    teardown in six on rank 0 here, after everything is done: see :func:`exit_now`.
    """
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def exit_now() -> None:
    """Flush stdout and stderr and end the process with status 0, skipping the
    interpreter's teardown.

    For a rank whose work is done and written: gloo's threads can abort the teardown
    ("terminate called without an active exception", seen in CI even after
    ``destroy_process_group``, and on rank 0 of 1 quick benchmark run in 6 here), which
    a launcher reports as a failed run. ``kfe train`` under torchrun and the 2-rank
    benchmark's workers leave this way.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def assign_owners(costs: Sequence[int | float], world_size: int) -> list[int]:
    """The owner rank of each job: greedy balance (LPT) of the costs over the ranks.

    Jobs are taken by decreasing cost (ties: lower index first) and each goes to the
    rank with the least total cost so far (ties: lower rank). Pure and deterministic:
    every rank computes the same list. Graham's bound holds for the busiest rank,

    .. math::  \\max_r L_r \\le \\frac{1}{P} \\sum_k c_k + \\max_k c_k .

    For eigendecompositions the cost of a ``d x d`` factor is ``d^3``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, not {world_size}")
    heap = [(0.0, rank) for rank in range(world_size)]  # (load, rank): pops least, then lowest
    owners = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        load, rank = heapq.heappop(heap)
        owners[k] = rank
        heapq.heappush(heap, (load + costs[k], rank))
    return owners


class CollectiveError(RuntimeError):
    """A collective of the optimizer failed or timed out (another rank probably died)."""


class Communicator:
    """The optimizer's collectives: bucketed, counted, timed, with errors that say what.

    Inactive (``world_size == 1``) unless built by :meth:`resolve` under an initialised
    process group with more than one rank; an inactive communicator is never called.

    Attributes:
        rank, world_size: this process's place in the group.
        group: the process group of the collectives (``None``: the default group).
        timeout: the timeout each collective is waited with (``None``: the group's).
        calls, seconds, nbytes: per ``"op:what"`` key, the number of collectives, the
            wall time spent issuing and waiting for them (waiting for a slower rank
            included), and the bytes of their buffers.
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        group: Any = None,
        timeout: timedelta | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.timeout = timeout
        self.calls: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.nbytes: Counter[str] = Counter()

    @classmethod
    def resolve(cls, timeout_s: float | None = None) -> Communicator:
        """The communicator of the current process group (inactive without one).

        With ``timeout_s``, the collectives run in a new group over every rank with that
        timeout (``dist.new_group``, itself a collective: every rank must call this, as
        every rank builds and steps the optimizer).
        """
        rank, size = world()
        if size == 1:
            return cls()
        group, timeout = None, None
        if timeout_s is not None:
            timeout = timedelta(seconds=timeout_s)
            group = dist.new_group(timeout=timeout)
        return cls(rank, size, group, timeout)

    @property
    def active(self) -> bool:
        """Whether there is anyone to talk to."""
        return self.world_size > 1

    def total_seconds(self) -> float:
        """Wall time spent in all collectives so far."""
        return float(sum(self.seconds.values()))

    # -- collectives ----------------------------------------------------------------

    def average(
        self, entries: Sequence[tuple[Sequence[Tensor], bool]], *, what: str, step: int
    ) -> list[list[Tensor] | None]:
        """Mean over the ranks that have it of each entry, in one all-reduce per dtype.

        Entry ``k`` is ``(tensors, present)``; every rank passes the same shapes and
        dtypes (zeros where ``present`` is false). One flat buffer holds a presence
        count per entry and then every tensor; after a summing all-reduce, entry ``k``
        is ``sum / count`` (fresh tensors, not views of the buffer), or ``None`` where
        no rank had it.
        """
        with phase("kfe/comm"):
            return self._average(entries, what, step)

    def _average(
        self, entries: Sequence[tuple[Sequence[Tensor], bool]], what: str, step: int
    ) -> list[list[Tensor] | None]:
        out: list[list[Tensor] | None] = [None] * len(entries)
        for keys in _buckets([e[0][0] for e in entries]).values():
            first = entries[keys[0]][0][0]
            flags = torch.tensor(
                [float(entries[k][1]) for k in keys], dtype=first.dtype, device=first.device
            )
            buffer = torch.cat([flags, *(t.reshape(-1) for k in keys for t in entries[k][0])])
            with self._guard("all_reduce", what, step, buffer):
                self._wait(
                    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
                )
            counts = buffer[: len(keys)].tolist()
            offset = len(keys)
            for k, count in zip(keys, counts, strict=True):
                parts = []
                for t in entries[k][0]:
                    parts.append(buffer[offset : offset + t.numel()].view(t.shape) / count)
                    offset += t.numel()
                out[k] = parts if count > 0 else None
        return out

    def broadcast_from_owners(
        self,
        sizes: Sequence[int],
        like: Sequence[Tensor],
        owners: Sequence[int],
        solve: Callable[[int], Solved],
        *,
        what: str,
        step: int,
    ) -> list[Solved]:
        """Each job solved by its owner only; every rank gets every result, bitwise.

        Job ``k`` is the eigendecomposition of a ``sizes[k]``-square matrix with the
        dtype and device of ``like[k]``; ``solve(k)`` runs it (called on the owner only).
        Jobs are bucketed per (owner, dtype, device); a bucket is one flat buffer of a
        success flag per job, then ``(values, vectors)`` per job, and one broadcast per
        bucket moves it. Broadcasts are issued asynchronously in bucket order (the same
        on every rank): a rank posts the receives from lower owners before it starts its
        own jobs, so that those transfers overlap its compute, and waits for all at the
        end.

        Why a broadcast per owner rather than one all-reduce of a zero-filled buffer of
        every basis: a broadcast moves each basis once to every other rank and adds
        nothing, whereas a (ring) all-reduce moves about twice the whole buffer through
        every rank and sums it; the ``P`` broadcasts cost ``P`` latencies, negligible
        beside megabytes of eigenvectors.
        """
        results: list[Solved] = [None] * len(sizes)
        pending = []
        for (owner, *_), keys in sorted(_buckets(like, owners).items()):
            first = like[keys[0]]
            if owner == self.rank:
                for k in keys:
                    results[k] = solve(k)  # outside "kfe/comm": the solver opens "kfe/eigh"
            with phase("kfe/comm"):
                if owner == self.rank:
                    buffer = _pack([results[k] for k in keys], [sizes[k] for k in keys], first)
                else:
                    total = len(keys) + sum(sizes[k] * (sizes[k] + 1) for k in keys)
                    buffer = torch.empty(total, dtype=first.dtype, device=first.device)
                with self._guard("broadcast", what, step, buffer, src=owner):
                    # our group spans every rank, so its ranks are the global ranks
                    work = dist.broadcast(buffer, owner, group=self.group, async_op=True)
            pending.append((owner, keys, buffer, work))
        with phase("kfe/comm"):
            for owner, keys, buffer, work in pending:
                with self._guard("broadcast", what, step, buffer, src=owner, count=False):
                    self._wait(work)
                if owner != self.rank:
                    unpacked = _unpack(buffer, [sizes[k] for k in keys])
                    for k, found in zip(keys, unpacked, strict=True):
                        results[k] = found
        return results

    # -- plumbing ---------------------------------------------------------------------

    def _wait(self, work: Any) -> None:
        if self.timeout is None:
            work.wait()
        else:
            work.wait(self.timeout)

    @contextlib.contextmanager
    def _guard(
        self,
        op: str,
        what: str,
        step: int,
        buffer: Tensor,
        *,
        src: int | None = None,
        count: bool = True,
    ) -> Iterator[None]:
        """Time (and count) one collective; re-raise a failure as :class:`CollectiveError`
        naming the collective and the step, chaining the backend's exception."""
        key = f"{op}:{what}"
        size = buffer.numel() * buffer.element_size()
        start = time.perf_counter()
        try:
            yield
        except RuntimeError as err:
            limit = (
                f"{self.timeout.total_seconds():g} s"
                if self.timeout is not None
                else "the process group's"
            )
            source = "" if src is None else f" from rank {src}"
            raise CollectiveError(
                f"kfe: {op} of {what}{source} ({size} bytes) at optimizer step {step} failed "
                f"on rank {self.rank} of {self.world_size} (timeout: {limit}). Another rank "
                "probably died, raised an error or stopped calling optimizer.step() in step "
                f"with this one: see its log. Backend error: {err}"
            ) from err
        finally:
            self.seconds[key] += time.perf_counter() - start
        if count:
            self.calls[key] += 1
            self.nbytes[key] += size


def _buckets(
    like: Sequence[Tensor], owners: Sequence[int] | None = None
) -> dict[tuple[Any, ...], list[int]]:
    """Indices grouped by ``(owner, dtype, device)`` (or ``(dtype, device)``), in order."""
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for k, t in enumerate(like):
        key: tuple[Any, ...] = (str(t.dtype), str(t.device))
        if owners is not None:
            key = (owners[k], *key)
        buckets.setdefault(key, []).append(k)
    return buckets


def _pack(found: Sequence[Solved], sizes: Sequence[int], like: Tensor) -> Tensor:
    """``[flags, values_0, vectors_0, values_1, ...]``; a failed job is zeros, flag 0."""
    flags = torch.tensor(
        [float(f is not None) for f in found], dtype=like.dtype, device=like.device
    )
    parts = [flags]
    for f, d in zip(found, sizes, strict=True):
        if f is None:
            parts.append(torch.zeros(d * (d + 1), dtype=like.dtype, device=like.device))
        else:
            parts += [f[0].reshape(-1), f[1].reshape(-1)]
    return torch.cat(parts)


def _unpack(buffer: Tensor, sizes: Sequence[int]) -> list[Solved]:
    """Inverse of :func:`_pack` (fresh tensors: a basis never aliases the buffer)."""
    flags = buffer[: len(sizes)].tolist()
    out: list[Solved] = []
    offset = len(sizes)
    for flag, d in zip(flags, sizes, strict=True):
        values = buffer[offset : offset + d]
        vectors = buffer[offset + d : offset + d * (d + 1)].view(d, d)
        out.append((values.clone(), vectors.clone()) if flag else None)
        offset += d * (d + 1)
    return out
