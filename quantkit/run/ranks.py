"""The processes of one run under torchrun (torch.distributed): which one this is, its share of the calibration
windows, the Hessians summed across processes, each solve given to one process by its cost, and the results sent
from the process that solved them to all others.

Every process runs the same steps on the same layer: the forwards (and Hessians) on its own windows, the solves of
the groups it owns, then the others' results received, so each holds the same quantized layer before it
propagates its windows to the next. Process 0 writes the finished steps and the output; the others write only
their windows' inputs for a resume. Without torchrun (WORLD_SIZE unset or 1) `Ranks.single()` stands in: every
method is then the identity, and nothing imports torch.distributed.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from quantkit.errors import QuantkitError, first_line
from quantkit.solve.hessian import SUM_DTYPE, mean_of_sum

log = logging.getLogger("quantkit")
T = TypeVar("T")
# how long a process waits in a collective for the others: process 0 assembles and publishes the whole output
# alone, and on a resume re-reads the finished steps' base tensors alone, while the others wait; a process that
# dies closes its connections, which the others see at once
COLLECTIVE_TIMEOUT_HOURS = 24
# what a failed collective leaves, at most points of a run
LAYERS_KEPT = "nothing was published, and the finished layers are kept: rerun the same command to resume"


class RankFailed(QuantkitError):
    """Another process of the run stopped (killed, or failed with its own error): this one cannot go on."""


def under_torchrun() -> bool:
    """This process is one of several that torchrun started (its WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1") or "1") > 1


def spread_by_cost(costs: Sequence[float], load: list[float]) -> list[int]:
    """Each job (costs, in order) given to a process: the costliest first, each to the process with the least load
    so far (ties to the lowest rank). `load`, one entry per process, is updated in place, so that a run's
    successive calls keep evening out. Deterministic: every process computes the same answer."""
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(len(load)), key=lambda r: (load[r], r))
        owners[job] = rank
        load[rank] += costs[job]
    return owners


def solve_cost(in_features: int, out_features: int) -> float:
    """A GPTQ solve's relative cost: the Hessian's factorization (K^3) and the sweep over the rows (N·K^2)."""
    return float(in_features) ** 3 + float(out_features) * in_features**2


def window_share(samples: int, rank: int, world: int) -> slice:
    """Process `rank`'s calibration windows: a contiguous slice, the shares differing by one window at most."""
    return slice(samples * rank // world, samples * (rank + 1) // world)


def batch_share(samples: int, per_batch: int, rank: int, world: int) -> slice:
    """Process `rank`'s calibration windows in whole mini-batches of `per_batch` windows (the last one may be
    short): the mini-batches one process would run, so that each batch's Hessian product is the same (exact sums,
    QuantSpec.exact_sums). The shares differ by one mini-batch at most; with fewer mini-batches than processes
    some are empty (the pipeline refuses such a run)."""
    batches = window_share(-(-samples // per_batch), rank, world)
    return slice(min(batches.start * per_batch, samples), min(batches.stop * per_batch, samples))


def _backend_reason(error: BaseException) -> str:
    """The process group's error, short: its first sentence, without the source location gloo puts first."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error))
    return text.split(". ", 1)[0].rstrip(".")


@dataclass
class Ranks:
    """This process's place in the run (rank of world) and the collectives it takes part in."""
    rank: int = 0
    world: int = 1
    device: torch.device | None = None  # the GPU a torchrun process uses (LOCAL_RANK), None on a CPU
    load: list[float] = field(default_factory=lambda: [0.0])  # the solve cost given to each process so far
    joined: bool = False  # this run joined the process group (and leaves it on close)
    on_term: Any = None  # SIGTERM's handler before the run's own (restored on close, unless the run failed)
    failed: bool = False  # this process fails: it is on its way out

    @classmethod
    def single(cls) -> Ranks:
        return cls()

    @classmethod
    def from_environment(cls, device: torch.device) -> Ranks:
        """Under torchrun (WORLD_SIZE > 1): the process group joined (gloo on a CPU, NCCL for GPUs, one GPU per
        process: LOCAL_RANK's), else the single process. device: the run's (resolved: "cpu" or "cuda")."""
        if not under_torchrun():
            return cls.single()
        world = int(os.environ["WORLD_SIZE"])
        import torch.distributed as dist

        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        gpu = None
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                raise QuantkitError(f"process {rank} of {world} is local process {local} of its node, which sees "
                                    f"{torch.cuda.device_count()} GPU(s): start at most one process per GPU "
                                    "(torchrun --nproc-per-node)")
            gpu = torch.device("cuda", local)
            torch.cuda.set_device(gpu)
        joined = not dist.is_initialized()
        if joined:
            try:  # a process waits in a collective while process 0 alone assembles and publishes a large output
                dist.init_process_group("cpu:gloo,cuda:nccl" if gpu is not None else "gloo",
                                        timeout=datetime.timedelta(hours=COLLECTIVE_TIMEOUT_HOURS))
            except (RuntimeError, ValueError) as e:
                raise QuantkitError(f"cannot join the torchrun run as process {rank} of {world}: {first_line(e)}"
                                    ) from None
        if (dist.get_rank(), dist.get_world_size()) != (rank, world):
            raise QuantkitError(f"the process group ({dist.get_rank()} of {dist.get_world_size()}) disagrees with "
                                f"torchrun's RANK {rank} and WORLD_SIZE {world}")
        ranks = cls(rank, world, gpu, [0.0] * world, joined)
        if joined and threading.current_thread() is threading.main_thread():
            ranks.on_term = signal.signal(signal.SIGTERM, ranks._stopped)
        return ranks

    def _stopped(self, signum: int, frame: Any) -> None:
        """SIGTERM, which torchrun sends the other processes when one fails (or the run is interrupted): this
        one's error line, its work directory kept (the pipeline's error path), then the exit."""
        self.failing()
        raise RankFailed(f"process {self.rank} of {self.world}: stopped by torchrun (another process of the run "
                         "failed, or the run was interrupted); the finished layers are kept: rerun the same command "
                         "to resume")

    @contextlib.contextmanager
    def uninterrupted(self, done: str) -> Iterator[None]:
        """A block that torchrun's SIGTERM does not cut short (a publish's renames, the work directory's removal):
        a SIGTERM in it is told once the block has ended, as stopping this process after `done`."""
        if self.on_term is None or self.failed or threading.current_thread() is not threading.main_thread():
            yield
            return
        pending: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, frame: pending.append(signum))
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, self._stopped)
        if pending:
            self.failing()
            raise RankFailed(f"process {self.rank} of {self.world}: stopped by torchrun (another process of the run "
                             f"failed, or the run was interrupted) after {done}")

    def windows(self, samples: int, whole: int | None = None) -> slice:
        """This process's calibration windows of `samples`: window_share, or with `whole` in whole mini-batches of
        that many windows (batch_share, exact sums)."""
        if whole is None:
            return window_share(samples, self.rank, self.world)
        return batch_share(samples, whole, self.rank, self.world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def _call(self, what: str, collective: Callable[[], T], after: str = LAYERS_KEPT) -> T:
        """A collective whose failure (a peer gone: its connection closed, or a timeout) is one line, ending with
        `after` (what that leaves, at this point of the run). Running out of GPU memory is this process's own
        failure, raised as it is."""
        try:
            return collective()
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            self.failing()
            raise RankFailed(f"process {self.rank} of {self.world}: another process of this torchrun run stopped "
                             f"during {what} ({_backend_reason(e)}); {after}") from None

    def failing(self) -> None:
        """This process of several fails: torchrun's SIGTERM, which follows, no longer interrupts its error path
        (the work directory kept, its one error line), which ends in the process's exit."""
        if not self.distributed:
            return
        self.failed = True
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def barrier(self, what: str, after: str = LAYERS_KEPT) -> None:
        if self.distributed:
            import torch.distributed as dist

            self._call(what, dist.barrier, after)

    def gathered(self, what: str, value: T) -> list[T]:
        """Every process's `value` (picklable), in rank order, on every process."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world
        self._call(what, lambda: dist.all_gather_object(values, value))
        return values

    def from_rank(self, what: str, owner: int, value: T | None, after: str = LAYERS_KEPT) -> T:
        """`value` (picklable) as process `owner` has it, on every process."""
        if not self.distributed:
            if value is None:
                raise QuantkitError(f"internal error: nothing to share for {what}")
            return value
        import torch.distributed as dist

        box: list[Any] = [value if self.rank == owner else None]
        self._call(what, lambda: dist.broadcast_object_list(box, src=owner), after)
        return box[0]

    def to_main(self, what: str, owner: int, value: T | None) -> T | None:
        """`value` (picklable) from process `owner` to process 0 alone (None on the others)."""
        if not self.distributed or owner == 0:
            return value if self.is_main else None
        import torch.distributed as dist

        box: list[Any] = [value]
        if self.rank == owner:
            self._call(what, lambda: dist.send_object_list(box, dst=0))
        elif self.is_main:
            self._call(what, lambda: dist.recv_object_list(box, src=owner))
            return box[0]
        return None

    def token_totals(self, what: str, tokens: Sequence[int]) -> list[int]:
        """Each count summed over the processes."""
        if not self.distributed:
            return list(tokens)
        import torch.distributed as dist

        counts = torch.tensor(list(tokens), dtype=torch.float64, device=self.device)
        self._call(what, lambda: dist.all_reduce(counts))
        return [int(c) for c in counts.tolist()]

    def mean_to(self, what: str, owner: int, summed: Tensor, tokens: int, total: int) -> Tensor | None:
        """The float32 mean over every process's `total` tokens, on process `owner` (None elsewhere). `summed`, this
        process's over its own `tokens`, is a float32 running mean (accumulate_hessian): each process's is weighted
        by its share of `total`, then they are summed there; or an exact sum (hessian.SUM_DTYPE, add_gram): the
        sums are summed there, then scaled once (mean_of_sum), which one process does too. `summed` is changed in
        place, and on the other processes left meaningless: the caller drops it."""
        exact = summed.dtype == SUM_DTYPE
        if self.distributed:
            import torch.distributed as dist

            if not exact:
                summed.mul_(tokens / total if total else 0.0)
            self._call(what, lambda: dist.reduce(summed, dst=owner))
            if self.rank != owner:
                return None
        return mean_of_sum(summed, total) if exact else summed

    def weights_from(self, what: str, owner: int, modules: Sequence[nn.Module],
                     read: Callable[[nn.Module], Tensor], write: Callable[[nn.Module, Tensor], None]) -> None:
        """Each module's weight as process `owner` has it (its solve wrote the quantized one back), on every
        process."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for module in modules:
            weight = read(module).contiguous()
            self._call(what, functools.partial(dist.broadcast, weight, src=owner))
            if self.rank != owner:
                write(module, weight)

    def close(self) -> None:
        """After a run that ended well: the process group this run joined left, SIGTERM's handler as it was. After
        a failure both stay: the process is on its way out."""
        if self.failed:
            return
        if self.on_term is not None:
            signal.signal(signal.SIGTERM, self.on_term)
            self.on_term = None
        if self.joined:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
