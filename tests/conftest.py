"""Offline fixtures: tiny random PixArt models in the diffusers layout, and an isolated HOME and HF cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from pixart_cli import random_model

try:  # the fuzz draws the same examples on every run (a landing never fails by chance); PIXART_FUZZ_RANDOM=1 explores
    import os

    from hypothesis import settings

    settings.register_profile("pixart", derandomize=os.environ.get("PIXART_FUZZ_RANDOM") != "1")
    settings.load_profile("pixart")
except ImportError:
    pass


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


def pytest_collection_modifyitems(items):
    """The slow classes, marked so that `python -m pytest -m "not slow"` runs the fast set while developing (make
    test runs everything): Ray and torchrun start clusters and process groups, the fuzz runs many cases."""
    for item in items:
        name = item.originalname if hasattr(item, "originalname") else item.name
        kinds = []
        if "torchrun" in name:
            kinds.append("torchrun")
        if "ray" in name.split("_"):
            kinds.append("ray")
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            kinds.append("fuzz")
        for kind in kinds:
            item.add_marker(getattr(pytest.mark, kind))
        if kinds:
            item.add_marker(pytest.mark.slow)
