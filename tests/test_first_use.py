"""A new user's first try-out on a fresh clone, each finding as a real process: a .bin-only model folder (loaded
and converted by one rule), an output location that cannot be written (refused before any model loads), a stdout
that cannot be written (the last line true), `-` as the PROMPT (stdin, as --prompts-file -), the messages of
--resume's manifest, init latents, a pipe given by name and --devices' lines, and a test ControlNet adapter made
offline."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers import assert_one_line_error, run_pixart

SMALL = ["--width", "64", "--height", "64", "--no-binning", "--steps", "2", "--seed", "1"]


@pytest.fixture(scope="module")
def emb(tiny_model, tmp_path_factory):
    """emb.pt and lat.pt of the tiny model, and a PNG to encode as init latents or an edge map."""
    folder = tmp_path_factory.mktemp("first-use")
    run_pixart("encode", "a cute cat", "--model", tiny_model, "-q", "-o", "emb.pt", cwd=folder)
    run_pixart("denoise", "emb.pt", "--model", tiny_model, *SMALL, "-q", "-o", "lat.pt", cwd=folder)
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


# --- 4. `-` as the PROMPT: standard input, as --prompts-file - reads it ------------------------------------------
def _prompts(path) -> list[str]:
    from pixart_cli.files import staged

    return staged.load_embeddings(path).meta["prompts"]


def test_dash_as_the_prompt_reads_stdin_as_prompts_file_dash_does(tiny_model, tmp_path):
    model = ("--model", tiny_model)
    result = run_pixart("encode", "-", *model, "-o", "one.pt", cwd=tmp_path, stdin=b"a red chair\n")
    assert result.stdout == "one.pt\n" and "PROMPT -" not in result.stderr, result.stderr
    assert _prompts(tmp_path / "one.pt") == ["a red chair"]
    # several lines are several prompts (blank ones skipped), in the place of the -, as --prompts-file - reads them
    result = run_pixart("encode", "a bowl", "-", *model, "-o", "many.pt", cwd=tmp_path, stdin=b"a cat\n\na dog\n")
    assert "PROMPT -: read 2 prompts from standard input, one per line" in result.stderr
    assert _prompts(tmp_path / "many.pt") == ["a bowl", "a cat", "a dog"]
    file_run = run_pixart("encode", "a bowl", "--prompts-file", "-", *model, "-o", "file.pt", cwd=tmp_path,
                          stdin=b"a cat\n\na dog\n")  # fmt: skip
    assert file_run.returncode == 0 and _prompts(tmp_path / "file.pt") == ["a bowl", "a cat", "a dog"]
    # a literal "-" prompt: a line of a prompts file
    run_pixart("encode", "--prompts-file", "-", *model, "-q", "-o", "literal.pt", cwd=tmp_path, stdin=b"-\n")
    assert _prompts(tmp_path / "literal.pt") == ["-"]
    # generate too, and the image records the prompt
    run_pixart("generate", "-", *model, *SMALL, "-q", "-o", "cat.png", cwd=tmp_path, stdin=b"a cute cat\n")
    info = json.loads(run_pixart("info", "cat.png", "--json", cwd=tmp_path).stdout)
    assert info["settings"]["prompt"] == "a cute cat"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("encode", "-", "-"), "PROMPT -: standard input is read once"),
        (("encode", "-", "--prompts-file", "-"), "PROMPT - and --prompts-file -: standard input is read once"),
        (("generate", "-", "--image", "-"), "PROMPT and --image: both are -"),
        (("encode", "-", "-o", "e.pt"), "PROMPT -: holds no prompts; pipe the prompts in, one per line"),
    ],
)
def test_dash_as_the_prompt_is_refused_where_stdin_cannot_serve(tiny_model, tmp_path, args, fragment):
    result = run_pixart(*args, "--model", tiny_model, cwd=tmp_path, check=False, stdin=b"\n\n")
    assert_one_line_error(result, 2, fragment)
    assert list(tmp_path.iterdir()) == []


def test_dash_as_the_prompt_is_refused_under_several_processes(tiny_model, tmp_path):
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    result = run_pixart("generate", "-", "--model", tiny_model, "-o", "out/", cwd=tmp_path, env=env, check=False,
                        stdin=b"a cat\n")  # fmt: skip
    assert_one_line_error(result, 2, "PROMPT -: standard input reaches only one of the WORLD_SIZE=2 processes")


# --- 2. an output location that cannot be written: refused in the plan, before any model loads ---------------------
def _commands(emb, tiny_model):
    """Every command with -o, with its inputs."""
    model = ("--model", tiny_model)
    return {
        "encode": ("encode", "a cat", *model),
        "denoise": ("denoise", emb / "emb.pt", *model, *SMALL),
        "decode": ("decode", emb / "lat.pt"),
        "encode-image": ("encode-image", emb / "cat.png", *model),
        "encode-control": ("encode-control", emb / "cat.png", *model),
        "encode-mask": ("encode-mask", emb / "cat.png", "--image", emb / "cat.png", *model),
        "generate": ("generate", "a cat", *model, *SMALL),
        "convert": ("convert", tiny_model),
    }


NAMES = {"encode": "e.pt", "denoise": "l.pt", "encode-image": "i.pt", "encode-control": "c.pt", "encode-mask": "m.pt"}


@pytest.mark.parametrize("command", list(NAMES) + ["decode", "generate", "convert"])
def test_an_unwritable_output_location_is_refused_before_any_work(command, emb, tiny_model, tmp_path):
    args = _commands(emb, tiny_model)[command]
    name = NAMES.get(command, "copy" if command == "convert" else "x.png")
    # /proc takes no new files, even from root (os.access says it is writable there)
    result = run_pixart(*args, "-o", f"/proc/{name}", cwd=tmp_path, check=False)
    fix = "write elsewhere" if command == "convert" else "give -o a path in a folder you can write"
    assert_one_line_error(result, 2, f"--output /proc/{name}: cannot create", "(No such file or directory)", fix)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["generate", "decode"])
def test_an_output_folder_that_cannot_be_created_is_refused_before_any_work(command, emb, tiny_model, tmp_path):
    args = _commands(emb, tiny_model)[command]
    result = run_pixart(*args, "-o", "/proc/new/", cwd=tmp_path, check=False)
    assert_one_line_error(result, 2, "--output /proc/new/image.png: cannot create folder /proc/new", "give -o a")
    result = run_pixart(*args, "-o", "missing/x.png", cwd=tmp_path, check=False)
    assert_one_line_error(result, 2, "--output missing/x.png: folder missing does not exist", "end the path with /")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder (the /proc case covers root)")
def test_a_read_only_output_folder_is_refused_before_any_work(tiny_model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        result = run_pixart("generate", "a cat", "--model", tiny_model, *SMALL, "-o", locked / "x.png",
                            cwd=tmp_path, check=False)  # fmt: skip
        assert_one_line_error(result, 2, f"folder {locked} is not writable", "give -o a path in a folder you can")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


# --- 3. a stdout that cannot be written: the last line names what was written, not stdout ------------------------
def _to_full(*args, cwd):
    """pixart with stdout on /dev/full: every write to it fails with ENOSPC."""
    import subprocess

    from helpers import pixart_bin

    with open("/dev/full", "w") as full:
        return subprocess.run([pixart_bin(), *map(str, args)], cwd=cwd, stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=300)  # fmt: skip


def _one_line(result, code: int) -> str:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_stdout_ends_with_a_line_naming_the_files_written(emb, tiny_model, tmp_path):
    model = ("--model", tiny_model)
    line = _one_line(_to_full("generate", "a cat", *model, *SMALL, "-q", "-o", "cat.png", cwd=tmp_path), 1)
    assert line == "error: cannot write to stdout (No space left on device); the output had been written (cat.png)"
    assert (tmp_path / "cat.png").is_file()
    line = _one_line(_to_full("generate", "a cat", *model, *SMALL, "--num-images", "3", "-o", "out/", "-q",
                              cwd=tmp_path), 1)  # fmt: skip
    assert line == (
        "error: cannot write to stdout (No space left on device); all 3 outputs had been written "
        "(out/image-0.png, out/image-1.png, out/image-2.png)"
    )
    lines = (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in lines) == [0, 1, 2]  # disk, manifest and line agree
    line = _one_line(_to_full("encode", "a cat", *model, "--json", "-q", "-o", "e.pt", cwd=tmp_path), 1)
    assert "the output had been written (e.pt)" in line and "stdout)" not in line.split(";", 1)[1]
    for args in (
        ("info", emb / "emb.pt"),
        ("info", emb / "emb.pt", "--json"),
        ("compare", emb / "lat.pt", emb / "lat.pt"),
    ):
        assert _one_line(_to_full(*args, cwd=tmp_path), 1) == "error: cannot write to stdout (No space left on device)"
    line = _one_line(_to_full("encode", "a cat", *model, "-q", "-o", "-", cwd=tmp_path), 1)
    assert "--output -: cannot write the output to stdout (No space left on device)" in line


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_stderr_changes_nothing_but_what_is_shown(tiny_model, tmp_path):
    import subprocess

    from helpers import pixart_bin

    def run(*args):
        with open("/dev/full", "w") as full:
            return subprocess.run([pixart_bin(), *map(str, args)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=full,
                                  text=True, timeout=300)  # fmt: skip

    result = run("generate", "a cat", "--model", tiny_model, *SMALL, "-o", "cat.png")
    assert result.returncode == 0 and result.stdout == "cat.png\n" and (tmp_path / "cat.png").is_file()
    result = run("generate", "a cat", "--model", tiny_model, *SMALL, "-o", "out/", "--num-images", "2", "--json")
    assert result.returncode == 0 and len(json.loads(result.stdout)["outputs"]) == 2
    result = run("generate", "a cat", "--model", tiny_model, "--steps", "0", "-o", "no.png", "--json")
    assert result.returncode == 2 and json.loads(result.stdout)["exit_code"] == 2  # the failure is still told
    assert not (tmp_path / "no.png").exists()


# --- 6. a test ControlNet adapter, made offline (README's recipe) --------------------------------------------------
def test_random_model_makes_a_controlnet_adapter_that_fits_and_steers(tiny_model, emb, tmp_path):
    import subprocess
    import sys

    import numpy as np

    from helpers import read_png

    made = subprocess.run(
        [sys.executable, "-m", "pixart_cli.random_model", "cn.safetensors", "--controlnet-for", str(tiny_model)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert made.returncode == 0 and made.stdout == "cn.safetensors\n", made.stderr
    common = ("--model", tiny_model, *SMALL, "-q")
    control = ("--control-image", emb / "cat.png", "--controlnet")
    run_pixart("generate", "a house", *common, *control, "cn.safetensors:0.8", "-o", "house.png", cwd=tmp_path)
    run_pixart("generate", "a house", *common, *control, "cn.safetensors:0", "-o", "zero.png", cwd=tmp_path)
    run_pixart("generate", "a house", *common, "-o", "plain.png", cwd=tmp_path)
    house, zero, plain = (read_png(tmp_path / name) for name in ("house.png", "zero.png", "plain.png"))
    assert np.array_equal(zero, plain) and not np.array_equal(house, plain)  # it fits the model, and it steers
    info = json.loads(run_pixart("info", "house.png", "--json", cwd=tmp_path).stdout)["settings"]
    assert info["controlnet"]["file"] == "cn.safetensors" and info["controlnet_scale"] == 0.8
    refused = subprocess.run(
        [sys.executable, "-m", "pixart_cli.random_model", "cn.pth", "--controlnet-for", str(tiny_model)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode != 0 and "*.safetensors" in refused.stderr and not (tmp_path / "cn.pth").exists()


# --- 1. a .bin checkpoint: one rule for every component, in every stage and in convert ----------------------------
def _to_bin(folder, component: str, stem: str, shards: int = 1) -> None:
    """``component``'s safetensors replaced by the .bin checkpoint its library falls back to (a torch.save zip
    archive, as save_pretrained(safe_serialization=False) writes), in ``shards`` files with an index when several."""
    import torch
    from safetensors.torch import load_file

    source = folder / component / f"{'model' if stem == 'pytorch_model' else stem}.safetensors"
    state = load_file(source)
    source.unlink()
    if shards == 1:
        torch.save(state, folder / component / f"{stem}.bin")
        return
    names = sorted(state)
    weight_map = {}
    for index in range(shards):
        shard = f"{stem}-{index + 1:05d}-of-{shards:05d}.bin"
        part = names[index::shards]
        torch.save({name: state[name] for name in part}, folder / component / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (folder / component / f"{stem}.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def bin_model(tiny_model, tmp_path_factory):
    """The tiny model with every component's weights as .bin: T5 in two shards, the transformer and the VAE whole."""
    folder = tmp_path_factory.mktemp("bin") / "model"
    shutil.copytree(tiny_model, folder)
    _to_bin(folder, "text_encoder", "pytorch_model", shards=2)
    _to_bin(folder, "transformer", "diffusion_pytorch_model")
    _to_bin(folder, "vae", "diffusion_pytorch_model")
    assert not list(folder.rglob("*.safetensors"))
    return folder


def _weights(folder) -> dict[str, list[str]]:
    return {c: sorted(p.name for p in (folder / c).iterdir() if p.name != "config.json") for c in COMPONENTS}


COMPONENTS = ("text_encoder", "transformer", "vae")


def test_a_bin_checkpoint_loads_in_every_stage_and_converts_alike(bin_model, tiny_model, tmp_path):
    import numpy as np

    from helpers import read_png

    def image(model, name, *extra):
        run_pixart("generate", "a cute cat", "--model", model, *SMALL, *extra, "-q", "-o", name, cwd=tmp_path)
        return read_png(tmp_path / name)

    # every stage reads the .bin weights as diffusers and transformers do: the very image of the safetensors model
    assert np.array_equal(image(bin_model, "bin.png"), image(tiny_model, "safetensors.png"))
    staged = ("--model", bin_model)
    run_pixart("encode", "a cute cat", *staged, "-q", "-o", "e.pt", cwd=tmp_path)
    run_pixart("denoise", "e.pt", *staged, *SMALL, "-q", "-o", "l.pt", cwd=tmp_path)
    run_pixart("decode", "l.pt", "-q", "-o", "staged.png", cwd=tmp_path)
    assert np.array_equal(read_png(tmp_path / "staged.png"), read_png(tmp_path / "bin.png"))
    # convert reads them by the same rule and writes safetensors: the copy equals the fp16 copy of the original
    result = run_pixart("convert", bin_model, "-o", "copy", cwd=tmp_path)
    assert "left out: transformer/diffusion_pytorch_model.bin: read with weights_only and written as safetensors" in (
        result.stderr
    )
    assert _weights(tmp_path / "copy") == {
        "text_encoder": ["model.safetensors"],
        "transformer": ["diffusion_pytorch_model.safetensors"],
        "vae": ["diffusion_pytorch_model.safetensors"],
    }
    run_pixart("convert", tiny_model, "-o", "reference", "-q", cwd=tmp_path)
    for component in COMPONENTS:
        for name in _weights(tmp_path / "copy")[component]:
            assert (tmp_path / "copy" / component / name).read_bytes() == (
                tmp_path / "reference" / component / name
            ).read_bytes(), (component, name)
    # a component not converted keeps its .bin weights, copied as they are, and the copy loads
    run_pixart("convert", bin_model, "-o", "part", "--components", "transformer", "-q", cwd=tmp_path)
    assert _weights(tmp_path / "part") == {
        "text_encoder": [
            "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
        ],
        "transformer": ["diffusion_pytorch_model.safetensors"],
        "vae": ["diffusion_pytorch_model.bin"],
    }  # fmt: skip
    assert image(tmp_path / "part", "part.png").shape == (64, 64, 3)


@pytest.mark.parametrize("kind", ["names a function", "legacy pickle"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_a_hostile_bin_is_refused_alike_by_the_stages_and_convert(bin_model, tmp_path, kind, component):
    import torch

    model = tmp_path / "model"
    shutil.copytree(bin_model, model)
    name = {"text_encoder": "pytorch_model-00001-of-00002.bin"}.get(component, "diffusion_pytorch_model.bin")
    path = model / component / name
    state = torch.load(path, weights_only=True)
    ran = tmp_path / "RAN"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {ran}",))

    if kind == "legacy pickle":
        torch.save(state, path, _use_new_zipfile_serialization=False)
        fragment = f"{component}/{name}: is not the zip archive torch.save writes"
    else:
        torch.save({**state, "x": Payload()}, path)
        fragment = f"{component}/{name}: refused: it holds Python objects other than tensors"
    # generate plans every component before any model loads; convert reads the same file by the same rule
    for args in (("generate", "a cat", "--model", model, *SMALL, "-o", "x.png"), ("convert", model, "-o", "copy")):
        result = run_pixart(*args, cwd=tmp_path, check=False)
        assert_one_line_error(result, 1, f"--model {model}: {fragment}", "get the model's safetensors files")
    assert not ran.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("flag", ["--lora", "--controlnet"])
@pytest.mark.parametrize("scale", ["1e300", "-1e30", "101"])
def test_an_adapter_scale_beyond_its_bound_is_refused_before_any_model_loads(flag, scale, tiny_model, tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"")  # never read: the scale is checked first
    result = run_pixart("generate", "a cat", "--model", tiny_model, *SMALL, flag, f"a.safetensors:{scale}", "-o",
                        "x.png", cwd=tmp_path, check=False)  # fmt: skip
    assert_one_line_error(result, 2, f"{flag} a.safetensors:{scale}: scale {scale} is beyond ±100")
    assert not (tmp_path / "x.png").exists() and "encode:" not in result.stderr


def test_a_pt_file_the_disk_cannot_take_is_one_line_naming_it(tiny_model, tmp_path):
    """A full disk, here a file size limit (RLIMIT_FSIZE: the write fails as on a full disk): the line names the
    output and the reason (torch's own writer says "unexpected pos"); no temp file is left; a cache that cannot
    take an entry is noted and skipped."""
    import resource
    import signal
    import subprocess

    from helpers import pixart_bin

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    result = subprocess.run([pixart_bin(), "encode", "a cat", "--model", tiny_model, "--cache", "c", "-o", "e.pt"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=small_files)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: --output e.pt: cannot write it (File too large)"
    assert "cache: could not store an entry in c (" in result.stderr and "continuing without it" in result.stderr
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".pixart-") or p.name == "e.pt"]


def test_decode_refuses_latents_of_a_family_whose_vae_is_another(emb, tiny_model, tmp_path):
    from pixart_cli import random_model

    sigma = random_model.build(tmp_path / "sigma", "tiny", family="sigma")
    run_pixart("encode", "a cute cat", "--model", sigma, "-q", "-o", "s-emb.pt", cwd=tmp_path)
    run_pixart("denoise", "s-emb.pt", "--model", sigma, *SMALL, "-q", "-o", "s-lat.pt", cwd=tmp_path)
    for latents, model in (("s-lat.pt", tiny_model), (emb / "lat.pt", sigma)):
        result = run_pixart("decode", latents, "--model", model, "-o", "x.png", cwd=tmp_path, check=False)
        assert_one_line_error(result, 2, "latents come from a PixArt-", "decode them with the model that made them")
        assert not (tmp_path / "x.png").exists()
    run_pixart("decode", "s-lat.pt", "-q", "-o", "s.png", cwd=tmp_path)  # the model the file names
    assert (tmp_path / "s.png").is_file()


def test_a_negative_prompt_is_bounded_as_a_prompt_is(tiny_model, tmp_path):
    result = run_pixart("encode", "a cat", "--model", tiny_model, "--negative-prompt", "x" * 40_000, "-o", "n.pt",
                        cwd=tmp_path, check=False)  # fmt: skip
    assert_one_line_error(result, 2, "--negative-prompt is 40,000 characters, beyond the 32,768")
    assert not (tmp_path / "n.pt").exists()


def test_resume_without_a_manifest_says_it_starts_a_new_run(tiny_model, tmp_path):
    common = ["generate", "a cat", "--model", tiny_model, *SMALL, "--num-images", "2", "-o", "out/", "--resume"]
    result = run_pixart(*common, cwd=tmp_path)
    assert f"--resume: {os.path.join('out', 'manifest.jsonl')} is not there; starting a new run in out" in result.stderr
    (tmp_path / "out" / "manifest.jsonl").write_text("")
    result = run_pixart(*common, cwd=tmp_path)
    assert "manifest.jsonl holds no line of a run; starting a new run in out" in result.stderr
    result = run_pixart(*common, cwd=tmp_path)  # now its manifest is there: it finishes that run, nothing to say
    assert "starting a new run" not in result.stderr
