"""Images: writing them with their metadata (PNG text chunk, EXIF, A1111 parameters) on writer threads, and
reading source images for image to image, bounded before decoding."""

from __future__ import annotations

import io
import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixart_cli.errors import PixartError, bad_file, detail
from pixart_cli.files.atomic import STDOUT, atomic_path, is_stdout, json_safe, plain, write_stdout
from pixart_cli.files.untrusted import empty_path_error, open_input, plain_meta, read_at_most
from pixart_cli.signals import GUARD

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


_EXIF_IFD, _USER_COMMENT, _IMAGE_DESCRIPTION = 0x8769, 0x9286, 0x010E


def image_format(path: Path, option: str = "--output") -> str:
    """PIL format name for an output path's extension."""
    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise PixartError(
            f"{option} {path}: unknown image type {Path(path).suffix or '(none)'}; use .png, .jpg or .webp"
        )
    return fmt


def save_image(path, image, parameters: str, settings: dict, overwrite: bool = True) -> Path:
    """Write an image atomically (``-``: PNG bytes to stdout), its format chosen by the extension, with the
    generation settings inside.

    PNG: an A1111-style "parameters" text chunk and a "pixart" chunk with every setting as JSON.
    JPEG/WebP: the same two in EXIF (UserComment, as A1111 writes it, and ImageDescription).
    """
    fmt = "PNG" if is_stdout(path) else image_format(path)
    settings_json = json.dumps(json_safe(plain(settings)), sort_keys=True)
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", parameters)
        info.add_text("pixart", settings_json)
        extra = {"pnginfo": info}
    else:
        from PIL import Image

        exif = Image.Exif()
        exif[_IMAGE_DESCRIPTION] = settings_json
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
        extra = {"exif": exif.tobytes(), "quality": 95}
    if is_stdout(path):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **extra)
        write_stdout(buffer.getvalue())
        return Path(STDOUT)
    with atomic_path(path, overwrite, follow_link=True) as temp:
        image.save(temp, format=fmt, **extra)
    return Path(path)


# Images encoded at once: PNG's zlib and libjpeg release the GIL, so several threads write several images at a
# time (32 PNGs at 1024² took ~6 s one by one on the benchmark machine).
IMAGE_WRITERS = 8


def save_images(images: list[tuple], overwrite: bool = True, on_written=None) -> list[Path]:
    """Write several images as ``save_image`` does, ``(path, image, parameters, settings)`` each, encoded in
    parallel threads. ``on_written(index, path)`` is called in order, in this thread, as each is in place.

    On a failure or a signal, images not yet started are not written, the ones being written finish, and every
    image in place is still reported before the error goes on, so a failure can say truthfully what was written.
    """
    if len(images) <= 1 or any(is_stdout(item[0]) for item in images):
        paths = []
        for index, item in enumerate(images):
            with GUARD.deferred():  # placed and reported together
                paths.append(save_image(*item, overwrite=overwrite))
                if on_written is not None:
                    on_written(index, paths[-1])
        return paths
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(min(IMAGE_WRITERS, len(images)), thread_name_prefix="image-write")
    futures = []
    reported = 0  # images whose report has been made (or begun): each is reported once, never twice
    try:
        with GUARD.deferred():  # every image handed to a writer has its future here (a signal inside submit()
            for item in images:  # could leave one queued, then written and never reported)
                futures.append(pool.submit(save_image, *item, overwrite=overwrite))
        for index, future in enumerate(futures):
            path = future.result()
            with GUARD.deferred():  # a signal waits for the report (path and manifest line) to be whole
                reported = index + 1  # begun: a report that fails part-way (stdout lost) is not made twice
                if on_written is not None:
                    on_written(index, path)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        for index in range(reported, len(futures)):
            future = futures[index]
            if on_written is not None and future.done() and not future.cancelled() and future.exception() is None:
                try:
                    with GUARD.deferred():
                        on_written(index, future.result())
                except Exception:  # the failure under way is the one to tell
                    break
        raise
    pool.shutdown()
    return [future.result() for future in futures]


def read_image_metadata(path: Path) -> dict:
    """{"parameters": str | None, "settings": dict | None, "format", "size"} of an image pixart wrote."""
    from PIL import Image, UnidentifiedImageError

    handle, size_on_disk = open_input(path)
    if size_on_disk == 0:
        handle.close()
        raise bad_file(path, "is empty (0 bytes); the command that wrote it may have failed: run it again")
    try:
        with handle, opened_image(handle, size_on_disk, str(path)) as image:
            image.load()  # the pixels too: a truncated or damaged file fails here, not only a bad header
            fmt, size = image.format, list(image.size)
            if fmt == "PNG":
                parameters, settings = image.text.get("parameters"), image.text.get("pixart")
            else:
                exif = image.getexif()
                settings = exif.get(_IMAGE_DESCRIPTION)
                comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
                parameters = (
                    comment[8:].decode("utf-16-be", "replace")
                    if isinstance(comment, bytes) and comment.startswith(b"UNICODE")
                    else comment
                )
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise bad_file(path, image_problem(error)) from None
    try:
        settings = plain_meta(path, json.loads(settings)) if isinstance(settings, (str, bytes)) else None
    except (ValueError, RecursionError, PixartError):  # not JSON, too deep or too big: another program's, not ours
        settings = None
    if not isinstance(parameters, str):
        parameters = None
    return {"format": fmt, "size": size, "parameters": parameters, "settings": settings}


@dataclass(frozen=True)
class SourceImage:
    """An image to start from (image to image): RGB pixels, upright as its EXIF orientation says, and the
    file's name and sha256, which the outputs record."""

    path: Path
    sha256: str
    pixels: Any  # PIL.Image.Image, mode RGB (a mask: L)
    option: str = "IMAGE"  # the argument that named it (IMAGE, --image, --mask): errors about the image name it

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.pixels.size

    def record(self) -> dict:
        return {"name": self.name, "sha256": self.sha256}


# A source image larger than this on disk is refused before it is read (PIL refuses decompression bombs itself).
MAX_SOURCE_IMAGE_BYTES = 256 * 2**20


def read_source_image(path, option: str = "IMAGE", mode: str = "RGB") -> SourceImage:
    """Read and decode an image file whole (a damaged or truncated one fails here, before any model loads).
    Untrusted like any input: only a regular file, bounded in size, decoded by PIL within its pixel limit.
    ``mode``: the PIL mode it is converted to (an inpainting mask: "L", from any mode)."""
    import hashlib

    from PIL import ImageOps

    if str(path) == "":
        raise empty_path_error(option)
    try:
        handle, size = open_input(path, option)
    except PixartError as error:  # the line names the option too: "--image x.png: no such file"
        raise PixartError(f"{option} {error}", error.exit_code) from None
    with handle:
        if size == 0:
            raise PixartError(f"{option} {path}: is empty (0 bytes); give a .png, .jpg or .webp file")
        if size > MAX_SOURCE_IMAGE_BYTES:
            raise PixartError(
                f"{option} {path}: {size} bytes is beyond the {MAX_SOURCE_IMAGE_BYTES // 2**20} MiB "
                "pixart reads as a source image; give a smaller .png, .jpg or .webp file"
            )
        data = read_at_most(handle, MAX_SOURCE_IMAGE_BYTES, size)
    try:
        with opened_image(io.BytesIO(data), size, f"{option} {path}") as image:
            # as diffusers.utils.load_image: upright per EXIF, then RGB (alpha dropped, palettes expanded)
            pixels = ImageOps.exif_transpose(image).convert(mode)
    except PixartError:
        raise
    except Exception as error:
        raise PixartError(f"{option} {path}: {image_problem(error)}; give a .png, .jpg or .webp file") from None
    return SourceImage(Path(path), hashlib.sha256(data).hexdigest(), pixels, option)


def load_image_pixels(path: Path):
    """An image's pixels as a uint8 array [H, W, 3] (RGB), for comparing; any unreadable file is one line."""
    import numpy as np

    handle, size = open_input(path)  # regular files and standard input only, as every input
    try:
        with handle, opened_image(handle, size, str(path)) as image:
            return np.asarray(image.convert("RGB"))
    except PixartError:
        raise
    except Exception as error:
        raise bad_file(path, image_problem(error)) from None


# Every image pixart reads (encode-image, generate --image, compare, info) is decoded only within these bounds, read
# from its header first. Up to FREE_IMAGE_PIXELS (4x the native side of a 1024 px model) whatever the file's size;
# beyond, up to MAX_IMAGE_PIXELS (4x the side of a 2048 px model), only with at least one byte of file for every
# MAX_PIXELS_PER_BYTE pixels: photos hold far more, while a decompression bomb (a 20 KB PNG of 13000 x 13000)
# holds far less. PIL's own bomb limits (a warning from 89 M pixels, an error from 179 M) are never reached.
FREE_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_PIXELS_PER_BYTE = 64


def check_image_size(where: str, width: int, height: int, file_size: int) -> None:
    """Refuse, before decoding, an image larger than the bounds above allow for its file's size."""
    pixels = width * height
    if pixels <= FREE_IMAGE_PIXELS:
        return
    if pixels > MAX_IMAGE_PIXELS:
        reason = f"beyond the {MAX_IMAGE_PIXELS:,} pixels pixart decodes"
    elif pixels > file_size * MAX_PIXELS_PER_BYTE:
        reason = (
            f"{pixels / max(file_size, 1):,.0f} pixels per byte of its {file_size:,}-byte file, beyond the "
            f"{MAX_PIXELS_PER_BYTE} pixart decodes above {FREE_IMAGE_PIXELS:,} pixels (a decompression bomb)"
        )
    else:
        return
    raise PixartError(
        f"{where}: its header says {width}x{height} ({pixels:,} pixels), {reason}; scale it down first "
        f"(at most {int(FREE_IMAGE_PIXELS**0.5)}x{int(FREE_IMAGE_PIXELS**0.5)} always works)"
    )


@contextmanager
def opened_image(handle, file_size: int, where: str):
    """``PIL.Image.open`` of an image file, its size checked from the header before anything is decoded
    (``check_image_size``). PIL's own pixel limit is lifted while the header is read (ours is stricter and comes
    right after), and PIL's warnings while the image is open (a decompression bomb, damaged EXIF data) are not
    shown: our check is the one line, and an image with damaged EXIF data is read as it is (upright as far as its
    orientation tag can be read)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\..*")
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(handle)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        with image:
            check_image_size(where, image.width, image.height, file_size)
            yield image


def image_problem(error: Exception) -> str:
    """Why PIL could not read an image, for a line that names the file already: PIL's own text names the file
    object it was given (``<_io.BytesIO object at 0x...>``), which says nothing to a user."""
    import re

    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image pixart can read (PIL does not recognise its format)"
    reason = re.sub(r"\s*<[^<>]*>", "", detail(error)).strip(" :") or type(error).__name__
    return f"not an image pixart can read ({reason[:120]})"
