"""Reaching the Hugging Face Hub, and the one line for a model that cannot be had (offline, unreachable, unknown)."""

from __future__ import annotations

import os

from pixart_cli.errors import EXIT_RUNTIME, PixartError

BASE_MODEL_ENV = "PIXART_BASE_MODEL"  # the model lending T5, tokenizer and VAE to one without them


def naming(option: str, value) -> str:
    """How a line names a value: ``--model X`` for an option, ``PIXART_MODEL=X`` for an environment variable."""
    return f"{option}={value}" if option.isupper() else f"{option} {value}"


HUB_PROBE_TIMEOUT = 5.0  # seconds to open a connection to the Hub before calling it unreachable


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (a short reason), or None when a connection opens. Behind a proxy the
    client's own attempt decides, so no probe is made there."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    import huggingface_hub

    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT).close()
    except OSError as error:
        return f"{endpoint.hostname} unreachable: {getattr(error, 'strerror', None) or type(error).__name__}"
    return None


def model_unavailable(
    model: str, error: Exception, named_by: str | None = None, reason: str | None = None, option: str = "--model"
) -> PixartError:
    """The line for a hub model that cannot be had (offline, unreachable, unknown, gated)."""
    if named_by is not None:
        return PixartError(
            f"{named_by}: names the hub model {model}, which is not in the local Hugging Face cache; a model named "
            f"by a file is never downloaded: pass --model {model} to download it, or --model with a local folder",
            EXIT_RUNTIME,
        )
    if reason is None and _offline():
        return PixartError(
            f"--model {model}: not in the local Hugging Face cache, and offline mode is on (HF_HUB_OFFLINE is set), "
            f"so it was not downloaded; download it once with `hf download {model}` where HF_HUB_OFFLINE is unset, "
            "or point --model at a local diffusers folder",
            EXIT_RUNTIME,
        )
    reason = type(error).__name__ if reason is None else reason
    return PixartError(
        f"{naming(option, model)}: not in the local Hugging Face cache and could not be downloaded ({reason}); "
        f"download it once with `hf download {model}` while online, or point --model at a local diffusers folder",
        EXIT_RUNTIME,
    )


def base_unavailable(base, error: Exception, reason: str | None = None) -> PixartError:
    """The line for a base model (the lender of T5, tokenizer, VAE) that is not here: the user named another model."""
    if reason is None:
        reason = "offline mode is on: HF_HUB_OFFLINE is set" if _offline() else type(error).__name__
    chosen = f"${BASE_MODEL_ENV}" if os.environ.get(BASE_MODEL_ENV) else f"the default; ${BASE_MODEL_ENV} names another"
    return PixartError(
        f"{base.base_of.lends()} from the base model {base.id} ({chosen}), which is not in the local Hugging Face "
        f"cache and was not downloaded ({reason}); download it once with `hf download {base.id}` while online, or "
        f"set {BASE_MODEL_ENV} to a local diffusers folder that has them",
        EXIT_RUNTIME,
    )


def _offline() -> bool:
    """Whether the Hugging Face client is in offline mode (HF_HUB_OFFLINE)."""
    import huggingface_hub

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)
