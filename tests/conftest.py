"""Offline fixtures: tiny random PixArt models in the diffusers layout, and an isolated HOME and HF cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixart_cli import random_model

SEED = 0


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    """No test reads or writes the real HOME or HF cache, or reaches the network."""
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PIXART_MODEL", raising=False)
    monkeypatch.delenv("PIXART_DEBUG", raising=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """PixArt-α-like model with transformer sample_size 32 (256 px): the 256 bin table applies."""
    return random_model.build(tmp_path_factory.mktemp("tiny") / "model", "tiny")


@pytest.fixture(scope="session")
def tiny_unbinned_model(tmp_path_factory) -> Path:
    """sample_size 8 (64 px): no bin table exists, so the pipeline must run without binning."""
    return random_model.build(tmp_path_factory.mktemp("tiny8") / "model", "tiny", sample_size=8)


def pipeline_images(model: Path, prompt, seed: int = SEED, **kwargs):
    """The oracle: diffusers' own one-shot PixArtAlphaPipeline, CPU generator, fp32. Returns uint8 [N, H, W, 3]."""
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil", **kwargs).images
    import numpy as np

    return np.stack([np.asarray(image) for image in images])


def read_png(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def max_diff(a, b) -> int:
    import numpy as np

    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def run_pixart(*args, cwd, env=None, check=True, timeout=300):
    """The installed console script as a subprocess, as a shell user runs it."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run([pixart_bin(), *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"pixart {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr}")
    return result


def pixart_bin() -> str:
    return str(Path(sys.executable).parent / "pixart")
