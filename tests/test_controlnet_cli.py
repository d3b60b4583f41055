"""ControlNet wired into the stages and the CLI (issue 24): encode-control + denoise --control --controlnet equal
generate --control-image --controlnet, scale 0 is the plain run, every memory plan gives the same latents (with
LoRA and image to image too), the planner counts the adapter, everything is recorded, and every hostile or
mismatched input is one line, exit 2, before any model loads, with nothing written. The adapter module's own
tests (the structure, both layouts, hostile pickles) are in test_controlnet.py."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from test_controlnet import (
    LAYERS,
    RunsCode,
    _deepen,
    base_model_tensors,
    diffusers_state,
    random_adapter,
    save_diffusers,
    save_original,
)

from helpers import SEED, assert_one_line_error, cpu, encoded, image_encoded, invoke, max_diff, read_png, run_pixart
from pixart_cli import random_model
from pixart_cli.files import image_io, staged
from pixart_cli.files.controlnet_file import ControlNetSpec, parse_controlnet_spec
from pixart_cli.models import controlnet as cn
from pixart_cli.models import memory
from pixart_cli.models.source import Model
from pixart_cli.plan import fit_image, plan_denoise
from pixart_cli.settings import DenoiseSettings

PROMPT = "a cute cat"
GB = memory.GIB


# --- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """The tiny α model with a 4-layer transformer: adapters of 3 blocks chain their copies."""
    return _deepen(random_model.build(tmp_path_factory.mktemp("cnet") / "model", "tiny"), LAYERS)


@pytest.fixture(scope="module")
def files(deep, tmp_path_factory):
    """One random adapter as the published .pth (frozen base inside) and as a diffusers folder, an edge map and a
    photo of 200x296 (both run at the 208x304 bin), and a LoRA for the base."""
    from diffusers import PixArtTransformer2DModel
    from PIL import Image, ImageDraw
    from test_lora import random_lora, write_lora

    folder = tmp_path_factory.mktemp("cnet-files")
    base = PixArtTransformer2DModel.from_pretrained(deep, subfolder="transformer").eval()
    state = diffusers_state(random_adapter(base, seed=11))
    save_original(folder / "PixArt-XL-2-256-ControlNet.pth", state, base_model_tensors(base))
    (folder / "converted").mkdir()
    save_diffusers(folder / "converted" / "diffusion_pytorch_model.safetensors", state)
    (folder / "converted" / "config.json").write_text(json.dumps({"num_layers": LAYERS - 1}))
    edges = Image.new("L", (200, 296))
    draw = ImageDraw.Draw(edges)
    draw.ellipse((30, 50, 170, 250), outline=255, width=4)
    draw.line((0, 148, 200, 148), fill=255, width=3)
    edges.save(folder / "edges.png")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (296, 200, 3), dtype=np.uint8)).save(folder / "photo.png")
    write_lora(folder / "style.safetensors", random_lora(base, 4, seed=12), "diffusers")
    return {
        "folder": folder,
        "pth": folder / "PixArt-XL-2-256-ControlNet.pth",
        "converted": folder / "converted",
        "edges": folder / "edges.png",
        "photo": folder / "photo.png",
        "lora": folder / "style.safetensors",
        "state": state,
        "base": base,
    }


def control_encoded(path, model, width=None, height=None, binning=True):
    """encode-control's stage on the CPU: the edge map read as the command reads it, sized by the plan."""
    from pixart_cli.stages.encode_control import encode_control

    ctx = cpu(model)
    image = image_io.read_source_image(path, "IMAGE")
    return encode_control(image, fit_image(image, ctx.model, width, height, binning), ctx)


def control_denoised(embeddings, model, control=None, spec=None, init=None, **settings):
    """denoise() on the CPU with control latents and a --controlnet spec (and init latents, LoRAs, a log)."""
    from pixart_cli.stages.denoise import denoise

    callbacks = {key: settings.pop(key) for key in ("log", "loras") if key in settings}
    ctx = cpu(model, **callbacks)
    plan = plan_denoise(
        DenoiseSettings(**settings),
        ctx.model,
        embeddings.prompt_embeds.shape[0],
        embedding_width=embeddings.prompt_embeds.shape[-1],
        init=init,
        loras=ctx.loras,
        control=control,
        controlnet=spec,
    )
    return denoise(embeddings, plan, ctx)


def lora_of(files, scale=0.6):
    from pixart_cli.files import lora_file

    return lora_file.read_lora(lora_file.LoraSpec(files["lora"], scale))


# --- the stages --------------------------------------------------------------------------------------------
def test_scale_zero_equals_no_control_and_the_adapter_steers(deep, files):
    """At scale 0 the latents are the plain run's at the control's size, bit for bit; at 1 they differ; the
    record holds the control latents' digest and the edge map, the adapter's name and weights digest, the scale."""
    embeddings = encoded([PROMPT], deep)
    control = control_encoded(files["edges"], deep)
    assert control.latents.shape == (1, 4, 38, 26) and control.meta["control_image"]["name"] == "edges.png"
    common = dict(steps=2, seed=SEED)
    plain = control_denoised(embeddings, deep, width=200, height=296, **common)
    zero = control_denoised(embeddings, deep, control, ControlNetSpec(files["pth"], 0.0), **common)
    steered = control_denoised(embeddings, deep, control, ControlNetSpec(files["pth"]), **common)
    assert torch.equal(zero.latents, plain.latents)
    assert (steered.latents - plain.latents).abs().max() > 1e-3

    meta = steered.meta
    assert (meta["requested_width"], meta["requested_height"], meta["width"], meta["height"]) == (200, 296, 208, 304)
    weights = cn_weights(files, deep)
    assert meta["controlnet"] == {"file": files["pth"].name, "weights_sha256": weights.weights_sha256}
    assert meta["controlnet_scale"] == 1.0 and zero.meta["controlnet_scale"] == 0.0
    edges_digest = hashlib.sha256(files["edges"].read_bytes()).hexdigest()
    assert meta["control"] == {
        "image": {"name": "edges.png", "sha256": edges_digest},
        "latents_sha256": staged.tensor_sha256(control.latents),
    }
    assert not {"control", "controlnet", "controlnet_scale"} & set(plain.meta)  # runs without one: as before


def cn_weights(files, model):
    from pixart_cli.files.controlnet_file import read_controlnet

    return read_controlnet(files["pth"], Model(str(model)))


def test_every_plan_gives_the_same_latents_with_lora_and_image_to_image(deep, files, monkeypatch):
    """Init latents, control latents, a LoRA on the base and the adapter at 0.7: the resident plan and the
    smallest plans (a 1 KB budget: the transformer's blocks streamed, the adapter streamed copy by copy) give the
    same latents; the LoRA and the adapter each changed them."""
    embeddings = encoded([PROMPT], deep)
    init = image_encoded(files["photo"], deep)
    control = control_encoded(files["edges"], deep)
    spec = ControlNetSpec(files["converted"], 0.7)
    common = dict(steps=3, seed=SEED, strength=0.8, init=init)
    resident_logs: list[str] = []
    resident = control_denoised(
        embeddings, deep, control, spec, loras=(lora_of(files),), log=resident_logs.append, **common
    )
    logs: list[str] = []
    monkeypatch.setattr(memory, "device_budget", lambda budget, device: (1024, 0))  # every plan its smallest
    streamed = control_denoised(embeddings, deep, control, spec, loras=(lora_of(files),), log=logs.append, **common)
    monkeypatch.undo()
    plans = [line for line in logs if line.startswith(("denoise: plan", "controlnet:"))]
    assert plans[0].startswith("denoise: plan streamed, batch 1")
    assert plans[1] == (
        "controlnet: diffusion_pytorch_model.safetensors x0.7 (3 blocks, diffusers layout), streamed with the "
        "transformer"
    )
    assert any(line.endswith("layout), resident") for line in resident_logs)
    assert torch.equal(resident.latents, streamed.latents)
    assert streamed.meta["plan"] == "streamed" and resident.meta["plan"] == "resident"
    assert resident.meta["strength"] == 0.8 and resident.meta["loras"][0]["scale"] == 0.6
    without_lora = control_denoised(embeddings, deep, control, spec, **common)
    without_control = control_denoised(embeddings, deep, loras=(lora_of(files),), **common)
    assert not torch.equal(without_lora.latents, resident.latents)
    assert not torch.equal(without_control.latents, resident.latents)


def test_a_streamed_adapter_brings_each_copy_in_for_its_forward_only(files):
    """stream_adapter: each copy gets its onload and offload hooks, the copies' weights are the stored CPU tensors
    again after the call, and the output is the resident adapter's (on the CPU the device is the CPU, so what moves
    cannot be seen here)."""
    base = files["base"]
    adapter = random_adapter(base, seed=11)
    streamed = random_adapter(base, seed=11)
    cn.stream_adapter(streamed, torch.device("cpu"))
    assert all(len(c._forward_pre_hooks) == len(c._forward_hooks) == 1 for c in streamed.controlnet_blocks)
    stored = [p.data_ptr() for p in streamed.parameters()]
    generator = torch.Generator().manual_seed(5)
    latents, control = torch.randn(2, 4, 32, 32, generator=generator), torch.randn(1, 4, 32, 32, generator=generator)
    call = dict(
        encoder_hidden_states=torch.randn(2, 7, 32, generator=generator),
        timestep=torch.tensor([500, 500]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )
    with torch.no_grad():
        ours = cn.controlled(base, streamed, control)(latents, **call)[0]
        reference = cn.controlled(base, adapter, control)(latents, **call)[0]
    assert torch.equal(ours, reference)
    assert [p.data_ptr() for p in streamed.parameters()] == stored


def test_the_memory_plan_counts_the_adapter(tmp_path):
    """On the full-size configs: the published 13-block adapter is 294,917,760 parameters (0.55 GB in fp16); the
    resident plan adds it and 4/40 more activations; under a 2 GB budget the streamed plan fits because the
    adapter streams with the base (resident beside a streamed base it would not)."""
    from diffusers import PixArtTransformer2DModel

    full = Model(str(random_model.write_full_size_configs(tmp_path / "full")))
    fp16 = torch.float16
    transformer = memory.parameter_bytes(
        memory.meta_model(PixArtTransformer2DModel.from_config, full.config("transformer"), fp16)
    )
    adapter = cn.adapter_bytes_for(full, 13, fp16)
    block = 4 * (1152 * 1152 + 1152) * 2 + (1152 * 4608 + 4608) + (4608 * 1152 + 1152) + 6 * 1152
    assert adapter == 2 * (13 * block + 14 * (1152 * 1152 + 1152)) == 2 * 294_917_760
    context, tokens = memory.CONTEXT_ESTIMATE, 64 * 64
    activations = 2 * tokens * 1152 * 2  # one image with guidance, per activation factor, in fp16

    def plan(budget, with_adapter=True):
        extra = dict(adapter_bytes=adapter, adapter_blocks=13) if with_adapter else {}
        return memory.plan_denoise(budget, context, transformer, tokens, 1152, 2, 1, True, **extra)

    resident = plan(8 * GB)
    assert resident.name == "resident" and resident.fits
    assert resident.estimate == context + transformer + adapter + 44 * activations
    assert plan(8 * GB, False).estimate == context + transformer + 40 * activations
    assert plan(3 * GB).name == "streamed" and plan(3 * GB, False).name == "resident"
    small = plan(2 * GB)
    assert small.name == "streamed" and small.fits
    assert small.estimate == context + transformer // 8 + adapter // 13 + 44 * activations
    assert context + transformer // 8 + adapter + 44 * activations > 2 * GB  # a resident adapter would not fit
    assert not plan(int(1.5 * GB)).fits


# --- the CLI -----------------------------------------------------------------------------------------------
def test_staged_commands_equal_generate_in_real_processes(deep, files, tmp_path):
    """encode, encode-control, denoise --control --controlnet FILE.pth:0.8, decode, and generate --control-image
    --controlnet DIR:0.8 (the same adapter in the diffusers layout), each a real process: the same image, the same
    record (the weights digest is the adapter's, whichever layout); compare names a different scale."""
    env = {"PIXART_MODEL": str(deep)}

    def run(*args):
        return run_pixart(*args, "--device", "cpu", cwd=tmp_path, env=env).stdout

    assert run("encode", PROMPT, "-q") == "embeddings.pt\n"
    assert run("encode-control", files["edges"], "-o", "control.pt") == "control.pt\n"
    common = ("--steps", "2", "--seed", "4")
    adapter = ("--controlnet", f"{files['pth']}:0.8")
    assert run("denoise", "embeddings.pt", "--control", "control.pt", *adapter, *common) == "latents.pt\n"
    assert run("decode", "latents.pt", "-o", "staged.png") == "staged.png\n"
    generated = run_pixart(
        "generate",
        PROMPT,
        "--control-image",
        files["edges"],
        "--controlnet",
        f"{files['converted']}:0.8",
        *common,
        "-o",
        "one.png",
        cwd=tmp_path,
        env=env,
    )
    assert generated.stdout == "one.png\n"
    assert "controlnet: diffusion_pytorch_model.safetensors x0.8 (3 blocks, diffusers layout), resident" in (
        generated.stderr
    )
    staged_png, one = read_png(tmp_path / "staged.png"), read_png(tmp_path / "one.png")
    assert staged_png.shape == (296, 200, 3) and max_diff(staged_png, one) == 0

    records = [image_io.read_image_metadata(tmp_path / name) for name in ("staged.png", "one.png")]
    first, second = (metadata["settings"] for metadata in records)
    assert first["controlnet"]["weights_sha256"] == second["controlnet"]["weights_sha256"]
    assert (first["controlnet"]["file"], second["controlnet"]["file"]) == (
        files["pth"].name,
        "diffusion_pytorch_model.safetensors",
    )
    assert first["control"] == second["control"] and first["control"]["image"]["name"] == "edges.png"
    assert first["controlnet_scale"] == second["controlnet_scale"] == 0.8
    assert (
        f'ControlNet 0: "Model: {files["pth"].name} [{first["controlnet"]["weights_sha256"][:10]}], Weight: 0.8"'
        in (records[0]["parameters"])
    )
    info = json.loads(run_pixart("info", "control.pt", "--json", cwd=tmp_path).stdout)
    assert info["kind"] == "control latents" and info["tensors"]["latents"]["shape"] == [1, 4, 38, 26]

    result = invoke(
        "denoise", "embeddings.pt", "--control", "control.pt", "--controlnet", f"{files['pth']}:0.5", *common,
        "-o", "half.pt", "--device", "cpu", "-q", cwd=tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    compared = json.loads(invoke("compare", "latents.pt", "half.pt", "--json", cwd=tmp_path).stdout)
    assert compared["notes"] == ["different controlnet_scale: 0.8 and 0.5"]


def test_generate_with_image_control_and_lora_equals_the_staged_run(deep, files, tmp_path, monkeypatch):
    """Image to image, a ControlNet and a LoRA together: generate --image --control-image --controlnet --lora
    equals encode-image + encode-control + denoise --init-latents --control --controlnet --lora + decode."""
    monkeypatch.setenv("PIXART_MODEL", str(deep))

    def run(*args):
        result = invoke(*args, "--device", "cpu", "-q", cwd=tmp_path)
        assert result.exit_code == 0, result.stderr
        return result.stdout

    common = ("--steps", "3", "--seed", "2", "--strength", "0.7", "--lora", f"{files['lora']}:0.6")
    adapter = ("--controlnet", f"{files['pth']}:1.5")
    run("encode", PROMPT)
    run("encode-image", files["photo"], "-o", "init.pt")
    run("encode-control", files["edges"], "-o", "control.pt")
    run("denoise", "embeddings.pt", "--init-latents", "init.pt", "--control", "control.pt", *adapter, *common)
    run("decode", "latents.pt", "-o", "staged.png")
    run(
        "generate",
        PROMPT,
        "--image",
        files["photo"],
        "--control-image",
        files["edges"],
        *adapter,
        *common,
        "-o",
        "one.png",
    )
    assert max_diff(read_png(tmp_path / "staged.png"), read_png(tmp_path / "one.png")) <= 1  # as test_img2img
    settings = image_io.read_image_metadata(tmp_path / "one.png")["settings"]
    assert settings["strength"] == 0.7 and settings["controlnet_scale"] == 1.5 and len(settings["loras"]) == 1
    assert settings["source_image"]["name"] == "photo.png" and settings["control"]["image"]["name"] == "edges.png"


def hostile_files(deep, files, folder):
    """Adapter files that must not load, each with the fragment its line must hold."""
    state, base = files["state"], files["base"]
    small_base = {**base_model_tensors(base), "pos_embed": torch.zeros(1, 64, 16)}  # a 128px base's 8x8 patches
    save_original(folder / "for-128px.pth", state, small_base)
    torch.save({"state_dict": {**{f"base_model.{k}": v for k, v in small_base.items()}, "x": RunsCode(folder / "ran")}},
               folder / "runs-code.pth")  # fmt: skip
    key = "controlnet_blocks.1.transformer_block.ff.net.0.proj.weight"
    rows, columns = state[key].shape
    save_diffusers(folder / "wrong-shape.safetensors", {**state, key: torch.zeros(rows // 2, columns)})
    return {
        "for-128px.pth": "is the ControlNet of a 128px model (its base_model.pos_embed holds 64 positions",
        "runs-code.pth": "could run code",
        "wrong-shape.safetensors": f"{key} has shape [{rows // 2}, {columns}], but --model {deep} needs",
    }


def test_hostile_and_mismatched_inputs_exit_2_before_any_model_loads(deep, files, tmp_path, monkeypatch):
    """One line each, exit 2, nothing written; the stage notes never appear (no stage started). The adapter file
    for another model size, a pickle that runs code, a Σ base, control latents of the wrong size, and the pairing
    of the flags; the first ones again in real processes."""
    monkeypatch.setenv("PIXART_MODEL", str(deep))
    sigma = random_model.build(tmp_path / "sigma", "tiny", family="sigma")
    work = tmp_path / "work"
    work.mkdir()
    staged.save(work / "emb.pt", encoded([PROMPT], deep))
    staged.save(work / "control.pt", control_encoded(files["edges"], deep))
    staged.save(work / "small.pt", control_encoded(files["edges"], deep, 128, 128))
    staged.save(work / "init.pt", image_encoded(files["photo"], deep, 128, 128))
    control = staged.load_control(work / "control.pt")
    staged.save(work / "eight.pt", staged.ControlLatents(control.latents.repeat(1, 2, 1, 1), control.meta))
    other_vae = staged.ControlLatents(control.latents, {**control.meta, "vae_scaling_factor": 0.13025})
    staged.save(work / "other-vae.pt", other_vae)
    three = {**control.meta, "seeds": [0] * 3, "prompts": [""] * 3}
    staged.save(work / "three.pt", staged.ControlLatents(control.latents.repeat(3, 1, 1, 1), three))
    bad = hostile_files(deep, files, work)
    (work / "out").mkdir()
    before = sorted(p.name for p in work.iterdir())
    pth, edges = str(files["pth"]), str(files["edges"])
    denoise = ("denoise", "emb.pt", "--control", "control.pt")
    cases = [
        *(((*denoise, "--controlnet", name), f"--controlnet {name}: ", fragment) for name, fragment in bad.items()),
        (("generate", PROMPT, "--control-image", edges, "--controlnet", "for-128px.pth"), "128px model"),
        ((*denoise, "--controlnet", pth, "--model", str(sigma)), "is a PixArt-Σ model", "use a PixArt-α model"),
        (("generate", PROMPT, "--control-image", edges, "--controlnet", pth, "--model", str(sigma)), "PixArt-Σ"),
        (("encode-control", edges, "--model", str(sigma)), "encode-control: --model", "is a PixArt-Σ model"),
        ((*denoise, "--controlnet", "missing.pth"), "--controlnet missing.pth: no such file or folder"),
        ((*denoise, "--controlnet", f"{pth}:nan"), "is not a finite number"),
        ((*denoise, "--controlnet", str(files["folder"])), "holds 2 weights files"),
        (("denoise", "emb.pt", "--controlnet", pth), "needs a control image; give --control FILE too"),
        (("denoise", "emb.pt", "--control", "control.pt"), "--control: a control image steers a ControlNet"),
        (("generate", PROMPT, "--controlnet", pth), "give --control-image FILE too"),
        (("generate", PROMPT, "--control-image", edges), "give --controlnet FILE too"),
        ((*denoise, "--controlnet", pth, "--step-cache", "fbc:0.1"), "--step-cache fbc:0.1: not with --controlnet"),
        (("generate", PROMPT, "--control-image", edges, "--controlnet", pth, "-o", "out/"), "--control-image: a Control"),
        (("denoise", "emb.pt", "--control", "small.pt", "--controlnet", pth, "--width", "256", "--height", "256"),
         "--width 256 --height 256: the control image (small.pt) was encoded for 128x128"),
        (("denoise", "emb.pt", "--control", "small.pt", "--controlnet", pth, "--init-latents", "control.pt"),
         "control.pt: is a control file (from pixart encode-control), but this command needs init latents"),
        (("denoise", "emb.pt", "--control", "init.pt", "--controlnet", pth),
         "init.pt: is an init latents file (from pixart encode-image), but this command needs control latents"),
        (("denoise", "emb.pt", "--control", "control.pt", "--controlnet", pth, "--init-latents", "init.pt"),
         "control.pt: the control image was encoded for 200x296 but the init image (init.pt) for 128x128"),
        (("denoise", "emb.pt", "--control", "control.pt", "--controlnet", pth, "--no-binning"),
         "--width 200: without binning", "control.pt was encoded for"),
        (("denoise", "emb.pt", "--control", "eight.pt", "--controlnet", pth), "control latents have 8 channels"),
        (("denoise", "emb.pt", "--control", "other-vae.pt", "--controlnet", pth), "come from another VAE"),
        (("denoise", "emb.pt", "--control", "three.pt", "--controlnet", pth), "holds 3 control latents for 1 images"),
        (("decode", "control.pt"), "is a control file (from pixart encode-control), but this command needs a latents"),
    ]  # fmt: skip
    for args, *fragments in cases:
        assert_one_line_error(invoke(*args, cwd=work), 2, *fragments)
    assert sorted(p.name for p in work.iterdir()) == before  # nothing written, no code ran

    # and in real processes: one line on stderr (no stage's plan note before it), exit 2, nothing on stdout
    for args, fragment in (
        ((*denoise, "--controlnet", "runs-code.pth"), "--controlnet runs-code.pth: refused"),
        ((*denoise, "--controlnet", "for-128px.pth"), "128px model"),
        (("generate", PROMPT, "--control-image", edges, "--controlnet", pth, "--model", str(sigma)), "PixArt-Σ"),
        (("denoise", "emb.pt", "--control", "small.pt", "--controlnet", pth, "--width", "256"), "encoded for 128x128"),
    ):
        result = run_pixart(*args, cwd=work, check=False, env={"PIXART_MODEL": str(deep)})
        assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr
    assert sorted(p.name for p in work.iterdir()) == before


def test_stage_processes_import_only_what_they_run(deep, files, tmp_path):
    """encode-control imports no transformers; a resident denoise with a ControlNet no group offloading and none of
    the libraries no stage runs (test_lean's lists), in real processes."""
    from test_lean import NOT_IMPORTED, imported_by

    common = ["--model", deep, "--device", "cpu", "--quiet"]
    staged.save(tmp_path / "emb.pt", encoded([PROMPT], deep))
    runs = {
        "encode-image": ["encode-control", files["edges"], "-o", "control.pt", *common],
        "denoise": ["denoise", "emb.pt", "--control", "control.pt", "--controlnet", files["pth"], "--steps", "2"]
        + ["-o", "lat.pt", *common],
    }
    for stage, args in runs.items():
        modules = imported_by(tmp_path, *args)
        assert "torch" in modules and "pixart_cli.models.controlnet" in modules
        loaded = [name for name in NOT_IMPORTED[stage] if name in modules]
        assert not loaded, f"{args[0]} imported {loaded}"


def test_parse_controlnet_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapter").mkdir()
    assert parse_controlnet_spec("a.pth") == ControlNetSpec(__import__("pathlib").Path("a.pth"), 1.0)
    assert parse_controlnet_spec("adapter:0.5").scale == 0.5
    assert str(parse_controlnet_spec("C:\\cn\\a.pth").path) == "C:\\cn\\a.pth"
    with pytest.raises(Exception, match="the scale 'x' is not a number"):
        parse_controlnet_spec("adapter:x")
    assert os.path.isdir("adapter")
