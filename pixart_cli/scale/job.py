"""Many images over many processes: one process per GPU under torchrun / accelerate launch / srun+torchrun.

Scale-out splits work above the stages. Image i of a run has one prompt, one seed (seed + i) and one file name,
whatever the number of processes; a rank takes a contiguous block of the image indices and runs the same
``generate`` chain (encode -> denoise -> decode) on it, in passes of ``IMAGES_PER_PASS`` images so that finished
images reach the disk (and the manifest) while the rest are still being made. No stage learns about ranks.

Launchers announce a process with RANK, WORLD_SIZE and LOCAL_RANK (torchrun sets them, and so does accelerate
launch, which runs torchrun underneath; under Slurm, run torchrun with srun). With more than one process, a gloo
process group (CPU only, so the same on GPU and CPU machines) agrees on the seed at the start and gathers the
counts at the end: rank 0 prints the one summary after every rank has finished. Each rank prints only the paths
it wrote.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

from pixart_cli.errors import PixartError
from pixart_cli.scale import manifest
from pixart_cli.settings import DenoiseSettings, EncodeSettings, check_prompts

IMAGES_PER_PASS = 64  # images per encode -> denoise -> decode pass of one process: a SIGTERM loses at most one pass
# An idle or early rank waits this long for the slowest one at the end (gloo's default, 30 min, is too short for
# a big share). A rank that dies does not leave the others waiting: the launcher stops them.
FINISH_TIMEOUT = timedelta(days=7)


def applies(output: Path, resume: bool, ray: bool, ray_address: str | None) -> bool:
    """Whether `generate` runs through this driver: -o DIR/ (it writes the manifest), several processes, --resume
    or --ray. A plain single-file run keeps the one-process path."""
    if ray_address is not None and not ray:
        raise PixartError(f"--ray-address {ray_address}: only used with --ray; add --ray")
    from pixart_cli.files.output_paths import names_folder

    return names_folder(output) or resume or ray or Ranks.from_env().world_size > 1


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


@dataclass(frozen=True)
class RunOptions:
    """How every process runs its stages: the --device and --dtype words (each process resolves them itself, a
    rank to cuda:LOCAL_RANK) and the parsed --vram budget in bytes (None: auto)."""

    device: str = "auto"
    dtype: str = "auto"
    vram: int | None = None
    loras: tuple = ()  # lora.LoraWeights, read once by the CLI

    def context(self, model, callbacks: Callbacks, device: str | None = None):
        """This process's run context (``device`` overrides the run's: a rank's GPU)."""
        from pixart_cli.runtime import RunContext

        return RunContext.resolve(
            model,
            self.device if device is None else device,
            self.dtype,
            self.vram,
            progress=callbacks.progress,
            log=callbacks.log,
            reports=callbacks.reports,
            loras=self.loras,
        )


def image_options(model, dtype: str, encoding: EncodeSettings, denoising: DenoiseSettings, loras=()) -> dict:
    """The options that change an image, each default filled from the model's configs (``-g 4.5`` is the same run
    as the default 4.5): a manifest line is reused by --resume only when they are the same now. Derived from the
    run's record (``record.IDENTITY``); --dtype stays as given (``auto`` depends on each process's device)."""
    from pixart_cli import plan, record
    from pixart_cli.models import step_caching
    from pixart_cli.models.lora import records

    filled = plan.resolved(denoising, model)
    acting, _ = step_caching.acting(denoising.step_cache, len(filled["timesteps"] or []) or filled["steps"])
    encoded = record.for_encode(model, dtype, [], encoding, plan.max_sequence_length(encoding, model))
    made = record.for_denoise(
        encoded, model, dtype, 1, filled, [], compiled=denoising.compile, step_cache=acting, loras=records(list(loras))
    )
    return record.identity(made, dtype)


@dataclass
class Job:
    """Every image of a run, as a single process would make it: index i -> prompt, seed + i, path."""

    prompts: list[str]  # one per image: prompt k repeated num_images times
    paths: list[Path]
    negative_prompt: str
    options: dict  # the image-changing options, defaults filled from the model (job.image_options)
    folder: Path | None  # where manifest.jsonl lives: -o DIR/; None when -o names image files
    overwrite: bool = True  # False: --no-overwrite, an existing image is never replaced (nor the manifest)

    def wanted(self, index: int, seed: int) -> manifest.Wanted:
        path = os.path.relpath(self.paths[index], self.folder) if self.folder is not None else str(self.paths[index])
        return manifest.Wanted(index, path, self.prompts[index], self.negative_prompt, seed + index, self.options)

    def check_not_replacing(self, todo: Sequence[int]) -> None:
        """--no-overwrite with --resume: an image file to be made again (damaged, unrecorded, or made with other
        options) is refused before any work, not after the pass that would replace it."""
        existing = [self.paths[index] for index in todo if os.path.lexists(self.paths[index])]
        if existing and not self.overwrite:
            raise PixartError(
                f"--no-overwrite: {existing[0]} exists but its manifest line does not record it complete (damaged, "
                f"unrecorded, or made with other options; {len(existing)} such file(s)); remove them, or drop "
                "--no-overwrite"
            )

    def done(self, index: int, seed: int, lines: dict[int, dict]) -> bool:
        """Image ``index`` is complete on disk as the manifest lines record it (never, without a manifest)."""
        return self.folder is not None and manifest.complete(self.folder, self.wanted(index, seed), lines)


def make_job(
    prompts: Sequence[str],
    output: Path,
    encoding: EncodeSettings,
    denoising: DenoiseSettings,
    model,
    run: RunOptions,
    overwrite: bool = True,
    resume: bool = False,
) -> Job:
    """The run's images; checks -o (and that --resume has a folder) before the model's configs are read."""
    from pixart_cli.files import atomic, output_paths

    if atomic.is_stdout(str(output)):
        raise PixartError(
            "--output -: --ray, --resume and several processes write image files; give a folder (-o DIR/)"
        )
    folder = Path(output) if output_paths.names_folder(output) else None
    if resume and folder is None:
        raise PixartError(f"--resume: needs -o DIR/ (the manifest lives in DIR), not -o {output}")
    options = image_options(model, run.dtype, encoding, denoising, run.loras)  # reads the model's configs
    image_prompts = [prompt for prompt in prompts for _ in range(denoising.num_images)]
    paths = output_paths.output_targets(output, len(image_prompts), "image", allow_stdout=False)
    return Job(image_prompts, paths, encoding.negative_prompt, options, folder, overwrite)


@dataclass
class Summary:
    """What a run did, over all processes."""

    written: int = 0
    skipped: int = 0  # already complete (--resume)
    processes: int = 1
    seconds: float = 0.0
    seed: int = 0
    total: int = 0
    manifest: Path | None = None
    engine: str = "processes"

    def as_dict(self) -> dict:
        return {
            "written": self.written,
            "skipped": self.skipped,
            "processes": self.processes,
            "engine": self.engine,
            "seconds": round(self.seconds, 2),
            "seed": self.seed,
            "images": self.total,
            "manifest": None if self.manifest is None else str(self.manifest),
        }

    def describe(self) -> str:
        seeds = f"seed {self.seed}" if self.total == 1 else f"seeds {self.seed}..{self.seed + self.total - 1}"
        text = f"generate: wrote {self.written} image(s)"
        if self.skipped:
            text += f", skipped {self.skipped} already complete"
        text += f" ({seeds})"
        if self.engine != "processes":
            text += f" on {self.engine}"
        elif self.processes > 1:
            text += f" with {self.processes} processes"
        text += f" in {self.seconds:.1f} s"
        if self.manifest is not None:
            text += f"; manifest {self.manifest}"
        return text


@dataclass
class Callbacks:
    """What the CLI gives the driver: where written paths go, and the stage functions' callbacks."""

    wrote: Callable[[Path], None]
    log: Callable[[str], None] | None = None
    progress: Callable[[str, int, int], None] | None = None
    reports: list | None = field(default_factory=list)


def generate_images(
    prompts: Sequence[str],
    *,
    output: Path,
    encoding: EncodeSettings,
    denoising: DenoiseSettings,
    model,
    run: RunOptions,
    resume: bool,
    callbacks: Callbacks,
    ray: bool = False,
    ray_address: str | None = None,
    ranks: Ranks | None = None,
    overwrite: bool = True,
) -> Summary | None:
    """Make every image of the run that is this process's to make; return the summary on rank 0 (None elsewhere).
    ``overwrite=False`` (--no-overwrite): no existing image is replaced, and a new run does not restart an
    existing manifest.

    ``denoising.seed`` None: rank 0 draws one and every process uses it (or, with --resume, the manifest's).
    """
    # 1. Check everything before any process waits on another or any model loads
    started = time.perf_counter()
    ranks = Ranks.from_env() if ranks is None else ranks
    prompts = check_prompts(prompts)
    seed = denoising.seed
    denoising.check_total(len(prompts))
    if ray and ranks.world_size > 1:
        raise PixartError(
            f"--ray: runs from one process, but WORLD_SIZE={ranks.world_size}; start it without "
            "torchrun or accelerate launch"
        )
    job = make_job(prompts, output, encoding, denoising, model, run, overwrite, resume)
    if not overwrite and not resume and job.folder is not None and manifest.manifest_path(job.folder).is_file():
        raise PixartError(
            f"--no-overwrite: {manifest.manifest_path(job.folder)} already exists and a new run would start it "
            "again; add --resume to finish that run, or drop --no-overwrite"
        )
    lines = manifest.read(job.folder) if resume else {}
    if seed is None and resume:
        seed = manifest.base_seed(job.folder, lines, len(job.prompts))  # the interrupted run's: found complete

    if ray:
        from pixart_cli.scale.ray_run import run_ray

        seed = denoising.with_seed().seed if seed is None else seed
        todo = [index for index in range(len(job.prompts)) if not job.done(index, seed, lines)]
        job.check_not_replacing(todo)
        # run_ray starts a new manifest only once Ray is up: a missing Ray or a bad address leaves the old one
        new_manifest = job.folder is not None and not resume
        written = run_ray(job, todo, seed, model, encoding, denoising, run, ray_address, callbacks, new_manifest)
        return Summary(
            written,
            len(job.prompts) - len(todo),
            1,
            time.perf_counter() - started,
            seed,
            len(job.prompts),
            manifest.manifest_path(job.folder) if job.folder else None,
            "Ray",
        )

    # 2. Agree on the seed, and start a new manifest before any rank appends to it
    group = _ProcessGroup(ranks) if ranks.world_size > 1 else None
    try:
        if ranks.rank == 0:
            seed = denoising.with_seed().seed if seed is None else seed
            if job.folder is not None and not resume:
                manifest.start_new(job.folder)
        if group is not None:
            seed = group.broadcast(seed)  # also the barrier: no rank appends before rank 0 started the manifest

        # 3. This rank's share, less what a previous run finished (each rank checks only its own images)
        share = ranks.share(len(job.prompts))
        todo = [index for index in share if not job.done(index, seed, lines)]
        job.check_not_replacing(todo)
        log = callbacks.log
        if group is not None and log is not None:
            log(f"rank {ranks.rank}/{ranks.world_size}: images {_ranges(share)}, {len(todo)} to make")
            progress = callbacks.progress
            callbacks = Callbacks(
                callbacks.wrote,
                _prefixed(log, f"rank {ranks.rank}: "),
                progress and (lambda stage, done, total: progress(f"rank {ranks.rank} {stage}", done, total)),
                callbacks.reports,
            )

        # 4. Make them, pass by pass
        if todo:
            from pixart_cli.plan import plan_run

            ctx = run.context(model, callbacks, device=ranks.device(run.device))
            # what the configs can tell (the LoRAs' fit included), before the first pass loads T5
            plan_run(prompts[:1], encoding, replace(denoising, seed=seed, num_images=1), ctx.model, loras=run.loras)
            for start, stop in passes(todo, IMAGES_PER_PASS):
                make_pass(job, start, stop, seed, encoding, denoising, ctx, callbacks)

        # 5. One summary, on rank 0, once every rank is done
        counts = (len(todo), len(share) - len(todo))
        gathered = group.gather(counts) if group is not None else [counts]
    finally:
        if group is not None:
            group.close()
    if ranks.rank != 0:
        return None
    return Summary(
        sum(c[0] for c in gathered),
        sum(c[1] for c in gathered),
        ranks.world_size,
        time.perf_counter() - started,
        seed,
        len(job.prompts),
        manifest.manifest_path(job.folder) if job.folder else None,
    )


def passes(indices: Sequence[int], size: int) -> list[tuple[int, int]]:
    """Contiguous runs of ``indices`` (sorted), cut to at most ``size``: [(start, stop), ...]. A contiguous run
    needs only its first seed (the chain gives image j of a call seed + j)."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][1] == index and runs[-1][1] - runs[-1][0] < size:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def make_pass(
    job: Job,
    start: int,
    stop: int,
    seed: int,
    encoding: EncodeSettings,
    denoising: DenoiseSettings,
    ctx,
    callbacks: Callbacks,
    append: bool = True,
) -> list[dict]:
    """Images start..stop-1 through the one-process chain, then written, then recorded in the manifest
    (``append=False``: the manifest lines are returned for the caller to append, as Ray's driver does)."""
    from pixart_cli.generate import generate
    from pixart_cli.plan import plan_run

    # one image per prompt row, seeds seed + start onwards; the LoRAs' fit was checked before the first pass
    planned = plan_run(
        job.prompts[start:stop],
        encoding,
        replace(denoising, seed=seed + start, num_images=1),
        ctx.model,
        decode_batch_size=denoising.batch_size,
    )
    images, meta = generate(planned, ctx)
    return write_images(job, start, images, meta, callbacks.wrote, append=append)


def write_images(
    job: Job, start: int, images: list, meta: dict, wrote: Callable[[Path], None] | None, append: bool = True
) -> list[dict]:
    """Write image start+j for each decoded image j, then (-o DIR/ only) its manifest line, and report the path.
    Returns the manifest lines; ``append=False`` leaves appending them to the caller (Ray's driver)."""
    from pixart_cli import record
    from pixart_cli.files import image_io

    requests = [
        (job.paths[start + offset], image, *record.image_metadata(record.RunRecord.from_meta(meta), offset))
        for offset, image in enumerate(images)
    ]
    lines = []

    def written(offset: int, path: Path) -> None:
        index = start + offset
        if job.folder is not None:
            line = manifest.record(
                job.folder,
                index,
                path,
                job.prompts[index],
                job.negative_prompt,
                meta["seeds"][offset],
                job.options,
                requests[offset][3],
            )
            if append:
                manifest.append(job.folder, line)
            lines.append(line)
        if wrote is not None:
            wrote(path)

    image_io.save_images(requests, overwrite=job.overwrite, on_written=written)
    return lines


def _ranges(indices: range) -> str:
    return "none" if not indices else f"{indices.start}..{indices.stop - 1}"


def _prefixed(log: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda message: log(prefix + message)


class _ProcessGroup:
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
