"""--devices: one process drives several devices (a worker thread each, a shared queue of units). On this CPU-only
machine the same code path runs over CPU "devices" (--devices cpu,cpu): the images must equal one process's, the
manifest must be complete, and an interrupted or failing run must leave a true account."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_one_line_error, invoke, read_png, run_pixart

PROMPTS = "a cute cat\na dog\na bowl of fruit\n"


def _images(folder: Path) -> dict[str, np.ndarray]:
    return {path.name: read_png(path) for path in sorted(folder.glob("image-*.png"))}


def test_two_devices_give_one_process_s_images_and_manifest(tiny_model, tmp_path):
    (tmp_path / "p.txt").write_text(PROMPTS)
    common = ["--prompts-file", "p.txt", "--num-images", "2", "--seed", "7", "--steps", "3", "--model", tiny_model]
    run_pixart("generate", *common, "--device", "cpu", "-o", "one/", cwd=tmp_path)
    result = run_pixart("generate", *common, "--devices", "cpu,cpu", "-o", "two/", "--json", cwd=tmp_path)
    document = json.loads(result.stdout)
    assert document["summary"]["written"] == 6 and sorted(document["outputs"]) == [
        f"two/image-{i}.png" for i in range(6)
    ]
    one, two = _images(tmp_path / "one"), _images(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 6
    for name in one:
        assert np.array_equal(one[name], two[name]), name  # pixel difference 0
    lines = [json.loads(line) for line in (tmp_path / "two" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(6))
    assert {line["seed"] for line in lines} == set(range(7, 13))
    # --resume of the finished run makes nothing
    again = run_pixart("generate", *common, "--devices", "cpu,cpu", "-o", "two/", "--resume", cwd=tmp_path)
    assert again.stdout == "" and "skipped 6 already complete" in again.stderr


def test_a_failing_device_ends_the_run_with_one_line_naming_it(tiny_model, tmp_path):
    """cuda:0 on a machine without CUDA fails in its worker; the CPU worker stops at its next step. What was
    written is on stdout, on disk and in the manifest alike."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "p.txt").write_text(PROMPTS)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "pixart"), "generate", "--prompts-file", "p.txt", "--steps", "2"]
        + ["--model", str(tiny_model), "--seed", "1", "--devices", "cpu,cuda:0", "-o", "out/"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: cuda:0: "), result.stderr
    assert "Traceback" not in result.stderr
    written = sorted(result.stdout.split())
    assert written == sorted(f"out/{path.name}" for path in (tmp_path / "out").glob("image-*.png"))
    manifest = tmp_path / "out" / "manifest.jsonl"
    recorded = manifest.read_text().splitlines() if manifest.exists() else []
    assert len(recorded) == len(written)


def test_sigint_mid_run_leaves_a_true_account(tiny_model, tmp_path):
    (tmp_path / "p.txt").write_text(PROMPTS * 4)
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "pixart"), "generate", "--prompts-file", "p.txt", "--steps", "200"]
        + ["--model", str(tiny_model), "--seed", "1", "--devices", "cpu,cpu", "-o", "out/"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PIXART_DEBUG": "0"},
    )
    for line in process.stderr:
        if line.startswith(("cpu #1: denoise: plan", "cpu #2: denoise: plan")):  # a worker is denoising
            break
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: interrupted"), stderr
    written = sorted(stdout.split())
    on_disk = sorted(f"out/{path.name}" for path in (tmp_path / "out").glob("image-*.png"))
    assert written == on_disk
    manifest = tmp_path / "out" / "manifest.jsonl"
    assert len(manifest.read_text().splitlines() if manifest.exists() else []) == len(on_disk)
    assert not list((tmp_path / "out").glob(".pixart-*"))  # no temp file left


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--devices", "cpu"], "give two or more devices"),
        (["--devices", "cpu,gpu"], "name devices as all"),
        (["--devices", "cpu,cpu", "--device", "cpu"], "give one of the two"),
        (["--devices", "cpu,cpu", "--ray"], "--devices: spreads the images"),
    ],
)
def test_bad_devices_are_one_line(tiny_model, tmp_path, args, fragment):
    result = invoke("generate", "a cat", "--model", tiny_model, "-o", "out/", *args, cwd=tmp_path)
    assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "out").exists()
