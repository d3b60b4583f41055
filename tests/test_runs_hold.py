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
