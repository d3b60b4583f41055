"""Model folders and families: where a component lives, what its config says, and each family's defaults.

Model facts come from the configs (``model_index.json``, ``transformer/config.json``, ...), never from
constants, so tiny test models and the real checkpoints go through the same code.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pixart_cli.errors import EXIT_RUNTIME, PixartError, detail

DEFAULT_MODEL = "PixArt-alpha/PixArt-XL-2-1024-MS"
MODEL_ENV = "PIXART_MODEL"
# Where components missing from a model folder come from (PixArt-DMD ships only its transformer and scheduler).
BASE_MODEL_ENV = "PIXART_BASE_MODEL"
SHARED_COMPONENTS = ("tokenizer", "text_encoder", "vae")
# The weights file each component with weights is saved as (diffusers' and transformers' save_pretrained names);
# a sharded (.index.json), variant (.fp16.safetensors) or .bin file counts too.
WEIGHTS_FILES = {
    "transformer": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


@dataclass(frozen=True)
class Family:
    """Defaults of one PixArt family; the user's flags always win over them."""

    name: str
    pipeline: str  # the diffusers pipeline whose steps the stages follow (sampling.py, prompts.py)
    steps: int
    guidance_scale: float
    max_sequence_length: int
    timesteps: tuple[int, ...] | None = None  # a fixed schedule (one-step models) replaces `steps`


FAMILIES = {
    "alpha": Family("alpha", "PixArtAlphaPipeline", steps=20, guidance_scale=4.5, max_sequence_length=120),
    "sigma": Family("sigma", "PixArtSigmaPipeline", steps=20, guidance_scale=4.5, max_sequence_length=300),
    "lcm": Family("lcm", "PixArtAlphaPipeline", steps=4, guidance_scale=0.0, max_sequence_length=120),
    "dmd": Family("dmd", "PixArtAlphaPipeline", steps=1, guidance_scale=1.0, max_sequence_length=120, timesteps=(400,)),
}

# Transformer sample_size -> the resolution-binning table the pipelines use for it.
BIN_TABLES = {
    256: "ASPECT_RATIO_2048_BIN",
    128: "ASPECT_RATIO_1024_BIN",
    64: "ASPECT_RATIO_512_BIN",
    32: "ASPECT_RATIO_256_BIN",
}


def base_model() -> str:
    """The model lending T5, tokenizer and VAE to one without them: $PIXART_BASE_MODEL, else PixArt-α 1024."""
    return os.environ.get(BASE_MODEL_ENV) or DEFAULT_MODEL


def default_model() -> str:
    """The model used when --model is not given: $PIXART_MODEL, else the PixArt-α 1024 checkpoint."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_local(model: str) -> bool:
    """A folder that exists, or anything that cannot be a hub id ("owner/name"), is a local path."""
    return os.path.isdir(model) or not _HUB_ID.match(model)


class Model:
    """One model, a local diffusers folder or a Hugging Face id, read one component at a time.

    ``named_by``: the file whose meta names this model (no --model given). Such a model is trusted less: a hub
    id is loaded only from the local Hugging Face cache (never downloaded), and errors name the file.
    ``base_of``: the model this one lends its T5, tokenizer or VAE to (this is the base model); errors say so.
    """

    def __init__(
        self, model: str, revision: str | None = None, named_by: str | None = None, base_of: Model | None = None
    ):
        if not model.strip():
            raise PixartError(
                f"--model {model!r}: the name is empty; give a diffusers model folder or a Hugging Face id, or leave "
                f"--model out (default: ${MODEL_ENV}, else {DEFAULT_MODEL})"
            )
        self.id = model
        self.revision = revision
        self.named_by = named_by
        self.base_of = base_of
        self.local = _looks_local(model)
        if self.local:
            folder = Path(model).expanduser()
            if not folder.is_dir():
                if base_of is not None:
                    raise PixartError(
                        f"{base_of.lends()} from the base model ${BASE_MODEL_ENV}={model}, which does not exist; "
                        f"set {BASE_MODEL_ENV} to a model folder or Hugging Face id that has them",
                        EXIT_RUNTIME,
                    )
                if named_by is not None:
                    raise PixartError(
                        f"{named_by}: names the model folder {model}, which does not exist here; pass "
                        "--model with the model's folder or id"
                    )
                raise PixartError(
                    f"--model {model}: no such folder; give a diffusers model folder or a Hugging Face id"
                )
            if not (folder / "model_index.json").is_file():
                where = f"{named_by}: names the model folder {model}, which" if named_by else f"--model {model}:"
                raise PixartError(f"{where} is not a diffusers model folder (no model_index.json)")
            self.root = folder
        self._configs: dict[str, dict] = {}
        self._base: Model | None = None

    @property
    def recorded(self) -> str:
        """What files record: a local folder as an absolute path (a later stage may run elsewhere), or the id."""
        return os.path.abspath(self.root) if self.local else self.id

    @property
    def offline_only(self) -> bool:
        """A hub model named by a file, not by the user: loaded from the local cache only."""
        return self.named_by is not None and not self.local

    def unavailable(self, error: Exception, reason: str | None = None) -> PixartError:
        if self.base_of is not None:
            return base_unavailable(self, error, reason)
        return model_unavailable(self.id, error, self.named_by, reason)

    def lends(self) -> str:
        """'--model X: has no tokenizer, text_encoder or vae of its own and takes them': how a line about its base
        model (the lender of those) starts."""
        missing = [name for name in SHARED_COMPONENTS if not self._has(name)]
        names = ", ".join(missing[:-1]) + (" or " if len(missing) > 1 else "") + missing[-1] if missing else "parts"
        return f"--model {self.id}: has no {names} of its own and takes {'them' if len(missing) > 1 else 'it'}"

    def _has(self, component: str) -> bool:
        entry = self.config(None).get(component)
        return entry not in (None, [None, None]) and (not self.local or (self.root / component).is_dir())

    def __repr__(self) -> str:
        return f"Model({self.id!r})"

    def owner(self, component: str) -> Model:
        """The model that holds ``component``: this one, or the base model where this one lacks T5, its
        tokenizer or the VAE (as PixArt-DMD does)."""
        if component not in SHARED_COMPONENTS:
            return self
        if self._has(component):
            return self
        if self._base is None:
            if base_model() == self.id:
                raise PixartError(f"--model {self.id}: has no {component}/ and is itself the base model", EXIT_RUNTIME)
            self._base = Model(base_model(), base_of=self)
        return self._base

    def file(self, relative: str) -> Path:
        """Local path of one file of the model, downloading it (once) for a hub id."""
        if self.local:
            path = self.root / relative
            if not path.is_file():
                raise PixartError(
                    f"--model {self.id}: {relative} is missing; the model folder is incomplete", EXIT_RUNTIME
                )
            return path
        from huggingface_hub import hf_hub_download

        return Path(self._from_hub(hf_hub_download, self.id, relative, revision=self.revision))

    def check_weights(self, component: str) -> None:
        """A local component folder must hold a weights file: a folder with its config alone would otherwise
        fail deep inside the loader (or send the VAE to another loader), with another file's name in the line."""
        holder = self.owner(component)
        if holder is not self:
            return holder.check_weights(component)
        if not self.local or component not in WEIGHTS_FILES:
            return
        folder = self.root / component
        try:
            names = [entry.name for entry in os.scandir(folder) if entry.is_file()]
        except OSError as error:
            raise PixartError(f"--model {self.id}: cannot read {component}/ ({error.strerror})", EXIT_RUNTIME) from None
        if not any(name.endswith((".safetensors", ".bin", ".index.json")) for name in names):
            raise PixartError(
                f"--model {self.id}: {component}/ has no weights file ({WEIGHTS_FILES[component]} is missing); "
                "the model folder is incomplete: download it again",
                EXIT_RUNTIME,
            )

    def config(self, component: str | None) -> dict:
        """A component's config.json (``None``: model_index.json), parsed."""
        holder = self if component is None else self.owner(component)
        if holder is not self:
            return holder.config(component)
        name = "model_index.json" if component is None else f"{component}/{_config_name(component)}"
        if name not in self._configs:
            path = self.file(name)
            try:
                self._configs[name] = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise PixartError(f"--model {self.id}: {name} is broken ({error})", EXIT_RUNTIME) from error
        return self._configs[name]

    def folder(self, component: str) -> Path:
        """Local folder of one component (downloading only that component for a hub id)."""
        holder = self.owner(component)
        if holder is not self:
            return holder.folder(component)
        if self.local:
            return self.root / component
        from huggingface_hub import snapshot_download

        root = self._from_hub(snapshot_download, self.id, revision=self.revision, allow_patterns=[f"{component}/*"])
        return Path(root) / component

    def _from_hub(self, fetch, *args, **kwargs) -> str:
        """The local cache first (no network at all); else a download, when the Hub can be reached at all: the hub
        client retries an unreachable host for ~25 s and logs each try, where one line is all a user needs."""
        import huggingface_hub

        try:
            return fetch(*args, **kwargs, local_files_only=True)
        except Exception as error:
            cached_error = error
        if self.offline_only or huggingface_hub.constants.HF_HUB_OFFLINE:
            raise self.unavailable(cached_error) from cached_error
        unreachable = _hub_unreachable()
        if unreachable:
            raise self.unavailable(cached_error, reason=unreachable) from cached_error
        try:
            return fetch(*args, **kwargs)
        except Exception as error:  # unknown repo, gated, network: one line either way
            raise self.unavailable(error) from error

    def load_args(self, component: str) -> dict:
        """Keyword arguments for ``from_pretrained`` of one component."""
        holder = self.owner(component)
        if holder is not self:
            return holder.load_args(component)
        source = str(self.root) if self.local else self.id
        args = {"pretrained_model_name_or_path": source, "subfolder": component, "revision": self.revision}
        if self.offline_only:
            args["local_files_only"] = True
        return args

    # --- facts read from the configs -------------------------------------------------------------------
    @property
    def family(self) -> Family:
        """The family, from the pipeline class, the scheduler and the transformer config."""
        pipeline = self.config(None).get("_class_name", "")
        if pipeline == "PixArtSigmaPipeline":
            return FAMILIES["sigma"]
        scheduler = self.config("scheduler").get("_class_name", "")
        if scheduler == "LCMScheduler":
            return FAMILIES["lcm"]
        if scheduler == "DDPMScheduler":
            return FAMILIES["dmd"]
        return FAMILIES["alpha"]

    @property
    def sample_size(self) -> int:
        """Latent side of the transformer's native resolution."""
        return int(self.config("transformer")["sample_size"])

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent, as the pipelines compute it."""
        return 2 ** (len(self.config("vae")["block_out_channels"]) - 1)

    @property
    def native_size(self) -> int:
        """Native image side in pixels (1024 for PixArt-XL-2-1024-MS)."""
        return self.sample_size * self.vae_scale_factor

    @property
    def bin_table(self) -> dict[str, list[float]] | None:
        """The pipeline's aspect-ratio bins for this transformer, or None where it has none."""
        name = BIN_TABLES.get(self.sample_size)
        if name is None:
            return None
        from pixart_cli.models.facade import diffusers_constant

        # Read from the pipeline's source: importing the pipeline costs a denoise process seconds (issue 10)
        module = "pipeline_pixart_sigma" if name == "ASPECT_RATIO_2048_BIN" else "pipeline_pixart_alpha"
        return diffusers_constant(f"pipelines/pixart_alpha/{module}.py", name)


def model_for_file(flag: str | None, revision: str | None, meta: dict, path) -> Model:
    """The model a stage runs with: --model (and --revision) when given, else the one the input file ``path``
    names (trusted less: a hub id named by a file loads only from the local cache)."""
    if flag is not None:
        return Model(flag, revision)
    return Model(meta["model"], meta.get("revision") if revision is None else revision, named_by=str(path))


def _config_name(component: str) -> str:
    return {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}.get(component, "config.json")


HUB_PROBE_TIMEOUT = 5.0  # seconds to open a connection to the Hub before calling it unreachable


def _hub_unreachable() -> str | None:
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
    model: str, error: Exception, named_by: str | None = None, reason: str | None = None
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
        f"--model {model}: not in the local Hugging Face cache and could not be downloaded ({reason}); "
        f"download it once with `hf download {model}` while online, or point --model at a local diffusers folder",
        EXIT_RUNTIME,
    )


def base_unavailable(base: Model, error: Exception, reason: str | None = None) -> PixartError:
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


def load_component(model: Model, component: str, load, **kwargs):
    """``load(**from_pretrained args)`` with a broken or missing model turned into one line."""
    from pixart_cli.models.facade import LOCK

    model.check_weights(component)
    try:
        with LOCK:  # model building switches process-wide state for a moment (facade.LOCK)
            return load(**model.load_args(component), **kwargs)
    except PixartError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        if type(error).__name__ == "OutOfMemoryError":
            raise
        message = str(error).lower()
        holder = model.owner(component)
        if not holder.local and ("offline" in message or "connect" in message or "not found" in message):
            raise holder.unavailable(error) from error
        broken = _broken_weight_file(model, component)
        if broken is not None:
            raise PixartError(
                f"--model {model.id}: {broken} is damaged (truncated or not safetensors); download the model again",
                EXIT_RUNTIME,
            ) from error
        raise PixartError(
            f"--model {model.id}: cannot load {component}/ ({detail(error)}); the model folder may be "
            "damaged: download it again",
            EXIT_RUNTIME,
        ) from error


def _broken_weight_file(model: Model, component: str) -> str | None:
    """The first .safetensors file of a local component whose header or size is wrong, as 'component/file'."""
    model = model.owner(component)
    if not model.local:
        return None
    from pixart_cli.models.streaming import TensorFile

    for path in sorted((model.root / component).glob("*.safetensors")):
        try:
            tensor_file = TensorFile(path)
            tensor_file.close()
            end = max((e["data_offsets"][1] for e in tensor_file.entries.values()), default=0)
            if tensor_file.data_start + end > tensor_file.size:
                return f"{component}/{path.name}"
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return f"{component}/{path.name}"
    return None
