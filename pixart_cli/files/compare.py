"""Compare two runs: two embeddings files, two latents files, or two images.

Embeddings and latents are read only through files/kinds.py's validated loaders; images through its image reader.
For each prompt (embeddings) or image (latents): cosine similarity, max and mean absolute difference, all in
float64. For images: the same on pixel values 0-255, plus max and mean pixel difference and PSNR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pixart_cli import record
from pixart_cli.errors import PixartError
from pixart_cli.files import image_io, staged

STAT_KEYS = ("cosine", "max_abs_diff", "mean_abs_diff")
IMAGE_KEYS = ("max_pixel_diff", "mean_pixel_diff", "psnr")
# Values compared at a time (two images of 8192 x 8192 in blocks of rows: a few tens of MB beside the images)
COMPARE_BLOCK = 2**22


@dataclass
class Comparison:
    """Per-pair statistics of two files of one kind; ``pairs`` holds one dict per prompt or image."""

    kind: str  # "embeddings", "latents" or "image"
    a: str
    b: str
    pairs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "a": self.a, "b": self.b, "pairs": self.pairs, "notes": self.notes}


def compare_files(a: Path, b: Path) -> Comparison:
    """Compare two files of the same kind. Raises PixartError (exit 2) when they cannot be compared."""
    kinds = staged.file_kind(a), staged.file_kind(b)
    a, b = Path(a), Path(b)
    if "image" in kinds:
        if kinds[0] != kinds[1]:
            image, other = (a, b) if kinds[0] == "image" else (b, a)
            raise PixartError(
                f"{other}: cannot compare it with the image {image}; give two images, two embeddings "
                "files or two latents files"
            )
        return _compare_images(a, b)
    first, second = staged.load_any(a), staged.load_any(b)
    kinds = [("embeddings" if isinstance(x, staged.Embeddings) else "latents") for x in (first, second)]
    if kinds[0] != kinds[1]:
        raise PixartError(f"{b}: holds {kinds[1]} but {a} holds {kinds[0]}; compare two files of the same kind")
    if kinds[0] == "embeddings":
        return _compare_embeddings(a, b, first, second)
    return _compare_latents(a, b, first, second)


def _stats(x, y) -> dict:
    """cosine, max |x - y| and mean |x - y| of two same-shaped tensors, in float64."""
    x, y = x.double().flatten(), y.double().flatten()
    difference = (x - y).abs()
    norms = float(x.norm() * y.norm())
    if norms == 0.0:  # a zero vector: the same direction only if both are zero
        cosine = 1.0 if bool((x == y).all()) else 0.0
    else:
        cosine = float(x @ y) / norms
    return {
        "cosine": min(max(cosine, -1.0), 1.0),
        "max_abs_diff": float(difference.max()),
        "mean_abs_diff": float(difference.mean()),
    }


def _same_shape(a: Path, b: Path, what: str, shape_a, shape_b) -> None:
    if tuple(shape_a) != tuple(shape_b):
        raise PixartError(
            f"{b}: {what} {list(shape_b)} do not match {a}'s {list(shape_a)}; only runs of the same "
            "prompts, model and size can be compared"
        )


def _compare_embeddings(a: Path, b: Path, first, second) -> Comparison:
    """Per prompt, over the tokens either mask keeps (the transformer ignores padding)."""
    _same_shape(a, b, "prompt_embeds", first.prompt_embeds.shape, second.prompt_embeds.shape)
    result = Comparison("embeddings", str(a), str(b))
    if first.meta.get("model") != second.meta.get("model"):
        result.notes.append(f"different models: {first.meta.get('model')} and {second.meta.get('model')}")
    if first.meta.get("prompts") != second.meta.get("prompts"):
        result.notes.append("different prompts")
    for index in range(first.prompt_embeds.shape[0]):
        keep = (first.prompt_attention_mask[index] != 0) | (second.prompt_attention_mask[index] != 0)
        masks_equal = bool((first.prompt_attention_mask[index] != 0).eq(second.prompt_attention_mask[index] != 0).all())
        pair = {
            "index": index,
            "prompt": first.meta["prompts"][index],
            "tokens": int(keep.sum()),
            "masks_equal": masks_equal,
        }
        pair.update(_stats(first.prompt_embeds[index][keep], second.prompt_embeds[index][keep]))
        result.pairs.append(pair)
    keep = (first.negative_prompt_attention_mask[0] != 0) | (second.negative_prompt_attention_mask[0] != 0)
    negative = _stats(first.negative_prompt_embeds[0][keep], second.negative_prompt_embeds[0][keep])
    result.pairs.append(
        {
            "index": None,
            "prompt": "(negative prompt)",
            "tokens": int(keep.sum()),
            "masks_equal": bool(
                (first.negative_prompt_attention_mask[0] != 0).eq(second.negative_prompt_attention_mask[0] != 0).all()
            ),
            **negative,
        }
    )
    return result


def _compare_latents(a: Path, b: Path, first, second) -> Comparison:
    _same_shape(a, b, "latents", first.latents.shape, second.latents.shape)
    result = Comparison("latents", str(a), str(b))
    if first.meta.get("model") != second.meta.get("model"):
        result.notes.append(f"different models: {first.meta.get('model')} and {second.meta.get('model')}")
    for key in record.COMPARED:  # settings that change the result: a difference they explain is not a problem
        if first.meta.get(key) != second.meta.get(key):
            result.notes.append(f"different {key}: {first.meta.get(key)} and {second.meta.get(key)}")
    for index in range(first.latents.shape[0]):
        pair = {
            "index": index,
            "prompt": first.meta["prompts"][index] if index < len(first.meta.get("prompts") or []) else None,
            "seed": first.meta["seeds"][index],
        }
        pair.update(_stats(first.latents[index], second.latents[index]))
        result.pairs.append(pair)
    return result


def _compare_images(a: Path, b: Path) -> Comparison:
    """Pixel statistics summed exactly over blocks of rows (int64), so memory stays a small multiple of the two
    images (each bounded by image_io's pixel bounds) whatever their size."""
    import numpy as np

    first, second = image_io.load_image_pixels(a), image_io.load_image_pixels(b)
    if first.shape != second.shape:
        raise PixartError(
            f"{b}: is {second.shape[1]}x{second.shape[0]} but {a} is {first.shape[1]}x{first.shape[0]};"
            " only images of the same size can be compared"
        )
    dot = norm_a = norm_b = absolute = squared = 0
    largest = 0
    rows = max(1, COMPARE_BLOCK // (first.shape[1] * first.shape[2]))
    for start in range(0, first.shape[0], rows):
        x = first[start : start + rows].astype(np.int64)
        y = second[start : start + rows].astype(np.int64)
        difference = np.abs(x - y)
        dot += int((x * y).sum())
        norm_a += int((x * x).sum())
        norm_b += int((y * y).sum())
        absolute += int(difference.sum())
        squared += int((difference * difference).sum())
        largest = max(largest, int(difference.max()))
    count = first.size
    norms = math.sqrt(norm_a) * math.sqrt(norm_b)
    cosine = (1.0 if norm_a == norm_b == 0 else 0.0) if norms == 0 else dot / norms
    mse = squared / count
    # PSNR of 8-bit images; identical images have none (infinite), written as null.
    psnr = None if mse == 0 else 10 * math.log10(255.0**2 / mse)
    pair = {
        "index": 0,
        "cosine": min(max(cosine, -1.0), 1.0),
        "max_abs_diff": float(largest),
        "mean_abs_diff": absolute / count,
        "max_pixel_diff": largest,
        "mean_pixel_diff": absolute / count,
        "psnr": psnr,
    }
    return Comparison("image", str(a), str(b), [pair])


def format_table(comparison: Comparison) -> str:
    """Aligned rows for people: one per prompt or image."""
    image = comparison.kind == "image"
    columns = ["#", *([] if image else ["prompt"]), *STAT_KEYS, *(IMAGE_KEYS if image else ())]
    rows = []
    for pair in comparison.pairs:
        label = pair.get("prompt") or ""
        row = ["-" if pair["index"] is None else str(pair["index"])]
        if not image:
            row.append(label if len(label) <= 40 else label[:37] + "...")
        row += [f"{pair['cosine']:.6f}", f"{pair['max_abs_diff']:.6g}", f"{pair['mean_abs_diff']:.6g}"]
        if image:
            psnr = pair["psnr"]
            row += [
                str(pair["max_pixel_diff"]),
                f"{pair['mean_pixel_diff']:.4f}",
                "inf (identical)" if psnr is None else f"{psnr:.2f} dB",
            ]
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = [f"{comparison.kind}: {comparison.a} vs {comparison.b}"] + [f"note: {n}" for n in comparison.notes]
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"
