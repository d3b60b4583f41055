"""Inpainting: the masked arithmetic equals diffusers' own pieces step by step (StableDiffusionInpaintPipeline's 4-channel
path on the image-to-image start), --keep-unmasked leaves the unmasked pixels exactly the input's, the staged
commands equal generate --image --mask, every memory plan gives the same result, and bad input fails early with one
line."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import (
    SEED,
    assert_one_line_error,
    denoised,
    encoded,
    generated,
    image_encoded,
    invoke,
    max_diff,
    read_png,
    run_pixart,
)
from pixart_cli.files import image_io, staged
from pixart_cli.models import sampling

PROMPT = "a cute cat"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A 200x300 picture (it runs at the 208x304 bin; decode restores 200x296) and masks drawn on it."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("inpaint")
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 300)[:, None, None] * np.ones((300, 200, 3))
    pixels = np.clip(gradient + rng.normal(0, 30, (300, 200, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "source.png")
    mask = Image.new("L", (200, 300))
    draw = ImageDraw.Draw(mask)
    draw.rectangle((40, 60, 140, 170), fill=255)
    draw.ellipse((90, 180, 170, 260), fill=255)
    mask.save(folder / "mask.png")
    mask.convert("RGBA").resize((100, 150)).save(folder / "half.png")  # a scaled copy in another mode
    Image.new("L", (200, 300)).save(folder / "black.png")
    Image.new("1", (200, 300), 1).save(folder / "white.png")
    Image.new("L", (200, 200), 255).save(folder / "square.png")
    dot = Image.new("L", (200, 300))
    dot.putpixel((100, 100), 255)
    dot.save(folder / "dot.png")
    return folder


def diffusers_inpaint(model, image_path, mask_path, strength, steps, seed, scheduler=None, blur=0):
    """The oracle, from diffusers' own pieces: the image processor and ``retrieve_latents`` for the init latents; the
    inpaint pipeline's ``mask_processor`` (with ``blur``) and ``prepare_mask_latents`` for the latent mask;
    ``get_timesteps`` and StableDiffusionInpaintPipeline's ``prepare_latents`` (strength below 1: the init latents
    noised, and the noise) on a stand-in that has only the scheduler; then PixArt's loop with the pipeline's 4-channel
    step written out. Returns (latent mask, latents after each step)."""
    from diffusers import (
        PixArtAlphaPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
    )
    from diffusers.image_processor import PixArtImageProcessor, VaeImageProcessor
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

    stand_in = SimpleNamespace(scheduler=pipe.scheduler, vae_scale_factor=8)
    mask_processor = VaeImageProcessor(
        vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
    from PIL import Image

    mask_image = Image.open(mask_path).convert("L")
    if blur:
        mask_image = mask_processor.blur(mask_image, blur)
    condition = mask_processor.preprocess(mask_image, height=height, width=width, resize_mode="crop")
    mask, _ = StableDiffusionInpaintPipeline.prepare_mask_latents(
        stand_in, condition, init, 1, height, width, torch.float32, "cpu", None, False
    )

    embeds, attention, negative, negative_mask = pipe.encode_prompt(PROMPT, clean_caption=True)
    embeds, attention = torch.cat([negative, embeds]), torch.cat([negative_mask, attention])
    pipe.scheduler.set_timesteps(steps)
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(stand_in, steps, strength, "cpu")
    latents, noise, image_latents = StableDiffusionInpaintPipeline.prepare_latents(
        stand_in,
        1,
        4,
        height,
        width,
        torch.float32,
        "cpu",
        [torch.Generator().manual_seed(seed)],
        image=init,
        timestep=timesteps[:1].repeat(1),
        is_strength_max=False,
        return_noise=True,
        return_image_latents=True,
    )
    after = []
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            prediction = pipe.transformer(
                model_input,
                encoder_hidden_states=embeds,
                encoder_attention_mask=attention,
                timestep=t.expand(2),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )[0]
            unconditional, conditional = prediction.chunk(2)
            noise_pred = (unconditional + 4.5 * (conditional - unconditional)).chunk(2, dim=1)[0]
            latents = pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            # StableDiffusionInpaintPipeline.__call__, num_channels_unet == 4, without CFG rows in the mask
            init_latents_proper = image_latents
            if i < len(timesteps) - 1:
                noise_timestep = timesteps[i + 1]
                init_latents_proper = pipe.scheduler.add_noise(
                    init_latents_proper, noise, torch.tensor([noise_timestep])
                )
            latents = (1 - mask) * init_latents_proper + mask * latents
            after.append(latents)
    return mask, after


@pytest.mark.parametrize("scheduler, blur", [(None, 0), ("euler", 6)], ids=["dpm++", "euler-blur6"])
def test_masked_steps_equal_diffusers_pieces(tiny_model, pictures, monkeypatch, scheduler, blur):
    import diffusers

    steps_seen, masks_seen = [], []
    blend = sampling.Known.blend

    def recording(self, *args):
        masks_seen.append(self.mask)
        steps_seen.append(blend(self, *args))
        return steps_seen[-1]

    monkeypatch.setattr(sampling.Known, "blend", recording)
    init = image_encoded(pictures / "source.png", tiny_model)
    ours = denoised(
        encoded([PROMPT], tiny_model),
        tiny_model,
        steps=4,
        seed=SEED,
        strength=0.6,
        scheduler=scheduler,
        init=init,
        mask=pictures / "mask.png",
        mask_blur=blur or None,
        keep_unmasked=False,
    )
    reference_mask, reference = diffusers_inpaint(
        tiny_model,
        pictures / "source.png",
        pictures / "mask.png",
        0.6,
        4,
        SEED,
        None if scheduler is None else diffusers.EulerDiscreteScheduler,
        blur,
    )
    assert torch.equal(masks_seen[0], reference_mask) and 0 < float(reference_mask.mean()) < 1
    assert len(steps_seen) == len(reference) == 2
    for step, (mine, theirs) in enumerate(zip(steps_seen, reference)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4, msg=f"step {step}")
    torch.testing.assert_close(ours.latents, reference[-1], rtol=1e-4, atol=1e-4)
    # the known region is the init latents themselves after the last step
    keep = reference_mask[0, 0] == 0
    torch.testing.assert_close(ours.latents[0][:, keep], init.latents[0][:, keep], rtol=0, atol=1e-6)
    assert ours.meta["mask"]["name"] == "mask.png" and ours.meta["mask_blur"] == blur
    assert ours.meta["keep_unmasked"] is False and ours.meta["strength"] == 0.6


def test_staged_commands_keep_the_unmasked_pixels_and_equal_generate(tiny_model, pictures, tmp_path, monkeypatch):
    """encode, encode-image, encode-mask, denoise --mask, decode through the CLI; generate --image --mask as a real
    process of the installed script. Unmasked pixels are the input's exactly, masked ones are repainted."""
    monkeypatch.setenv("PIXART_MODEL", str(tiny_model))

    def run(*args):
        result = invoke(*args, cwd=tmp_path)
        assert result.exit_code == 0, result.stderr
        return result.stdout

    common = ["--strength", "0.7", "--steps", "4", "--seed", SEED]
    assert run("encode", PROMPT, "-q") == "embeddings.pt\n"
    assert run("encode-image", pictures / "source.png", "-o", "init.pt") == "init.pt\n"
    assert run("encode-mask", pictures / "mask.png", "--image", pictures / "source.png", "-o", "mask.pt") == "mask.pt\n"
    # a scaled copy of the mask, in another mode, gives (nearly) the same latent mask
    run("encode-mask", pictures / "half.png", "--image", pictures / "source.png", "-o", "half.pt")
    full, half = staged.load_mask(tmp_path / "mask.pt").mask, staged.load_mask(tmp_path / "half.pt").mask
    assert float((full != half).float().mean()) < 0.05
    run("denoise", "embeddings.pt", "--init-latents", "init.pt", "--mask", "mask.pt", *common, "-o", "lat.pt")
    assert run("decode", "lat.pt", "-o", "staged.png") == "staged.png\n"
    one = run_pixart(
        "generate",
        PROMPT,
        "--image",
        pictures / "source.png",
        "--mask",
        pictures / "mask.png",
        *common,
        "-o",
        "one.png",
        cwd=tmp_path,
        env={"PIXART_MODEL": str(tiny_model)},
    )
    assert one.stdout == "one.png\n"

    staged_image, one_image = read_png(tmp_path / "staged.png"), read_png(tmp_path / "one.png")
    assert staged_image.shape == (296, 200, 3)
    assert max_diff(staged_image, one_image) <= 1
    source = read_png(pictures / "source.png")[2:298]  # the requested 200x296, center-cropped as the image processor
    drawn = read_png(pictures / "mask.png")[2:298, :, 0]
    for image in (staged_image, one_image):
        assert max_diff(image[drawn == 0][None], source[drawn == 0][None]) == 0  # exactly the input's
        repainted = np.abs(image[drawn == 255].astype(int) - source[drawn == 255]).mean()
        assert repainted > 10, repainted

    # --no-keep-unmasked: the decoded image everywhere (the VAE's round trip is not the input)
    run(
        "denoise",
        "embeddings.pt",
        "--init-latents",
        "init.pt",
        "--mask",
        "mask.pt",
        "--no-keep-unmasked",
        *common,
        "-o",
        "plain.pt",
    )
    assert staged.load_latents(tmp_path / "plain.pt").overlay_image is None
    # a mask image given to denoise is made into the same mask at init.pt's sizes (its source size recorded there)
    run(
        "denoise",
        "embeddings.pt",
        "--init-latents",
        "init.pt",
        "--mask",
        pictures / "mask.png",
        "--no-keep-unmasked",
        *common,
        "-o",
        "from-image.pt",
    )
    assert torch.equal(
        staged.load_latents(tmp_path / "from-image.pt").latents, staged.load_latents(tmp_path / "plain.pt").latents
    )
    run("decode", "plain.pt", "-o", "plain.png")
    plain = read_png(tmp_path / "plain.png")
    assert max_diff(plain[drawn == 0][None], source[drawn == 0][None]) > 0
    compared = invoke("compare", "lat.pt", "plain.pt", "--json", cwd=tmp_path).stdout
    assert "different keep_unmasked: True and False" in compared

    # recorded: the latents, the image's settings and A1111 line, pixart info
    sha = hashlib.sha256((pictures / "mask.png").read_bytes()).hexdigest()
    latents = staged.load_latents(tmp_path / "lat.pt")
    assert latents.meta["mask"] == {"name": "mask.png", "sha256": sha}
    assert (latents.meta["mask_blur"], latents.meta["keep_unmasked"]) == (0, True)
    assert list(latents.overlay_image.shape) == [1, 3, 296, 200]
    for name in ("staged.png", "one.png"):
        metadata = image_io.read_image_metadata(tmp_path / name)
        settings = metadata["settings"]
        assert settings["mask"] == {"name": "mask.png", "sha256": sha} and settings["keep_unmasked"] is True
        assert settings["mask_blur"] == 0 and settings["strength"] == 0.7
        assert metadata["parameters"].endswith(", Denoising strength: 0.7, Mask blur: 0")
    described = invoke("info", "mask.pt", "--json", cwd=tmp_path).stdout
    assert '"kind": "mask"' in described and '"source_image"' in described


@pytest.fixture
def tiny_budget(monkeypatch):
    from pixart_cli.models import memory

    monkeypatch.setattr(memory, "device_budget", lambda budget, device: (1024, 0))


@pytest.mark.parametrize("budget", ["none", "tiny"])
def test_every_plan_inpaints_alike(tiny_model, pictures, budget, request):
    """The default plan (CPU: resident, what an 8 GB card runs), and the smallest plans (streamed transformer, tiled
    decode), give the same latents, and the unmasked pixels stay the input's under both."""
    logs: list[str] = []
    if budget == "tiny":
        request.getfixturevalue("tiny_budget")
    options = dict(image=pictures / "source.png", mask=pictures / "mask.png", strength=0.7, steps=3, seed=SEED)
    images, meta = generated([PROMPT], tiny_model, log=logs.append, **options)
    plans = [line.split(" (")[0] for line in logs if ": plan " in line]
    if budget == "none":
        assert "denoise: plan resident, batch 1" in plans
    else:
        assert {"denoise: plan streamed, batch 1", "decode: plan tiled, tile 128px"} <= set(plans), plans
    source = read_png(pictures / "source.png")[2:298]
    drawn = read_png(pictures / "mask.png")[2:298, :, 0]
    image = np.asarray(images[0])
    assert max_diff(image[drawn == 0][None], source[drawn == 0][None]) == 0
    assert meta["mask"]["name"] == "mask.png" and meta["plan"] == ("resident" if budget == "none" else "streamed")


def test_streamed_inpainting_equals_resident(tiny_model, pictures, monkeypatch):
    from pixart_cli.models import memory

    init = image_encoded(pictures / "source.png", tiny_model)
    embeddings = encoded([PROMPT], tiny_model)
    options = dict(steps=3, seed=SEED, strength=0.7, init=init, mask=pictures / "mask.png", keep_unmasked=False)
    resident = denoised(embeddings, tiny_model, **options)
    monkeypatch.setattr(memory, "device_budget", lambda budget, device: (1024, 0))
    streamed = denoised(embeddings, tiny_model, **options)
    assert streamed.meta["plan"] == "streamed" and torch.equal(resident.latents, streamed.latents)


def test_all_white_mask_is_image_to_image(tiny_model, pictures):
    options = dict(image=pictures / "source.png", strength=0.6, steps=3, seed=SEED)
    logs: list[str] = []
    white, white_meta = generated([PROMPT], tiny_model, mask=pictures / "white.png", log=logs.append, **options)
    plain, _ = generated([PROMPT], tiny_model, **options)
    assert max_diff(np.asarray(white[0])[None], np.asarray(plain[0])[None]) == 0
    assert white_meta["mask"]["name"] == "white.png"
    assert any("all white: the same as image to image" in line for line in logs), logs


def test_bad_mask_input_exits_2_before_models_load(tiny_model, tiny_unbinned_model, pictures, tmp_path):
    model = ["--model", str(tiny_model)]
    staged.save(tmp_path / "emb.pt", encoded([PROMPT], tiny_model))
    staged.save(tmp_path / "init.pt", image_encoded(pictures / "source.png", tiny_model))
    from PIL import Image

    Image.fromarray(read_png(pictures / "source.png")[::-1].copy()).save(tmp_path / "other.png")
    staged.save(tmp_path / "other-init.pt", image_encoded(tmp_path / "other.png", tiny_model))
    from helpers import cpu
    from pixart_cli.plan import fit_image
    from pixart_cli.stages.encode_mask import encode_mask

    source = image_io.read_source_image(pictures / "source.png", "--image")
    mask_image = image_io.read_source_image(pictures / "mask.png", "MASK", mode="L")
    made = encode_mask(mask_image, fit_image(source, cpu(tiny_model).model), 0, cpu(tiny_model), source)
    staged.save(tmp_path / "mask.pt", made)
    staged.save(tmp_path / "bare.pt", made.without_overlay())
    staged.save(
        tmp_path / "wide.pt",
        encode_mask(mask_image, fit_image(source, cpu(tiny_model).model, 256, 384), 0, cpu(tiny_model), source),
    )
    staged.save(tmp_path / "none.pt", staged.Mask(made.mask * 0, made.meta, made.overlay_image, made.overlay_mask))
    before = sorted(p.name for p in tmp_path.iterdir())
    denoise = ["denoise", "emb.pt", "--init-latents", "init.pt"]
    generate = ["generate", PROMPT, "--image", pictures / "source.png", *model]
    cases = [
        (("denoise", "emb.pt", "--mask", pictures / "mask.png"), "give --init-latents FILE too"),
        (("generate", PROMPT, "--mask", pictures / "mask.png", *model), "give --image FILE too"),
        (("denoise", "emb.pt", "--mask-blur", "4"), "--mask-blur 4: only for inpainting; give --mask MASK"),
        (("generate", PROMPT, "--no-keep-unmasked", *model), "--no-keep-unmasked: only for inpainting"),
        ((*generate, "--mask", pictures / "black.png"), "black.png: it is all black: there is nothing to repaint"),
        ((*generate, "--mask", pictures / "dot.png"), "its white area is too small or thin"),
        ((*generate, "--mask", pictures / "square.png"), "it is 200x200, which does not scale to --image"),
        ((*generate, "--mask", pictures / "mask.png", "--mask-blur", "-1"), "--mask-blur -1: must be between 0"),
        ((*generate, "--mask", "missing.png"), "--mask missing.png: no such file"),
        ((*generate, "--mask", ""), "--mask: the path is empty"),
        ((*generate, "--mask", "emb.pt"), "is an embeddings file", "needs a mask file (from pixart encode-mask)"),
        ((*denoise, "--mask", pictures / "mask.png"), "--keep-unmasked (the default)", "pixart encode-mask"),
        ((*denoise, "--mask", pictures / "square.png", "--no-keep-unmasked"), "does not scale to init.pt's 200x300"),
        ((*denoise, "--mask", "mask.pt", "--mask-blur", "2"), "mask.pt was made with --mask-blur 0"),
        ((*denoise, "--mask", "wide.pt"), "wide.pt: the mask is for 256x384", "make the mask with the same model"),
        ((*denoise, "--mask", "none.pt"), "none.pt: it is all black"),
        ((*denoise, "--mask", "bare.pt"), "holds no source pixels", "--no-keep-unmasked"),
        (
            ("denoise", "emb.pt", "--init-latents", "other-init.pt", "--mask", "mask.pt"),
            "made for the image source.png",
        ),
        (("encode-mask", pictures / "black.png", "--image", pictures / "source.png", *model), "MASK", "all black"),
        (("encode-mask", pictures / "square.png", "--image", pictures / "source.png", *model), "does not scale to"),
        (("encode-mask", pictures / "mask.png", "--image", "missing.png", *model), "--image missing.png: no such file"),
        (
            (
                "encode-mask",
                pictures / "mask.png",
                "--image",
                pictures / "source.png",
                "--model",
                str(tiny_unbinned_model),
            ),
            "beyond this model's maximum",
        ),
    ]
    for args, *fragments in cases:
        assert_one_line_error(invoke(*args, cwd=tmp_path), 2, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    # and through the installed script: the one line, exit 2
    result = run_pixart(*generate, "--mask", pictures / "black.png", cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "all black" in result.stderr
    # the all-white mask is allowed (the same as image to image)
    assert (
        invoke(
            "denoise",
            "emb.pt",
            "--init-latents",
            "init.pt",
            "--mask",
            pictures / "white.png",
            "--no-keep-unmasked",
            "--steps",
            "2",
            "--strength",
            "1",
            cwd=tmp_path,
        ).exit_code
        == 0
    )
