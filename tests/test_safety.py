"""Hostile and broken inputs: exit 2, one line naming the file, no traceback, nothing written, no code run."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import hostile as attacks
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import SEED, assert_one_line_error, denoised, encoded, invoke, run_pixart
from pixart_cli.files import staged

MARKER = "PAYLOAD_RAN"


class Payload:
    """Unpickling this would create a marker file (it must never happen)."""

    def __init__(self, folder):
        self.command = f"touch {folder / MARKER}"

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def good(tiny_model, tmp_path_factory):
    """A valid embeddings file and latents file of the tiny model, and their dicts to mutate."""
    folder = tmp_path_factory.mktemp("good")
    embeddings = encoded(["a cute cat"], tiny_model)
    latents = denoised(embeddings, steps=2, seed=SEED)
    staged.save(folder / "emb.pt", embeddings)
    staged.save(folder / "lat.pt", latents)
    load = lambda name: torch.load(folder / name, weights_only=True)  # noqa: E731
    return {"emb": folder / "emb.pt", "lat": folder / "lat.pt", "emb_data": load("emb.pt"), "lat_data": load("lat.pt")}


def _mutated(data: dict, **changes) -> dict:
    copy = {key: value for key, value in data.items()}
    copy["meta"] = dict(data["meta"])
    for key, value in changes.items():
        if key.startswith("meta_"):
            copy["meta"][key[5:]] = value
        elif value is None:
            copy.pop(key)
        else:
            copy[key] = value
    return copy


def _hostile_files(folder: Path, good: dict) -> dict[str, tuple[str, Path, str]]:
    """name -> (command, file, fragment expected in the error line)."""
    emb, lat = good["emb_data"], good["lat_data"]
    files = {}

    def save(name, data):
        torch.save(data, folder / name)
        return folder / name

    def raw(name, payload: bytes):
        (folder / name).write_bytes(payload)
        return folder / name

    evil = Payload(folder)
    files["pickle-top-level"] = ("denoise", raw("evil.pt", pickle.dumps(evil, protocol=2)), "refused")
    files["pickle-protocol-4"] = ("denoise", raw("evil4.pt", pickle.dumps(evil, protocol=4)), "refused")
    zipped_evil = folder / "evil-zip.pt"
    torch.save({"meta": {"format": "pixart-cli/embeddings"}, "x": evil}, zipped_evil)
    files["pickle-in-zip"] = ("denoise", zipped_evil, "refused")
    nested = dict(emb)
    nested["meta"] = dict(emb["meta"], extra={"deep": [evil]})
    torch.save(nested, folder / "evil-meta.pt")
    files["pickle-in-meta"] = ("denoise", folder / "evil-meta.pt", "refused")
    files["empty"] = ("denoise", raw("empty.pt", b""), "is empty (0 bytes)")
    whole = good["emb"].read_bytes()
    files["truncated"] = ("denoise", raw("truncated.pt", whole[: len(whole) // 2]), "damaged or truncated")
    # fixed bytes: a random draw that happens to start like a pickle naming a global is refused as one instead
    noise = __import__("random").Random(0).randbytes(4096)
    files["random-bytes"] = ("denoise", raw("random.pt", noise), "not a pixart .pt file")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(folder / "picture.png")
    files["png-renamed"] = (
        "denoise",
        raw("picture.pt", (folder / "picture.png").read_bytes()),
        "is an image, not a .pt file; image to image starts with `pixart encode-image",
    )
    files["latents-to-denoise"] = ("denoise", good["lat"], "is a latents file")
    files["embeddings-to-decode"] = ("decode", good["emb"], "is an embeddings file")
    files["newer-version"] = ("denoise", save("newer.pt", _mutated(emb, meta_version=99)), "newer")
    wide = torch.zeros(1, 120, 64)
    files["embeddings-too-wide"] = (
        "denoise",
        save("wide.pt", _mutated(emb, prompt_embeds=wide, negative_prompt_embeds=wide)),
        "64 wide",
    )
    long = torch.zeros(1, 200, 32)
    long_mask = torch.ones(1, 200, dtype=torch.long)
    files["sequence-length"] = (
        "denoise",
        save(
            "long.pt",
            _mutated(
                emb,
                prompt_embeds=long,
                negative_prompt_embeds=long,
                prompt_attention_mask=long_mask,
                negative_prompt_attention_mask=long_mask,
            ),
        ),
        "200 tokens",
    )
    files["latent-channels"] = (
        "decode",
        save("channels.pt", _mutated(lat, latents=torch.zeros(1, 8, 32, 32))),
        "8 channels",
    )
    files["latent-size"] = (
        "decode",
        save("size.pt", _mutated(lat, latents=torch.zeros(1, 4, 16, 16))),
        "do not decode to the recorded 256x256",
    )
    nan = emb["prompt_embeds"].clone()
    nan[0, 0, 0] = float("nan")
    files["nan"] = ("denoise", save("nan.pt", _mutated(emb, prompt_embeds=nan)), "NaN or inf")
    inf = lat["latents"].clone()
    inf[0, 0, 0, 0] = float("inf")
    files["inf"] = ("decode", save("inf.pt", _mutated(lat, latents=inf)), "NaN or inf")
    files["missing-key"] = (
        "denoise",
        save("missing.pt", _mutated(emb, negative_prompt_embeds=None)),
        "missing tensor 'negative_prompt_embeds'",
    )
    files["missing-meta"] = ("decode", save("nometa.pt", {"latents": lat["latents"]}), "no meta")
    return files


HOSTILE = [
    "pickle-top-level",
    "pickle-protocol-4",
    "pickle-in-zip",
    "pickle-in-meta",
    "empty",
    "truncated",
    "random-bytes",
    "png-renamed",
    "latents-to-denoise",
    "embeddings-to-decode",
    "newer-version",
    "embeddings-too-wide",
    "sequence-length",
    "latent-channels",
    "latent-size",
    "nan",
    "inf",
    "missing-key",
    "missing-meta",
]


@pytest.fixture(scope="module")
def hostile(good, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    return folder, _hostile_files(folder, good)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_file(name, hostile, tmp_path):
    folder, files = hostile
    command, path, fragment = files[name]
    result = invoke(command, path, "-o", "out.pt" if command == "denoise" else "out.png", cwd=tmp_path)
    assert_one_line_error(result, 2, str(path), fragment)
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert not (folder / MARKER).exists()  # the payload never ran


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_file_through_stdin(name, hostile, tmp_path):
    """`-` reads standard input: the same checks, the same refusals, the file named as standard input."""
    folder, files = hostile
    command, path, fragment = files[name]
    result = invoke(
        command, "-", "-o", "out.pt" if command == "denoise" else "out.png", cwd=tmp_path, stdin=path.read_bytes()
    )
    assert_one_line_error(result, 2, "- (standard input)", fragment)
    assert list(tmp_path.iterdir()) == []
    assert not (folder / MARKER).exists()


def test_hostile_files_cover_the_issue_list(hostile):
    assert sorted(hostile[1]) == sorted(HOSTILE)


def test_payload_is_real(tmp_path):
    """The payload does run when a careless loader uses pickle, so the tests above prove something."""
    pickle.loads(pickle.dumps(Payload(tmp_path)))
    assert (tmp_path / MARKER).exists()


# --- bad options: checked before any model or torch loads --------------------------------------------------
@pytest.mark.parametrize(
    "args, fragment",
    [
        (["encode", "--prompts-file", "{empty}"], "holds no prompts"),
        (["encode"], "give at least one prompt"),
        (["generate", "cat", "--steps", "0"], "--steps 0"),
        (["generate", "cat", "--guidance-scale", "-2"], "--guidance-scale"),
        (["generate", "cat", "--width", "1001"], "--width 1001"),
        (["generate", "cat", "--num-images", "0"], "--num-images 0"),
        (["generate", "cat", "--device", "gpu7"], "--device 'gpu7'"),
        (["generate", "cat", "-o", "/nonexistent/dir/x.png"], "does not exist"),
        (["encode", "cat", "-o", "{existing}", "--no-overwrite"], "already exists"),
        (["encode", "cat", "--vram", "lots"], "--vram 'lots'"),
        (
            ["encode", "cat", "-o", "emb.png"],
            "--output emb.png: an embeddings file is a torch .pt file; name it emb.pt",
        ),
        (
            ["encode-image", "x.png", "-o", "init"],
            "--output init: an init latents file is a torch .pt file; name it init.pt",
        ),
    ],
)
def test_bad_options_fail_fast_in_a_real_process(args, fragment, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "existing.pt").write_bytes(b"keep me")
    args = [a.replace("{empty}", "empty.txt").replace("{existing}", "existing.pt") for a in args]
    # -X importtime lists every module the process imported: bad options are refused before torch loads.
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pixart_cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and len(errors) == 1 and fragment in errors[0], errors
    assert "torch" not in imported and "diffusers" not in imported
    assert (tmp_path / "existing.pt").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "existing.pt"]


def test_unwritable_output_folder(tmp_path, monkeypatch):
    # Tests run as root in CI, where chmod cannot make a folder unwritable; the check itself is os.access.
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if str(path).endswith("locked") else real_access(path, mode)
    )
    (tmp_path / "locked").mkdir()
    result = invoke("encode", "cat", "-o", tmp_path / "locked" / "x.pt", cwd=tmp_path)
    assert_one_line_error(result, 2, "locked is not writable")


def test_prompts_file_and_stdin(tiny_model, tmp_path):
    (tmp_path / "prompts.txt").write_text("a cute cat\n\na red chair\n")
    result = run_pixart("encode", "--prompts-file", "prompts.txt", "--model", tiny_model, cwd=tmp_path)
    assert staged.load_embeddings(tmp_path / "embeddings.pt").meta["prompts"] == ["a cute cat", "a red chair"]
    piped = subprocess.run(
        [
            str(Path(sys.executable).parent / "pixart"),
            "encode",
            "--prompts-file",
            "-",
            "-o",
            "piped.pt",
            "--model",
            str(tiny_model),
        ],
        input="a dog\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert piped.returncode == 0 and piped.stdout == "piped.pt\n", piped.stderr
    assert staged.load_embeddings(tmp_path / "piped.pt").meta["prompts"] == ["a dog"]
    assert result.stdout == "embeddings.pt\n"


# --- interruption -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_a_stage_leaves_no_output(signum, code, good, tmp_path):
    """A long denoise in a real process, interrupted once its plan line shows the stage is running."""
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "pixart"),
            "denoise",
            str(good["emb"]),
            "--steps",
            "1000",
            "--num-images",
            "4",
            "-o",
            "lat.pt",
        ],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    for line in process.stderr:
        if "denoise: plan" in line:
            break
    time.sleep(1.0)  # well inside the denoising loop
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert stdout == "" and "no output was written" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []  # no latents.pt, no temp file


# --- runtime failures -------------------------------------------------------------------------------------
def test_corrupted_model_file_is_named(tiny_model, tmp_path, good):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = invoke("denoise", good["emb"], "--model", broken, "--steps", "2", cwd=tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    # The plan line came first; the failure is one line, last.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]]
    assert "transformer/diffusion_pytorch_model.safetensors is damaged" in errors[0]
    assert not (tmp_path / "latents.pt").exists()


def test_corrupted_text_encoder_is_named(tiny_model, tmp_path):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    weights = broken / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    result = invoke("encode", "a cat", "--model", broken, cwd=tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "text_encoder/model.safetensors is damaged" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "embeddings.pt").exists()


def test_out_of_memory_is_one_line_suggesting_vram(good, tmp_path, monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("pixart_cli.models.sampling.sample_latents", exhausted)
    result = invoke("denoise", good["emb"], "--steps", "2", cwd=tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: out of device memory") and "--vram" in last
    assert not (tmp_path / "latents.pt").exists()


def test_existing_output_is_replaced_atomically(good, tmp_path):
    (tmp_path / "lat.pt").write_bytes(b"old")
    result = invoke("denoise", good["emb"], "--steps", "2", "--seed", "1", "-o", "lat.pt", cwd=tmp_path)
    assert result.exit_code == 0
    assert staged.load_latents(tmp_path / "lat.pt").meta["seeds"] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat.pt"]  # no temp file left beside it


# --- fuzzing, each case read by a worker process under an address-space and a time limit ---------------------
@pytest.fixture(scope="module")
def worker():
    reader = attacks.Worker()
    yield reader
    reader.stop()


def _assert_refused(answer: dict, path) -> None:
    assert answer["outcome"] == "refused", answer  # not accepted, crashed, hung or killed for memory
    assert answer["message"].startswith(str(path)) and "\n" not in answer["message"], answer


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_fuzzed_bytes_are_read_or_refused_within_limits(good, worker, tmp_path_factory, data):
    source = good["emb"].read_bytes() if data.draw(st.booleans()) else good["lat"].read_bytes()
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "garbage"]))
    if kind == "garbage":
        blob = data.draw(st.binary(max_size=2048))
    else:
        position = data.draw(st.integers(0, len(source) - 1))
        if kind == "flip":
            count = data.draw(st.integers(1, 8))
            blob = bytearray(source)
            for offset in range(count):
                blob[(position + offset * 97) % len(blob)] ^= data.draw(st.integers(1, 255))
            blob = bytes(blob)
        elif kind == "truncate":
            blob = source[:position]
        else:
            blob = source[:position] + data.draw(st.binary(min_size=1, max_size=64)) + source[position:]
    path = tmp_path_factory.getbasetemp() / "fuzz.pt"
    path.write_bytes(blob)
    answer = worker.read(path, data.draw(st.sampled_from(["embeddings", "latents", "describe"])))
    assert answer["outcome"] in ("refused", "accepted"), answer
    if answer["outcome"] == "refused":
        _assert_refused(answer, path)


TENSOR_KEYS = {
    "emb": ["prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask"],
    "lat": ["latents"],
}
EXOTIC = ["sparse_coo", "sparse_csr", "meta", "quantized", "float8_e4m3fn", "float8_e5m2", "complex64", "uint16"]


class Case(bytes):
    """A hostile file's bytes, shown in a failing example by the attack that made them, not the bytes."""

    def __new__(cls, blob: bytes, attack: str):
        case = super().__new__(cls, blob)
        case.attack = attack
        return case

    def __repr__(self):
        return f"Case({self.attack})"


@st.composite
def hostile_files(draw, good):
    """A structurally hostile file: every one must be refused."""
    case = draw(_hostile_blobs(good))
    return case


@st.composite
def _hostile_blobs(draw, good):
    trace: list = []
    blob = draw(_hostile_blob(good, trace))
    return Case(blob, " ".join(map(str, trace)))


@st.composite
def _hostile_blob(draw, good, trace):
    real_draw = draw

    def draw(strategy):
        value = real_draw(strategy)
        trace.append(value if not isinstance(value, (list, dict)) else type(value).__name__)
        return value

    which = draw(st.sampled_from(["emb", "lat"]))
    base = good[f"{which}_data"]
    data = {key: value for key, value in base.items()}
    data["meta"] = dict(base["meta"])
    attack = draw(
        st.sampled_from(["shared", "cyclic", "deep", "key", "number", "wide", "exotic", "strided", "zip", "fields"])
    )
    if attack == "shared":
        data["meta"][draw(st.sampled_from(["extra", "prompts", "seeds"]))] = attacks.shared_meta(
            draw(st.integers(2, 60)), draw(st.integers(2, 4))
        )
    elif attack == "cyclic":
        data["meta"]["extra"] = attacks.cyclic_meta(draw(st.sampled_from(["list", "dict"])))
    elif attack == "deep":
        return attacks.deep_meta_file(base, draw(st.one_of(st.integers(17, 5000), st.just(200_000))))
    elif attack == "key":
        data["meta"][draw(st.sampled_from([("a", "b"), 1, None, 2.5, b"k"]))] = "value"
    elif attack == "number":
        data["meta"]["extra"] = draw(st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1)))
    elif attack == "wide":  # many nodes from a small pickle: one string repeated past the text budget
        data["meta"]["extra"] = ["x" * 4096] * draw(st.integers(17_000, 20_000))
    elif attack == "exotic":
        key = draw(st.sampled_from(TENSOR_KEYS[which]))
        data[key] = attacks.exotic_tensor(draw(st.sampled_from(EXOTIC)), tuple(base[key].shape))
    elif attack == "strided":
        key = draw(st.sampled_from(TENSOR_KEYS[which]))
        trick = draw(st.sampled_from(["expand", "overlap", "gap"]))
        data[key] = attacks.strided_trick(
            trick, tuple(base[key].shape), draw(st.integers(10**6, 10**12)), base[key].dtype
        )
    elif attack == "zip":
        blob = attacks.to_bytes(data)
        if draw(st.booleans()):
            return attacks.rezip(blob, compress=zipfile.ZIP_DEFLATED)
        return attacks.rezip(blob, extra_size=draw(st.integers(1 << 20, 1 << 31)))
    else:  # a meta field a stage uses, of the wrong type or count
        checked = {
            "emb": ["model", "prompts", "revision", "max_sequence_length"],
            "lat": ["model", "prompts", "seeds", "revision", "height", "requested_width"],
        }[which]
        field = draw(st.sampled_from(checked))
        values = [3, [], ["a"] * 7, {"x": 1}, "", 10**6, float("nan")] + ([None] if field != "revision" else [])
        data["meta"][field] = draw(st.sampled_from(values))
    return attacks.to_bytes(data)


@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_structurally_hostile_files_are_refused_within_limits(good, worker, tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "hostile.pt"
    path.write_bytes(data.draw(hostile_files(good)))
    _assert_refused(worker.read(path, data.draw(st.sampled_from(["any", "describe"]))), path)


CACHE_SETTINGS = {
    "model": "/models/tiny",
    "revision": None,
    "text_encoder": {"d_model": 32},
    "negative_prompt": "",
    "max_sequence_length": 120,
    "clean_caption": True,
    "dtype": "fp32",
    "precision": "full",
}


def _cache_entry(good, **changes) -> staged.Embeddings:
    emb = good["emb_data"]
    tensors = [emb[key][:1].clone() for key in staged.EMBEDDING_KEYS]
    meta = {
        "format": staged.EMBEDDINGS_FORMAT,
        "version": 1,
        "model": "/models/tiny",
        "revision": None,
        "family": "cache",
        "dtype": "fp32",
        "prompts": ["a cat"],
        "max_sequence_length": 120,
        "negative_prompt": "",
        "clean_caption": True,
        "text_encoder_precision": "full",
    }
    for key, value in changes.items():
        if key in staged.EMBEDDING_KEYS:
            tensors[staged.EMBEDDING_KEYS.index(key)] = value
        else:
            meta[key] = value
    return staged.Embeddings(*tensors, meta=meta)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_tampered_cache_entries_are_misses(good, worker, tmp_path_factory, data):
    """A cache entry that does not match the current settings is never used, whatever it claims."""
    change = data.draw(
        st.sampled_from(
            [
                {"model": "/models/other"},
                {"dtype": "fp16"},
                {"prompts": ["a dog"]},
                {"negative_prompt": "blurry"},
                {
                    "max_sequence_length": 60,
                    "prompt_embeds": torch.zeros(1, 60, 32),
                    "prompt_attention_mask": torch.ones(1, 60, dtype=torch.long),
                    "negative_prompt_embeds": torch.zeros(1, 60, 32),
                    "negative_prompt_attention_mask": torch.ones(1, 60, dtype=torch.long),
                },
                {"prompt_embeds": torch.zeros(1, 120, 64), "negative_prompt_embeds": torch.zeros(1, 120, 64)},
                {
                    "prompt_embeds": torch.zeros(1, 120, 32, dtype=torch.float16),
                    "negative_prompt_embeds": torch.zeros(1, 120, 32, dtype=torch.float16),
                },
                {"clean_caption": False},
                {"text_encoder_precision": "8bit"},
            ]
        )
    )
    folder = tmp_path_factory.getbasetemp() / "fuzz-cache"
    path = tmp_path_factory.getbasetemp() / "entry.pt"
    blob = attacks.to_bytes({**_cache_entry(good, **change).tensors(), "meta": _cache_entry(good, **change).meta})
    if data.draw(st.booleans()):  # or a structurally hostile file in its place
        blob = data.draw(hostile_files(good))
    path.write_bytes(blob)
    answer = worker.read(path, "cache", folder=str(folder), settings=CACHE_SETTINGS, width=32, prompt="a cat")
    assert answer == {"outcome": "miss"}, answer


def test_a_matching_cache_entry_is_a_hit(good, worker, tmp_path):
    path = tmp_path / "entry.pt"
    staged.save(path, _cache_entry(good))
    answer = worker.read(
        path, "cache", folder=str(tmp_path / "cache"), settings=CACHE_SETTINGS, width=32, prompt="a cat"
    )
    assert answer == {"outcome": "hit"}


def test_the_worker_limits_catch_a_bloating_read(worker, tmp_path):
    """The fuzz would notice a loader that allocates: the same isfinite() the old loader ran on a stride-0 view
    of 16e9 elements fails inside the worker instead of taking the machine."""
    path = tmp_path / "bloat.pt"
    torch.save({"t": torch.zeros(1).expand(16 * 10**9)}, path)
    code = f"import torch; t = torch.load({str(path)!r}, weights_only=True)['t']; torch.isfinite(t).all()"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import resource; lim = 2 << 30; resource.setrlimit(resource.RLIMIT_AS, (lim, lim)); {code}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and ("memory" in result.stderr.lower() or "alloc" in result.stderr.lower())


def test_missing_vae_weights_are_named(tiny_model, good, tmp_path):
    """No VAE weights: one line naming vae/ and the missing file, before any loader tries (the compact decoder
    would hand over to AutoencoderKL, whose error names another file)."""
    import shutil

    broken = tmp_path / "no-vae-weights"
    shutil.copytree(tiny_model, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    result = invoke("decode", good["lat"], "--model", broken, "-o", "x.png", cwd=tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: --model {broken}: vae/ has no weights file (diffusion_pytorch_model.safetensors is missing); "
        "the model folder is incomplete: download it again"
    )
    assert not (tmp_path / "x.png").exists()


# --- fuzzing LoRA files, model configs and manifests (issue 20), under the same limits ---------------------------
REGEX_PARTS = ["a", ".", "\\.", "\\d", "\\w+", "[a-z]", "[^.]", "(a|a)", "(a+)+", "(.*)*", ".*", "x{2,5}", "(?:to_q|to_k)",
               "^", "$", "(?=a)", "\\1", "(?P<n>a)", "*", "(", ")", "[", "{9999}", "a{1000}{1000}", "proj_out",
               "transformer_blocks.0", "\\x41", "(?i)", "|"]  # fmt: skip
JSON_VALUES = st.one_of(
    st.integers(), st.integers(min_value=10**30), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
    st.booleans(), st.none(), st.lists(st.integers(), max_size=3), st.just({"x": 1}),
)  # fmt: skip


@st.composite
def _pattern_keys(draw):
    return "".join(draw(st.lists(st.sampled_from(REGEX_PARTS), min_size=1, max_size=8)))


@st.composite
def hostile_loras(draw):
    """A LoRA file's bytes: its metadata, header or tensors made hostile (the name of the attack beside it)."""
    attack = draw(st.sampled_from(["metadata", "patterns", "deep", "header", "tensors", "names"]))
    module = attacks.LORA_MODULE
    tensors = None
    metadata = None
    if attack == "metadata":
        fields = {
            name: json.dumps(draw(JSON_VALUES))
            for name in draw(st.lists(st.sampled_from(["lora_alpha", "use_rslora", "r", "alpha_pattern"]), max_size=3))
        }
        metadata = attacks.adapter_metadata(**fields)
        if draw(st.booleans()):
            metadata = {"lora_adapter_metadata": draw(st.text(max_size=40))}
    elif attack == "patterns":
        keys = draw(st.dictionaries(_pattern_keys(), JSON_VALUES | st.integers(1, 64), max_size=6))
        metadata = attacks.adapter_metadata(lora_alpha=8, alpha_pattern=json.dumps(keys))
        name = draw(st.sampled_from(["a" * 80, "proj_out", "x" * 40 + "y", "transformer_blocks.0.attn1.to_q"]))
        module = f"transformer.{name}"
    elif attack == "deep":
        depth = draw(st.sampled_from([50, 1000, 100_000]))
        metadata = {"lora_adapter_metadata": "[" * depth + "]" * depth}
    elif attack == "names":
        module = draw(st.text(min_size=1, max_size=60))
    if attack in ("header", "tensors"):
        dtype = draw(st.sampled_from(["F32", "F16", "F8_E4M3", "I64", "C64", "BOOL", "F64", "X"]))
        shape = draw(st.lists(st.integers(0, 10**7), min_size=0, max_size=4))
        offsets = [draw(st.integers(0, 64)), draw(st.integers(0, 2**40))]
        header = {f"{module}.lora_A.weight": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}
        blob = attacks.raw_safetensors(header, bytes(draw(st.integers(0, 256))))
        if attack == "header" and draw(st.booleans()):
            blob = (2**40).to_bytes(8, "little") + b"{" + blob[9:]
        return Case(blob, f"{attack} {dtype} {shape} {offsets}")
    if tensors is None:
        rank = draw(st.sampled_from([0, 1, 4]))
        tensors = {
            f"{module}.lora_A.weight": torch.zeros(rank, 16),
            f"{module}.lora_B.weight": torch.full((32, rank), draw(st.sampled_from([0.0, float("nan"), 1e38]))),
        }
    return Case(attacks.lora_bytes(tensors, metadata), f"{attack} {module[:20]!r} {str(metadata)[:120]}")


def _refused_or_accepted(answer: dict, *prefixes: str) -> None:
    assert answer["outcome"] in ("refused", "accepted"), answer  # not crashed, hung or killed for memory
    if answer["outcome"] == "refused":
        assert answer["message"].startswith(prefixes) and "\n" not in answer["message"], answer


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_hostile_lora_files_are_read_or_refused_within_limits(worker, tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "hostile.safetensors"
    path.write_bytes(data.draw(hostile_loras()))
    _refused_or_accepted(worker.read(path, "lora"), f"--lora {path}")


CONFIG_FIELDS = {
    "transformer": ["num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                    "sample_size", "patch_size", "caption_channels", "cross_attention_dim", "interpolation_scale",
                    "norm_type", "activation_fn", "num_embeds_ada_norm"],
    "text_encoder": ["num_layers", "d_model", "d_kv", "d_ff", "num_heads", "vocab_size", "feed_forward_proj",
                     "relative_attention_num_buckets"],
    "vae": ["block_out_channels", "latent_channels", "in_channels", "out_channels", "layers_per_block",
            "norm_num_groups", "scaling_factor", "up_block_types"],
    "scheduler": ["num_train_timesteps", "solver_order", "_class_name", "beta_schedule"],
}  # fmt: skip
CONFIG_VALUES = st.one_of(
    st.integers(-(10**12), 10**12), st.sampled_from([0, 1, 2, 3, 256, 257, 4096, 10**9, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.none(), st.booleans(),
    st.lists(st.integers(-5, 10**6), max_size=12),
)  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_model(tiny_model, tmp_path_factory):
    """A copy of the tiny model whose configs each case changes (and puts back)."""
    folder = attacks.model_copy(tiny_model, tmp_path_factory.mktemp("fuzz-model") / "model")
    return folder, {path: path.read_bytes() for path in [*folder.glob("*.json"), *folder.glob("*/*.json")]}


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_hostile_model_configs_are_planned_or_refused_within_limits(fuzz_model, worker, data):
    folder, originals = fuzz_model
    for path, original in originals.items():
        path.write_bytes(original)
    component = data.draw(st.sampled_from(sorted(CONFIG_FIELDS) + ["model_index"]))
    name = {"model_index": "model_index.json", "scheduler": "scheduler/scheduler_config.json"}.get(
        component, f"{component}/config.json"
    )
    if data.draw(st.integers(0, 4)) == 0:  # the whole file
        depth = data.draw(st.sampled_from([10, 100_000]))
        (folder / name).write_bytes(data.draw(st.sampled_from([b"[" * depth + b"]" * depth, b"[]", b"", b"\xff{"])))
    elif component == "model_index":
        index = json.loads(originals[folder / name])
        index[data.draw(st.sampled_from(["text_encoder", "vae", "_class_name"]))] = data.draw(CONFIG_VALUES)
        (folder / name).write_text(json.dumps(index))
    else:
        fields = data.draw(st.dictionaries(st.sampled_from(CONFIG_FIELDS[component]), CONFIG_VALUES, min_size=1))
        attacks.set_config(folder, component, **fields)
    # a model_index.json that lacks a component sends it to the base model (not in this test's cache)
    _refused_or_accepted(worker.read(folder, "model"), "--model ", "the base model ")


@st.composite
def hostile_manifests(draw):
    line = {"version": 1, "index": 0, "path": "image-0.png", "prompt": "a cat", "negative_prompt": "", "seed": 5,
            "options": {"steps": 2}, "settings": {}, "size": 10, "sha256": "0" * 64}  # fmt: skip
    parts = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["good", "field", "long", "deep", "garbage", "many"]))
        if kind == "good":
            parts.append(json.dumps({**line, "index": draw(st.integers(0, 20))}).encode() + b"\n")
        elif kind == "field":
            key = draw(st.sampled_from(sorted(line)))
            parts.append(json.dumps({**line, key: draw(CONFIG_VALUES | JSON_VALUES)}).encode() + b"\n")
        elif kind == "long":
            parts.append(b'{"prompt": "' + b"x" * draw(st.sampled_from([2**20 - 20, 2**20 + 5, 3 * 2**20])) + b'"}')
        elif kind == "deep":
            parts.append(b"[" * 100_000 + b"]" * 100_000 + b"\n")
        elif kind == "garbage":
            parts.append(draw(st.binary(max_size=200)))
        else:  # many lines of images the run does not make (kept, they would hold memory)
            parts.append(b"".join(json.dumps({**line, "index": 10 + i}).encode() + b"\n" for i in range(20_000)))
    return Case(b"".join(parts), f"{len(parts)} parts")


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_hostile_manifests_are_read_or_refused_within_limits(worker, tmp_path_factory, data):
    folder = tmp_path_factory.getbasetemp() / "fuzz-manifest"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.jsonl").write_bytes(data.draw(hostile_manifests()))
    _refused_or_accepted(worker.read(folder, "manifest"), str(folder / "manifest.jsonl"))


def test_a_manifest_of_a_million_lines_is_read_in_bounded_memory(worker, tmp_path):
    """Only the lines of images the run makes are kept: 700,000 lines of other indices (170 MB) stay within the
    worker's limit, where keeping them took 1.2 GB."""
    line = {"version": 1, "path": "image-0.png", "prompt": "a cat", "negative_prompt": "", "seed": 5,
            "options": {"steps": 2}, "settings": {"prompt": "a cat", "seed": 5}, "size": 10, "sha256": "0" * 64}  # fmt: skip
    with open(tmp_path / "manifest.jsonl", "w") as handle:
        for index in range(700_000):
            handle.write(json.dumps({**line, "index": index + 10, "seed": 5 + index}) + "\n")
    assert worker.read(tmp_path, "manifest") == {"outcome": "accepted"}


def test_a_t5_config_whose_activation_is_not_text_is_refused():
    """Found by the model-config fuzz: ``feed_forward_proj: null`` crashed the plan (AttributeError)."""
    from pixart_cli.models.t5 import t5_config

    for value in (None, 3, ["gated-gelu"], "gated-gelu-x"):
        with pytest.raises(ValueError, match="is not a T5 activation"):
            t5_config({"feed_forward_proj": value})
