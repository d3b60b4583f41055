"""Issue 20, each class in a real process on the tiny model: hostile LoRA files (patterns, ranks, alphas, nesting,
dtypes, sizes, what the path is), model folders (absurd configs, configs that disagree with their weights, shards
outside the folder, oversized configs, env-named models). Every case: one line naming the file or variable and the
fix, exit 2 for bad input or 1 for a damaged model, nothing written, decided before any model loads, in bounded
time and memory."""

from __future__ import annotations

import json
import os
import resource
import time

import hostile as attacks
import pytest

from helpers import assert_one_line_error
from pixart_cli.files import lora_file, peft_patterns

ADDRESS_LIMIT = 6 * 2**30  # each real process here runs under this address-space limit (torch alone takes ~3 GB)


def limited():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))


def run_limited(*args, cwd, env=None, timeout=120):
    """The CLI in a real process under the address-space limit and a time limit; (result, seconds)."""
    import subprocess

    from helpers import pixart_bin

    started = time.monotonic()
    result = subprocess.run(
        [pixart_bin(), *map(str, args)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limited,
    )
    return result, time.monotonic() - started


def assert_untouched(folder, *kept):
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept)


# --- classes 1, 4, 5, 9: LoRA files ---------------------------------------------------------------------------
LORA_CASES = {
    # 1. a pattern that backtracks for ever through Python's re, on module names made for it
    "redos-pattern": (
        lambda: attacks.lora_bytes(
            {
                f"transformer.{'a' * 60}.lora_A.weight": attacks.torch.zeros(4, 16),
                f"transformer.{'a' * 60}.lora_B.weight": attacks.torch.zeros(32, 4),
            },
            attacks.adapter_metadata(lora_alpha=8, alpha_pattern='{"(a|a)+b": 3, "(x+x+)+y": 2}'),
        ),
        2,
        "is not a layer of this model's transformer",
    ),
    "lookaround-pattern": (
        lambda: attacks.lora_bytes(metadata=attacks.adapter_metadata(alpha_pattern='{"(?=proj)proj_out": 3}')),
        2,
        "its alpha_pattern cannot be used: key '(?=proj)proj_out': lookarounds",
    ),
    # 5. raw exceptions before: ZeroDivisionError, OverflowError, RecursionError, NotImplementedError
    "rank-0": (lambda: attacks.lora_bytes(rank=0), 2, "is empty (rank 0)"),
    "huge-alpha": (
        lambda: attacks.lora_bytes(metadata=attacks.adapter_metadata(lora_alpha="9" * 400)),
        2,
        "lora_alpha 99999999999999999999... (400 characters) in its metadata is not a number",
    ),
    "deep-metadata": (
        lambda: attacks.lora_bytes(metadata={"lora_adapter_metadata": "[" * 100_000 + "]" * 100_000}),
        2,
        "its lora_adapter_metadata is not valid JSON (nested too deeply)",
    ),
    "float8": (lambda: attacks.lora_bytes(dtype=attacks.torch.float8_e4m3fn), 2, "has dtype F8_E4M3"),
    "lying-shape": (
        lambda: attacks.raw_safetensors(
            {"transformer.proj_out.lora_A.weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4]}},
            bytes(4),
        ),
        2,
        "damaged .safetensors file",
    ),
}


@pytest.fixture(scope="module")
def lora_cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    paths = {}
    for name, (build, code, fragment) in LORA_CASES.items():
        path = folder / f"{name}.safetensors"
        path.write_bytes(build())
        paths[name] = (path, code, fragment)
    return paths


@pytest.mark.parametrize("name", sorted(LORA_CASES))
def test_hostile_lora_files_are_refused_before_any_model_loads(name, lora_cases, tiny_model, tmp_path):
    path, code, fragment = lora_cases[name]
    result, seconds = run_limited("generate", "cat", "--model", tiny_model, "--lora", path, "-o", "x.png", cwd=tmp_path)
    assert_one_line_error(result, code, f"--lora {path}", fragment)  # one line: T5's plan note never came
    assert seconds < 60
    assert_untouched(tmp_path)


def test_deep_or_huge_adapter_config_beside_a_peft_file(tiny_model, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(attacks.lora_bytes())
    config = folder / "adapter_config.json"
    config.write_text("[" * 200_000 + "]" * 200_000)
    result, _ = run_limited("generate", "cat", "--model", tiny_model, "--lora", folder / "adapter_model.safetensors",
                            "-o", "x.png", cwd=tmp_path)  # fmt: skip
    assert_one_line_error(result, 2, f"--lora {config}: not valid JSON (nested too deeply)")
    config.unlink()
    with open(config, "wb") as handle:
        handle.truncate(8 * 2**30)  # sparse: 8 GB that take no disk
    result, _ = run_limited("generate", "cat", "--model", tiny_model, "--lora", folder / "adapter_model.safetensors",
                            "-o", "x.png", cwd=tmp_path)  # fmt: skip
    assert_one_line_error(result, 2, f"--lora {config}: 8,589,934,592 bytes is beyond the 1 MiB")
    assert_untouched(tmp_path, "adapter")


def test_what_the_lora_path_is_is_named(tiny_model, tmp_path):
    """A FIFO, a link to a device, a sparse file beyond the bound: each named for what it is (reading none)."""
    os.mkfifo(tmp_path / "fifo.safetensors")
    os.symlink("/dev/zero", tmp_path / "zero.safetensors")
    with open(tmp_path / "sparse.safetensors", "wb") as handle:
        handle.truncate(64 * 2**30)
    expected = {
        "fifo.safetensors": "is a named pipe (FIFO), not a file",
        "zero.safetensors": "is a character device, not a file",
        "sparse.safetensors": "68,719,476,736 bytes is beyond the 2,048 MiB pixart reads as a LoRA file",
        "gone.safetensors": "no such file",
    }
    for name, fragment in expected.items():
        result, seconds = run_limited("generate", "cat", "--model", tiny_model, "--lora", name, "-o", "x.png",
                                      cwd=tmp_path, timeout=60)  # fmt: skip
        assert_one_line_error(result, 2, f"--lora {name}: {fragment}")
        assert seconds < 60
    assert_untouched(tmp_path, *list(expected)[:3])


# --- class 1 in process: PEFT's rule, exactly, without backtracking ---------------------------------------------
def test_patterns_match_as_peft_matches_them_and_stay_linear():
    """Against Python's re on short names (where backtracking is harmless): the same answers; on long names the
    classic catastrophic patterns take milliseconds."""
    import re

    keys = ["proj_out", "to_.", "transformer_blocks.0.attn1.to_q", "blocks\\.[0-9]+\\.attn1\\..*", "^proj_out",
            "(attn1|attn2)\\.to_(q|k)", "ff.net.[02].*", "x{2,3}", "(a|b)+b", "[^.]+_out$", "a)|(b"]  # fmt: skip
    names = ["proj_out", "transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn2.to_k", "a.proj_out",
             "ff.net.0.proj", "xx", "aab", "b", "blocks.12.attn1.to_v", "q.proj_out\n"]  # fmt: skip
    for key in keys:
        try:
            reference = re.compile(rf"(.*\.)?({key})$")
        except re.error:
            with pytest.raises(peft_patterns.PatternError):
                peft_patterns.PatternTable({key: 1})
            continue
        table = peft_patterns.PatternTable({key: 1})
        for name in names:
            assert (table.lookup(name) == 1) == (reference.match(name) is not None), (key, name)
    started = time.monotonic()
    table = peft_patterns.PatternTable({"(a|a)+b": 1, "(a+)+$c": 2, "(.*a){12}x": 3, "(x+x+)+y": 4})
    for length in (30, 300, 3000):
        assert table.lookup("a" * length) is None
    assert time.monotonic() - started < 5
    assert peft_patterns.PatternTable({"to_q": 1, "to_.": 2}).lookup("a.to_q") == 1  # the first key that matches


def test_pattern_work_is_bounded():
    with pytest.raises(peft_patterns.PatternError, match="steps"):
        table = peft_patterns.PatternTable({f"(b|c|d|e)*{i}x": i for i in range(5000)})
        for index in range(2000):
            table.lookup(f"{index}" + "b" * 200)


def test_alpha_pattern_from_metadata_sets_alpha(tmp_path):
    path = tmp_path / "pattern.safetensors"
    path.write_bytes(
        attacks.lora_bytes(
            metadata=attacks.adapter_metadata(lora_alpha=8, alpha_pattern='{"p.oj_o.t": 2, "proj_out": 5}')
        )
    )
    weights = lora_file.read_lora(lora_file.LoraSpec(path))
    assert weights.modules["transformer.proj_out"].alpha == 2.0


# --- classes 2, 4, 9: model folders ---------------------------------------------------------------------------
SPARSE = "text_encoder/model.safetensors"
ABSURD = {  # name -> (how to damage a copy of the tiny model, fragment of the line)
    "layers-1e5": (lambda m: attacks.set_config(m, "transformer", num_layers=10**5), "num_layers 100000 is outside"),
    "layers-1e9": (lambda m: attacks.set_config(m, "transformer", num_layers=10**9), "num_layers 1000000000"),
    "head-dim": (lambda m: attacks.set_config(m, "transformer", attention_head_dim=5 * 10**6), "attention_head_dim"),
    "sample-size": (lambda m: attacks.set_config(m, "transformer", sample_size=10**6), "sample_size 1000000"),
    "negative-size": (lambda m: attacks.set_config(m, "transformer", sample_size=-128), "sample_size -128"),
    "in-channels": (lambda m: attacks.set_config(m, "vae", in_channels=10**9), "vae/config.json: in_channels"),
    "t5-layers": (lambda m: attacks.set_config(m, "text_encoder", num_layers=10**5), "text_encoder/config.json"),
    "timesteps": (
        lambda m: attacks.set_config(m, "scheduler", num_train_timesteps=10**9),
        "num_train_timesteps 1000000000",
    ),
    "layers-vs-weights": (
        lambda m: attacks.set_config(m, "transformer", num_layers=3),
        "gives 3 transformer_blocks, but the weights hold 2",
    ),
    "width-vs-weights": (
        lambda m: attacks.set_config(m, "text_encoder", d_model=64),
        "implies shared.weight of shape [81, 64], but the weights hold [81, 32]",
    ),
    "sparse-config": (lambda m: os.truncate(m / "transformer" / "config.json", 8 * 2**30), "beyond the 16 MiB"),
    "deep-config": (
        lambda m: (m / "vae" / "config.json").write_text("[" * 100_000 + "]" * 100_000),
        "vae/config.json is broken (nested too deeply)",
    ),
    "shard-outside": (lambda m: _outside_shard(m), "names the shard '../../../outside.safetensors', outside"),
    "entry-beyond-data": (lambda m: _sparse_entry(m / SPARSE), f"{SPARSE} is damaged"),
    "fifo-in-the-folder": (lambda m: _fifo(m / "tokenizer" / "tokenizer_config.json"), "is a named pipe (FIFO)"),
    "sparse-tokenizer": (
        lambda m: _sparse(m / "tokenizer" / "spiece.model"),
        "tokenizer/spiece.model is 8,589,934,592 bytes, beyond the 64 MiB",
    ),
}


def _fifo(path):
    path.unlink()
    os.mkfifo(path)


def _sparse(path):
    path.unlink()  # a link to the model's own file: never written through
    with open(path, "wb") as handle:
        handle.truncate(8 * 2**30)


def _outside_shard(model):
    (model / "text_encoder" / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"shared.weight": "../../../outside.safetensors"}}
    (model / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))


def _sparse_entry(path):
    """The embedding's entry claims 40 GB, and the file (sparse) is that long: its shape says otherwise."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["shared.weight"]["data_offsets"][1] = 40 * 2**30
    path.unlink()
    path.write_bytes(attacks.raw_safetensors(header, data[8 + length :]))
    os.truncate(path, 41 * 2**30)


@pytest.mark.parametrize("name", sorted(ABSURD))
def test_absurd_model_folders_are_named_before_anything_is_built(name, tiny_model, tmp_path):
    damage, fragment = ABSURD[name]
    model = attacks.model_copy(tiny_model, tmp_path / "model")
    damage(model)
    result, seconds = run_limited("generate", "cat", "--model", model, "--lora", _good_lora(tmp_path), "-o", "x.png",
                                  cwd=tmp_path)  # fmt: skip
    assert_one_line_error(result, 1, f"--model {model}: ", fragment)
    assert seconds < 60
    assert_untouched(tmp_path, "model", "good.safetensors")


def _good_lora(folder):
    path = folder / "good.safetensors"
    path.write_bytes(attacks.lora_bytes())
    return path


@pytest.mark.parametrize("variable", ["PIXART_MODEL", "PIXART_BASE_MODEL"])
def test_a_model_named_by_an_environment_variable_is_named_so(variable, tiny_model, tmp_path):
    model = attacks.model_copy(tiny_model, tmp_path / "no-t5")
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None]}))
    args = ["generate", "cat", "-o", "x.png"] + (["--model", model] if variable == "PIXART_BASE_MODEL" else [])
    result, _ = run_limited(*args, cwd=tmp_path, env={variable: str(tmp_path / "missing")})
    assert_one_line_error(result, 2, f"{variable}={tmp_path / 'missing'}: no such folder")


# --- classes 3, 8: decompression bombs and damaged EXIF, one bound for every command that reads images ------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    Image.new("L", (13000, 13000)).save(folder / "bomb.png")  # 169 M pixels in ~160 KB: PIL only warns
    Image.new("L", (8000, 8000)).save(folder / "flat.png")  # 64 M pixels in ~60 KB: no warning from PIL at all
    image = Image.new("RGB", (64, 48), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the orientation tag is read, the damaged rest is not
    buffer = __import__("io").BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    at = data.find(b"Exif\x00\x00") + 14
    data[at : at + 2] = b"\xff\x7f"  # an IFD entry count far beyond the EXIF block: PIL warns "Corrupt EXIF data"
    (folder / "bad-exif.jpg").write_bytes(bytes(data))
    return folder


@pytest.mark.parametrize("image", ["bomb.png", "flat.png"])
@pytest.mark.parametrize("command", ["encode-image", "generate", "compare", "info"])
def test_decompression_bombs_are_refused_from_the_header(command, image, images, tiny_model, tmp_path):
    path = images / image
    args = {
        "encode-image": ["encode-image", path, "--model", tiny_model, "-o", "init.pt"],
        "generate": ["generate", "cat", "--image", path, "--model", tiny_model, "-o", "x.png"],
        "compare": ["compare", path, path],
        "info": ["info", path],
    }[command]
    result, seconds = run_limited(*args, cwd=tmp_path, timeout=60)
    named = {"encode-image": f"IMAGE {path}", "generate": f"--image {path}"}.get(command, str(path))
    reason = "beyond the 67,108,864 pixels" if image == "bomb.png" else "pixels per byte"
    assert_one_line_error(result, 2, f"{named}: its header says", reason)
    assert "Warning" not in result.stderr and seconds < 30
    assert_untouched(tmp_path)


def test_damaged_exif_is_read_without_a_library_warning(images, tiny_model, tmp_path):
    result, _ = run_limited("encode-image", images / "bad-exif.jpg", "--model", tiny_model, "-o", "init.pt",
                            "--quiet", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "init.pt\n", result.stderr
    from pixart_cli.files import staged

    assert staged.load_latents(tmp_path / "init.pt").meta["requested_width"] == 48  # turned upright: 48 wide
    result, _ = run_limited("info", images / "bad-exif.jpg", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_a_large_photo_within_the_bounds_is_read(tmp_path):
    """Beyond 16.8 M pixels an image is decoded when its file holds at least a byte per 64 pixels, as photos do."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (4300, 4300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=30)
    result, _ = run_limited("info", "photo.jpg", "--json", cwd=tmp_path)
    assert result.returncode == 0 and json.loads(result.stdout)["size"] == [4300, 4300], result.stderr


# --- classes 4, 9: manifests, prompts files, the cache named by PIXART_CACHE ------------------------------------------
def test_manifest_and_prompts_reads_are_bounded(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / "manifest.jsonl", "wb") as handle:  # 16 GB without a newline, taking no disk
        handle.truncate(16 * 2**30)
    result, seconds = run_limited("generate", "cat", "--model", tiny_model, "--resume", "-o", "out/", cwd=tmp_path)
    assert_one_line_error(result, 2, "manifest.jsonl: 17,179,869,184 bytes is beyond the 256 MiB")
    assert seconds < 60 and sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]
    with open(tmp_path / "prompts.txt", "wb") as handle:
        handle.truncate(100 * 2**20)
    result, _ = run_limited("generate", "--prompts-file", "prompts.txt", "--model", tiny_model, "-o", "x.png",
                            cwd=tmp_path)  # fmt: skip
    assert_one_line_error(result, 2, "--prompts-file prompts.txt: holds more than the 64 MiB")
    result, _ = run_limited("generate", "x" * 40_000, "--model", tiny_model, "-o", "x.png", cwd=tmp_path)
    assert_one_line_error(result, 2, "PROMPT #1 is 40,000 characters, beyond the 32,768")


def test_the_cache_named_by_pixart_cache_is_named_so(tiny_model, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    result, _ = run_limited("encode", "cat", "--model", tiny_model, "-o", "e.pt", cwd=tmp_path,
                            env={"PIXART_CACHE": "a-file"})  # fmt: skip
    assert_one_line_error(result, 2, "PIXART_CACHE=a-file: is a file, not a folder")
    result, _ = run_limited("encode", "cat", "--model", tiny_model, "-o", "e.pt", "--cache", "a-file", cwd=tmp_path)
    assert_one_line_error(result, 2, "--cache a-file: is a file, not a folder")
    assert_untouched(tmp_path, "a-file")


def test_a_pickle_bin_in_place_of_the_weights_is_one_line(tiny_model, tmp_path):
    """A .bin where the safetensors would be is read as diffusers reads it (weights_only), after pixart's checks: a
    raw pickle is refused unread, before any model loads, and never runs; pixart's one line is all that shows."""
    import pickle

    model = attacks.model_copy(tiny_model, tmp_path / "model")
    (model / "transformer" / "diffusion_pytorch_model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'RAN'}",))

    (model / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    result, _ = run_limited("generate", "cat", "--model", model, "--steps", "2", "-o", "x.png", "--quiet",
                            cwd=tmp_path)  # fmt: skip
    assert_one_line_error(
        result, 1, f"--model {model}: transformer/diffusion_pytorch_model.bin: is not the zip archive torch.save"
    )
    assert not (tmp_path / "RAN").exists()
    assert_untouched(tmp_path, "model")


def test_a_model_named_by_a_file_is_named_as_the_file_named_it(tiny_model, tmp_path):
    """decode takes the model from the latents' meta: a damaged config there names the file, not --model."""
    from helpers import denoised, encoded
    from pixart_cli.files import staged

    model = attacks.model_copy(tiny_model, tmp_path / "model")
    latents = denoised(encoded(["a cat"], model), steps=2, seed=0)
    staged.save(tmp_path / "lat.pt", latents)
    attacks.set_config(model, "vae", block_out_channels=[8] * 40)
    result, _ = run_limited("decode", "lat.pt", "-o", "x.png", cwd=tmp_path)
    assert_one_line_error(result, 1, f"the model {model} named by lat.pt: vae/config.json: block_out_channels")
    assert not (tmp_path / "x.png").exists()
