"""Issue 8 classes, each in a real process: bounded reads, exotic tensors, outputs that are not regular files,
--no-overwrite at placement, signals and several outputs, the cache, the model a file names, info, paths."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import time
import zipfile
from pathlib import Path

import hostile as attacks
import pytest
import torch

from helpers import SEED, assert_one_line_error, denoised, encoded, invoke, pixart_bin, run_pixart
from pixart_cli.errors import PixartError
from pixart_cli.files import atomic, image_io, staged


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    """Good embeddings (1 prompt) and latents (3 images) files of the tiny model, and their dicts."""
    folder = tmp_path_factory.mktemp("reliability")
    embeddings = encoded(["a cute cat"], tiny_model)
    latents = denoised(embeddings, steps=2, seed=SEED, num_images=3)
    staged.save(folder / "emb.pt", embeddings)
    staged.save(folder / "lat.pt", latents)
    load = lambda name: torch.load(folder / name, weights_only=True)  # noqa: E731
    return {
        "folder": folder,
        "emb": folder / "emb.pt",
        "lat": folder / "lat.pt",
        "emb_data": load("emb.pt"),
        "lat_data": load("lat.pt"),
    }


def _with(data: dict, meta=None, **tensors) -> dict:
    copy = dict(data, **tensors)
    copy["meta"] = dict(data["meta"])
    copy["meta"].update(meta or {})
    return copy


def assert_refused(result, code: int, *fragments):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --- 1, 2: bounded reads and exotic tensor kinds ------------------------------------------------------------
def _hostile(name: str, files: dict) -> bytes:
    emb, lat = files["emb_data"], files["lat_data"]
    return {
        "shared-meta": lambda: attacks.to_bytes(_with(emb, meta={"extra": attacks.shared_meta(12, 6)})),
        "deep-meta": lambda: attacks.deep_meta_file(lat, 200_000),
        "stride-0-view": lambda: attacks.to_bytes(
            _with(emb, prompt_embeds=torch.zeros(1, 1, 32).expand(125_000_000, 120, 32))
        ),
        "requested-size": lambda: attacks.to_bytes(
            _with(lat, meta={"requested_width": 16384, "requested_height": 16384})
        ),
        "sparse": lambda: attacks.to_bytes(_with(emb, prompt_embeds=emb["prompt_embeds"].to_sparse())),
        "float8": lambda: attacks.to_bytes(_with(lat, latents=lat["latents"].to(torch.float8_e4m3fn))),
        "tuple-key": lambda: attacks.to_bytes(_with(lat, meta={("a", "b"): 1})),
    }[name]()


@pytest.mark.parametrize(
    "command, name, fragment",
    [
        ("info", "shared-meta", "shared or cyclic"),
        ("decode", "deep-meta", "nested more than 16 levels"),
        ("denoise", "stride-0-view", "strided view"),
        ("decode", "requested-size", "beyond this model's maximum of 1024"),
        ("denoise", "sparse", "sparse_coo tensor"),
        ("decode", "float8", "float8_e4m3fn"),
        ("info", "tuple-key", "key of type tuple"),
    ],
)
def test_hostile_structures_are_refused_in_a_real_process(command, name, fragment, files, tmp_path):
    path = tmp_path / f"{name}.pt"
    path.write_bytes(_hostile(name, files))
    # (a hang fails through run_pixart's timeout: the DAG alone would take 6**12 steps walked as a tree)
    result = run_pixart(command, path, *([] if command == "info" else ["-o", "out/"]), cwd=tmp_path, check=False)
    assert_refused(result, 2, str(path), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("meta", "meta device"),
        ("quantized", "quantized"),
        ("complex64", "complex64"),
        ("sparse_csr", "sparse_csr"),
        ("cyclic", "shared or cyclic"),
        ("deflated", "compressed"),
    ],
)
def test_more_hostile_kinds(kind, fragment, files, tmp_path):
    emb = files["emb_data"]
    if kind == "cyclic":
        blob = attacks.to_bytes(_with(emb, meta={"extra": attacks.cyclic_meta("list")}))
    elif kind == "deflated":
        blob = attacks.rezip(attacks.to_bytes(emb), compress=zipfile.ZIP_DEFLATED)
    else:
        blob = attacks.to_bytes(_with(emb, prompt_embeds=attacks.exotic_tensor(kind, (1, 120, 32))))
    (tmp_path / "x.pt").write_bytes(blob)
    assert_one_line_error(invoke("denoise", "x.pt", "-o", "lat.pt", cwd=tmp_path), 2, "x.pt", fragment)
    assert not (tmp_path / "lat.pt").exists()


# --- 3: outputs that are not regular files ------------------------------------------------------------------
def test_devices_fifos_sockets_and_links_to_them_are_never_replaced(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    os.symlink("fifo", tmp_path / "link-to-fifo")
    os.symlink("/dev/null", tmp_path / "link-to-null")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    for target, kind in (
        ("/dev/null", "character device"),
        ("fifo", "named pipe"),
        ("link-to-fifo", "named pipe"),
        ("link-to-null", "character device"),
        ("sock", "socket"),
    ):
        result = run_pixart("encode", "a cat", "-o", target, cwd=tmp_path, check=False)
        assert_refused(result, 2, target, kind, "-o -")
    server.close()
    assert Path("/dev/null").is_char_device() and (tmp_path / "fifo").is_fifo()
    assert os.readlink(tmp_path / "link-to-fifo") == "fifo"


def test_a_link_to_a_regular_file_is_written_through_as_cp_does(tiny_model, files, tmp_path):
    """The file a link points to gets the output (.pt and images alike); the link stays; stdout names the link."""
    for name, target in (("emb.pt", "real.pt"), ("lat-1.png", "real.png")):
        (tmp_path / target).write_bytes(b"old")
        (tmp_path / name).symlink_to(target)
    refused = run_pixart("encode", "a cat", "-o", "emb.pt", "--no-overwrite", cwd=tmp_path, check=False)
    assert_refused(refused, 2, "--output emb.pt: already exists and --no-overwrite was given")
    assert run_pixart("encode", "a cat", "--model", tiny_model, "-o", "emb.pt", cwd=tmp_path).stdout == "emb.pt\n"
    assert run_pixart("decode", files["lat"], "-o", "lat.png", cwd=tmp_path).stdout.split()[1] == "lat-1.png"
    assert os.readlink(tmp_path / "emb.pt") == "real.pt" and os.readlink(tmp_path / "lat-1.png") == "real.png"
    assert staged.load_embeddings(tmp_path / "real.pt").meta["prompts"] == ["a cat"]
    assert image_io.read_image_metadata(tmp_path / "real.png")["format"] == "PNG"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".pixart-")]  # no temp file left


def test_output_dash_writes_one_output_to_stdout(files, tmp_path):
    piped = subprocess.run(
        [pixart_bin(), "decode", str(files["emb"]).replace("emb", "one"), "-o", "-"], capture_output=True, cwd=tmp_path
    )
    assert piped.returncode == 2  # (a missing file, checked before stdout is touched)
    single = tmp_path / "one.pt"
    data = files["lat_data"]
    meta = dict(data["meta"], prompts=data["meta"]["prompts"][:1], seeds=data["meta"]["seeds"][:1])
    torch.save({"latents": data["latents"][:1].clone(), "meta": meta}, single)
    result = subprocess.run([pixart_bin(), "decode", "one.pt", "-o", "-"], capture_output=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith(b"\x89PNG\r\n\x1a\n"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.pt"]
    several = run_pixart("decode", files["lat"], "-o", "-", cwd=tmp_path, check=False)
    assert_refused(several, 2, "--output -", "this run makes 3")
    assert_refused(run_pixart("encode", "a cat", "-o", "-", "--json", cwd=tmp_path, check=False), 2, "--json")


# --- 4: --no-overwrite at the moment the file is placed ---------------------------------------------------------
def test_no_overwrite_holds_when_the_file_appears_during_the_run(files, tmp_path):
    process = subprocess.Popen(
        [pixart_bin(), "denoise", str(files["emb"]), "--steps", "20", "--no-overwrite", "-o", "lat.pt"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stderr:
        if "denoise: plan" in line:
            break
    (tmp_path / "lat.pt").write_bytes(b"appeared meanwhile")
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 2 and "appeared while pixart worked" in stderr and stdout == "", stderr
    assert (tmp_path / "lat.pt").read_bytes() == b"appeared meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat.pt"]  # no temp file left


def test_no_overwrite_placement_is_a_no_clobber_link(tmp_path):
    target = tmp_path / "out.pt"
    with pytest.raises(PixartError, match="appeared while pixart worked"):
        with atomic.atomic_path(target, overwrite=False) as temp:
            temp.write_bytes(b"new")
            target.write_bytes(b"other process")
    assert target.read_bytes() == b"other process" and sorted(tmp_path.iterdir()) == [target]


# --- 5: several outputs and signals -----------------------------------------------------------------------------
def test_a_burst_of_signals_gives_one_line(files, tmp_path):
    process = subprocess.Popen(
        [pixart_bin(), "denoise", str(files["emb"]), "--steps", "1000", "--num-images", "4", "-o", "lat.pt"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    for line in process.stderr:
        if "denoise: plan" in line:
            break
    for index in range(40):
        process.send_signal(signal.SIGTERM if index % 2 == 0 else signal.SIGINT)
        time.sleep(0.001)
    stdout, stderr = process.communicate(timeout=120)
    # Python runs pending handlers in signal-number order, so SIGINT may be seen first
    expected = {143: "error: terminated; no output was written", 130: "error: interrupted; no output was written"}
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("denoise: plan")]
    assert lines == [expected.get(process.returncode)], (process.returncode, stderr)
    assert stdout == "" and list(tmp_path.iterdir()) == []


def test_a_signal_once_every_output_is_written_interrupts_nothing(tiny_model, tmp_path):
    """From the summary line on, the outputs are all there: SIGTERM then (or while the interpreter exits) ends
    with exit 0, the paths on stdout and no error line or traceback, whenever exactly it lands."""
    process = subprocess.Popen(
        [pixart_bin(), "generate", "a", "b", "--steps", "2", "--device", "cpu", "--model", tiny_model, "-o", "out/"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("generate: wrote"):
            process.send_signal(signal.SIGTERM)
    stdout = process.stdout.read()
    process.wait(timeout=120)
    assert process.returncode == 0, "".join(lines)
    assert not any("error" in line or "Traceback" in line for line in lines)
    assert stdout.split() == [f"out/image-{i}.png" for i in range(len(stdout.split()))] and stdout


@pytest.mark.parametrize(
    "failure, code, fragment",
    [
        (KeyboardInterrupt(), 130, "interrupted; 2 of 3 outputs had been written"),
        # images are written by several threads: the third may land although the second failed; the line and stdout
        # then list both that did (the assertions below check stdout against the folder)
        (
            OSError(errno.ENOSPC, "No space left on device", "lat-1.png"),
            1,
            "cannot write lat-1.png (No space left on device); ",
        ),
    ],
)
def test_a_failure_between_images_says_what_was_written(failure, code, fragment, files, tmp_path, monkeypatch):
    real_save = image_io.save_image
    calls = []

    def save_image(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == (3 if isinstance(failure, KeyboardInterrupt) else 2):
            raise failure
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(image_io, "save_image", save_image)
    result = invoke("decode", files["lat"], "-o", "lat.png", cwd=tmp_path)
    assert result.exit_code == code
    written = result.stdout.splitlines()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)  # stdout lists exactly what exists
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]] and fragment in errors[0], result.stderr
    assert f"{len(written)} of 3 outputs had been written" in errors[0]


# --- 6: the cache ----------------------------------------------------------------------------------------------
def test_two_processes_filling_one_cache(tiny_model, tmp_path):
    prompts = [f"prompt {i}" for i in range(6)]
    command = [pixart_bin(), "encode", "--model", str(tiny_model), "--cache", "cache"]
    first = subprocess.Popen(
        [*command, *prompts, "-o", "a.pt"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    second = subprocess.Popen(
        [*command, *reversed(prompts), "-o", "b.pt"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for process in (first, second):
        assert process.wait(timeout=120) == 0, process.stderr.read()
    a, b = staged.load_embeddings(tmp_path / "a.pt"), staged.load_embeddings(tmp_path / "b.pt")
    assert torch.equal(a.prompt_embeds, b.prompt_embeds.flip(0))
    entries = sorted((tmp_path / "cache").iterdir())
    assert len(entries) == 6 and all(p.suffix == ".pt" for p in entries)  # no temp file left
    for entry in entries:
        loaded = staged.load_embeddings(entry)
        assert loaded.prompt_embeds.shape == (1, 120, 32)
        # its own row only: two [1, 120, 32] float32 tensors and two masks, not the batch's storage
        assert entry.stat().st_size < 2 * 120 * 32 * 4 + 2 * 120 * 8 + 8192


def test_a_tampered_cache_entry_is_encoded_again(tiny_model, tmp_path):
    fresh = encoded(["a cat"], tiny_model)
    encoded(["a cat"], tiny_model, cache=tmp_path / "cache")
    (entry,) = (tmp_path / "cache").iterdir()
    data = torch.load(entry, weights_only=True)
    torch.save(
        _with(data, prompt_embeds=torch.zeros(1, 120, 64), negative_prompt_embeds=torch.zeros(1, 120, 64)), entry
    )
    logs: list[str] = []
    again = encoded(["a cat"], tiny_model, cache=tmp_path / "cache", log=logs.append)
    assert torch.equal(again.prompt_embeds, fresh.prompt_embeds)
    assert any("ignoring entry" in line for line in logs)
    assert staged.load_embeddings(entry).prompt_embeds.shape == (1, 120, 32)  # replaced by a good one


def test_a_link_planted_as_a_cache_entry_is_replaced_not_written_through(tiny_model, tmp_path):
    encoded(["a cat"], tiny_model, cache=tmp_path / "cache")
    (entry,) = (tmp_path / "cache").iterdir()
    (tmp_path / "victim").write_bytes(b"someone else's file")
    entry.unlink()
    entry.symlink_to(tmp_path / "victim")
    encoded(["a cat"], tiny_model, cache=tmp_path / "cache", log=lambda line: None)
    assert (tmp_path / "victim").read_bytes() == b"someone else's file" and not entry.is_symlink()


# --- 9: the model a file names ---------------------------------------------------------------------------------
def test_a_relative_model_is_recorded_as_an_absolute_folder(tiny_model, files, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    os.symlink(tiny_model, tmp_path / "a" / "model")
    run_pixart("encode", "a cat", "--model", "model", "-o", "emb.pt", cwd=tmp_path / "a")
    assert staged.load_embeddings(tmp_path / "a" / "emb.pt").meta["model"] == str(tmp_path / "a" / "model")
    result = run_pixart("denoise", "../a/emb.pt", "--steps", "1", "--scheduler", "ddim", cwd=tmp_path / "b")
    assert result.stdout == "latents.pt\n"


def test_a_hub_model_named_by_a_file_is_never_downloaded(files, tmp_path):
    path = tmp_path / "hub.pt"
    torch.save(_with(files["emb_data"], meta={"model": "someone/not-downloaded"}), path)
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    result = subprocess.run(
        [pixart_bin(), "denoise", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    # one line: no hub request was made (its retries print several lines over ~27 s)
    assert_refused(
        result,
        1,
        str(path),
        "names the hub model someone/not-downloaded",
        "pass --model someone/not-downloaded to download it",
    )


@pytest.mark.parametrize(
    "component, command, weights",
    [
        ("transformer", "denoise", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "encode", "model.safetensors"),
    ],
)
def test_a_component_with_a_config_but_no_weights_is_named(component, command, weights, tiny_model, files, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for entry in tiny_model.iterdir():
        (model / entry.name).symlink_to(entry)
    (model / component).unlink()
    (model / component).mkdir()
    (model / component / "config.json").symlink_to(tiny_model / component / "config.json")
    source = {"denoise": [files["emb"], "--steps", "2"], "encode": ["a cat"]}[command]
    result = run_pixart(command, *source, "--model", model, "-o", "out/", cwd=tmp_path, check=False)
    errors = [line for line in result.stderr.splitlines() if not line.startswith(("seed:", f"{command}: "))]
    assert result.returncode == 1 and len(errors) == 1, result.stderr  # (no loader warning on another line)
    assert errors[0] == (
        f"error: --model {model}: {component}/ has no weights file ({weights} is missing); the model folder is "
        "incomplete: download it again"
    )
    assert result.stdout == "" and not (tmp_path / "out").exists()


# --- 10: info ----------------------------------------------------------------------------------------------------
def test_info_shows_nan_as_json_and_escapes_terminal_codes(files, tmp_path):
    path = tmp_path / "odd.pt"
    prompts = ["\x1b[31mred\x1b[0m\nsecond line"] * 3
    torch.save(
        _with(files["lat_data"], meta={"guidance_scale": float("nan"), "extra": float("-inf"), "prompts": prompts}),
        path,
    )
    shown = json.loads(
        invoke("info", path, "--json", cwd=tmp_path).stdout,
        parse_constant=lambda name: pytest.fail(f"invalid JSON constant {name}"),
    )
    assert shown["meta"]["guidance_scale"] == "NaN" and shown["meta"]["extra"] == "-Infinity"
    table = run_pixart("info", path, cwd=tmp_path).stdout
    assert "\x1b" not in table and "\\x1b[31mred\\x1b[0m" in table and "second line" in table


def test_info_and_compare_read_a_pt_file_by_its_contents_whatever_its_name(files, tmp_path):
    (tmp_path / "older.png").write_bytes(files["emb"].read_bytes())  # (named before .pt was required)
    shown = json.loads(run_pixart("info", "older.png", "--json", cwd=tmp_path).stdout)
    assert shown["kind"] == "embeddings" and shown["tensors"]["prompt_embeds"]["shape"] == [1, 120, 32]
    compared = json.loads(run_pixart("compare", "older.png", files["emb"], "--json", cwd=tmp_path).stdout)
    assert compared["kind"] == "embeddings" and compared["pairs"][0]["max_abs_diff"] == 0


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["denoise", "{emb}", "--lora", "style:abc"],
            "--lora style:abc: the scale 'abc' is not a number; give style:0.8",
        ),
        (["denoise", "{emb}", "--lora", "folder"], "--lora folder: is a folder; give the LoRA's .safetensors file"),
        (["encode", "a cat", "--model", "{model}", "--cache", "style"], "--cache style: is a file, not a folder"),
        (["encode", "a cat", "--model", ""], "--model '': the name is empty; give a diffusers model folder"),
        (["info", "cut.jpg"], "cut.jpg: not an image pixart can read (image file is truncated"),
    ],
)
def test_option_and_file_messages_name_what_is_wrong(args, line, tiny_model, files, tmp_path):
    from PIL import Image

    (tmp_path / "style").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    Image.effect_noise((64, 64), 64).convert("RGB").save(tmp_path / "whole.jpg")
    whole = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # its header whole: only decoding finds the cut
    before = sorted(tmp_path.iterdir())
    args = [arg.replace("{emb}", str(files["emb"])).replace("{model}", str(tiny_model)) for arg in args]
    result = run_pixart(*args, cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {line}"), result.stderr
    assert sorted(tmp_path.iterdir()) == before


# --- rough edges: paths --------------------------------------------------------------------------------------------
def test_paths_empty_missing_folders(files, tmp_path):
    assert_refused(
        run_pixart("denoise", "", cwd=tmp_path, check=False), 2, "EMBEDDINGS: the path is empty", "that command failed"
    )
    assert_refused(run_pixart("info", "nothere.png", cwd=tmp_path, check=False), 2, "nothere.png: no such file")
    assert "Errno" not in run_pixart("info", "nothere.png", cwd=tmp_path, check=False).stderr
    assert_refused(run_pixart("encode", "a cat", "-o", "", cwd=tmp_path, check=False), 2, "--output: the path is empty")
    for broken in ("a\nb.pt", "dir\r/"):  # stdout lists one path per line
        assert_refused(
            run_pixart("encode", "a cat", "-o", broken, cwd=tmp_path, check=False),
            2,
            f"--output {broken!r}: the path holds a line break",
        )
    (tmp_path / "existing").mkdir()
    assert_refused(
        run_pixart("encode", "a cat", "-o", "nofolder/x.pt", cwd=tmp_path, check=False), 2, "end the path with /"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_output_folders_one_rule_for_every_command(tiny_model, files, tmp_path):
    (tmp_path / "existing").mkdir()
    result = invoke("encode", "a cat", "--model", tiny_model, "-o", "existing", cwd=tmp_path)
    assert result.exit_code == 0 and result.stdout == "existing/embeddings.pt\n", result.stderr
    result = invoke("decode", files["lat"], "-o", "new/deeper/", cwd=tmp_path)
    assert result.exit_code == 0 and result.stdout.split() == [f"new/deeper/image-{i}.png" for i in range(3)]
    failed = invoke("decode", files["emb"], "-o", "never/", cwd=tmp_path)
    assert failed.exit_code == 2 and not (tmp_path / "never").exists()


def test_a_signal_while_an_output_is_placed_takes_effect_after_it_is_reported():
    """A SIGINT between a file's rename and its report must not make the line say that no output was written:
    inside GUARD.deferred() the signal waits for the end of the block."""
    from pixart_cli.signals import SignalGuard

    guard = SignalGuard()  # a fresh guard: the process's own stays as it is
    reported = []
    with pytest.raises(KeyboardInterrupt):
        with guard.deferred():
            guard.on_signal(signal.SIGINT, None)
            reported.append("out.png")  # still runs: the signal waits
    assert reported == ["out.png"] and guard.pending is None and guard.stopping
