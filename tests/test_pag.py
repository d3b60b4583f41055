"""Perturbed-attention guidance: the same images as diffusers' PixArtSigmaPAGPipeline with and without classifier-free
guidance, the pipeline's layer rule and default, staged = one process, every memory plan alike, the extra row in the
memory plan, recorded in the files, and refused in one line where diffusers' PAG does not apply."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import SEED, assert_one_line_error, denoised, encoded, generated, invoke, max_diff
from pixart_cli import random_model
from pixart_cli.files import image_io, staged
from pixart_cli.models import memory, pag

PROMPT = "a small house by the lake"


@pytest.fixture(scope="module")
def sigma(tmp_path_factory):
    return random_model.build(tmp_path_factory.mktemp("pag") / "sigma", "tiny", family="sigma")


def pipeline_images(model, guidance_scale, pag_scale, steps=3, **kwargs):
    from diffusers import PixArtSigmaPAGPipeline

    pipe = PixArtSigmaPAGPipeline.from_pretrained(model, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        pag_scale=pag_scale,
        generator=torch.Generator("cpu").manual_seed(SEED),
    ).images
    return np.stack([np.asarray(image) for image in images])


def as_array(images):
    return np.stack([np.asarray(image) for image in images])


@pytest.mark.parametrize("guidance_scale", [4.5, 1.0], ids=["with-cfg", "without-cfg"])
def test_pag_equals_its_pipeline(sigma, guidance_scale):
    logs: list[str] = []
    images, meta = generated(
        [PROMPT], sigma, steps=3, seed=SEED, guidance_scale=guidance_scale, pag_scale=3.0, log=logs.append
    )
    assert max_diff(as_array(images), pipeline_images(sigma, guidance_scale, 3.0)) <= 1
    plain, _ = generated([PROMPT], sigma, steps=3, seed=SEED, guidance_scale=guidance_scale)
    assert max_diff(as_array(images), as_array(plain)) > 10  # PAG changes the image
    assert (meta["pag_scale"], meta["pag_layers"]) == (3.0, ["blocks.1"])
    assert any(
        "perturbed-attention guidance 3 on transformer_blocks 1 (1 self-attention layer)" in line for line in logs
    )


def test_pag_layers_given_equal_the_pipeline(sigma):
    images, meta = generated([PROMPT], sigma, steps=2, seed=SEED, pag_scale=2.0, pag_layers=("blocks.0",))
    reference = pipeline_images(sigma, 4.5, 2.0, steps=2, pag_applied_layers=["blocks.0"])
    assert max_diff(as_array(images), reference) <= 1 and meta["pag_layers"] == ["blocks.0"]


def test_default_layers_are_the_pipelines():
    from diffusers import PixArtSigmaPAGPipeline

    default = inspect.signature(PixArtSigmaPAGPipeline.__init__).parameters["pag_applied_layers"].default
    assert pag.default_layers() == ((default,) if isinstance(default, str) else tuple(default))


@pytest.mark.parametrize(
    "layers", [["blocks.1"], ["blocks.14"], ["blocks.(2|27)"], ["transformer_blocks.3", "blocks.9"]]
)
def test_layer_rule_is_pagmixins(tmp_path_factory, layers):
    """On the full-size 28-block transformer (meta device): diffusers' own _set_pag_attn_processor, on a stand-in
    that holds the transformer, picks the modules pag.selected picks (blocks.1 also finds blocks 10 to 19)."""
    from diffusers import PixArtTransformer2DModel
    from diffusers.models.attention_processor import (
        PAGCFGIdentitySelfAttnProcessor2_0,
        PAGIdentitySelfAttnProcessor2_0,
    )
    from diffusers.pipelines.pag.pag_utils import PAGMixin

    folder = random_model.write_full_size_configs(tmp_path_factory.mktemp("full") / "model")
    from pixart_cli.models.source import Model

    config = Model(str(folder)).config("transformer")
    transformer = memory.meta_model(PixArtTransformer2DModel.from_config, config, torch.float16, cpu_buffers=True)
    marker = PAGCFGIdentitySelfAttnProcessor2_0()
    stand_in = SimpleNamespace(
        transformer=transformer, _pag_attn_processors=(marker, PAGIdentitySelfAttnProcessor2_0())
    )
    PAGMixin._set_pag_attn_processor(stand_in, layers, do_classifier_free_guidance=True)
    theirs = sorted(
        name for name, module in transformer.named_modules() if getattr(module, "processor", None) is marker
    )
    ours = sorted({name for names in pag.selected(transformer, layers).values() for name in names})
    assert ours == theirs and ours
    if layers == ["blocks.1"]:
        assert pag.describe(ours) == "transformer_blocks 1, 10-19 (11 self-attention layers)"


def test_staged_equals_generate_and_every_plan_alike(sigma, tmp_path, monkeypatch):
    """encode, denoise --pag-scale, decode through the CLI equal generate --pag-scale; the streamed transformer
    (the smallest plan) gives the same latents; the files record it."""
    monkeypatch.setenv("PIXART_MODEL", str(sigma))

    def run(*args):
        result = invoke(*args, cwd=tmp_path)
        assert result.exit_code == 0, result.stderr
        return result

    settings = ["--steps", "2", "--seed", SEED, "--pag-scale", "2.5"]
    run("encode", PROMPT, "-o", "emb.pt")
    run("denoise", "emb.pt", *settings, "-o", "pag.pt")
    run("decode", "pag.pt", "-o", "staged.png")
    run("generate", PROMPT, *settings, "-o", "one.png")
    assert (
        max_diff(
            image_io.load_image_pixels(tmp_path / "staged.png")[None],
            image_io.load_image_pixels(tmp_path / "one.png")[None],
        )
        <= 1
    )
    latents = staged.load_latents(tmp_path / "pag.pt")
    assert (latents.meta["pag_scale"], latents.meta["pag_layers"]) == (2.5, ["blocks.1"])
    metadata = image_io.read_image_metadata(tmp_path / "staged.png")
    assert metadata["settings"]["pag_scale"] == 2.5 and metadata["parameters"].endswith(", PAG scale: 2.5")
    run("denoise", "emb.pt", "--steps", "2", "--seed", SEED, "-o", "plain.pt")
    assert "pag_scale" not in staged.load_latents(tmp_path / "plain.pt").meta  # unchanged without PAG
    notes = run("compare", "pag.pt", "plain.pt", "--json").stdout
    assert "different pag_scale: 2.5 and None" in notes

    monkeypatch.setattr(memory, "device_budget", lambda budget, device: (1024, 0))
    logs: list[str] = []
    small = denoised(encoded([PROMPT], sigma), sigma, steps=2, seed=SEED, pag_scale=2.5, log=logs.append)
    assert small.meta["plan"] == "streamed" and torch.equal(small.latents, latents.latents)
    assert any(line.startswith("denoise: plan streamed") for line in logs)  # (tiled decode: tests/test_memory.py)


def test_memory_plan_counts_the_perturbed_row():
    args = (4 * memory.GIB, memory.CONTEXT_ESTIMATE, int(1.2 * memory.GIB), 4096, 1152, 2, 16)
    plain, with_pag = memory.plan_denoise(*args, cfg=True), memory.plan_denoise(*args, cfg=True, pag=True)
    per_row = memory.DIT_ACTIVATIONS_PER_TOKEN * 4096 * 1152 * 2
    fixed = memory.CONTEXT_ESTIMATE + int(1.2 * memory.GIB)
    assert plain.estimate - fixed == per_row * 2 * plain.batch
    assert with_pag.estimate - fixed == per_row * 3 * with_pag.batch and with_pag.batch < plain.batch
    alone = memory.plan_denoise(*args, cfg=False, pag=True)  # PAG without CFG: two rows, as CFG alone
    assert alone.estimate == plain.estimate


def test_resume_identity_knows_pag(sigma):
    from pixart_cli.models.source import Model
    from pixart_cli.scale.job import image_options
    from pixart_cli.settings import DenoiseSettings, EncodeSettings

    model = Model(str(sigma))
    off = image_options(model, "auto", EncodeSettings(), DenoiseSettings())
    on = image_options(model, "auto", EncodeSettings(), DenoiseSettings(pag_scale=3.0))
    assert "pag_scale" not in off  # manifests written without PAG still match
    assert (on["pag_scale"], on["pag_layers"]) == (3.0, ["blocks.1"])


def test_refused_where_diffusers_pag_does_not_apply(tiny_model, sigma, tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("PIXART_BASE_MODEL", str(tiny_model))  # DMD's T5 and VAE
    root = tmp_path_factory.mktemp("families")
    lcm, dmd = (random_model.build(root / name, "tiny", family=name) for name in ("lcm", "dmd"))
    staged.save(tmp_path / "emb.pt", encoded([PROMPT], tiny_model))
    cases = [
        (("generate", PROMPT, "--pag-scale", "3", "--model", tiny_model), "diffusers has no PAG pipeline for PixArt-α"),
        (("denoise", "emb.pt", "--pag-scale", "3", "--model", lcm), "PixArt-LCM, a distilled PixArt-α"),
        (("denoise", "emb.pt", "--pag-scale", "3", "--model", dmd), "PixArt-DMD, a one-step distilled PixArt-α"),
        (
            ("generate", PROMPT, "--pag-scale", "3", "--pag-layers", "blocks.7", "--model", sigma),
            "--pag-layers blocks.7: finds no self-attention layer",
            "blocks.0 to blocks.1",
        ),
        (("generate", PROMPT, "--pag-layers", "blocks.1", "--model", sigma), "only with perturbed-attention guidance"),
        (("generate", PROMPT, "--pag-scale", "nan", "--model", sigma), "--pag-scale nan: must be a number from 0"),
        (("generate", PROMPT, "--pag-scale", "1", "--pag-layers", "blocks.1,,", "--model", sigma), "no empty entries"),
        (("generate", PROMPT, "--pag-scale", "1", "--pag-layers", "blocks.[", "--model", sigma), "not a layer name"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, *fragments in cases:
        assert_one_line_error(invoke(*args, cwd=tmp_path), 2, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # 0 is off: the plain run, nothing recorded
    images, meta = generated([PROMPT], sigma, steps=2, seed=SEED, pag_scale=0.0)
    assert "pag_scale" not in meta or meta["pag_scale"] is None


def test_denoise_with_pag_stays_lean(sigma, tmp_path):
    """PAG's processors come from the attention module the transformer imports anyway; the pipelines stay out."""
    from test_lean import NOT_IMPORTED, imported_by

    common = ["--model", sigma, "--device", "cpu", "--quiet"]
    invoke("encode", PROMPT, "-o", "emb.pt", *common, cwd=tmp_path)
    modules = imported_by(tmp_path, "denoise", "emb.pt", "--steps", "2", "--pag-scale", "3", "-o", "lat.pt", *common)
    assert "torch" in modules and not [name for name in NOT_IMPORTED["denoise"] if name in modules]
