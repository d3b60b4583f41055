"""The embedding cache: one embeddings file per (model, T5 config, prompt, settings), named by their hash.

Entries are untrusted files like any other: each is read through ``files.staged`` (bounded, validated) and then
checked against the current settings (model, dtype, token length, embedding width, prompt, negative prompt).
An entry that fails is encoded again and replaced; it never reaches an output. Each entry holds only its own
prompt's rows, and is written atomically under a unique temp name, so processes filling one cache at the same
time never leave a torn or mixed entry (the last complete write wins; both are valid).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from pixart_cli import record
from pixart_cli.errors import PixartError
from pixart_cli.files import staged
from pixart_cli.record import RunRecord


class EmbeddingCache:
    """``get(prompt)`` -> (embeds, mask, negative, negative mask), each [1, ...], or None; ``put`` stores one."""

    def __init__(
        self,
        folder,
        made: RunRecord,
        text_encoder: dict,
        dtype,
        log: Callable[[str], None] | None = None,
        option: str = "--cache",
    ):
        """made: the encode run's record (its key fields: record.CACHE_KEY); text_encoder: T5's config (part of the
        key; its d_model is the embedding width); dtype: the torch dtype; option: what named the folder (--cache,
        or the PIXART_CACHE environment variable), named in its errors."""
        from pixart_cli.models.source import naming

        if str(folder) == "":
            undo = "unset PIXART_CACHE" if option.isupper() else "leave --cache out"
            raise PixartError(f"{option}: the path is empty; give a folder (or {undo})")
        where = naming(option, folder)
        self.folder = Path(folder).expanduser()
        if self.folder.exists() and not self.folder.is_dir():
            raise PixartError(f"{where}: is a file, not a folder; give a folder (created if missing)")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise PixartError(f"{where}: cannot create it ({error.strerror})") from None
        if not self.folder.is_dir():
            raise PixartError(f"{where}: is not a folder")
        self.made = made
        self.key = record.cache_key(made, text_encoder)
        self.width = text_encoder.get("d_model")
        self.dtype = dtype
        self.log = log or (lambda message: None)

    def path(self, prompt: str) -> Path:
        key = json.dumps({**self.key, "prompt": prompt}, sort_keys=True)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def get(self, prompt: str):
        path = self.path(prompt)
        if not path.exists() and not path.is_symlink():
            return None
        try:
            entry = staged.load_embeddings(path)
            self._check(entry, prompt, path)
        except PixartError as error:
            self.log(f"cache: ignoring entry {path.name} ({str(error).removeprefix(f'{path}: ')}); encoding again")
            return None
        return tuple(tensor.clone() for tensor in entry.tensors().values())

    def _check(self, entry: staged.Embeddings, prompt: str, path: Path) -> None:
        meta = entry.meta
        expected = record.derive(self.made, record.CACHE_CHECKED)
        for key, value in expected.items():
            if meta.get(key) != value or type(meta.get(key)) is not type(value):
                raise PixartError(f"{path}: meta.{key} is {meta.get(key)!r}, not {value!r}")
        if meta.get("prompts") != [prompt]:
            raise PixartError(f"{path}: it holds another prompt")
        shape = (1, self.made.max_sequence_length)
        for tensor in (entry.prompt_embeds, entry.negative_prompt_embeds):
            if tuple(tensor.shape[:2]) != shape or (self.width is not None and tensor.shape[2] != self.width):
                raise PixartError(f"{path}: embeddings {list(tensor.shape)} do not fit [1, {shape[1]}, {self.width}]")
            if tensor.dtype != self.dtype:
                raise PixartError(f"{path}: embeddings are {tensor.dtype}, not {self.dtype}")

    def put(self, prompt: str, row: tuple) -> None:
        """Store one prompt's rows (cloned: a slice would keep the whole batch's storage). A cache that cannot be
        written is noted and skipped; the run goes on."""
        meta = record.embeddings_meta(self.made.replace(prompts=[prompt], family="cache"))
        tensors = [tensor.detach().cpu().clone() for tensor in row]
        try:
            staged.save(self.path(prompt), staged.Embeddings(*tensors, meta=meta), follow_link=False)
        except (PixartError, OSError) as error:
            self.log(f"cache: could not store an entry in {self.folder} ({error}); continuing without it")
