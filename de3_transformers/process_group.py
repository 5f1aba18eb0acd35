"""The processes a launcher started (`torchrun`, `accelerate launch`; both set `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
`MASTER_ADDR` and `MASTER_PORT`): which one this is, its device, and the few collectives that work shared between
them needs. The collectives run on CPU tensors over gloo, so they are the same with or without GPUs.
"""

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


# A process waits at a barrier for the slowest one, which may have more work left (a bigger share after a resume, a
# slower device) than torch's default 30 minutes; a process that fails does not leave the others waiting, since the
# launcher stops them all.
TIMEOUT = datetime.timedelta(hours=24)


@dataclass
class Processes:
    """This process among those a launcher started (rank 0 of 1 when there is no launcher).

    Attributes:
        rank, world_size, local_rank: as the launcher numbered the processes (`local_rank` on this machine).
        group: the gloo process group of the collectives (`None` with one process).
        owned: whether `from_environment` initialised torch.distributed (and `close` ends it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: object = None
    owned: bool = False

    @classmethod
    def from_environment(cls) -> "Processes":
        """The processes `WORLD_SIZE` announces, joined through torch.distributed (`env://`, initialised here with the
        gloo backend unless the caller has initialised it; then a gloo group beside its own is made).

        Raises:
            RuntimeError: when `WORLD_SIZE` is above 1 and this PyTorch has no torch.distributed.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if not dist.is_available():
            raise RuntimeError(f"WORLD_SIZE={world_size} but this PyTorch build has no torch.distributed: run one "
                               "process, or install a PyTorch with distributed support.")
        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("gloo", timeout=TIMEOUT)
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), group, owned)

    @property
    def distributed(self) -> bool:
        """Whether there are several processes."""
        return self.world_size > 1

    def device(self, requested: str | None) -> str | None:
        """The PyTorch device of this process: with several processes on a machine with CUDA, for `None` or `"cuda"`
        the GPU `LOCAL_RANK` (modulo the GPUs: more processes than GPUs share them); otherwise `requested`."""
        if self.distributed and requested in (None, "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def barrier(self) -> None:
        """Waits until every process is here."""
        if self.distributed:
            dist.barrier(group=self.group)

    @contextmanager
    def first(self):
        """Runs the block in process 0, then in the others (which then find what process 0 cached)."""
        if self.rank > 0:
            self.barrier()
        yield
        if self.rank == 0:
            self.barrier()

    def gather(self, values: list[float]) -> list[list[float]] | None:
        """In process 0, every process's `values` (the same count in each), by rank; `None` in the others."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if not self.distributed:
            return [tensor.tolist()]
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(tensor, gathered, dst=0, group=self.group)
        return None if gathered is None else [row.tolist() for row in gathered]

    def close(self) -> None:
        """Ends torch.distributed if `from_environment` initialised it."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["Processes"]
