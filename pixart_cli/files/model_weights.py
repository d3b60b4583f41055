"""A model folder's weights files, read without trusting them: safetensors headers through safetensors' own checks
(``pread``, no memory map)."""

from __future__ import annotations

from pixart_cli.errors import EXIT_RUNTIME, PixartError, detail


def open_safetensors(path):
    """``safetensors.safe_open`` through ``pread`` where this safetensors has it (0.8 on): a memory map would count
    every page read in this process's RSS."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:  # an older safetensors: no backend argument
        return safe_open(str(path), framework="pt")


def safetensors_header(path, what: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype code, shape) of one safetensors file, in the order of its data, from its header only
    (safetensors bounds the header and checks that its offsets cover the file exactly); ``what`` names the file."""
    from safetensors import SafetensorError

    try:
        with open_safetensors(path) as handle:
            names = handle.offset_keys() if hasattr(handle, "offset_keys") else handle.keys()
            entries = {}
            for name in names:
                view = handle.get_slice(name)
                entries[name] = (view.get_dtype(), tuple(int(n) for n in view.get_shape()))
            return entries
    except (SafetensorError, OSError, ValueError) as error:
        raise PixartError(
            f"{what} is damaged (truncated or not safetensors: {detail(error)}); download the model again",
            EXIT_RUNTIME,
        ) from error
