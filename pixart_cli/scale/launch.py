"""Launchers: whether a run is scale-out, the ranks that torchrun, accelerate launch or srun give a process, and
the process group over them (gloo: broadcast the seed, gather the counts)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pixart_cli.errors import EXIT_RUNTIME, PixartError

# An idle or early rank waits this long for the slowest one at the end (gloo's default, 30 min, is too short for
# a big share). A rank that dies does not leave the others waiting: the launcher stops them.
FINISH_TIMEOUT = timedelta(days=7)
# Every process must have joined the group (at MASTER_ADDR:MASTER_PORT) within this many seconds of starting to,
# before any model loads: a peer that never comes, or a master nobody listens at, ends the run with one line.
# PIXART_RENDEZVOUS_TIMEOUT (seconds) sets another, up to MAX_RENDEZVOUS_SECONDS.
RENDEZVOUS_SECONDS = 300
RENDEZVOUS_ENV = "PIXART_RENDEZVOUS_TIMEOUT"
MAX_RENDEZVOUS_SECONDS = 86_400
# Processes in one run: far beyond any cluster's GPUs, and a share of no image for most (settings.MAX_IMAGES).
MAX_WORLD_SIZE = 65_536
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:[]%")


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
            if len(text.strip()) > 9 or int(text) > MAX_WORLD_SIZE:  # compared as text first: no 10^4000 int
                raise PixartError(
                    f"{name}={text.strip()[:20]}{'...' if len(text.strip()) > 20 else ''}: beyond the "
                    f"{MAX_WORLD_SIZE:,} processes pixart runs; start pixart with torchrun or accelerate launch, "
                    "which set it"
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
    """A gloo group over the launcher's processes, used twice: broadcast the seed (the rendezvous, bounded by
    rendezvous_seconds()), then gather the counts at the end (a group of its own, waiting up to FINISH_TIMEOUT)."""

    def __init__(self, ranks: Ranks):
        import torch.distributed as dist

        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise PixartError(
                f"WORLD_SIZE={ranks.world_size} but {' and '.join(missing)} not set: start pixart with "
                "torchrun or accelerate launch, which set them"
            )
        port = os.environ["MASTER_PORT"].strip()
        if not (port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536):
            raise PixartError(
                f"MASTER_PORT={os.environ['MASTER_PORT']!r}: not a port number (1 to 65535); start pixart with "
                "torchrun or accelerate launch, which set it"
            )
        self.address = f"{check_master(os.environ['MASTER_ADDR'], int(port))}:{port}"
        self.seconds = rendezvous_seconds()
        self.ranks = ranks
        self.dist = dist
        self.finish = None
        timeout = timedelta(seconds=self.seconds)
        self._joining(
            lambda: dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=timeout)
        )

    def _joining(self, step):
        """A step of the rendezvous, its failure (a timeout, a refused connection) one line."""
        try:
            return step()
        except PixartError:
            raise
        except Exception as error:
            self.close()
            from pixart_cli.errors import detail

            raise PixartError(
                f"rank {self.ranks.rank} of WORLD_SIZE={self.ranks.world_size}: the processes did not all join at "
                f"MASTER_ADDR:MASTER_PORT {self.address} within {self.seconds:g} s ({detail(error)[:160]}); start "
                f"every rank (torchrun starts them all), or set {RENDEZVOUS_ENV} to wait longer",
                EXIT_RUNTIME,
            ) from None

    def broadcast(self, value):
        """The seed from rank 0: the end of the rendezvous (every rank is there), then the group for the end."""
        box = [value]
        self._joining(lambda: self.dist.broadcast_object_list(box, src=0))
        self.finish = self._joining(lambda: self.dist.new_group(backend="gloo", timeout=FINISH_TIMEOUT))
        return box[0]

    def gather(self, value) -> list:
        boxes = [None] * self.ranks.world_size
        self.dist.all_gather_object(boxes, value, group=self.finish)
        return boxes

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def rendezvous_seconds() -> float:
    """RENDEZVOUS_SECONDS, or PIXART_RENDEZVOUS_TIMEOUT's seconds (checked)."""
    return env_seconds(RENDEZVOUS_ENV, RENDEZVOUS_SECONDS, MAX_RENDEZVOUS_SECONDS)


def env_seconds(name: str, default: float, most: float) -> float:
    """Seconds from the environment variable ``name`` (``default`` when unset or blank), from above 0 to ``most``;
    anything else is one line naming the variable."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= most:  # NaN fails too
        raise PixartError(
            f"{name}={text[:40]!r}: not a number of seconds from 1 to {most:,}; unset it for the default {default:g} s"
        )
    return seconds


def check_master(address: str, port: int) -> str:
    """MASTER_ADDR as a host this machine can resolve (a name or an address), before any process waits on it."""
    import socket

    host = address.strip()
    if not host or len(host) > 253 or not set(host) <= _HOST_CHARS:
        raise PixartError(
            f"MASTER_ADDR={address[:80]!r}: not a host name or address; start pixart with torchrun or accelerate "
            "launch, which set it (or give rank 0's host)"
        )
    try:
        socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise PixartError(
            f"MASTER_ADDR={host}: this machine cannot resolve it ({getattr(error, 'strerror', None) or error}); "
            "give rank 0's host name or address",
            EXIT_RUNTIME,
        ) from None
    return host
