"""Image to image: encode-image + denoise --init-latents equal diffusers' own img2img recipe, generate --image equals
the staged run, and bad input fails early with one line."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import (
    SEED,
    assert_one_line_error,
    denoised,
    encoded,
    image_encoded,
    invoke,
    max_diff,
    read_png,
    run_pixart,
)
from pixart_cli.files import image_io, staged

PROMPT = "a cute cat"  # caption cleaning leaves it as it is, so diffusers' encode_prompt gives the same embeddings


@pytest.fixture(scope="module")
def source_png(tmp_path_factory):
    """A 200x300 picture: not a bin of the 256 table (it runs at 208x304) nor a multiple of 8 (296 requested)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 300)[:, None, None] * np.ones((300, 200, 3))
    pixels = np.clip(gradient + rng.normal(0, 30, (300, 200, 3)), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("img2img") / "source.png"
    Image.fromarray(pixels).save(path)
    return path


def diffusers_img2img(model, image_path, strength, steps, seed, scheduler=None):
    """The oracle, from diffusers' own pieces: the image processor and ``retrieve_latents`` for the init latents,
    StableDiffusionImg2ImgPipeline's ``get_timesteps`` and ``prepare_latents`` (called on a stand-in that has only
    the scheduler), then PixArt's denoising loop written out. Returns (init latents, final latents)."""
    from diffusers import PixArtAlphaPipeline, StableDiffusionImg2ImgPipeline
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_256_BIN
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
    from diffusers.utils import load_image

    pipe = PixArtAlphaPipeline.from_pretrained(model, dtype=torch.float32)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    image = load_image(str(image_path))
    height, width = PixArtImageProcessor.classify_height_width_bin(
        image.height // 8 * 8, image.width // 8 * 8, ASPECT_RATIO_256_BIN
    )
    pixels = pipe.image_processor.preprocess(image, height=height, width=width, resize_mode="crop")
    init = retrieve_latents(pipe.vae.encode(pixels), generator=torch.Generator().manual_seed(0))
    init = init * pipe.vae.config.scaling_factor

    embeds, mask, negative, negative_mask = pipe.encode_prompt(PROMPT, clean_caption=True)
    embeds, mask = torch.cat([negative, embeds]), torch.cat([negative_mask, mask])
    pipe.scheduler.set_timesteps(steps)
    stand_in = SimpleNamespace(scheduler=pipe.scheduler)
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(stand_in, steps, strength, "cpu")
    latents = StableDiffusionImg2ImgPipeline.prepare_latents(
        stand_in, init, timesteps[:1].repeat(1), 1, 1, torch.float32, "cpu", [torch.Generator().manual_seed(seed)]
    )
    with torch.no_grad():
        for t in timesteps:
            model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            prediction = pipe.transformer(
                model_input,
                encoder_hidden_states=embeds,
                encoder_attention_mask=mask,
                timestep=t.expand(2),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )[0]
            unconditional, conditional = prediction.chunk(2)
            noise = (unconditional + 4.5 * (conditional - unconditional)).chunk(2, dim=1)[0]  # learned sigma dropped
            latents = pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
    return init, latents, len(timesteps)


@pytest.mark.parametrize("scheduler", [None, "euler"], ids=["dpm++", "euler"])
def test_staged_img2img_equals_diffusers_recipe(tiny_model, source_png, scheduler):
    """DPM++ (the model's own) and Euler, whose init_noise_sigma is not 1: the noised start is not scaled again."""
    import diffusers

    init = image_encoded(source_png, tiny_model)
    ours = denoised(
        encoded([PROMPT], tiny_model), tiny_model, steps=4, seed=SEED, strength=0.6, scheduler=scheduler, init=init
    )

    reference_init, reference, steps_run = diffusers_img2img(
        tiny_model, source_png, 0.6, 4, SEED, None if scheduler is None else diffusers.EulerDiscreteScheduler
    )
    torch.testing.assert_close(init.latents, reference_init, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.latents, reference, rtol=1e-4, atol=1e-4)
    assert steps_run == 2 and ours.meta["steps_run"] == 2 and ours.meta["steps"] == 4
    assert (init.meta["width"], init.meta["height"]) == (208, 304)
    assert (init.meta["requested_width"], init.meta["requested_height"]) == (200, 296)
    assert ours.meta["strength"] == 0.6
    import hashlib

    assert ours.meta["source_image"] == {
        "name": "source.png",
        "sha256": hashlib.sha256(source_png.read_bytes()).hexdigest(),
    }


def test_staged_commands_equal_installed_generate(tiny_model, source_png, tmp_path, monkeypatch):
    """encode, encode-image, denoise --init-latents, decode through the CLI; generate --image as a real process of
    the installed script."""
    monkeypatch.setenv("PIXART_MODEL", str(tiny_model))

    def run(*args):
        result = invoke(*args, cwd=tmp_path)
        assert result.exit_code == 0, result.stderr
        return result.stdout

    assert run("encode", PROMPT, "-q") == "embeddings.pt\n"
    assert run("encode-image", source_png, "-o", "init.pt") == "init.pt\n"
    assert (
        run(
            "denoise", "embeddings.pt", "--init-latents", "init.pt", "--strength", "0.5", "--steps", "3", "--seed", SEED
        )
        == "latents.pt\n"
    )
    assert run("decode", "latents.pt", "-o", "staged.png") == "staged.png\n"
    generated = run_pixart(
        "generate",
        PROMPT,
        "--image",
        source_png,
        "--strength",
        "0.5",
        "--steps",
        "3",
        "--seed",
        SEED,
        "-o",
        "one.png",
        cwd=tmp_path,
        env={"PIXART_MODEL": str(tiny_model)},
    )
    assert generated.stdout == "one.png\n"

    staged, one = read_png(tmp_path / "staged.png"), read_png(tmp_path / "one.png")
    assert staged.shape == (296, 200, 3)  # the requested size restored from the 208x304 bin
    assert max_diff(staged, one) <= 1
    for name in ("staged.png", "one.png"):
        metadata = image_io.read_image_metadata(tmp_path / name)
        settings = metadata["settings"]
        assert (settings["strength"], settings["steps"], settings["steps_run"]) == (0.5, 3, 1)
        assert settings["source_image"]["name"] == "source.png"
        assert metadata["parameters"].endswith(", Denoising strength: 0.5")


def test_bad_input_exits_2_before_models_load(tiny_model, tiny_unbinned_model, source_png, tmp_path):
    env_model = ["--model", str(tiny_model)]
    embeddings = tmp_path / "emb.pt"
    staged.save(embeddings, encoded([PROMPT], tiny_model))
    init = tmp_path / "init.pt"
    staged.save(init, image_encoded(source_png, tiny_model))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "unknown.png").write_bytes(b"not an image at all")
    from PIL import Image

    Image.new("RGB", (4, 64)).save(tmp_path / "thin.png")
    wide = staged.load_latents(init)
    staged.save(tmp_path / "eight.pt", staged.Latents(wide.latents.repeat(1, 2, 1, 1), wide.meta))
    (tmp_path / "out").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())

    cases = [
        (("encode-image", "missing.png", *env_model), "IMAGE missing.png: no such file"),
        (("encode-image", "broken.png", *env_model), "IMAGE broken.png: not an image"),
        (("encode-image", source_png, "--width", "5000", "--height", "512", *env_model), "--width 5000"),
        (
            ("encode-image", "unknown.png", *env_model),
            "IMAGE unknown.png: not an image pixart can read (PIL does not recognise its format)",
        ),
        (("encode-image", "", *env_model), "IMAGE: the path is empty"),
        (("encode-image", source_png, "--height", "0", *env_model), "--height 0: must be a positive multiple of 8"),
        (("encode-image", "thin.png", *env_model), "IMAGE thin.png: it is 4 pixels wide", "or pass --width"),
        (
            ("encode-image", source_png, "--no-binning", *env_model),
            f"IMAGE {source_png}: its width 200: without binning it must be a multiple of 16",
            "pass --width 192",
        ),
        (("generate", PROMPT, "--image", "thin.png", *env_model), "--image thin.png: it is 4 pixels wide"),
        (("denoise", "emb.pt", "--init-latents", "init.pt", "--strength", "0"), "--strength 0.0"),
        (("denoise", "emb.pt", "--init-latents", "init.pt", "--strength", "1.5"), "--strength 1.5"),
        (("denoise", "emb.pt", "--init-latents", "init.pt", "--strength", "nan"), "--strength nan"),
        (("denoise", "emb.pt", "--strength", "0.5"), "give --init-latents FILE"),
        (("denoise", "emb.pt", "--init-latents", "emb.pt"), "is an embeddings file", "pixart encode-image"),
        (("denoise", "emb.pt", "--init-latents", "init.pt", "--width", "256"), "encoded for 200x296"),
        (
            ("denoise", "emb.pt", "--init-latents", "init.pt", "--height", "64"),
            "--height 64: the image was encoded for 200x296; leave it out",
        ),
        (
            ("denoise", "emb.pt", "--init-latents", "init.pt", "--no-binning"),
            "--width 200: without binning",
            "the one init.pt was encoded for",
        ),
        (("denoise", "emb.pt", "--init-latents", "eight.pt"), "8 channels"),
        (("denoise", "emb.pt", "--init-latents", "init.pt", "--steps", "2", "--strength", "0.4"), "0 steps"),
        (
            ("denoise", "emb.pt", "--init-latents", "init.pt", "--model", str(tiny_unbinned_model)),
            "--height 296: beyond this model's maximum of 256",
            "init.pt was encoded for",
        ),
        (("generate", PROMPT, "--image", "missing.png", *env_model), "--image missing.png: no such file"),
        (("generate", PROMPT, "--strength", "0.5", *env_model), "give --image FILE"),
        (("generate", PROMPT, "--image", source_png, "-o", "out/", *env_model), "--image: image to image"),
    ]
    for args, *fragments in cases:
        assert_one_line_error(invoke(*args, cwd=tmp_path), 2, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written

    # and in a real process, before torch loads a model: exit 2, one line
    for args, line in (
        (("missing.png",), "IMAGE missing.png: no such file"),
        (("",), "IMAGE: the path is empty"),
        ((source_png, "--height", "0"), "--height 0: must be a positive multiple of 8"),
    ):
        result = run_pixart("encode-image", *args, *env_model, cwd=tmp_path, check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stdout == ""
        assert result.stderr.startswith(f"error: {line}"), result.stderr
