"""Data-parallel runs under `torchrun`: ranks share the books, rank 0 writes the results.

Launched by `torchrun` (environment `WORLD_SIZE` > 1), each process joins the process group (`nccl` on GPUs,
`gloo` on CPUs), uses `cuda:LOCAL_RANK` when CUDA is available, and scores the batches `assign` gives it:
the batches of the whole selection (the same on every rank: see `tasks.librilight._batches`), each to the least loaded
rank, longest first. A book's numbers therefore do not depend on the number of processes. Without torchrun
(`WORLD_SIZE` unset or 1) there is one rank and no process group.
"""
from dataclasses import dataclass
import heapq
import os
import sys
import typing as tp

import torch
import torch.distributed as dist

from .errors import MoshiEvalError


@dataclass
class Ranks:
    """This process's place among the ranks of the run."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        """Prefix of this rank's log lines ("" when alone)."""
        return f"[rank {self.rank}/{self.world}] " if self.active else ""

    def broadcast(self, value: tp.Any) -> tp.Any:
        """Rank 0's `value`, on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: tp.Any) -> list[tp.Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.active:
            return [value]
        values: list[tp.Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active:
            shutdown()


def shutdown() -> None:
    """Destroy the process group if this process joined one; a no-op otherwise (idempotent).

    Every path out of a torchrun process must come through here (`cli.main` calls it last): a process that
    exits with its gloo group alive aborts at exit ("terminate called without an active exception", SIGABRT)
    when its worker threads are torn down with the interpreter.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class DistributedError(MoshiEvalError, RuntimeError):
    """A multi-process environment that is not torchrun's (the message says what is missing)."""


def from_environment() -> Ranks:
    """The ranks torchrun describes in the environment; joins the process group if there are several
    (saying so on stderr: a rank waits there until every other rank has started)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "-1")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise DistributedError(f"WORLD_SIZE / RANK / LOCAL_RANK must be integers ({exc}).") from None
    if world <= 1:
        return Ranks()
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if rank < 0:
        missing.insert(0, "RANK")
    if missing or not 0 <= rank < world:
        raise DistributedError(
            f"WORLD_SIZE={world} asks for {world} processes, but {', '.join(missing) or f'RANK={rank}'} "
            f"{'is' if len(missing) == 1 else 'are'} {'not set' if missing else 'out of range'}: launch several "
            "processes with `torchrun --nproc-per-node N -m moshi_eval ...`, or unset WORLD_SIZE and RANK to run "
            "one process.")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    if not dist.is_initialized():
        print(f"moshi-eval: [rank {rank}/{world}] joining the process group at {os.environ['MASTER_ADDR']}:"
              f"{os.environ['MASTER_PORT']}: waiting for the other {world - 1} rank(s) to start...",
              file=sys.stderr, flush=True)
        dist.init_process_group(backend=backend)
    return Ranks(rank, world, local_rank)


def rank_device(device: str | None, ranks: Ranks) -> str | None:
    """`cuda:LOCAL_RANK` for a rank of a multi-process run on CUDA (unless another device is named)."""
    if not ranks.active or not torch.cuda.is_available():
        return device
    if device is None or device == "cuda":
        return f"cuda:{ranks.local_rank}"
    return device


def assign(costs: tp.Sequence[float], world: int) -> list[int]:
    """The rank of each item: longest first, each to the least loaded rank (ties: lowest rank, then the
    item's index), so every rank computes the same split from the same costs."""
    owners = [0] * len(costs)
    loads = [(0.0, rank) for rank in range(world)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + costs[index], rank))
    return owners
