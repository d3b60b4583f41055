"""CLI behaviour: exit codes, exact stdout, one-line errors, nothing written on failure, instant --help."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from helpers import SEED, assert_one_line_error, encoded, invoke, run_pixart
from pixart_cli.cli.commands import app
from pixart_cli.files import staged

runner = CliRunner()


@pytest.fixture(scope="module")
def embeddings_file(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("emb") / "embeddings.pt"
    staged.save(path, encoded(["a cute cat"], tiny_model))
    return path


def test_help_does_not_import_torch_and_is_fast():
    code = (
        "import sys, time; t = time.perf_counter(); from pixart_cli.cli.commands import app; "
        "from typer.testing import CliRunner; r = CliRunner().invoke(app, ['--help']); "
        "assert r.exit_code == 0 and 'encode' in r.stdout; "
        "print('torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pixart_cli", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - started < 2.0  # generous for a loaded CI box; typically ~0.25 s


@pytest.mark.parametrize(
    "command, options",
    [
        ("encode", ["--negative-prompt TEXT", "--max-sequence-length N", "--revision REV", "--cache DIR"]),
        ("denoise", ["EMBEDDINGS", "--steps N", "--guidance-scale SCALE", "--seed N", "--batch-size N"]),
        ("decode", ["LATENTS", "--batch-size N", "Images per VAE call"]),
        ("generate", ["[PROMPT]...", "--steps N", "--vram SIZE", "--prompts-file FILE"]),
        ("info", ["FILE", "--json"]),
        ("convert", ["MODEL", "--output DIR", "--dtype fp16|bf16", "--components NAMES", "--overwrite"]),
    ],
)
def test_help_names_each_option_with_a_plain_metavar(command, options):
    for flag in ("--help", "-h"):
        result = runner.invoke(app, [command, flag], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        for option in options:
            assert option in result.stdout, (option, result.stdout)
        # options show a plain metavar, never a Python type
        option_lines = [line for line in result.stdout.splitlines() if line.lstrip().startswith("-")]
        assert not any(leak in line for line in option_lines for leak in ("<int>", "<str>", "<float>", "<path>"))


def test_help_defaults_come_from_the_family_table():
    from pixart_cli.models.source import FAMILIES

    text = " ".join(runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "400"}).stdout.split())
    for family in FAMILIES.values():
        assert f"{family.steps} for" in text and f"{family.max_sequence_length:g} for" in text


def test_command_list_is_not_cut():
    result = runner.invoke(app, ["-h"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    listed = result.stdout.split("Commands:")[1].splitlines()[1:]
    assert [line.split()[0] for line in listed if line.strip()] == [
        "encode",
        "denoise",
        "decode",
        "encode-image",
        "encode-control",
        "encode-mask",
        "generate",
        "info",
        "compare",
        "convert",
    ]
    assert not any(line.rstrip().endswith("...") for line in listed), listed


def test_json_error_is_a_json_document(tmp_path):
    result = invoke("denoise", "missing.pt", "--json", cwd=tmp_path)
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    assert document["exit_code"] == 2 and "missing.pt" in document["error"] and document["outputs"] == []


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["denoise", "{emb}", "--steps", "0"], ["--steps 0", "between 1 and 1000"]),
        (["denoise", "{emb}", "--steps", "1"], ["--steps 1", "DPMSolverMultistepScheduler", "--steps 2"]),
        (["denoise", "{emb}", "--guidance-scale", "-1"], ["--guidance-scale -1.0", "from 0 to 100"]),
        (["denoise", "{emb}", "--width", "100"], ["--width 100", "multiple of 8"]),
        (["denoise", "{emb}", "--width", "99999992"], ["--width 99999992", "maximum"]),
        (["denoise", "{emb}", "--num-images", "0"], ["--num-images 0"]),
        (["denoise", "{emb}", "--seed", "-3"], ["--seed -3"]),
        (
            ["denoise", "{emb}", "--seed", "4294967295", "--num-images", "2"],
            ["--seed 4294967295", "at most 4294967294"],
        ),
        (["denoise", "{emb}", "--device", "tpu"], ["--device 'tpu'", "unknown device"]),
        (["denoise", "{emb}", "--dtype", "fp8"], ["--dtype 'fp8'"]),
        (["denoise", "{emb}", "-o", "{emb}"], ["is also the input file"]),
        (["denoise", "{emb}", "-o", "missing/dir/x.pt"], ["does not exist"]),
        (["denoise", "nope.pt"], ["nope.pt", "no such file"]),
        (["decode", "{emb}"], ["is an embeddings file", "needs a latents file"]),
        (["encode", ""], ["PROMPT #1 is empty"]),
        (["encode", "cat", "--model", "/no/such/folder"], ["--model /no/such/folder", "no such folder"]),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(args, fragments, embeddings_file, tmp_path):
    args = [a.replace("{emb}", str(embeddings_file)) for a in args]
    before = sorted(tmp_path.iterdir())
    result = invoke(*args, cwd=tmp_path)
    assert_one_line_error(result, 2, *fragments)
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    "args, line",
    [
        (["denoise", "x.pt", "--steps", "abc"], "--steps 'abc': must be a whole number; see `pixart denoise --help`"),
        (["denoise", "x.pt", "-g", "x"], "--guidance-scale 'x': must be a number; see `pixart denoise --help`"),
        (["denoise", "x.pt", "--bogus"], "--bogus: no such option; see `pixart denoise --help`"),
        (["denoise"], "EMBEDDINGS: missing; this argument is required; see `pixart denoise --help`"),
        (["decode", "x.pt", "--device"], "--device: needs a value; see `pixart decode --help`"),
        (["nosuch"], "nosuch: no such command; see `pixart --help`"),
        (["generat"], "generat: no such command (did you mean generate?); see `pixart --help`"),
    ],
)
def test_parser_errors_are_one_line_and_a_json_document(args, line, tmp_path):
    """The parser's errors end as our own checks do (a real process: the console script's main runs the parser)."""
    for as_json in (False, True):
        # --json right after the command: at the end it would be the value of an option that lacks one
        result = run_pixart(args[0], *(["--json"] if as_json else []), *args[1:], cwd=tmp_path, check=False)
        assert result.returncode == 2 and result.stderr == f"error: {line}\n", result.stderr
        if as_json:
            assert json.loads(result.stdout) == {
                "command": args[0] if args[0] not in ("nosuch", "generat") else "pixart",
                "outputs": [],
                "error": line,
                "exit_code": 2,
            }
        else:
            assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_help_version_and_a_bare_command_in_a_real_process(tmp_path):
    shown = run_pixart("-h", cwd=tmp_path)
    assert shown.stdout.startswith("Usage: pixart") and shown.stderr == ""
    assert run_pixart("--version", cwd=tmp_path).stdout.startswith("pixart-cli ")
    bare = run_pixart(cwd=tmp_path, check=False)  # `pixart` alone: the help, on stderr, exit 2 (as before)
    assert bare.returncode == 2 and bare.stderr.startswith("Usage: pixart") and bare.stdout == ""


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
    assert staged.load_latents(tmp_path / "b.pt").meta["seeds"] == [seed]


def test_latents_file_records_what_decode_needs(embeddings_file, tmp_path):
    result = invoke(
        "denoise", embeddings_file, "--steps", "2", "--seed", SEED, "--width", "200", "--height", "144", cwd=tmp_path
    )
    assert result.exit_code == 0, result.stderr
    meta = staged.load_latents(tmp_path / "latents.pt").meta
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
    result = invoke(
        "generate",
        "a cat",
        "a dog",
        "--num-images",
        "2",
        "--steps",
        "2",
        "--seed",
        "3",
        "--model",
        tiny_model,
        "-o",
        "pic.png",
        cwd=tmp_path,
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == ["pic-0.png", "pic-1.png", "pic-2.png", "pic-3.png"]
    from PIL import Image

    seeds = [json.loads(Image.open(tmp_path / f"pic-{i}.png").text["pixart"])["seed"] for i in range(4)]
    assert seeds == [3, 4, 5, 6]
