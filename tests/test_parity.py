"""The heart of the tool: staged output equals diffusers' one-shot PixArtAlphaPipeline, pixel for pixel (≤ 1)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import SEED, decoded, denoised, encoded, generated, max_diff, pipeline_images, read_png, run_pixart
from pixart_cli.files import staged

# Caption cleaning changes both: the HTML entity is unescaped and the URL removed.
CLEANED_PROMPT = "a cute cat &amp; dog, see https://example.com/cat.png"


def staged_run(model, prompt, tmp_path, **denoise_options):
    """encode -> file -> denoise -> file -> decode, in this process, through the stage functions."""
    embeddings = encoded([prompt], model)
    staged.save(tmp_path / "emb.pt", embeddings)
    latents = denoised(staged.load_embeddings(tmp_path / "emb.pt"), seed=SEED, **denoise_options)
    staged.save(tmp_path / "lat.pt", latents)
    images = decoded(staged.load_latents(tmp_path / "lat.pt"))
    return np.stack([np.asarray(image) for image in images]), latents


@pytest.mark.parametrize("size", [None, (200, 144)], ids=["native", "binned-200x144"])
def test_staged_equals_pipeline(tiny_model, tmp_path, size):
    options = {} if size is None else {"width": size[0], "height": size[1]}
    ours, latents = staged_run(tiny_model, CLEANED_PROMPT, tmp_path, steps=3, **options)
    reference = pipeline_images(tiny_model, CLEANED_PROMPT, num_inference_steps=3, **options)
    assert max_diff(ours, reference) <= 1
    if size is not None:
        assert ours.shape == (1, size[1], size[0], 3)
        # 200x144 is not a trained bin: denoising ran at the nearest one and decode restored the request.
        assert (latents.meta["width"], latents.meta["height"]) != size
        assert latents.meta["binned"] is True


def test_unbinned_model_and_guidance_off(tiny_unbinned_model, tmp_path):
    ours, latents = staged_run(tiny_unbinned_model, "a red chair", tmp_path, steps=2, guidance_scale=1.0)
    reference = pipeline_images(
        tiny_unbinned_model, "a red chair", num_inference_steps=2, guidance_scale=1.0, use_resolution_binning=False
    )
    assert max_diff(ours, reference) <= 1
    assert latents.meta["binned"] is False and latents.meta["width"] == 64


def test_caption_cleaning_matches_pipeline_default(tiny_model):
    cleaned = encoded([CLEANED_PROMPT], tiny_model)
    raw = encoded([CLEANED_PROMPT], tiny_model, clean_caption=False)
    assert cleaned.meta["clean_caption"] is True and raw.meta["clean_caption"] is False
    assert not np.array_equal(cleaned.prompt_attention_mask.numpy(), raw.prompt_attention_mask.numpy())


def test_generate_equals_pipeline_for_several_prompts(tiny_model):
    prompts = ["a cute cat", "a red chair"]
    images, meta = generated(prompts, tiny_model, steps=2, seed=7)
    assert meta["seeds"] == [7, 8]
    for index, prompt in enumerate(prompts):
        reference = pipeline_images(tiny_model, prompt, seed=7 + index, num_inference_steps=2)
        assert max_diff(np.asarray(images[index])[None], reference) <= 1


def test_installed_script_staged_and_generate_equal_pipeline(tiny_model, tmp_path):
    """Four real processes of the installed `pixart`, as a shell script would run them."""
    env = {"PIXART_MODEL": str(tiny_model)}
    encoded = run_pixart("encode", CLEANED_PROMPT, cwd=tmp_path, env=env)
    assert encoded.stdout == "embeddings.pt\n"
    denoised = run_pixart("denoise", "embeddings.pt", "--steps", "3", "--seed", SEED, cwd=tmp_path, env=env)
    assert denoised.stdout == "latents.pt\n"
    assert f"seed: {SEED}" in denoised.stderr
    decoded = run_pixart("decode", "latents.pt", "-o", "cat.png", cwd=tmp_path, env=env)
    assert decoded.stdout == "cat.png\n"
    generated = run_pixart(
        "generate", CLEANED_PROMPT, "--steps", "3", "--seed", SEED, "-o", "one.png", cwd=tmp_path, env=env
    )
    assert generated.stdout == "one.png\n"

    reference = pipeline_images(tiny_model, CLEANED_PROMPT, num_inference_steps=3)[0]
    assert max_diff(read_png(tmp_path / "cat.png"), reference) <= 1
    assert max_diff(read_png(tmp_path / "one.png"), reference) <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png", "embeddings.pt", "latents.pt", "one.png"]
