"""Image output: [-1, 1] tensors to uint8, and labelled sample grids as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from runtime.files import atomic_write

LABEL_CHARS = 24


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 1, H, W] in [-1, 1] -> uint8 [N, H, W]."""
    scaled = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).squeeze(1).cpu().numpy()


def grid_image(rows: Sequence[np.ndarray], labels: Sequence[str], scale: int = 2) -> Image.Image:
    """One row of digits per label ([N, H, W] uint8 each), the label written at the left."""
    size = rows[0].shape[-1] * scale
    label_width = 7 * min(LABEL_CHARS, max(len(label) for label in labels)) + 8
    width = label_width + size * max(len(r) for r in rows)
    canvas = Image.new("L", (width, size * len(rows)), color=255)
    draw = ImageDraw.Draw(canvas)
    for i, (row, label) in enumerate(zip(rows, labels)):
        text = label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "~"
        draw.text((4, i * size + size // 2 - 5), text, fill=0)
        for j, digit in enumerate(row):
            tile = Image.fromarray(digit).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label_width + j * size, i * size))
    return canvas


def save_grid(rows: Sequence[np.ndarray], labels: Sequence[str], path: Path) -> None:
    """Write the grid atomically as PNG."""
    image = grid_image(rows, labels)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def save_images(images: np.ndarray, names: Sequence[str], folder: Path) -> None:
    """Each uint8 [H, W] image as its own PNG, ``folder / name``, written atomically."""
    for image, name in zip(images, names, strict=True):
        atomic_write(folder / name, partial(Image.fromarray(image).save, format="PNG"))
