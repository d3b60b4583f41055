"""`pixart compare` in real processes: statistics checked against numpy on files with known differences, and
files that cannot be compared exit 2 with one line naming the reason."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_pixart
from pixart_cli.files import staged

PROMPTS = ["a cute cat", "a red chair"]


def embeddings(path, prompt_embeds, mask):
    meta = {
        "format": staged.EMBEDDINGS_FORMAT,
        "version": staged.FORMAT_VERSION,
        "model": "m",
        "family": "alpha",
        "dtype": "fp32",
        "prompts": PROMPTS[: prompt_embeds.shape[0]],
        "negative_prompt": "",
        "max_sequence_length": prompt_embeds.shape[1],
    }
    negative = torch.zeros_like(prompt_embeds)
    staged.save(path, staged.Embeddings(prompt_embeds, mask, negative, mask.clone(), meta))
    return path


def latents(path, tensor, **settings):
    count, _, height, width = tensor.shape
    meta = {
        "format": staged.LATENTS_FORMAT,
        "version": staged.FORMAT_VERSION,
        "model": "m",
        "family": "alpha",
        "dtype": "fp32",
        "prompts": PROMPTS[:count],
        "seeds": list(range(count)),
        "height": height * 8,
        "width": width * 8,
        "requested_height": height * 8,
        "requested_width": width * 8,
        **settings,
    }
    staged.save(path, staged.Latents(tensor, meta))
    return path


def numpy_stats(x, y) -> dict:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    return {
        "cosine": float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))),
        "max_abs_diff": float(np.abs(x - y).max()),
        "mean_abs_diff": float(np.abs(x - y).mean()),
    }


def assert_pair(pair: dict, expected: dict):
    for key, value in expected.items():
        assert pair[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def compare_json(a, b, cwd) -> dict:
    result = run_pixart("compare", a, b, "--json", cwd=cwd)
    return json.loads(result.stdout)


def test_embeddings_per_prompt_over_kept_tokens(tmp_path):
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(2, 6, 4, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    second = first.clone()
    second[1, 2] += torch.tensor([0.5, -0.25, 0.0, 0.125])  # prompt 1, a kept token
    second[0, 5] += 100.0  # prompt 0, padding: the transformer never sees it, so it does not count
    embeddings(tmp_path / "a.pt", first, mask)
    embeddings(tmp_path / "b.pt", second, mask)

    document = compare_json("a.pt", "b.pt", tmp_path)
    assert document["kind"] == "embeddings" and len(document["pairs"]) == 3  # two prompts + the negative prompt
    zero, one, negative = document["pairs"]
    assert (zero["prompt"], zero["tokens"], zero["cosine"], zero["max_abs_diff"]) == ("a cute cat", 3, 1.0, 0.0)
    assert_pair(one, numpy_stats(first[1, :5], second[1, :5]))
    assert one["max_abs_diff"] == 0.5 and one["tokens"] == 5
    assert negative["index"] is None and negative["max_abs_diff"] == 0.0

    table = run_pixart("compare", "a.pt", "b.pt", cwd=tmp_path).stdout.splitlines()
    assert table[0] == "embeddings: a.pt vs b.pt"
    assert table[1].split() == ["#", "prompt", "cosine", "max_abs_diff", "mean_abs_diff"]
    assert table[2].split()[-3:] == ["1.000000", "0", "0"] and table[3].startswith("1  a red chair")


def test_latents_per_image(tmp_path):
    first = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    second = first * 0.5  # same direction, half the size
    latents(tmp_path / "a.pt", first)
    latents(tmp_path / "b.pt", second, step_cache="taylorseer:2")
    document = compare_json(tmp_path / "a.pt", tmp_path / "b.pt", tmp_path)
    assert document["kind"] == "latents"
    assert document["notes"] == ["different step_cache: None and taylorseer:2"]
    for index, pair in enumerate(document["pairs"]):
        assert_pair(pair, numpy_stats(first[index], second[index]))
        assert pair["cosine"] == pytest.approx(1.0) and pair["seed"] == index


def test_images_pixel_difference_and_psnr(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    changed = pixels.copy()
    changed[3, 5, 1] = pixels[3, 5, 1] + 10 if pixels[3, 5, 1] < 200 else pixels[3, 5, 1] - 10
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(changed).save(tmp_path / "b.png")
    Image.fromarray(pixels).save(tmp_path / "same.png")

    pair = compare_json("a.png", "b.png", tmp_path)["pairs"][0]
    count = pixels.size
    assert pair["max_pixel_diff"] == 10 == pair["max_abs_diff"]
    assert pair["mean_pixel_diff"] == pytest.approx(10 / count)
    assert pair["psnr"] == pytest.approx(10 * math.log10(255**2 / (100 / count)))
    assert_pair(pair, numpy_stats(pixels, changed))
    identical = compare_json("a.png", "same.png", tmp_path)["pairs"][0]
    assert identical["psnr"] is None and identical["max_pixel_diff"] == 0 and identical["cosine"] == 1.0


@pytest.mark.parametrize(
    "a, b, fragment",
    [
        (
            "emb.pt",
            "lat.pt",
            "error: lat.pt: holds latents but emb.pt holds embeddings; compare two files of the same kind",
        ),
        ("lat.pt", "lat-small.pt", "error: lat-small.pt: latents [1, 4, 2, 2] do not match lat.pt's [2, 4, 4, 4]"),
        ("a.png", "lat.pt", "error: lat.pt: cannot compare it with the image a.png"),
        ("a.png", "small.png", "error: small.png: is 8x8 but a.png is 24x16"),
    ],
)
def test_files_that_cannot_be_compared_exit_2(tmp_path, a, b, fragment):
    embeddings(tmp_path / "emb.pt", torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.int64))
    latents(tmp_path / "lat.pt", torch.ones(2, 4, 4, 4))
    latents(tmp_path / "lat-small.pt", torch.ones(1, 4, 2, 2))
    Image.new("RGB", (24, 16)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    result = run_pixart("compare", a, b, cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [fragment] or (
        len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(fragment)
    ), result.stderr
