"""Launchers: whether a run is scale-out, the ranks that torchrun, accelerate launch or srun give a process, and
the process group over them (gloo: broadcast the seed, gather the counts)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pixart_cli.errors import PixartError

# An idle or early rank waits this long for the slowest one at the end (gloo's default, 30 min, is too short for
# a big share). A rank that dies does not leave the others waiting: the launcher stops them.
FINISH_TIMEOUT = timedelta(days=7)


def applies(output: Path, resume: bool, ray: bool, ray_address: str | None, devices: bool = False) -> bool:
    """Whether `generate` runs through this driver: -o DIR/ (it writes the manifest), several processes, --resume,
    --ray or --devices. A plain single-file run keeps the one-process path."""
    if ray_address is not None and not ray:
        raise PixartError(f"--ray-address {ray_address}: only used with --ray; add --ray")
    from pixart_cli.files.output_paths import names_folder

    return names_folder(output) or resume or ray or devices or Ranks.from_env().world_size > 1


@dataclass(frozen=True)
class Ranks:
    """This process's place among the launcher's processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int | None = None

    @classmethod
    def from_env(cls, environ=None) -> Ranks:
        """Read RANK, WORLD_SIZE and LOCAL_RANK (unset: a single process)."""
        environ = os.environ if environ is None else environ

        def number(name: str, default: int | None) -> int | None:
            text = environ.get(name)
            if text is None or text == "":
                return default
            if not (text.strip().isascii() and text.strip().isdigit()):
                raise PixartError(
                    f"{name}={text!r}: not a process number; unset it, or start pixart with torchrun "
                    "or accelerate launch, which set it"
                )
            return int(text)

        world_size = number("WORLD_SIZE", 1)
        rank = number("RANK", 0)
        local_rank = number("LOCAL_RANK", None)
        if world_size < 1 or rank >= world_size:
            raise PixartError(
                f"RANK={rank}, WORLD_SIZE={world_size}: the rank must be below the world size; start "
                "pixart with torchrun or accelerate launch, which set both"
            )
        return cls(rank, world_size, local_rank)

    def share(self, total: int) -> range:
        """A contiguous block of ``range(total)``; the first ``total % world_size`` ranks get one more (as
        accelerate's split_between_processes does). More ranks than images: the last ones get nothing."""
        per, extra = divmod(total, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (1 if self.rank < extra else 0))

    def device(self, device: str) -> str:
        """cuda:LOCAL_RANK for ``auto`` or ``cuda`` when a launcher named a local rank and CUDA is here; an explicit
        ``cuda:N`` or ``cpu`` is kept."""
        if self.local_rank is None or device not in ("auto", "cuda"):
            return device
        import torch

        if not torch.cuda.is_available():
            return device
        if self.local_rank >= torch.cuda.device_count():
            raise PixartError(
                f"LOCAL_RANK={self.local_rank}: only {torch.cuda.device_count()} CUDA device(s) on "
                "this machine; start at most that many processes per node (--nproc_per_node)"
            )
        return f"cuda:{self.local_rank}"


class ProcessGroup:
    """A gloo group over the launcher's processes, used twice: broadcast the seed, gather the counts."""

    def __init__(self, ranks: Ranks):
        import torch.distributed as dist

        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise PixartError(
                f"WORLD_SIZE={ranks.world_size} but {' and '.join(missing)} not set: start pixart with "
                "torchrun or accelerate launch, which set them"
            )
        port = os.environ["MASTER_PORT"].strip()
        if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise PixartError(
                f"MASTER_PORT={os.environ['MASTER_PORT']!r}: not a port number (1 to 65535); start pixart with "
                "torchrun or accelerate launch, which set it"
            )
        self.ranks = ranks
        self.dist = dist
        dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=FINISH_TIMEOUT)

    def broadcast(self, value):
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        boxes = [None] * self.ranks.world_size
        self.dist.all_gather_object(boxes, value)
        return boxes

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
