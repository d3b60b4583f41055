"""CLI behaviour: exit codes, exact stdout, one-line errors, nothing written on failure, instant --help."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from conftest import SEED
from pixart_cli import artifacts
from pixart_cli.cli import app
from pixart_cli.encode import encode

runner = CliRunner()


def invoke(*args, cwd):
    """Run the CLI in this process (fast) from folder ``cwd``."""
    import os

    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:
        os.chdir(previous)


@pytest.fixture(scope="module")
def embeddings_file(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("emb") / "embeddings.pt"
    artifacts.save(path, encode(["a cute cat"], model=str(tiny_model), device="cpu"))
    return path


def assert_one_line_error(result, code, *fragments):
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""


def test_help_does_not_import_torch_and_is_fast():
    code = ("import sys, time; t = time.perf_counter(); from pixart_cli.cli import app; "
            "from typer.testing import CliRunner; r = CliRunner().invoke(app, ['--help']); "
            "assert r.exit_code == 0 and 'encode' in r.stdout; "
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pixart_cli", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - started < 2.0  # generous for a loaded CI box; typically ~0.25 s


def test_every_command_has_help():
    for command in ("encode", "denoise", "decode", "generate"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--device" in result.stdout


@pytest.mark.parametrize("args, fragments", [
    (["denoise", "{emb}", "--steps", "0"], ["--steps 0", "at least 1"]),
    (["denoise", "{emb}", "--steps", "1"], ["--steps 1", "DPMSolverMultistepScheduler", "--steps 2"]),
    (["denoise", "{emb}", "--guidance-scale", "-1"], ["--guidance-scale -1.0", "0 or more"]),
    (["denoise", "{emb}", "--width", "100"], ["--width 100", "multiple of 8"]),
    (["denoise", "{emb}", "--width", "99999992"], ["--width 99999992", "maximum"]),
    (["denoise", "{emb}", "--num-images", "0"], ["--num-images 0"]),
    (["denoise", "{emb}", "--seed", "-3"], ["--seed -3"]),
    (["denoise", "{emb}", "--device", "tpu"], ["--device 'tpu'", "unknown device"]),
    (["denoise", "{emb}", "--dtype", "fp8"], ["--dtype 'fp8'"]),
    (["denoise", "{emb}", "-o", "{emb}"], ["is also the input file"]),
    (["denoise", "{emb}", "-o", "missing/dir/x.pt"], ["does not exist"]),
    (["denoise", "nope.pt"], ["nope.pt", "no such file"]),
    (["decode", "{emb}"], ["is an embeddings file", "needs a latents file"]),
    (["encode", ""], ["PROMPT #1 is empty"]),
    (["encode", "cat", "--model", "/no/such/folder"], ["--model /no/such/folder", "no such folder"]),
])
def test_bad_input_is_one_line_exit_2_nothing_written(args, fragments, embeddings_file, tmp_path):
    args = [a.replace("{emb}", str(embeddings_file)) for a in args]
    before = sorted(tmp_path.iterdir())
    result = invoke(*args, cwd=tmp_path)
    assert_one_line_error(result, 2, *fragments)
    assert sorted(tmp_path.iterdir()) == before


def test_unknown_hub_model_offline_is_runtime_error(tmp_path):
    result = invoke("encode", "cat", "--model", "nobody/not-a-model", cwd=tmp_path)
    assert_one_line_error(result, 1, "nobody/not-a-model", "hf download", "local diffusers folder")


def test_debug_env_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXART_DEBUG", "1")
    result = invoke("denoise", "missing.pt", cwd=tmp_path)
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_quiet_and_json_outputs(embeddings_file, tmp_path):
    quiet = invoke("denoise", embeddings_file, "--steps", "2", "--seed", "5", "-q", "-o", "a.pt", cwd=tmp_path)
    assert quiet.exit_code == 0 and quiet.stdout == "a.pt\n" and quiet.stderr == ""
    as_json = invoke("denoise", embeddings_file, "--steps", "2", "-o", "b.pt", "--json", cwd=tmp_path)
    document = json.loads(as_json.stdout)
    assert document["command"] == "denoise" and document["outputs"] == ["b.pt"]
    seed = document["seeds"][0]
    assert f"seed: {seed}" in as_json.stderr  # a random seed is shown and recorded
    assert artifacts.load_latents(tmp_path / "b.pt").meta["seeds"] == [seed]


def test_latents_file_records_what_decode_needs(embeddings_file, tmp_path):
    result = invoke("denoise", embeddings_file, "--steps", "2", "--seed", SEED, "--width", "200", "--height", "144",
                    cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    meta = artifacts.load_latents(tmp_path / "latents.pt").meta
    assert meta["requested_width"] == 200 and meta["requested_height"] == 144
    assert meta["seeds"] == [SEED] and meta["steps"] == 2 and meta["guidance_scale"] == 4.5
    assert meta["scheduler"] == "DPMSolverMultistepScheduler" and meta["family"] == "alpha"
    decoded = invoke("decode", "latents.pt", "-o", "out/", cwd=tmp_path) if (tmp_path / "out").mkdir() is None else None
    assert decoded.exit_code == 0 and decoded.stdout == "out/image.png\n"
    from PIL import Image

    with Image.open(tmp_path / "out" / "image.png") as image:
        assert image.size == (200, 144)
        assert "Seed: 0, Size: 200x144" in image.text["parameters"]
        assert json.loads(image.text["pixart"])["prompt"] == "a cute cat"


def test_several_images_get_numbered_paths(tiny_model, tmp_path):
    result = invoke("generate", "a cat", "a dog", "--num-images", "2", "--steps", "2", "--seed", "3",
                    "--model", tiny_model, "-o", "pic.png", cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == ["pic-0.png", "pic-1.png", "pic-2.png", "pic-3.png"]
    from PIL import Image

    seeds = [json.loads(Image.open(tmp_path / f"pic-{i}.png").text["pixart"])["seed"] for i in range(4)]
    assert seeds == [3, 4, 5, 6]
