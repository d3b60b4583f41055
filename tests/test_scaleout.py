"""Scale-out: torchrun ranks, the manifest and --resume, Ray. The image set must not depend on how it was made."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import max_diff, read_png
from pixart_cli.cli.commands import app
from pixart_cli.scale import manifest
from pixart_cli.scale.job import passes
from pixart_cli.scale.launch import Ranks

PROMPTS = "a red cube\na blue sphere\n"
COMMON = ["--seed", "7", "--steps", "2", "--device", "cpu"]  # 2 prompts x 2 images = 4 images, 256 px


def invoke(*args, cwd):
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(previous)


def manifest_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tiny_model, tmp_path_factory) -> Path:
    """The reference: one process, -o DIR/ (which writes the manifest)."""
    work = tmp_path_factory.mktemp("single")
    (work / "prompts.txt").write_text(PROMPTS)
    (work / "out").mkdir()
    result = invoke(
        "generate",
        "--prompts-file",
        "prompts.txt",
        "-o",
        "out/",
        "--num-images",
        "2",
        "--model",
        tiny_model,
        *COMMON,
        cwd=work,
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split() == [f"out/image-{i}.png" for i in range(4)]
    return work


def test_manifest_lists_every_image_with_its_prompt_seed_settings_and_hash(single, tiny_model):
    lines = manifest_lines(single / "out")
    assert [line["index"] for line in lines] == [0, 1, 2, 3]
    assert [line["path"] for line in lines] == [f"image-{i}.png" for i in range(4)]
    assert [line["prompt"] for line in lines] == ["a red cube", "a red cube", "a blue sphere", "a blue sphere"]
    assert [line["seed"] for line in lines] == [7, 8, 9, 10]
    for line in lines:
        image = single / "out" / line["path"]
        assert line["sha256"] == manifest.sha256_file(image) and line["size"] == image.stat().st_size
        assert (
            line["negative_prompt"] == ""
            and line["options"]["steps"] == 2
            and line["options"]["model"] == str(tiny_model)
        )
        assert (
            line["settings"]["seed"] == line["seed"] and line["settings"]["scheduler"] == "DPMSolverMultistepScheduler"
        )


def test_torchrun_gives_the_same_images_and_manifest_and_idle_ranks_exit_0(single, tiny_model, tmp_path):
    """3 processes for 2 images (the single run's first prompt, 2 images): ranks 0 and 1 make one each, rank 2
    has nothing to do and exits 0. Same names, prompts, seeds and settings as the single run's images 0 and 1."""
    (tmp_path / "out").mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "3",
            "-m",
            "pixart_cli",
            "generate",
            "a red cube",
            "--num-images",
            "2",
            "-o",
            "out/",
            "--model",
            str(tiny_model),
            *COMMON,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == ["out/image-0.png", "out/image-1.png"]  # each path once
    summaries = [line for line in result.stderr.splitlines() if line.startswith("generate: ")]
    assert len(summaries) == 1 and "wrote 2 image(s)" in summaries[0] and "3 processes" in summaries[0], summaries
    assert "rank 2/3: images none, 0 to make" in result.stderr
    for index in (0, 1):
        assert (
            max_diff(read_png(tmp_path / "out" / f"image-{index}.png"), read_png(single / "out" / f"image-{index}.png"))
            <= 1
        )
    identity = lambda line: {k: v for k, v in line.items() if k not in ("sha256", "size")}  # noqa: E731
    parted = sorted(manifest_lines(tmp_path / "out"), key=lambda line: line["index"])
    assert [identity(line) for line in parted] == [identity(line) for line in manifest_lines(single / "out")[:2]]


def test_resume_redoes_only_missing_damaged_and_unrecorded_images(single, tiny_model, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(single, work)
    out = work / "out"
    (out / "image-1.png").unlink()  # missing
    damaged = bytearray((out / "image-2.png").read_bytes())
    damaged[-100] ^= 0xFF
    (out / "image-2.png").write_bytes(bytes(damaged))  # same size, other bytes
    text = (out / "manifest.jsonl").read_text()
    (out / "manifest.jsonl").write_text(text[:-40])  # the last line (image 3) cut short, as by a crash
    untouched = (out / "image-0.png").stat().st_mtime_ns
    # no --seed: the manifest's seed is used, so image 0 is found complete
    args = [a for a in COMMON if a not in ("--seed", "7")]
    result = invoke(
        "generate",
        "--prompts-file",
        "prompts.txt",
        "-o",
        "out/",
        "--num-images",
        "2",
        "--resume",
        "--model",
        tiny_model,
        *args,
        cwd=work,
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split() == ["out/image-1.png", "out/image-2.png", "out/image-3.png"]
    assert "skipped 1 already complete" in result.stderr
    assert (out / "image-0.png").stat().st_mtime_ns == untouched
    for index in range(4):
        assert max_diff(read_png(out / f"image-{index}.png"), read_png(single / "out" / f"image-{index}.png")) <= 1
    newest = manifest.read(out)
    assert sorted(newest) == [0, 1, 2, 3]
    assert all(newest[i]["sha256"] == manifest.sha256_file(out / f"image-{i}.png") for i in range(4))
    again = invoke(
        "generate",
        "--prompts-file",
        "prompts.txt",
        "-o",
        "out/",
        "--num-images",
        "2",
        "--resume",
        "--model",
        tiny_model,
        *COMMON,
        # the model's own defaults, now given: the same images, so nothing is made again
        *["-g", "4.5", "--width", "256", "--max-sequence-length", "120", "--scheduler", "dpm++"],
        cwd=work,
    )
    assert again.exit_code == 0 and again.stdout == "" and "skipped 4 already complete" in again.stderr, again.stderr
    other = invoke(
        *["generate", "--prompts-file", "prompts.txt", "-o", "out/", "--num-images", "2"],
        *["--resume", "--model", tiny_model, *COMMON, "-g", "3"],
        cwd=work,
    )
    # another guidance would remake and replace every image: --resume refuses it before any work (issue 20)
    assert other.exit_code == 2 and other.stdout == "", other.stderr
    assert "--guidance-scale 4.5 there, 3.0 now" in other.stderr


def test_no_overwrite_replaces_no_image_and_no_manifest(single, tiny_model, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(single, work)
    out = work / "out"
    (out / "image-1.png").unlink()
    kept = {i: (out / f"image-{i}.png").stat().st_mtime_ns for i in (0, 2, 3)}
    run = ["generate", "--prompts-file", "prompts.txt", "-o", "out/", "--num-images", "2", "--model", tiny_model]
    resumed = invoke(*run, "--resume", "--no-overwrite", *COMMON, cwd=work)
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.stdout.split() == ["out/image-1.png"]  # the complete ones are skipped, not refused
    assert kept == {i: (out / f"image-{i}.png").stat().st_mtime_ns for i in (0, 2, 3)}
    lines = (out / "manifest.jsonl").read_text()
    for image in out.glob("*.png"):  # the images alone would be refused first; the manifest must be too
        image.unlink()
    restarted = invoke(*run, "--no-overwrite", *COMMON, cwd=work)
    assert restarted.exit_code == 2 and "manifest.jsonl already exists" in restarted.stderr
    assert "--resume" in restarted.stderr and (out / "manifest.jsonl").read_text() == lines


def test_scale_out_refuses_stdout_and_leaves_no_folder_before_its_first_image(tmp_path):
    result = invoke("generate", "a cat", "-o", "-", "--ray", cwd=tmp_path)
    assert result.exit_code == 2 and "give a folder (-o DIR/)" in result.stderr and "--json" not in result.stderr
    manifest.start_new(tmp_path / "new")  # an interrupted run's folder: nothing to clear, nothing made
    assert not (tmp_path / "new").exists()


def test_resume_needs_an_output_folder(tmp_path):
    result = invoke("generate", "a cat", "-o", "cat.png", "--resume", cwd=tmp_path)
    assert result.exit_code == 2 and "--resume: needs -o DIR/" in result.stderr and result.stdout == ""


def test_ray_missing_exits_2_with_the_install_command(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.jsonl").write_text("an earlier run's lines\n")
    result = invoke("generate", "a cat", "-o", "out/", "--ray", "--model", tiny_model, *COMMON, cwd=tmp_path)
    assert result.exit_code == 2, result.stderr
    assert 'pip install "pixart-cli[ray]"' in result.stderr and result.stdout == ""
    assert not (tmp_path / "out" / "image.png").exists()
    assert (tmp_path / "out" / "manifest.jsonl").read_text() == "an earlier run's lines\n"  # not started again


def test_a_ray_address_where_nothing_answers_is_one_line(tiny_model, tmp_path):
    pytest.importorskip("ray.data")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.jsonl").write_text("an earlier run's lines\n")
    args = ["generate", "a cat", "-o", "out/", "--ray", "--ray-address", "127.0.0.1:1", "--model", tiny_model]
    result = invoke(*args, *COMMON, cwd=tmp_path)
    assert result.exit_code == 1 and "cannot join the Ray cluster (nothing answers at 127.0.0.1:1" in result.stderr
    assert (tmp_path / "out" / "manifest.jsonl").read_text() == "an earlier run's lines\n"


def test_prompts_from_stdin_are_refused_under_several_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = invoke("generate", "--prompts-file", "-", "-o", "out/", cwd=tmp_path)
    assert result.exit_code == 2 and "reaches only one of the WORLD_SIZE=2 processes" in result.stderr


RESUME = ["generate", "--prompts-file", "prompts.txt", "-o", "out/", "--num-images", "2", "--resume"]


def test_resume_matches_the_model_however_its_folder_is_written(single, tiny_model, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(single, work)
    result = invoke(*RESUME, "--model", f"{tiny_model}/", *COMMON, cwd=work)
    assert result.exit_code == 0 and "skipped 4 already complete" in result.stderr, result.stderr
    assert manifest_lines(work / "out")[0]["options"]["revision"] is None


@pytest.mark.parametrize("planted", ["link", "dangling link", "fifo"])
def test_resume_refuses_a_manifest_that_is_not_a_regular_file(single, tiny_model, tmp_path, planted):
    work = tmp_path / "work"
    shutil.copytree(single, work)
    target = work / "out" / "manifest.jsonl"
    victim = tmp_path / "victim.txt"
    target.unlink()
    if planted == "fifo":
        os.mkfifo(target)
    else:
        if planted == "link":
            victim.write_text("someone else's file\n")
        target.symlink_to(victim)
    result = invoke(*RESUME, "--model", tiny_model, *COMMON, cwd=work)
    assert result.exit_code == 2 and "manifest" in result.stderr and result.stdout == "", result.stderr
    assert (victim.read_text() == "someone else's file\n") if planted == "link" else not victim.exists()


def test_resume_counts_an_image_behind_a_link_complete(single, tiny_model, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(single, work)
    outside = tmp_path / "outside.png"
    shutil.copy(work / "out" / "image-3.png", outside)
    (work / "out" / "image-3.png").unlink()
    (work / "out" / "image-3.png").symlink_to(outside)
    result = invoke(*RESUME, "--model", tiny_model, *COMMON, cwd=work)
    assert result.exit_code == 0 and "skipped 4 already complete" in result.stderr, result.stderr


def test_resume_names_the_manifest_for_a_seed_it_could_not_have_written(single, tiny_model, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(single, work)
    lines = manifest_lines(work / "out")
    lines[-1]["seed"] = 2  # image 3 with seed 2: image 0 would have seed -1
    (work / "out" / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = [a for a in COMMON if a not in ("--seed", "7")]
    result = invoke(*RESUME, "--model", tiny_model, *args, cwd=work)
    assert result.exit_code == 2 and "manifest.jsonl: line of image 3 has seed 2" in result.stderr, result.stderr


def test_resume_no_overwrite_refuses_a_damaged_image_before_any_work(single, tiny_model, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(single, work)
    with open(work / "out" / "image-2.png", "ab") as handle:
        handle.write(b"x")
    before = (work / "out" / "image-2.png").read_bytes()
    result = invoke(*RESUME, "--no-overwrite", "--model", tiny_model, *COMMON, cwd=work)
    assert result.exit_code == 2 and "image-2.png exists but its manifest line" in result.stderr, result.stderr
    assert "encode:" not in result.stderr and (work / "out" / "image-2.png").read_bytes() == before


def test_the_manifest_records_a_step_cache_only_where_it_acts(tiny_model):
    from pixart_cli.models.source import Model
    from pixart_cli.scale.job import image_options
    from pixart_cli.settings import DenoiseSettings, EncodeSettings

    def recorded(steps):
        denoising = DenoiseSettings(steps=steps, step_cache="taylorseer:2")
        return image_options(Model(str(tiny_model)), "auto", EncodeSettings(), denoising)["step_cache"]

    assert recorded(4) is None and recorded(20) == "taylorseer:2"


def test_ray_gives_the_same_images_and_manifest(single, tiny_model, tmp_path):
    pytest.importorskip("ray.data")
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    (tmp_path / "out").mkdir()
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "pixart"),
            "generate",
            "--prompts-file",
            "prompts.txt",
            "-o",
            "out/",
            "--num-images",
            "2",
            "--ray",
            "--model",
            str(tiny_model),
            *COMMON,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == [f"out/image-{i}.png" for i in range(4)]
    assert "wrote 4 image(s)" in result.stderr and "on Ray" in result.stderr
    for index in range(4):
        assert (
            max_diff(read_png(tmp_path / "out" / f"image-{index}.png"), read_png(single / "out" / f"image-{index}.png"))
            <= 1
        )
    by_index = lambda folder: sorted(manifest_lines(folder), key=lambda line: line["index"])  # noqa: E731
    assert by_index(tmp_path / "out") == by_index(single / "out")


def test_ray_ends_with_pixart_s_own_message_from_an_actor(tiny_model, tmp_path):
    pytest.importorskip("ray.data")
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    # a tokenizer that cannot be read is found only when the actor loads it (a damaged weights file is found by the
    # driver's plan, from its header, before Ray starts)
    (model / "tokenizer" / "spiece.model").write_bytes(b"not a sentencepiece model")
    pixart = [str(Path(sys.executable).parent / "pixart"), "generate", "a cat", "--model", str(model), *COMMON]
    result = subprocess.run(
        [*pixart, "-o", "out/", "--ray"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    # the line and exit code one process gives
    expected = f"error: --model {model}: cannot load tokenizer/ ("
    assert result.returncode == 1 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "UDF" not in result.stderr


def test_sigterm_ends_a_ray_run_as_it_ends_any_run(tiny_model, tmp_path):
    pytest.importorskip("ray.data")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "pixart"), "generate", "a cat", "--model", str(tiny_model), "--device"]
        + ["cpu", "--steps", "1000", "--seed", "1", "-o", "out/", "--ray", "--json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    for line in process.stderr:
        if line.startswith("ray: "):  # Ray is up: its core's own SIGTERM handler would be in place now
            break
    process.terminate()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "error: terminated" in stderr, stderr
    assert json.loads(stdout)["exit_code"] == 143


def _append_many(folder: str, writer: int) -> None:
    for number in range(200):
        manifest.append(Path(folder), {"writer": writer, "number": number, "padding": "x" * (writer * 300)})


def test_concurrent_appends_never_interleave_and_a_cut_line_is_skipped(tmp_path):
    (tmp_path / "manifest.jsonl").write_bytes(b'{"index": 9, "cut short')  # a crash mid-line
    context = multiprocessing.get_context("fork")  # spawn would re-import torch in each writer
    workers = [context.Process(target=_append_many, args=(str(tmp_path), writer)) for writer in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    raw = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert raw[0] == '{"index": 9, "cut short'
    parsed = [json.loads(line) for line in raw[1:]]
    assert sorted((p["writer"], p["number"]) for p in parsed) == [(w, n) for w in range(4) for n in range(200)]
    with open(manifest.manifest_path(tmp_path), "a") as handle:
        handle.write("[" * 100_000 + "]" * 100_000 + "\n")  # deeper than the JSON parser recurses
    assert manifest.read(tmp_path) == {}  # neither the cut line nor foreign lines count as images


def test_shares_are_contiguous_cover_every_image_once_and_leave_extra_ranks_idle():
    for total in (0, 1, 5, 64):
        for world in (1, 2, 3, 8):
            shares = [Ranks(rank, world).share(total) for rank in range(world)]
            assert [i for share in shares for i in share] == list(range(total))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert list(Ranks(2, 3).share(2)) == []
    assert passes([0, 1, 2, 5, 6, 9], 2) == [(0, 2), (2, 3), (5, 7), (9, 10)]


def test_ray_units_give_every_gpu_the_same_share():
    from pixart_cli.scale.job import IMAGES_PER_PASS
    from pixart_cli.scale.ray_run import unit_size

    for images in range(1, 400):
        for actors in (1, 2, 3, 8):
            size = unit_size(images, actors)
            units = len(passes(range(images), size))
            assert size <= IMAGES_PER_PASS
            assert units <= actors * -(-images // (actors * IMAGES_PER_PASS))  # as few units as passes allow
            assert units % actors == 0 or units < actors  # no GPU runs a round more than another
    assert unit_size(192, 2) == 48  # 4 units of 48, not 64 + 64 + 64 (two on one GPU)


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2, WORLD_SIZE=2"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "", "MASTER_PORT": ""}, "MASTER_ADDR and MASTER_PORT not set"),
        ({"WORLD_SIZE": "3", "RANK": "\u00b2"}, "RANK='\u00b2'"),  # a digit to str.isdigit, not to int()
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"}, "MASTER_PORT='abc'"),
    ],
)
def test_bad_launcher_environment_is_one_line_exit_2(tmp_path, monkeypatch, env, fragment, tiny_model):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "out").mkdir()
    result = invoke("generate", "a cat", "-o", "out/", "--model", tiny_model, *COMMON, cwd=tmp_path)
    assert result.exit_code == 2, result.stderr
    assert fragment in result.stderr and result.stdout == "" and "Traceback" not in result.stderr
    assert list((tmp_path / "out").iterdir()) == []
