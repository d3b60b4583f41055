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

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from pixart_cli.errors import EXIT_RUNTIME, EXIT_SIGINT, EXIT_SIGTERM, PixartError, RunStopped, StdoutClosed, Terminated
from pixart_cli.scale import manifest
from pixart_cli.scale.job import IMAGES_PER_PASS, Callbacks, RunOptions, Summary, make_job, make_pass, passes
from pixart_cli.scale.launch import ProcessGroup, Ranks
from pixart_cli.settings import DenoiseSettings, EncodeSettings, check_prompts
from pixart_cli.signals import GUARD


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
    devices: list[str] | None = None,
) -> Summary | None:
    """Make every image of the run that is this process's to make; return the summary on rank 0 (None elsewhere).
    ``overwrite=False`` (--no-overwrite): no existing image is replaced, and a new run does not restart an
    existing manifest.

    ``denoising.seed`` None: rank 0 draws one and every process uses it (or, with --resume, the manifest's).
    """
    # 1. Check everything before any process waits on another or any model loads
    started, started_ns = time.perf_counter(), time.time_ns()
    ranks = Ranks.from_env() if ranks is None else ranks
    prompts = check_prompts(prompts)
    seed = denoising.seed
    denoising.check_total(len(prompts))
    if devices is not None and (ray or ranks.world_size > 1):
        raise PixartError(
            "--devices: spreads the images over this machine's devices from one process; leave out --ray, and "
            "start it without torchrun or accelerate launch"
        )
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
    lines = manifest.read(job.folder, len(job.prompts)) if resume else {}
    if resume and not lines and job.folder is not None and callbacks.log is not None and ranks.rank == 0:
        found = "holds no line of a run" if manifest.manifest_path(job.folder).is_file() else "is not there"
        callbacks.log(f"--resume: {manifest.manifest_path(job.folder)} {found}; starting a new run in {job.folder}")
    if seed is None and resume:
        seed = manifest.base_seed(job.folder, lines, len(job.prompts))  # the interrupted run's: found complete
    if lines:
        job.check_same_run(lines, seed)  # --resume finishes that run: other options are refused, naming each

    if ray:
        return _on_ray(job, lines, seed, started, started_ns, prompts, encoding, denoising, model, run, resume,
                       callbacks, ray_address)  # fmt: skip

    if devices is not None:
        from pixart_cli.scale.devices import run_devices

        seed = denoising.with_seed().seed if seed is None else seed
        todo = [index for index in range(len(job.prompts)) if not job.done(index, seed, lines)]
        job.check_not_replacing(todo)
        if job.folder is not None and not resume:
            manifest.start_new(job.folder)
        written = run_devices(job, todo, seed, model, encoding, denoising, run, devices, callbacks)
        return _summary(job, written, len(job.prompts) - len(todo), 1, started, seed, f"{len(devices)} devices")

    # 2. Agree on the seed, and start a new manifest before any rank appends to it
    group = ProcessGroup(ranks) if ranks.world_size > 1 else None
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
    except (KeyboardInterrupt, Terminated) as error:
        account = stopped(error, job, seed, started_ns, ranks)  # told once, over every rank, by rank 0
        if ranks.world_size == 1 and account.complete == len(job.prompts):
            raise  # a signal after every image landed: the edge tells it as for any command
        raise account from None
    finally:
        if group is not None:
            group.close()
    if ranks.rank != 0:
        return None
    return _summary(job, sum(c[0] for c in gathered), sum(c[1] for c in gathered), ranks.world_size, started, seed)


def _summary(job, written: int, skipped: int, processes: int, started: float, seed: int, engine: str = "processes"):
    """The run's Summary: ``started`` its perf_counter at the start."""
    folder = job.folder
    return Summary(written, skipped, processes, time.perf_counter() - started, seed, len(job.prompts),
                   manifest.manifest_path(folder) if folder else None, engine)  # fmt: skip


def _on_ray(job, lines, seed, started, started_ns, prompts, encoding, denoising, model, run, resume, callbacks,
            address) -> Summary:  # fmt: skip
    """The run on Ray, from its driver process (scale/ray_driver.py). However it ends (a signal, Ray losing the
    run), the account is this process's: what is complete on disk, as --resume counts it; and what a killed actor
    left half-written (its temp files, named with the run's tag) is removed."""
    import secrets

    from pixart_cli.files import atomic
    from pixart_cli.scale.ray_driver import drive
    from pixart_cli.scale.ray_run import RayLost

    seed = denoising.with_seed().seed if seed is None else seed
    todo = [index for index in range(len(job.prompts)) if not job.done(index, seed, lines)]
    job.check_not_replacing(todo)
    if todo:  # what the configs can tell (the weights' headers, the LoRAs' fit), before Ray starts
        from pixart_cli.plan import plan_run

        plan_run(prompts[:1], encoding, replace(denoising, seed=seed, num_images=1), model, loras=run.loras)
    # the driver starts a new manifest only once Ray is up: a missing Ray or a bad address leaves the old one
    new_manifest = job.folder is not None and not resume
    reported: set[str] = set()
    report = callbacks.wrote
    callbacks = replace(callbacks, wrote=lambda path: (reported.add(str(path)), report(path)))
    tag = f"ray{secrets.token_hex(4)}"  # the actors' temp files: .pixart-TAG-*.tmp
    try:
        written = (
            drive(job, todo, seed, model, encoding, denoising, run, address, callbacks, new_manifest, tag)
            if todo
            else 0
        )
    except (KeyboardInterrupt, Terminated) as error:
        # Ray is shut down: what the actors placed is on disk and in the manifest, reported or not
        raise stopped(error, job, seed, started_ns, Ranks(), unreported=(reported, report)) from None
    except RayLost as error:
        account = stopped(error, job, seed, started_ns, Ranks(), unreported=(reported, report))
        if account.complete != len(job.prompts):
            raise account from None
        written = len(reported)  # every image is complete all the same
    finally:
        atomic.remove_temps({atomic.written_path(path).parent for path in job.paths}, tag)
    return _summary(job, written, len(job.prompts) - len(todo), 1, started, seed, "Ray")


# After a signal, rank 0 (or Ray's driver) counts once the other processes have placed what they were placing:
# the manifest still for this long, waiting at most SETTLE_MOST_SECONDS.
SETTLE_QUIET_SECONDS = 1.0
SETTLE_MOST_SECONDS = 10.0


def stopped(error, job, seed: int | None, started_ns: int, ranks: Ranks, unreported=None) -> RunStopped:
    """The account of a run of several processes (or Ray's actors) stopped by a signal, or ended by Ray
    (``error`` a ray_run.RayLost: its reason, exit 1), told once (rank 0, or the driver): how many of the run's
    images are complete on disk now, over every process, as --resume counts them. ``unreported``: (paths reported,
    report): Ray's driver reports the images its actors placed that it had not heard of yet, so that stdout lists
    every image written."""
    if isinstance(error, (KeyboardInterrupt, Terminated)):
        sigint = isinstance(error, KeyboardInterrupt)
        word, code = ("interrupted", EXIT_SIGINT) if sigint else ("terminated", EXIT_SIGTERM)
    else:
        word, code = str(error), EXIT_RUNTIME
    if ranks.rank != 0:
        return RunStopped(word, code, silent=True)
    if seed is None:  # before the seed was agreed: no image was made
        return RunStopped(f"{word}; no output was written", code, complete=0)
    try:
        with GUARD.deferred():  # a second signal of the same stop (torchrun's SIGTERM) waits for the account
            _settle(job)
            done = job.complete_now(seed, started_ns)
    except (KeyboardInterrupt, Terminated):
        done = job.complete_now(seed, started_ns)
    if unreported is not None:
        reported, report = unreported
        for index in done:
            if str(job.paths[index]) not in reported:
                try:
                    report(job.paths[index])
                except StdoutClosed:
                    pass  # the account below says what was written
    total = len(job.prompts)
    everyone = f" by the {ranks.world_size} processes" if ranks.world_size > 1 else ""
    if job.folder is None:
        told = f"{word}; {len(done)} of the run's {total} images had been written{everyone}, the rest were not"
        return RunStopped(told, code, complete=len(done))
    return RunStopped(
        f"{word}; {len(done)} of the run's {total} images are complete{everyone} (recorded in "
        f"{manifest.manifest_path(job.folder)}), the other {total - len(done)} are not: --resume makes them",
        code,
        complete=len(done),
    )


def _settle(job) -> None:
    """Wait until the manifest (or the images, without one) has been still for SETTLE_QUIET_SECONDS."""
    import os

    def fingerprint():
        paths = [manifest.manifest_path(job.folder)] if job.folder is not None else job.paths
        marks = []
        for path in paths:
            try:
                info = os.stat(path)
                marks.append((info.st_size, info.st_mtime_ns))
            except OSError:
                marks.append(None)
        return marks

    deadline, last, still_since = time.monotonic() + SETTLE_MOST_SECONDS, fingerprint(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - still_since < SETTLE_QUIET_SECONDS:
        time.sleep(0.2)
        now = fingerprint()
        if now != last:
            last, still_since = now, time.monotonic()


def _ranges(indices: range) -> str:
    return "none" if not indices else f"{indices.start}..{indices.stop - 1}"


def _prefixed(log: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda message: log(prefix + message)
