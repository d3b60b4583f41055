"""Model folders and families: where a component lives, what its config says, and each family's defaults.

Model facts come from the configs (``model_index.json``, ``transformer/config.json``, ...), never from
constants, so tiny test models and the real checkpoints go through the same code.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pixart_cli.errors import EXIT_RUNTIME, PixartError, detail
from pixart_cli.models import configs
from pixart_cli.models.configs import WEIGHTS_FILES
from pixart_cli.models.hub import BASE_MODEL_ENV, base_unavailable, hub_unreachable, model_unavailable, naming

DEFAULT_MODEL = "PixArt-alpha/PixArt-XL-2-1024-MS"
MODEL_ENV = "PIXART_MODEL"
# Where components missing from a model folder come from (PixArt-DMD ships only its transformer and scheduler).
SHARED_COMPONENTS = ("tokenizer", "text_encoder", "vae")


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


def base_model(base_of: Model | None = None) -> Model:
    """The model lending T5, tokenizer and VAE to ``base_of``, which has none: $PIXART_BASE_MODEL, else PixArt-α
    1024; its errors name where it came from."""
    named = os.environ.get(BASE_MODEL_ENV)
    option = BASE_MODEL_ENV if named else "the base model"
    return Model(named or DEFAULT_MODEL, option=option, base_of=base_of)


def default_model() -> str:
    """The model used when --model is not given: $PIXART_MODEL, else the PixArt-α 1024 checkpoint."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def model_option(flag: str | None) -> str:
    """What names the model of a command, for its errors: --model when given, else $PIXART_MODEL when set."""
    return "--model" if flag is not None or not os.environ.get(MODEL_ENV) else MODEL_ENV


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_local(model: str) -> bool:
    """A folder that exists, or anything that cannot be a hub id ("owner/name"), is a local path."""
    return os.path.isdir(model) or not _HUB_ID.match(model)


class Model:
    """One model, a local diffusers folder or a Hugging Face id, read one component at a time.

    ``named_by``: the file whose meta names this model (no --model given). Such a model is trusted less: a hub
    id is loaded only from the local Hugging Face cache (never downloaded), and errors name the file.
    ``base_of``: the model this one lends its T5, tokenizer or VAE to (this is the base model); errors say so.
    ``option``: what named it otherwise (--model, $PIXART_MODEL, $PIXART_BASE_MODEL), which its errors name.
    """

    def __init__(
        self,
        model: str,
        revision: str | None = None,
        named_by: str | None = None,
        option: str = "--model",
        base_of: Model | None = None,
    ):
        self.option = option
        if not model.strip():
            raise PixartError(
                f"{naming(option, repr(model))}: the name is empty; give a diffusers model folder or a Hugging Face "
                f"id, or leave --model out (default: ${MODEL_ENV}, else {DEFAULT_MODEL})"
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
                        f"{base_of.lends()} from the base model: {BASE_MODEL_ENV}={model}: no such folder; "
                        f"set {BASE_MODEL_ENV} to a model folder or Hugging Face id that has them"
                    )
                if named_by is not None:
                    raise PixartError(
                        f"{named_by}: names the model folder {model}, which does not exist here; pass "
                        "--model with the model's folder or id"
                    )
                raise PixartError(f"{self.where}: no such folder; give a diffusers model folder or a Hugging Face id")
            if not (folder / "model_index.json").is_file():
                where = f"{named_by}: names the model folder {model}, which" if named_by else f"{self.where}:"
                raise PixartError(f"{where} is not a diffusers model folder (no model_index.json)")
            self.root = folder
        self._configs: dict[str, dict] = {}
        self._fitted: set[str] = set()
        self._base: Model | None = None

    @property
    def where(self) -> str:
        """How errors name this model: ``--model X``, ``PIXART_MODEL=X``, ``PIXART_BASE_MODEL=X``, or the file that
        named it (``the model X named by latents.pt``)."""
        if self.named_by is not None:
            return f"the model {self.id} named by {self.named_by}"
        return naming(self.option, self.id)

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
        return model_unavailable(self.id, error, self.named_by, reason, option=self.option)

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
            base = base_model(base_of=self)
            if base.id == self.id:
                raise PixartError(f"{self.where}: has no {component}/ and is itself the base model", EXIT_RUNTIME)
            self._base = base
        return self._base

    def file(self, relative: str) -> Path:
        """Local path of one file of the model, downloading it (once) for a hub id."""
        if self.local:
            path = self.root / relative
            if not path.is_file():
                raise PixartError(f"{self.where}: {relative} is missing; the model folder is incomplete", EXIT_RUNTIME)
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
            raise PixartError(f"{self.where}: cannot read {component}/ ({error.strerror})", EXIT_RUNTIME) from None
        if not any(name.endswith((".safetensors", ".bin", ".index.json")) for name in names):
            raise PixartError(
                f"{self.where}: {component}/ has no weights file ({WEIGHTS_FILES[component]} is missing); "
                "the model folder is incomplete: download it again",
                EXIT_RUNTIME,
            )
        for name in names:  # a sharded checkpoint's shards lie beside their index, never elsewhere
            if name.endswith(".index.json"):
                index = configs.read_json(folder / name, f"{component}/{name}", self.where)
                configs.shard_names(index, f"{component}/{name}", self.where)

    def check_fit(self, component: str) -> None:
        """A local component's config agrees with its safetensors headers (block counts, key shapes; an index's
        shards beside it), checked once, before a skeleton of it is built (configs.check_against_weights). Weights
        that are missing are refused where they load (check_weights); a hub model's are checked by its loader, its
        config being within bounds already."""
        holder = self.owner(component)
        if holder is not self:
            return holder.check_fit(component)
        if not self.local or component in self._fitted:
            return
        configs.check_files(self.root / component, component, self.where)
        if component == "tokenizer":
            self._fitted.add(component)
            return
        config = self.config(component)
        configs.check_against_weights(
            self.root / component, component, config, f"{component}/{_config_name(component)}", self.where
        )
        self._fitted.add(component)

    def config(self, component: str | None) -> dict:
        """A component's config.json (``None``: model_index.json), parsed."""
        holder = self if component is None else self.owner(component)
        if holder is not self:
            return holder.config(component)
        name = "model_index.json" if component is None else f"{component}/{_config_name(component)}"
        if name not in self._configs:
            # bounded in size and depth, and each field that sizes a skeleton within its bound (models/configs.py)
            config = configs.read_json(self.file(name), name, self.where)
            self._configs[name] = configs.check_config(component, config, name, self.where)
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
        unreachable = hub_unreachable()
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


def config_where(model: Model, component: str) -> str:
    """How a line names a component's config: ``--model X: transformer/config.json``."""
    return f"{model.owner(component).where}: {component}/{_config_name(component)}"


def model_for_file(flag: str | None, revision: str | None, meta: dict, path) -> Model:
    """The model a stage runs with: --model (and --revision) when given, else the one the input file ``path``
    names (trusted less: a hub id named by a file loads only from the local cache)."""
    if flag is not None:
        return Model(flag, revision)
    return Model(meta["model"], meta.get("revision") if revision is None else revision, named_by=str(path))


def _config_name(component: str) -> str:
    return {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}.get(component, "config.json")


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
                f"{holder.where}: {broken} is damaged (truncated or not safetensors); download the model again",
                EXIT_RUNTIME,
            ) from error
        raise PixartError(
            f"{holder.where}: cannot load {component}/ ({detail(error)}); the model folder may be "
            "damaged: download it again",
            EXIT_RUNTIME,
        ) from error


def _broken_weight_file(model: Model, component: str) -> str | None:
    """The first .safetensors file of a local component whose header or size is wrong, as 'component/file'."""
    model = model.owner(component)
    if not model.local:
        return None
    for path in sorted((model.root / component).glob("*.safetensors")):
        try:
            configs.read_header(path)  # every entry inside the file, of the bytes its shape needs
        except (OSError, ValueError):
            return f"{component}/{path.name}"
    return None
