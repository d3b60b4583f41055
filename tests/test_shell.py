"""The command in a shell (issue 21): `-` reads a .pt file (or an image) from stdin, a reader that closes the pipe
early ends the command quietly, an unquoted prompt gets a note, and messages that name the fix. Real processes."""

from __future__ import annotations

import json
import os
import pty
import shlex
import subprocess
import sys

import pytest
import torch

from helpers import SEED, denoised, encoded, invoke, max_diff, pixart_bin, read_png, run_pixart
from pixart_cli import random_model
from pixart_cli.cli.prompts_file import unquoted_note
from pixart_cli.errors import EXIT_SIGPIPE
from pixart_cli.files import staged


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    """emb.pt, lat.pt (2 steps, seed SEED) and cat.png decoded from it, of the tiny model."""
    folder = tmp_path_factory.mktemp("shell")
    embeddings = encoded(["a cute cat"], tiny_model)
    staged.save(folder / "emb.pt", embeddings)
    staged.save(folder / "lat.pt", denoised(embeddings, steps=2, seed=SEED))
    run_pixart("decode", "lat.pt", "-q", "-o", "cat.png", cwd=folder)
    return folder


def shell(script: str, cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    """``script`` in bash with pipefail, `pixart` being the installed console script."""
    script = f'set -o pipefail; pixart() {{ {shlex.quote(pixart_bin())} "$@"; }}; {script}'
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def one_line_error(result, code: int, *fragments: str) -> str:
    """A real process's one-line error (exit ``code``): nothing on stdout, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


# --- 1. `-` reads standard input ---------------------------------------------------------------------------


def test_the_staged_flow_runs_through_pipes(files, tiny_model, tmp_path):
    """encode -o - | denoise - -o - | decode -: the same image as the flow through files."""
    result = shell(
        f"pixart encode 'a cute cat' -m {shlex.quote(str(tiny_model))} -q -o - "
        f"| pixart denoise - --steps 2 --seed {SEED} -q -o - | pixart decode - -q -o cat.png",
        tmp_path,
    )
    assert result.returncode == 0 and result.stdout == "cat.png\n" and result.stderr == "", result.stderr
    assert max_diff(read_png(tmp_path / "cat.png"), read_png(files / "cat.png")) == 0


def test_init_latents_from_stdin(files, tiny_model, tmp_path):
    result = shell(
        f"pixart encode-image {files / 'cat.png'} -m {shlex.quote(str(tiny_model))} -q -o - "
        f"| pixart denoise {files / 'emb.pt'} --init-latents - --steps 2 --seed {SEED} -q -o i2i.pt",
        tmp_path,
    )
    assert result.returncode == 0 and result.stdout == "i2i.pt\n", result.stderr
    assert staged.load_latents(tmp_path / "i2i.pt").meta["strength"] is not None


def test_info_and_compare_read_stdin(files, tmp_path):
    latents = json.loads(run_pixart("info", "-", "--json", cwd=tmp_path, stdin=(files / "lat.pt").read_bytes()).stdout)
    assert latents["kind"] == "latents" and latents["file"] == "-" and latents["meta"]["seeds"] == [SEED]
    image = json.loads(run_pixart("info", "-", "--json", cwd=tmp_path, stdin=(files / "cat.png").read_bytes()).stdout)
    assert image["kind"] == "image" and image["settings"]["seed"] == SEED
    same = run_pixart("compare", "-", files / "emb.pt", "--json", cwd=tmp_path, stdin=(files / "emb.pt").read_bytes())
    assert [pair["max_abs_diff"] for pair in json.loads(same.stdout)["pairs"]] == [0.0, 0.0]
    pictures = run_pixart("compare", files / "cat.png", "-", cwd=tmp_path, stdin=(files / "cat.png").read_bytes())
    assert "inf (identical)" in pictures.stdout


@pytest.mark.parametrize(
    "args, line",
    [
        (["compare", "-", "-"], "A and B: both are -, but standard input holds one file; give one of them as a path"),
        (["denoise", "-", "--init-latents", "-"], "EMBEDDINGS and --init-latents: both are -"),
        (["generate", "--prompts-file", "-", "--image", "-"], "--prompts-file and --image: both are -"),
    ],
)
def test_two_stdin_inputs_are_one_error(files, args, line, tmp_path):
    result = invoke(*args, cwd=tmp_path, stdin=(files / "emb.pt").read_bytes())
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {line}"), result.stderr
    assert len(result.stderr.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_stdin_is_refused_empty_an_image_or_a_terminal(files, tmp_path):
    one_line_error(run_pixart("decode", "-", cwd=tmp_path, check=False, stdin=b""), 2, "- (standard input): is empty")
    image = run_pixart("denoise", "-", cwd=tmp_path, check=False, stdin=(files / "cat.png").read_bytes())
    one_line_error(image, 2, "- (standard input): is an image", "`pixart encode-image")
    leader, follower = pty.openpty()
    try:
        typing = subprocess.run(
            [pixart_bin(), "denoise", "-"], cwd=tmp_path, stdin=follower, capture_output=True, text=True, timeout=60
        )
    finally:
        os.close(leader)
        os.close(follower)
    one_line_error(typing, 2, "EMBEDDINGS -: standard input is a terminal")
    assert list(tmp_path.iterdir()) == []


def test_stdin_is_bounded_before_it_is_read(tmp_path):
    """An endless stream: at most the limit + 1 byte is read, then one line (the limit lowered in the process)."""
    code = (
        "import sys; import pixart_cli.files.stdin as s; s.MAX_STDIN_BYTES = 4096; "
        "from pixart_cli.cli.main import main; main(sys.argv[1:])"
    )
    result = shell(f"yes | {shlex.quote(sys.executable)} -c {shlex.quote(code)} denoise -", tmp_path, timeout=60)
    one_line_error(result, 2, "EMBEDDINGS -: standard input holds more than 4 KiB", "write it to a file")


# --- 2. a reader that closes the pipe early -----------------------------------------------------------------


def test_head_closing_the_pipe_ends_info_quietly(files, tmp_path):
    """`pixart info FILE --json | head -3`: exit 141 (as coreutils killed by SIGPIPE), no line, no traceback."""
    data = torch.load(files / "emb.pt", weights_only=True)
    data["meta"]["prompts"] = ["a cute cat " * 20_000]  # a document far larger than a pipe holds
    torch.save(data, tmp_path / "big.pt")
    for args in ("info big.pt --json", "info big.pt", f"info {files / 'cat.png'} --json"):
        result = shell(f"pixart {args} 2>err.txt | head -3; echo status=${{PIPESTATUS[0]}}", tmp_path)
        status = result.stdout.splitlines()[-1]
        assert status in (f"status={EXIT_SIGPIPE}", "status=0"), result.stdout  # 0: all fit in the pipe
        assert (tmp_path / "err.txt").read_text() == "", args
        if "big" in args:
            assert status == f"status={EXIT_SIGPIPE}"


@pytest.mark.parametrize("command", ["info", "compare", "encode"])
def test_a_closed_stdout_ends_quietly_once_the_outputs_are_written(command, files, tiny_model, tmp_path):
    args = {
        "info": ["info", files / "lat.pt"],
        "compare": ["compare", files / "lat.pt", files / "lat.pt"],
        "encode": ["encode", "a cute cat", "-m", tiny_model, "-o", "e.pt"],
    }[command]
    process = subprocess.Popen(
        [pixart_bin(), *map(str, args)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    process.stdout.close()  # the reader is gone before the first line
    assert process.wait(timeout=300) == EXIT_SIGPIPE
    stderr = process.stderr.read()
    assert "error" not in stderr and "Traceback" not in stderr and "Exception" not in stderr, stderr
    if command == "encode":
        assert staged.load_embeddings(tmp_path / "e.pt").meta["prompts"] == ["a cute cat"]


# --- 3. an unquoted prompt ---------------------------------------------------------------------------------


def test_single_word_prompts_get_a_note(tiny_model, tmp_path):
    result = run_pixart("encode", "cute", "cat", "-m", tiny_model, "-o", "e.pt", cwd=tmp_path)
    assert result.stdout == "e.pt\n"
    assert 'read 2 prompts, one per PROMPT argument; a prompt with spaces needs quotes: "cute cat" is one prompt' in (
        result.stderr
    )
    assert staged.load_embeddings(tmp_path / "e.pt").meta["prompts"] == ["cute", "cat"]
    assert unquoted_note(["a cute cat"]) is None and unquoted_note(["cat"]) is None
    assert unquoted_note(["a cat", "dog"]) is None and unquoted_note(None) is None


# --- 4. messages that name the fix -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dmd_model(tmp_path_factory):
    return random_model.build(tmp_path_factory.mktemp("dmd") / "dmd", "tiny", family="dmd")


def test_messages_name_the_fix(files, dmd_model, tmp_path):
    lines = {
        "extra": one_line_error(run_pixart("denoise", files / "emb.pt", "latents.pt", cwd=tmp_path, check=False), 2),
        "image": one_line_error(run_pixart("denoise", files / "cat.png", cwd=tmp_path, check=False), 2),
        "compare": one_line_error(run_pixart("compare", files / "emb.pt", cwd=tmp_path, check=False), 2),
        "offline": one_line_error(run_pixart("encode", "cat", "-m", "someone/absent", cwd=tmp_path, check=False), 1),
        "base": one_line_error(run_pixart("encode", "cat", "-m", dmd_model, cwd=tmp_path, check=False), 1),
    }
    assert lines["extra"] == (
        "error: latents.pt: unexpected extra argument; denoise takes one argument, EMBEDDINGS; to write the output "
        "to latents.pt, pass -o latents.pt; see `pixart denoise --help`"
    )
    image = f"{files / 'cat.png'}: is an image, not a .pt file; image to image starts with `pixart encode-image"
    assert image in lines["image"]
    assert lines["compare"] == "error: B: missing; this argument is required; see `pixart compare --help`"
    assert "offline mode is on (HF_HUB_OFFLINE is set)" in lines["offline"]
    assert "LocalEntryNotFoundError" not in lines["offline"]
    assert lines["base"].startswith(
        f"error: --model {dmd_model}: has no tokenizer, text_encoder or vae of its own and takes them from the base "
        "model PixArt-alpha/PixArt-XL-2-1024-MS (the default; $PIXART_BASE_MODEL names another)"
    )
    assert "offline mode is on" in lines["base"]
    assert "set PIXART_BASE_MODEL to a local diffusers folder" in lines["base"]
    missing = run_pixart("encode", "cat", "-m", dmd_model, cwd=tmp_path, check=False, env={"PIXART_BASE_MODEL": "nope"})
    one_line_error(missing, 2, "from the base model: PIXART_BASE_MODEL=nope: no such folder", "set PIXART_BASE_MODEL")
    assert list(tmp_path.iterdir()) == []


def test_help_says_what_the_commands_do(tmp_path):
    def shown(*args):
        result = invoke(*args, "--help", cwd=tmp_path)
        assert result.exit_code == 0
        return " ".join(result.stdout.replace("│", " ").split())

    assert "Seed of the first image (image-0)" in shown("generate")
    compare = shown("compare")
    assert "{A} {B}" in compare and "The first file" in compare and "The second file, of the same kind as A" in compare
    assert "instead of the paths" not in compare and "Print the comparison as one JSON document" in compare
    for command in ("denoise", "decode", "info"):
        assert "- reads stdin" in shown(command)


def test_random_model_keeps_library_noise_off_the_terminal(tmp_path):
    """No bitsandbytes kernel probe, no save progress bar, no "cannot be saved" for dmd's absent parts."""
    result = subprocess.run(
        [sys.executable, "-m", "pixart_cli.random_model", tmp_path / "dmd", "--family", "dmd"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout == f"{tmp_path / 'dmd'}\n" and result.stderr == "", result.stderr


def test_a_closed_stdout_or_stderr_changes_nothing_but_what_is_shown(files, tmp_path):
    """`>&-` and `2>&-` start pixart without that stream: the command runs as it would, with the same exit code."""
    lat = files / "lat.pt"
    done = shell(f"{shlex.quote(pixart_bin())} decode {shlex.quote(str(lat))} -o out.png >&-", tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr and (tmp_path / "out.png").exists(), done.stderr
    bad = shell(f"{shlex.quote(pixart_bin())} info missing.pt --json >&-", tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    quiet = shell(f"{shlex.quote(pixart_bin())} decode missing.pt 2>&-", tmp_path)
    assert quiet.returncode == 2 and quiet.stdout == ""


def test_prompts_files_that_are_not_text_get_one_line(tmp_path):
    (tmp_path / "folder").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "picture.png")
    for path, fragment in (("folder", "is a folder"), ("missing.txt", "no such file"), ("picture.png", "not UTF-8")):
        result = run_pixart("encode", "--prompts-file", path, cwd=tmp_path, check=False)
        one_line_error(result, 2, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "picture.png"]


def test_convert_refuses_dash_as_its_folder(tiny_model, tmp_path):
    one_line_error(run_pixart("convert", tiny_model, "-o", "-", cwd=tmp_path, check=False), 2, "not a stream")
    assert list(tmp_path.iterdir()) == []
