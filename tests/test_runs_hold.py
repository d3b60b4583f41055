"""Issue 20, the runs themselves, in real processes on the tiny model: launcher variables checked before use and the
rendezvous bounded (class 7); --resume with other options refused, naming each, nothing replaced (10); a stdout
closed mid-run leaves the disk, the manifest and the last line agreeing (11)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time

import pytest

from helpers import assert_one_line_error, pixart_bin, run_pixart
from pixart_cli.errors import EXIT_SIGPIPE


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- class 7: launcher variables --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variables, code, fragment",
    [
        ({"WORLD_SIZE": "1" + "0" * 20, "RANK": "0"}, 2, "WORLD_SIZE=10000000000000000000...: beyond the 65,536"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "no such host"}, 2, "MASTER_ADDR='no such host': not a host"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "nowhere.invalid"}, 1, "MASTER_ADDR=nowhere.invalid: this"),
        ({"WORLD_SIZE": "2", "RANK": "0", "PIXART_RENDEZVOUS_TIMEOUT": "nan"}, 2, "PIXART_RENDEZVOUS_TIMEOUT='nan'"),
    ],
)
def test_launcher_variables_are_checked_before_use(variables, code, fragment, tiny_model, tmp_path):
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **variables}
    started = time.monotonic()
    result = run_pixart("generate", "cat", "--model", tiny_model, "-o", "out/", cwd=tmp_path, env=env, check=False,
                        timeout=120)  # fmt: skip
    assert_one_line_error(result, code, fragment)
    assert time.monotonic() - started < 60 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_rank_whose_peers_never_come_gives_up_after_the_rendezvous_timeout(rank, tiny_model, tmp_path):
    """Rank 0 waits for the others as the master, rank 1 for a master nobody listens at: both for the timeout."""
    port = str(free_port())
    env = {"WORLD_SIZE": "2", "RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
           "PIXART_RENDEZVOUS_TIMEOUT": "3"}  # fmt: skip
    started = time.monotonic()
    result = run_pixart("generate", "cat", "--model", tiny_model, "-o", "out/", cwd=tmp_path, env=env, check=False,
                        timeout=120)  # fmt: skip
    assert_one_line_error(result, 1, f"rank {rank} of WORLD_SIZE=2: the processes did not all join at", "within 3 s")
    assert time.monotonic() - started < 60 and list(tmp_path.iterdir()) == []


# --- class 10: --resume finishes the run it names, as it was started ---------------------------------------------
def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_resume_with_other_options_is_refused_naming_each(tiny_model, tmp_path):
    (tmp_path / "p.txt").write_text("a cat\na dog\na bowl of fruit\n")
    common = ["generate", "--prompts-file", "p.txt", "--model", tiny_model, "-o", "out/", "--quiet"]
    run_pixart(*common, "--seed", "5", "--steps", "2", cwd=tmp_path)
    before = _digests(tmp_path / "out")
    for extra, fragments in [
        (["--steps", "3"], ["--steps 2 there, 3 now"]),
        (["--steps", "2", "--seed", "6", "-g", "3"], ["--guidance-scale 4.5 there, 3.0 now", "--seed 5 there, 6 now"]),
        (["--steps", "2", "--negative-prompt", "blurry"], ["--negative-prompt '' there, 'blurry' now"]),
    ]:
        result = run_pixart(*common, "--resume", *extra, cwd=tmp_path, check=False)
        assert_one_line_error(result, 2, f"--resume: {os.path.join('out', 'manifest.jsonl')} records", *fragments)
        assert "drop --resume to start a new run" in result.stderr and "-o another folder" in result.stderr
        assert _digests(tmp_path / "out") == before  # nothing made again, nothing replaced
    (tmp_path / "p.txt").write_text("a cat\na fish\na bowl of fruit\n")
    result = run_pixart(*common, "--resume", "--steps", "2", cwd=tmp_path, check=False)
    assert_one_line_error(result, 2, "the prompt of image 1 'a dog' there, 'a fish' now")
    (tmp_path / "p.txt").write_text("a cat\na dog\na bowl of fruit\n")
    result = run_pixart(*common, "--resume", "--steps", "2", "--json", cwd=tmp_path)
    assert json.loads(result.stdout)["summary"]["skipped"] == 3 and _digests(tmp_path / "out") == before


# --- class 11: a stdout closed mid-run -----------------------------------------------------------------------------
@pytest.mark.parametrize("images", [8, 70])  # one batch; several batches (the reader leaves during the first)
def test_a_closed_stdout_leaves_disk_manifest_and_last_line_agreeing(tiny_model, tmp_path, images):
    small = "--width 64 --height 64 --no-binning" if images > 8 else ""
    command = (
        f"{pixart_bin()} generate cat --model {tiny_model} --steps 2 {small} --num-images {images} -o hp/ | head -1"
    )
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    # as coreutils end when their reader leaves: 128 + SIGPIPE, quietly, once every output is written
    assert result.returncode == EXIT_SIGPIPE, result.stderr
    assert result.stdout == "hp/image-0.png\n"
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith("error:")], result.stderr
    names = [p.name for p in (tmp_path / "hp").glob("*.png")]
    assert sorted(names) == sorted(f"image-{i}.png" for i in range(images))
    lines = [json.loads(line) for line in (tmp_path / "hp" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(images))  # each image once


def test_a_signal_while_a_pass_writes_its_images_leaves_every_image_on_disk_reported(tiny_model, tmp_path):
    """SIGINT once the second pass's images are landing (its writer threads busy): every image on disk has its path
    on stdout and its manifest line, and the account counts them."""
    import signal
    import time

    command = [pixart_bin(), "generate", "a", "--model", str(tiny_model), "--steps", "2", "--width", "64",
               "--height", "64", "--no-binning", "--num-images", "130", "--batch-size", "2", "--seed", "0",
               "-o", "race/"]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "race"
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if folder.is_dir() and sum(name.startswith("image-") for name in os.listdir(folder)) > 65:
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    on_disk = sorted(f"race/{name}" for name in os.listdir(folder) if name.startswith("image-"))
    assert process.returncode == 130 and len(on_disk) < 130, stderr
    assert sorted(stdout.splitlines()) == on_disk  # each image on disk reported once
    recorded = [json.loads(line)["path"] for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert sorted(f"race/{path}" for path in recorded) == on_disk  # each with its line (paths within the folder)
    assert f"error: interrupted; {len(on_disk)} of the run's 130 images are complete" in stderr, stderr


# --- class 12: an interrupted scale-out run is accounted once, truly, over every process ---------------------------
SMALL = ["--width", "64", "--height", "64", "--no-binning", "--steps", "2", "--seed", "1", "--device", "cpu"]


def _complete(folder):
    """Indices the manifest records whose image is there (as --resume counts them, less the digest)."""
    lines = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return sorted({line["index"] for line in lines if (folder / line["path"]).is_file()})


def _interrupt_after_first_path(command, cwd, env=None):
    """Run ``command`` in a session of its own, SIGINT the whole group once a path is on stdout (as Ctrl-C does)."""
    import signal
    import threading

    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, **(env or {})})  # fmt: skip
    paths, errors = [], []
    reader = threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True)
    reader.start()
    paths.append(process.stdout.readline())
    os.killpg(process.pid, signal.SIGINT)
    paths.extend(process.stdout)
    process.wait(timeout=300)
    reader.join(timeout=60)
    return process.returncode, [p.strip() for p in paths if p.strip()], errors


def test_sigint_to_a_torchrun_group_is_accounted_once_and_truly(tiny_model, tmp_path):
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "pixart_cli", "generate", "cat", "--num-images", "150", "-o", "out/", "--model", str(tiny_model),
               *SMALL]  # fmt: skip
    _, paths, errors = _interrupt_after_first_path(command, tmp_path)
    ours = [line for line in errors if line.startswith("error: ")]
    assert len(ours) == 1, errors  # rank 0's account; the other rank says nothing (torchrun says its own)
    complete = _complete(tmp_path / "out")
    assert ours[0].startswith(f"error: interrupted; {len(complete)} of the run's 150 images are complete by the 2 "), (
        ours
    )
    assert "--resume makes them" in ours[0]
    assert sorted(paths) == sorted(f"out/image-{i}.png" for i in complete)  # each complete image's path, once
    assert not list((tmp_path / "out").glob(".pixart-*"))


def test_sigint_to_a_ray_run_is_accounted_truly(tiny_model, tmp_path):
    pytest.importorskip("ray.data")
    command = [pixart_bin(), "generate", "cat", "--num-images", "150", "-o", "out/", "--model", str(tiny_model),
               "--ray", *SMALL]  # fmt: skip
    code, paths, errors = _interrupt_after_first_path(command, tmp_path, env={"RAY_ADDRESS": ""})
    ours = [line for line in errors if line.startswith("error: ")]
    assert code == 130 and len(ours) == 1, errors
    complete = _complete(tmp_path / "out")
    assert ours[0].startswith(f"error: interrupted; {len(complete)} of the run's 150 images are complete"), ours
    assert sorted(paths) == sorted(f"out/image-{i}.png" for i in complete)


# --- class 6: Ray after a worker, a raylet or a node dies ----------------------------------------------------------
# a dead raylet or node is known within about 2 s (Ray's default is 30 s): for the Ray the test starts, or pixart's
FAST_HEALTH_CHECK = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3",
                     "RAY_health_check_initial_delay_ms": "1000"}  # fmt: skip
# Ray 2.60's local ray.init (the tests before) writes ~/.ray/auth_token, and a `ray start --head` that finds one
# turns token authentication on, while `ray start --address` sends a token only with RAY_AUTH_MODE=token: the
# test's cluster says which mode, for every process that joins it
NO_TOKEN = {"RAY_AUTH_MODE": "disabled"}
RAY_TEXT = ("(raylet)", "\x1b[", "Traceback", "worker died", "retried")  # Ray's own lines, none of them ours


def _procs() -> dict[int, tuple[int, int, bytes]]:
    """pid -> (parent pid, session id, command line) of every live process, from /proc (zombies left out)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
                with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                    line = cmdline.read()
            except (OSError, IndexError, ValueError):
                continue
            if line and fields[0] != b"Z":
                table[int(name)] = (int(fields[1]), int(fields[3]), line)
    return table


def _family(root: int) -> dict[int, bytes]:
    """The processes of the run started as ``root``: its descendants, and the members of their sessions (the Ray
    driver's session holds a local Ray's raylet and workers)."""
    table = _procs()
    found, grew = {root}, True
    while grew:
        grew = False
        for pid, (parent, session, _) in table.items():
            if pid not in found and (parent in found or session in found):
                found.add(pid)
                grew = True
    return {pid: table[pid][2] for pid in found - {root} if pid in table}


def _in_sessions(sessions) -> list[int]:
    return [pid for pid, (_, session, _) in _procs().items() if session in sessions]


def _end_sessions(sessions) -> None:
    """SIGKILL every process of ``sessions`` (a Ray node started by ``_ray_start``: its raylet, agents, workers)."""
    import signal

    for pid in _in_sessions(sessions):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _ray_run(command, cwd, when, kill, env=None):
    """Run ``command``; once ``when(names in out/)`` holds, ``kill(the run's processes)`` (True once it killed).
    Returns (exit code, stdout, stderr, the names in out/ at the kill)."""
    import threading

    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "RAY_ADDRESS": "", **(env or {})})  # fmt: skip
    streams = {}
    readers = [threading.Thread(target=lambda name=name: streams.__setitem__(name, getattr(process, name).read()))
               for name in ("stdout", "stderr")]  # fmt: skip
    for reader in readers:
        reader.start()
    seen, deadline = None, time.monotonic() + 240
    while process.poll() is None and seen is None and time.monotonic() < deadline:
        names = os.listdir(cwd / "out") if (cwd / "out").is_dir() else []
        if when(names) and kill(_family(process.pid)):
            seen = names
        time.sleep(0.001)
    process.wait(timeout=240)
    for reader in readers:
        reader.join(timeout=60)
    assert seen is not None, ("nothing was killed", streams)
    return process.returncode, streams["stdout"], streams["stderr"], seen


def _kill_first(accept):
    """A ``kill`` for _ray_run: SIGKILL the first of the run's processes whose command line ``accept`` takes."""
    import signal

    def kill(processes) -> bool:
        for pid, line in processes.items():
            if accept(line):
                os.kill(pid, signal.SIGKILL)
                return True
        return False

    return kill


def _assert_manifest_matches_disk(folder, total):
    """Each image's newest manifest line names a file of that size and sha256 (what --resume checks)."""
    newest = {}
    for line in (folder / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        newest[record["index"]] = record
    assert sorted(newest) == list(range(total))
    for record in newest.values():
        data = (folder / record["path"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (record["size"], record["sha256"]), record


def _assert_accounted(code, stdout, stderr, folder, total, reason):
    """A run Ray lost: exit 1, its last line on stderr the only error line, naming ``reason`` and the complete
    images as --resume counts them; stdout lists exactly those; no temp file left."""
    complete = _complete(folder)
    lines = stderr.strip().splitlines()
    assert code == 1 and lines[-1].startswith(f"error: {reason}"), stderr
    assert f"; {len(complete)} of the run's {total} images are complete (recorded in " in lines[-1]
    assert lines[-1].endswith(f"the other {total - len(complete)} are not: --resume makes them")
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert sorted(stdout.splitlines()) == sorted(f"out/image-{i}.png" for i in complete)  # each once
    return complete


def _assert_no_ray_text(stderr):
    assert not [text for text in RAY_TEXT if text in stderr], stderr


def _temps(folder):
    return [name for name in os.listdir(folder) if name.startswith(".pixart-")]


def test_a_ray_actor_killed_while_it_writes_is_retried_and_leaves_no_temp_file(tiny_model, tmp_path):
    # under --json: stdout must stay one JSON document (Ray's driver prints nowhere near it; paths one per line are
    # the same stream, checked by the other Ray runs)
    pytest.importorskip("ray.data")
    command = [pixart_bin(), "generate", "cat", "--num-images", "64", "-o", "out/", "--model", str(tiny_model),
               "--ray", *SMALL, "--json"]  # fmt: skip
    # killed while a temp file of its unit's images is in out/ (or, should none be seen, once an image is there)
    writing = lambda names: any(name.startswith(".pixart-") or name.endswith(".png") for name in names)  # noqa: E731
    actor = _kill_first(lambda line: line.startswith(b"ray::MapWorker"))
    code, stdout, stderr, seen = _ray_run(command, tmp_path, writing, actor)
    assert code == 0, stderr
    paths = sorted(f"out/image-{i}.png" for i in range(64))
    document = json.loads(stdout)  # one JSON document: nothing of Ray's on stdout
    assert sorted(document["outputs"]) == paths and "error" not in document
    _assert_no_ray_text(stderr)
    assert "error" not in stderr
    _assert_manifest_matches_disk(tmp_path / "out", 64)
    assert not _temps(tmp_path / "out"), seen


def test_a_lost_raylet_ends_a_ray_run_with_its_account_and_resume_completes_it(tiny_model, tmp_path):
    pytest.importorskip("ray.data")
    command = [pixart_bin(), "generate", "cat", "--num-images", "100", "-o", "out/", "--model", str(tiny_model),
               "--ray", *SMALL]  # fmt: skip
    raylet = _kill_first(lambda line: line.split(b"\0")[0].endswith(b"/raylet"))
    landed = lambda names: any(name.endswith(".png") for name in names)  # noqa: E731
    code, stdout, stderr, _ = _ray_run(command, tmp_path, landed, raylet, env=FAST_HEALTH_CHECK)
    complete = _assert_accounted(code, stdout, stderr, tmp_path / "out", 100, "Ray lost the run: its driver process")
    assert 0 < len(complete) < 100
    _assert_no_ray_text(stderr)
    assert not _temps(tmp_path / "out")
    result = run_pixart(*command[1:], "--resume", "--json", cwd=tmp_path, env={"RAY_ADDRESS": "", **FAST_HEALTH_CHECK})
    document = json.loads(result.stdout)
    assert document["summary"]["skipped"] == len(complete) and len(document["outputs"]) == 100 - len(complete)
    _assert_manifest_matches_disk(tmp_path / "out", 100)


def _free_block(count: int) -> int:
    """The first of ``count`` consecutive ports that this machine can bind now."""
    import random

    for _ in range(200):
        base, probes = random.randrange(20_000, 32_000 - count), []  # below Linux's ephemeral ports (32768..)
        try:
            for port in range(base, base + count):
                probes.append(socket.socket())
                probes[-1].bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise AssertionError("no free block of ports")


def _ray_start(ports: int, *args) -> int:
    """`ray start ARGS` in a session of its own, on ports ``ports``.. (another Ray's are never touched); returns
    the session id, which every process of that node keeps (the raylet starts its workers in it)."""
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]  # fmt: skip
    numbered = [item for offset, name in enumerate(names) for item in (name, str(ports + offset))]
    command = [os.path.join(os.path.dirname(pixart_bin()), "ray"), "start", *args, *numbered, "--min-worker-port",
               str(ports + 10), "--max-worker-port", str(ports + 49), "--disable-usage-stats"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": "", **FAST_HEALTH_CHECK, **NO_TOKEN}
    node = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    output, _ = node.communicate(timeout=120)
    assert node.returncode == 0, output
    return node.pid


def test_a_two_node_ray_cluster_spreads_a_run_and_completes_it_when_a_node_is_stopped(tiny_model, tmp_path):
    """`ray start --head`, then `ray start --address` with its own CPU (and a custom resource): one actor per node,
    the units spread over both. The second node stopped mid-run (every process of it killed) is a killed worker
    whose node is gone: once the head's actor is done, Ray places the lost actor there and retries its unit, so
    the run completes, its manifest matching the disk (--resume finds nothing to make)."""
    import shutil
    import tempfile

    pytest.importorskip("ray.data")
    temp = tempfile.mkdtemp(prefix="pixart-ray-", dir="/tmp")  # Ray's socket paths must stay short
    ports, sessions = _free_block(120), []
    try:
        sessions.append(_ray_start(ports, "--head", "--port", str(ports + 100), "--temp-dir", temp, "--num-cpus", "1",
                                   "--include-dashboard", "false", "--dashboard-port", str(ports + 101),
                                   "--node-ip-address", "127.0.0.1"))  # fmt: skip
        address = f"127.0.0.1:{ports + 100}"
        sessions.append(_ray_start(ports + 50, "--address", address, "--num-cpus", "1", "--resources",
                                   '{"second_node": 1}', "--node-ip-address", "127.0.0.1"))  # fmt: skip
        # every actor up before the first unit is handed out (else the first one up may take them all)
        env = {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120", **NO_TOKEN}
        base = ["generate", "cat", "--model", str(tiny_model), "--ray", "--ray-address", address, *SMALL,
                "--num-images", "200", "-o", "out/"]  # fmt: skip
        # 4 units of 50, one at a time per actor: once 2 are back, each node holds one of the other two
        round_one = lambda names: sum(name.endswith(".png") for name in names) >= 100  # noqa: E731
        stop_node = lambda processes: _end_sessions(sessions[1:]) or True  # noqa: E731
        code, stdout, stderr, _ = _ray_run([pixart_bin(), *base], tmp_path, round_one, stop_node, env=env)
        assert code == 0 and "one actor per node (2)" in stderr and "made on 2 node(s)" in stderr, stderr
        assert sorted(stdout.splitlines()) == sorted(f"out/image-{i}.png" for i in range(200))
        _assert_no_ray_text(stderr)
        assert not _temps(tmp_path / "out")
        _assert_manifest_matches_disk(tmp_path / "out", 200)
        result = run_pixart(*base, "--resume", cwd=tmp_path, env=env)
        assert "wrote 0 image(s), skipped 200 already complete" in result.stderr, result.stderr
    finally:
        _end_sessions(sessions)
        shutil.rmtree(temp, ignore_errors=True)
    time.sleep(0.5)
    assert not _in_sessions(sessions)  # nothing of either node is left


def test_a_ray_cluster_left_with_nothing_an_actor_can_run_on_is_told_once():
    """The capacity watch (ray_run.CapacityWatch), on a cluster that loses its last GPU: told once, after the wait;
    a GPU back in time tells nothing."""
    from pixart_cli.scale.ray_run import CapacityWatch

    class Cluster:
        held = [{"GPU": 2.0}, {"GPU": 0.0}, {"GPU": 1.0}] + [{"GPU": 0.0}] * 10

        def cluster_resources(self):
            return self.held.pop(0) if len(self.held) > 1 else self.held[0]

    told = []
    with CapacityWatch(Cluster(), "GPU", 2.0, told.append):
        deadline = time.monotonic() + 20
        while not told and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)
    assert told == ["Ray lost the run's nodes: the cluster has held no GPU for 2 s, and its actors need one each"]
