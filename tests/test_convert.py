"""pixart convert: a local fp16 (or bf16) copy that loads to exactly the tensors the fp32 folder loads to, written
atomically from a source that is not trusted.

Equality is exact (tolerance 0) throughout: the copy stores each tensor already cast with torch's own rounding,
the one the loaders apply when they load fp32 weights with ``dtype=fp16``, and keeps in fp32 what they keep in
fp32; loading the copy then casts nothing more, so the loaded tensors, the embeddings and the images are the same
bits, and CPU arithmetic on the same bits is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from helpers import assert_one_line_error, invoke, run_pixart
from pixart_cli.files import model_copy
from pixart_cli.models import convert as conversion
from pixart_cli.models.source import Model
from pixart_cli.runtime import RunContext
from pixart_cli.settings import DenoiseSettings, EncodeSettings

PROMPTS = ["a cute cat sitting on a red chair", "a small house by the lake"]


def run_convert(*args, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`pixart convert ...` in a process of its own, through the console script, as a shell user runs it."""
    return run_pixart("convert", *args, cwd=cwd, env=env, check=False, timeout=timeout)


def library_copy(model: Path, output: Path, dtype=torch.float16, components=None, overwrite=False, **options):
    """The library's own steps, as the command takes them."""
    target, shown = model_copy.check_target(str(output), overwrite)
    plan = conversion.plan(Model(str(model)), target, shown, dtype, components, overwrite, **options)
    return model_copy.write(plan)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dtypes_in(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_slice(name).get_dtype() for name in handle.keys()}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".pixart-")]


def loaded(folder: Path, dtype) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's state dict as transformers' and diffusers' own from_pretrained load it with ``dtype``."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5EncoderModel

    return {
        "text_encoder": T5EncoderModel.from_pretrained(folder / "text_encoder", dtype=dtype).state_dict(),
        "transformer": PixArtTransformer2DModel.from_pretrained(
            folder, subfolder="transformer", dtype=dtype
        ).state_dict(),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=dtype).state_dict(),
    }


def assert_same_tensors(a: dict, b: dict) -> None:
    for component in a:
        assert a[component].keys() == b[component].keys(), component
        for name, tensor in a[component].items():
            other = b[component][name]
            assert tensor.dtype == other.dtype and torch.equal(tensor, other), (component, name)


def context(model: Path, dtype: str) -> RunContext:
    return RunContext.resolve(str(model), "cpu", dtype)


def embeddings_and_images(model: Path, dtype: str):
    """pixart's encode and generate (encode → denoise → decode) with --dtype ``dtype`` on the CPU."""
    from pixart_cli.generate import generate
    from pixart_cli.plan import plan_run
    from pixart_cli.stages.encode import encode

    embeddings = encode(PROMPTS, EncodeSettings(), context(model, dtype))
    ctx = context(model, dtype)
    planned = plan_run(PROMPTS[:1], EncodeSettings(), DenoiseSettings(steps=2, seed=0), ctx.model)
    images, _ = generate(planned, ctx)
    return embeddings, np.stack([np.asarray(image) for image in images])


@pytest.fixture(scope="module")
def source(tiny_model, tmp_path_factory) -> Path:
    """A private copy of the tiny fp32 model: the refusals below aim at it."""
    folder = tmp_path_factory.mktemp("source") / "model"
    shutil.copytree(tiny_model, folder)
    return folder


@pytest.fixture(scope="module")
def fp16_run(source, tmp_path_factory):
    """`pixart convert MODEL -o fp16` in a real process: (the copy, the process's result)."""
    cwd = tmp_path_factory.mktemp("fp16")
    result = run_convert(source, "-o", "fp16", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "fp16", result


# --- what the copy is -------------------------------------------------------------------------------------------
def test_stdout_is_the_folder_and_the_copy_is_the_model_in_fp16(fp16_run, source):
    copy, result = fp16_run
    assert result.stdout == "fp16\n"
    lines = result.stderr.splitlines()
    assert any(
        line.startswith("text_encoder: 21 tensors") and "2 kept in fp32" in line and "(wo)" in line for line in lines
    )
    assert any(line.startswith("convert: ") and "tensors written and files copied" in line for line in lines)
    assert leftovers(copy.parent) == []
    # the same files; configs, tokenizer and scheduler byte for byte (T5's config records the new dtype)
    original, copied = files_of(source), files_of(copy)
    assert copied.keys() == original.keys()
    weights = {name for name in original if name.endswith(".safetensors")}
    changed = {name for name in original if original[name] != copied[name]}
    assert changed == weights | {"text_encoder/config.json"}
    config = json.loads(copied["text_encoder/config.json"])
    assert config == {**json.loads(original["text_encoder/config.json"]), "dtype": "float16"}
    # T5's wo weights stay fp32 (transformers' T5PreTrainedModel._keep_in_fp32_modules = ["wo"]), all else fp16
    t5 = dtypes_in(copy / "text_encoder/model.safetensors")
    assert {name for name, code in t5.items() if code == "F32"} == {
        f"encoder.block.{i}.layer.1.DenseReluDense.wo.weight" for i in range(2)
    }
    assert {code for name, code in t5.items() if ".wo." not in name} == {"F16"}
    for component in ("transformer", "vae"):
        assert set(dtypes_in(copy / component / "diffusion_pytorch_model.safetensors").values()) == {"F16"}


def test_the_fp32_rule_is_transformers_own():
    from transformers import T5EncoderModel

    assert T5EncoderModel._keep_in_fp32_modules == ["wo"] and not T5EncoderModel._keep_in_fp32_modules_strict


def test_the_fp16_copy_loads_to_the_tensors_the_fp32_folder_loads_to(fp16_run, source):
    copy, _ = fp16_run
    assert_same_tensors(loaded(source, torch.float16), loaded(copy, torch.float16))
    # and pixart's own T5 reader (models/streaming.py) reads the same from both
    from pixart_cli.models.streaming import StreamedT5

    t5 = [
        StreamedT5(folder / "text_encoder", torch.float16, torch.device("cpu"), resident=True).model
        for folder in (source, copy)
    ]
    assert_same_tensors({"t5": t5[0].state_dict()}, {"t5": t5[1].state_dict()})
    # diffusers' whole pipeline loads the copy as any model folder
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(copy, dtype=torch.float16)
    assert pipe.transformer.dtype == torch.float16
    assert pipe.text_encoder.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32


def test_the_fp16_copy_gives_the_embeddings_and_images_of_the_fp32_folder_in_fp16(fp16_run, source):
    copy, _ = fp16_run
    (embeddings, images), (copy_embeddings, copy_images) = (embeddings_and_images(m, "fp16") for m in (source, copy))
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        assert getattr(embeddings, key).dtype == torch.float16
        assert torch.equal(getattr(embeddings, key), getattr(copy_embeddings, key)), key
    assert np.array_equal(images, copy_images)


def test_a_bf16_copy_equals_the_fp32_folder_in_bf16(source, tmp_path):
    copy = library_copy(source, tmp_path / "bf16", torch.bfloat16)
    # under bf16 transformers keeps nothing of T5 in fp32 (wo is in _keep_in_fp32_modules, not ..._strict)
    assert set(dtypes_in(copy / "text_encoder/model.safetensors").values()) == {"BF16"}
    assert_same_tensors(loaded(source, torch.bfloat16), loaded(copy, torch.bfloat16))
    (embeddings, images), (copy_embeddings, copy_images) = (embeddings_and_images(m, "bf16") for m in (source, copy))
    assert torch.equal(embeddings.prompt_embeds, copy_embeddings.prompt_embeds)
    assert np.array_equal(images, copy_images)


def test_a_sharded_model_is_read_through_its_index_and_the_copy_is_sharded(source, tmp_path):
    from diffusers import PixArtTransformer2DModel
    from transformers import T5EncoderModel

    sharded = tmp_path / "sharded"
    shutil.copytree(source, sharded)
    for component, cls in (("text_encoder", T5EncoderModel), ("transformer", PixArtTransformer2DModel)):
        model = cls.from_pretrained(source / component)
        shutil.rmtree(sharded / component)
        model.save_pretrained(sharded / component, max_shard_size="30KB")
    assert (sharded / "text_encoder/model.safetensors.index.json").is_file()
    copy = library_copy(sharded, tmp_path / "copy", shard_bytes=20_000)
    for component, stem in (("text_encoder", "model"), ("transformer", "diffusion_pytorch_model")):
        index = json.loads((copy / component / f"{stem}.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and shards[0] == f"{stem}-00001-of-{len(shards):05d}.safetensors"
        assert sorted(p.name for p in (copy / component).glob("*.safetensors")) == shards
        sizes = []
        for shard in shards:
            with safe_open(str(copy / component / shard), framework="pt") as handle:
                tensors = [handle.get_tensor(name) for name in handle.keys()]
                assert all(index["weight_map"][name] == shard for name in handle.keys())
            sizes.append(sum(t.numel() * t.element_size() for t in tensors))
        assert index["metadata"]["total_size"] == sum(sizes)
        assert all(size <= 20_000 for size in sizes if size)  # (a tensor above the limit would get its own shard)
    assert_same_tensors(loaded(source, torch.float16), loaded(copy, torch.float16))
    from pixart_cli.stages.encode import encode

    assert torch.equal(
        encode(PROMPTS, EncodeSettings(), context(source, "fp16")).prompt_embeds,
        encode(PROMPTS, EncodeSettings(), context(copy, "fp16")).prompt_embeds,
    )


def test_components_not_converted_are_copied_as_they_are_and_json_says_what_was_written(source, tmp_path):
    result = invoke("convert", source, "-o", "copy", "--components", "transformer", "--json", cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["outputs"] == ["copy"] and document["dtype"] == "fp16"
    parts = document["components"]
    assert [name for name, part in parts.items() if part["converted"]] == ["transformer"]
    assert parts["transformer"]["files"] == ["config.json", "diffusion_pytorch_model.safetensors"]
    original, copied = files_of(source), files_of(tmp_path / "copy")
    assert {name for name in original if original[name] != copied[name]} == {
        "transformer/diffusion_pytorch_model.safetensors"
    }


def test_pickles_stray_weights_and_subfolders_are_left_out_and_named(source, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(source, model)
    (model / "vae/diffusion_pytorch_model.bin").write_bytes(b"a pickle that is never opened")
    (model / "vae/diffusion_pytorch_model.fp16.safetensors").write_bytes(b"a variant that is never opened")
    (model / "PixArt-XL-2-1024x1024.pth").write_bytes(b"a root checkpoint")
    (model / "asset").mkdir()
    os.mkfifo(model / "pipe")  # beside model_index.json: left out, never opened
    result = invoke("convert", model, "-o", "copy", "--json", cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["left_out"] == [
        "vae/diffusion_pytorch_model.bin: not weights the loaders read (such files are never read or copied)",
        "vae/diffusion_pytorch_model.fp16.safetensors: not among the weights the loaders read",
        "PixArt-XL-2-1024x1024.pth: weights outside the component folders",
        "asset/: not a component of model_index.json",
        "pipe: a named pipe (FIFO), not a regular file",
    ]
    assert "left out: vae/diffusion_pytorch_model.bin: not weights the loaders read" in result.stderr
    assert sorted(files_of(tmp_path / "copy")) == sorted(files_of(source))


def test_an_existing_folder_is_refused_and_replaced_only_with_overwrite(source, tmp_path):
    library_copy(source, tmp_path / "copy")
    before = files_of(tmp_path / "copy")
    refused = invoke("convert", source, "-o", "copy", "--dtype", "bf16", cwd=tmp_path)
    assert_one_line_error(refused, 2, "--output copy: already exists", "--overwrite")
    assert files_of(tmp_path / "copy") == before
    replaced = invoke("convert", source, "-o", "copy", "--dtype", "bf16", "--overwrite", cwd=tmp_path)
    assert replaced.exit_code == 0 and replaced.stdout == "copy\n", replaced.stderr
    assert set(dtypes_in(tmp_path / "copy/transformer/diffusion_pytorch_model.safetensors").values()) == {"BF16"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_nothing(existing, source, tmp_path, monkeypatch):
    if existing:
        library_copy(source, tmp_path / "copy")
    before = files_of(tmp_path / "copy") if existing else None
    calls = []

    def full(handle):  # the disk fills up on the fourth file
        calls.append(handle)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_copy, "_sync", full)
    args = ["--overwrite"] if existing else []
    result = invoke("convert", source, "-o", "copy", "--quiet", *args, cwd=tmp_path)
    assert_one_line_error(
        result, 1, "--output copy: cannot write the copy (No space left on device)", "nothing was written"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == (["copy"] if existing else [])
    if existing:
        assert files_of(tmp_path / "copy") == before


_SLOW_CHILD = """
import os, runpy, sys, time
import pixart_cli.files.model_copy as model_copy
write_shard = model_copy._write_shard
def slow(*args, **kwargs):  # one file written, then the work goes on for a while
    write_shard(*args, **kwargs)
    open(os.environ["CONVERT_READY"], "w").close()
    time.sleep(120)
model_copy._write_shard = slow
sys.argv[0] = "pixart"
runpy.run_module("pixart_cli", run_name="__main__")
"""


@pytest.mark.parametrize(
    "signum, code, message, existing",
    [(signal.SIGINT, 130, "interrupted", False), (signal.SIGTERM, 143, "terminated", True)],
    ids=["ctrl-c", "sigterm-overwrite"],
)
def test_a_signal_mid_way_leaves_no_half_folder(signum, code, message, existing, source, tmp_path):
    if existing:
        library_copy(source, tmp_path / "copy", torch.bfloat16)
    before = files_of(tmp_path / "copy") if existing else None
    ready = tmp_path.parent / f"{tmp_path.name}-ready"
    args = ["convert", source, "-o", "copy", "--quiet", *(["--overwrite"] if existing else [])]
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CHILD, *map(str, args)],
        cwd=tmp_path,
        env={**os.environ, "CONVERT_READY": str(ready)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), process.communicate()[1]
    assert any(p.name.startswith(".pixart-convert-") for p in tmp_path.iterdir())  # under way, in its temp folder
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert stderr == f"error: {message}; no output was written\n" and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == (["copy"] if existing else [])
    if existing:
        assert files_of(tmp_path / "copy") == before


# --- refused before any work ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--dtype", "fp32"], ["--dtype 'fp32'", "fp16 or bf16"]),
        (["--components", "text_encoder,unet"], ["--components 'text_encoder,unet'", "unknown component 'unet'"]),
        (["--components", "vae,"], ["--components 'vae,'", "an empty name"]),
        (["-o", ""], ["--output: the path is empty"]),
        (["-o", "missing/copy"], ["--output missing/copy", "does not exist; create it first"]),
        (["-o", "{model}", "--overwrite"], ["is the model folder itself"]),
        (["-o", "{model}/text_encoder/copy"], ["inside the model's text_encoder/ folder"]),
        (["-o", "folder", "--overwrite"], ["--output folder: is a folder that holds no model", "--overwrite"]),
        (["-o", "file"], ["--output file: exists and is not a folder"]),
    ],
)
def test_bad_options_are_one_line_exit_2_and_nothing_is_written(args, fragments, source, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine\n")
    (tmp_path / "file").write_text("mine\n")
    args = [a.replace("{model}", str(source)) for a in args]
    if "-o" not in args:
        args += ["-o", "copy"]
    before, model_before = files_of(tmp_path), files_of(source)
    result = invoke("convert", source, *args, cwd=tmp_path)
    assert_one_line_error(result, 2, *fragments)
    assert files_of(tmp_path) == before and files_of(source) == model_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


def test_a_model_that_is_not_there_is_one_line(tmp_path):
    assert_one_line_error(invoke("convert", "/no/such/folder", "-o", "copy", cwd=tmp_path), 2, "no such folder")
    # a hub model not in the cache, offline: models/source.py's own line
    result = invoke("convert", "nobody/not-a-model", "-o", "copy", cwd=tmp_path)
    assert_one_line_error(result, 1, "nobody/not-a-model", "hf download", "local diffusers folder")
    assert list(tmp_path.iterdir()) == []


def _index(folder: Path, stem: str, weight_map: dict) -> None:
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _shard_outside(model: Path) -> None:
    (model / "text_encoder/model.safetensors").rename(model / "text_encoder.safetensors")
    _index(model / "text_encoder", "model", {"shared.weight": "../../text_encoder.safetensors"})


def _absolute_shard(model: Path) -> None:
    os.unlink(model / "text_encoder/model.safetensors")
    _index(model / "text_encoder", "model", {"shared.weight": "/etc/passwd"})


def _huge_index(model: Path) -> None:
    os.unlink(model / "text_encoder/model.safetensors")
    (model / "text_encoder/model.safetensors.index.json").write_bytes(b" " * (16 * 2**20 + 1) + b"{}")


def _huge_model_index(model: Path) -> None:
    text = (model / "model_index.json").read_text()
    (model / "model_index.json").write_text(text[:-2] + " " * (16 * 2**20) + text[-2:])


def _pickle_only(model: Path) -> None:
    (model / "vae/diffusion_pytorch_model.safetensors").rename(model / "vae/diffusion_pytorch_model.bin")


def _escaping_component(model: Path) -> None:
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "../outside": ["diffusers", "AutoencoderKL"]}))


def _both_weights(model: Path) -> None:
    _index(model / "vae", "diffusion_pytorch_model", {"x": "diffusion_pytorch_model.safetensors"})


def _truncated(model: Path) -> None:
    path = model / "transformer/diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])


def _index_disagrees(model: Path) -> None:
    (model / "text_encoder/model.safetensors").rename(model / "text_encoder/model-00001-of-00001.safetensors")
    _index(model / "text_encoder", "model", {"no.such.tensor": "model-00001-of-00001.safetensors"})


@pytest.mark.parametrize(
    "damage, code, fragments",
    [
        (_shard_outside, 2, ["text_encoder/model.safetensors.index.json names '../../text_encoder.safetensors'"]),
        (_absolute_shard, 2, ["names '/etc/passwd'", "only files inside the component's folder"]),
        (_huge_index, 2, ["model.safetensors.index.json is larger than 16 MiB"]),
        (_huge_model_index, 2, ["model_index.json is larger than 16 MiB"]),
        (_pickle_only, 1, ["vae/diffusion_pytorch_model.bin: is not the zip archive torch.save writes", "never loads"]),
        (_escaping_component, 2, ["names a component '../outside'", "not a plain folder name"]),
        (_both_weights, 2, ["vae/ holds both diffusion_pytorch_model.safetensors and", "remove the stale one"]),
        (_truncated, 1, ["transformer/diffusion_pytorch_model.safetensors is damaged", "download the model again"]),
        (_index_disagrees, 1, ["places tensor no.such.tensor in model-00001-of-00001.safetensors", "damaged"]),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else None,
)
def test_a_hostile_or_damaged_model_is_refused_in_one_line(damage, code, fragments, source, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(source, model)
    damage(model)
    (tmp_path / "out").mkdir()
    result = invoke("convert", model, "-o", "copy", cwd=tmp_path / "out")
    assert_one_line_error(result, code, *fragments)
    assert list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "outside").exists()


def test_a_named_pipe_in_the_model_is_refused_without_reading_it(source, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(source, model)
    os.mkfifo(model / "text_encoder" / "special_tokens_map.json")  # reading it would block forever
    result = run_convert(model, "-o", "copy", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"error: --model {model}: text_encoder/special_tokens_map.json is a named pipe (FIFO); pixart convert reads "
        "only regular files\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_model_without_its_own_t5_is_copied_without_it(tmp_path):
    from pixart_cli import random_model

    dmd = random_model.build(tmp_path / "dmd", "tiny", family="dmd")
    refused = invoke("convert", dmd, "-o", "copy", "--components", "text_encoder", cwd=tmp_path)
    assert_one_line_error(refused, 2, "--components text_encoder", "no text_encoder/ of its own", "leave it out")
    result = invoke("convert", dmd, "-o", "copy", cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert "text_encoder: not part of this model (pixart takes it from the base model)" in result.stderr
    assert sorted(files_of(tmp_path / "copy")) == sorted(files_of(dmd))


# --- a hub model, memory ----------------------------------------------------------------------------------------
def _hub_cache(model: Path, hub: Path, repo: str) -> None:
    """``model`` laid out as the Hugging Face cache holds a download: snapshot entries are links to blobs."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "blobs").mkdir()
    for path in sorted(model.rglob("*")):
        if path.is_file():
            blob = folder / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
            shutil.copyfile(path, blob)
            link = folder / "snapshots" / commit / path.relative_to(model)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))


def test_a_hub_model_is_read_from_the_cache_through_its_links(source, tmp_path):
    _hub_cache(source, tmp_path / "hf" / "hub", "someone/tiny")
    (tmp_path / "work").mkdir()
    result = run_convert("someone/tiny", "-o", "copy", cwd=tmp_path / "work", env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0 and result.stdout == "copy\n", result.stderr
    copy = tmp_path / "work" / "copy"
    assert not any(p.is_symlink() for p in copy.rglob("*"))  # real files, not the cache's links
    assert_same_tensors(loaded(source, torch.float16), loaded(copy, torch.float16))


_MEASURE_CHILD = """
import json, sys, torch
from pathlib import Path
from pixart_cli.files import model_copy
from pixart_cli.models import convert as conversion
from pixart_cli.models.source import Model
def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
target, shown = model_copy.check_target(sys.argv[2], False)
plan = conversion.plan(Model(sys.argv[1]), target, shown, torch.float16)  # every import done
try:
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from here
except OSError:
    print(json.dumps({"reset": False}))
    sys.exit()
base = status("VmRSS")
model_copy.write(plan)
print(json.dumps({"reset": True, "base": base, "peak": status("VmHWM")}))
"""


def test_memory_stays_about_one_tensor_not_the_model(tmp_path):
    """8 tensors of 32 MB: loading the model would take 256 MB; converting takes one of them and an 8 MB buffer."""
    from safetensors.torch import save_file

    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    (model / "model_index.json").write_text(
        json.dumps({"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]})
    )
    (model / "transformer" / "config.json").write_text("{}\n")
    tensors = {f"block.{i}.weight": torch.full((2048, 4096), float(i)) for i in range(8)}
    save_file(tensors, str(model / "transformer" / "diffusion_pytorch_model.safetensors"))
    tensor_bytes = 2048 * 4096 * 4
    del tensors
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE_CHILD, str(model), str(tmp_path / "copy")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    if not measured["reset"]:
        pytest.skip("this kernel cannot reset a process's peak RSS (/proc/self/clear_refs)")
    assert measured["peak"] - measured["base"] < 2 * tensor_bytes, measured  # the model is 8 of them
    with safe_open(str(tmp_path / "copy/transformer/diffusion_pytorch_model.safetensors"), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("block.7.weight"), torch.full((2048, 4096), 7.0, dtype=torch.float16))
