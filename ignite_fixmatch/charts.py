"""Charts drawn with PIL alone (matplotlib is not a dependency): the confusion matrix as an RGB image.

Used by the TensorBoard handler (``add_image``); any logger that takes an image can use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TARGET_SIDE = 800  # pixels of the matrix itself: cells shrink as classes grow, within CELL_RANGE
CELL_RANGE = (4, 40)
MIN_CELL_FOR_COUNTS = 20  # smaller cells (more than 40 classes) are drawn without numbers
MAX_LABEL_CHARS = 24
LOW, HIGH, EMPTY = np.array([247, 251, 255]), np.array([8, 48, 107]), np.array([225, 225, 225])  # white to dark blue; grey: no images


def confusion_matrix_image(matrix: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """(H, W, 3) uint8: rows are true classes, columns predicted ones, each cell shaded by its share of
    its row (so a rare class reads like a common one) and, for up to about 40 classes, showing its count.
    Class names label both axes (in a small font for many classes)."""
    counts = np.asarray(matrix, dtype=np.int64)
    n = len(classes)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {counts.shape} for {n} classes: expected ({n}, {n})")
    cell = int(np.clip(TARGET_SIDE // max(n, 1), *CELL_RANGE))
    label_font = _font(int(np.clip(cell * 0.6, 7, 14)))
    names = [_short(str(c)) for c in classes]
    label_w = max(_text_size(label_font, s)[0] for s in names)
    label_h = max(_text_size(label_font, s)[1] for s in names)
    upright = label_w <= cell - 2  # short names (digits): column labels read horizontally, above their column
    title_font = _font(14)
    title_h = _text_size(title_font, "predicted")[1]
    pad = 6
    left = title_h + 2 * pad + label_w + pad  # "true" (rotated), names, gap
    top = title_h + 2 * pad + (label_h if upright else label_w) + pad  # "predicted", column names, gap
    side = n * cell
    canvas = Image.new("RGB", (left + side + pad, top + side + pad), (255, 255, 255))
    canvas.paste(Image.fromarray(_cells(counts, cell)), (left, top))
    draw = ImageDraw.Draw(canvas)

    draw.text((left + side // 2, pad), "predicted", fill=(0, 0, 0), font=title_font, anchor="mt")
    true_title = _rotated_text("true", title_font)
    canvas.paste(true_title, (pad, top + side // 2 - true_title.height // 2))
    for i, name in enumerate(names):
        centre = i * cell + cell // 2
        draw.text((left - pad, top + centre), name, fill=(0, 0, 0), font=label_font, anchor="rm")  # row: true class
        if upright:  # column: predicted class
            draw.text((left + centre, top - pad), name, fill=(0, 0, 0), font=label_font, anchor="mb")
        else:
            column = _rotated_text(name, label_font)
            canvas.paste(column, (left + centre - column.width // 2, top - pad - column.height))

    if cell >= MIN_CELL_FOR_COUNTS:
        count_font = _font(int(np.clip(cell * 0.35, 8, 14)))
        shares = _row_shares(counts)
        for (r, c), value in np.ndenumerate(counts):
            colour = (255, 255, 255) if shares[r, c] > 0.5 else (0, 0, 0)
            draw.text((left + c * cell + cell // 2, top + r * cell + cell // 2), str(value), fill=colour, font=count_font, anchor="mm")
    return np.asarray(canvas, dtype=np.uint8)


def _row_shares(counts: np.ndarray) -> np.ndarray:
    rows = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros(counts.shape, dtype=np.float64), where=rows > 0)


def _cells(counts: np.ndarray, cell: int) -> np.ndarray:
    """The shaded grid, one cell of ``cell`` pixels per entry, with a one-pixel white border when cells are large."""
    shares = _row_shares(counts)[..., None]
    rgb = LOW + (HIGH - LOW) * shares
    rgb[counts.sum(axis=1) == 0] = EMPTY
    grid = np.repeat(np.repeat(rgb.round().astype(np.uint8), cell, axis=0), cell, axis=1)
    if cell >= 12:
        grid[::cell, :] = 255
        grid[:, ::cell] = 255
    return grid


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's bundled font at ``size`` pixels (its fixed-size bitmap font where FreeType is missing)."""
    return ImageFont.load_default(size=size)


def _text_size(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return int(right - left), int(bottom - top)


def _rotated_text(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> Image.Image:
    """``text`` reading upward (rotated 90 degrees), black on white."""
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGB", (max(1, int(right - left)), max(1, int(bottom - top))), (255, 255, 255))
    ImageDraw.Draw(image).text((-left, -top), text, fill=(0, 0, 0), font=font)
    return image.rotate(90, expand=True)


def _short(name: str) -> str:
    return name if len(name) <= MAX_LABEL_CHARS else name[: MAX_LABEL_CHARS - 1] + "…"
