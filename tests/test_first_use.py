"""A new user's first try-out on a fresh clone, each finding as a real process: a .bin-only model folder (loaded
and converted by one rule), an output location that cannot be written (refused before any model loads), a stdout
that cannot be written (the last line true), `-` as the PROMPT (stdin, as --prompts-file -), the messages of
--resume's manifest, init latents, a pipe given by name and --devices' lines, and a test ControlNet adapter made
offline."""

from __future__ import annotations

import pytest

from helpers import assert_one_line_error, run_pixart

SMALL = ["--width", "64", "--height", "64", "--no-binning", "--steps", "2", "--seed", "1"]


@pytest.fixture(scope="module")
def emb(tiny_model, tmp_path_factory):
    """emb.pt of the tiny model, and a PNG to encode as init latents or an edge map."""
    folder = tmp_path_factory.mktemp("first-use")
    run_pixart("encode", "a cute cat", "--model", tiny_model, "-q", "-o", "emb.pt", cwd=folder)
    run_pixart("generate", "a cute cat", "--model", tiny_model, *SMALL, "-q", "-o", "cat.png", cwd=folder)
    return folder


# --- 5. messages -------------------------------------------------------------------------------------------------
def test_resume_says_the_manifest_is_a_link_and_what_to_do(tiny_model, tmp_path):
    common = ["generate", "a cute cat", "--model", tiny_model, *SMALL, "-o", "out/"]
    run_pixart(*common, "-q", cwd=tmp_path)
    manifest = tmp_path / "out" / "manifest.jsonl"
    manifest.rename(tmp_path / "out" / "real.jsonl")
    manifest.symlink_to("real.jsonl")
    result = run_pixart(*common, "--resume", cwd=tmp_path, check=False)
    assert_one_line_error(
        result, 2, "out/manifest.jsonl: is a symbolic link (to real.jsonl)", "replace the link with the file itself"
    )
    assert "(mv " in result.stderr and manifest.is_symlink()
    manifest.unlink()
    manifest.symlink_to("gone.jsonl")
    assert_one_line_error(
        run_pixart(*common, "--resume", cwd=tmp_path, check=False), 2, "remove it (it points nowhere)"
    )


def test_init_latents_are_named_by_the_command_that_makes_them(tiny_model, emb, tmp_path):
    run_pixart("encode-image", emb / "cat.png", "--model", tiny_model, "-q", "-o", "init.pt", cwd=tmp_path)
    result = run_pixart("denoise", "init.pt", cwd=tmp_path, check=False)
    assert_one_line_error(
        result, 2, "init.pt: is an init latents file (from pixart encode-image)", "needs an embeddings file"
    )
    assert "pixart denoise" not in result.stderr


def test_a_pipe_given_by_its_name_is_told_to_be_given_as_dash(emb, tmp_path):
    result = run_pixart("info", "/dev/stdin", cwd=tmp_path, check=False, stdin=(emb / "emb.pt").read_bytes())
    assert_one_line_error(result, 2, "/dev/stdin: is a named pipe (FIFO)", "give - in place of /dev/stdin")


def test_devices_lines_name_their_device_once(tiny_model, tmp_path):
    result = run_pixart(
        "generate", "a cute cat", "--model", tiny_model, *SMALL, "--num-images", "2", "--devices", "cpu,cpu",
        "-o", "out/", cwd=tmp_path,
    )  # fmt: skip
    lines = result.stderr.splitlines()
    assert lines[0] == "devices: cpu #1, cpu #2; 2 unit(s) of up to 1 images", result.stderr
    assert lines[-1].startswith("generate: wrote 2 image(s)")
    for line in lines[1:-1]:
        assert line.startswith(("cpu #1: ", "cpu #2: ")) and line.count("cpu") == 1, line
    assert "cpu #1: encode: plan" in result.stderr
    assert any(line.startswith("cpu #2: denoise: 2/2 steps, over all batches") for line in lines), result.stderr
