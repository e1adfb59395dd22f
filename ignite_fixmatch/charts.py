"""Charts drawn with PIL alone (matplotlib is not a dependency), in one place: the confusion matrix (the
TensorBoard handler's image), the reliability diagram (``eval --reliability``) and the contact sheet of
images with captions (``suggest``)."""

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


# --------------------------------------------------------------------------- reliability diagram

BAR, BAR_EDGE, GAP, DIAGONAL, AXIS, GRID = (70, 130, 180), (40, 80, 120), (220, 60, 60, 110), (110, 110, 110), (0, 0, 0), (228, 228, 228)


def reliability_image(
    counts: Sequence[int], confidence: Sequence[float | None], accuracy: Sequence[float | None], ece: float, title: str
) -> Image.Image:
    """The reliability diagram of equal-width confidence bins: accuracy per bin (bars), the gap to the bin's
    mean confidence (shaded), the diagonal of perfect calibration and each bin's image count, with the ECE
    (a fraction) in the title."""
    size, left, right, top, bottom = 440, 62, 22, 56, 70
    image = Image.new("RGB", (left + size + right, top + size + bottom), "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=13), ImageFont.load_default(size=10)

    def px(x: float, y: float) -> tuple[float, float]:
        return left + x * size, top + (1 - y) * size

    for t in (0.2, 0.4, 0.6, 0.8):
        draw.line([px(t, 0), px(t, 1)], fill=GRID)
        draw.line([px(0, t), px(1, t)], fill=GRID)
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    shade = ImageDraw.Draw(overlay)
    n = len(counts)
    for b, (count, conf, acc) in enumerate(zip(counts, confidence, accuracy)):
        x0, x1 = b / n, (b + 1) / n
        cx = px((x0 + x1) / 2, 0)[0]
        draw.text((cx, top + size + 22), _short_count(count), fill=AXIS, font=small, anchor="mt")
        if not count or conf is None or acc is None:
            continue
        draw.rectangle([px(x0, acc), px(x1, 0)], fill=BAR, outline=BAR_EDGE)
        lo, hi = sorted((acc, conf))
        shade.rectangle([px(x0, hi), px(x1, lo)], fill=GAP)
    image.paste(Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB"))
    draw = ImageDraw.Draw(image)
    for i in range(0, 40, 2):  # dashed diagonal
        draw.line([px(i / 40, i / 40), px((i + 1) / 40, (i + 1) / 40)], fill=DIAGONAL, width=2)
    draw.rectangle([px(0, 1), px(1, 0)], outline=AXIS)
    for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        draw.text((px(t, 0)[0], top + size + 5), f"{t:.1f}", fill=AXIS, font=small, anchor="mt")
        draw.text((left - 5, px(0, t)[1]), f"{t:.1f}", fill=AXIS, font=small, anchor="rm")
    draw.text((left - 5, top + size + 22), "n", fill=AXIS, font=small, anchor="rt")
    draw.text((left + size / 2, top + size + 40), "confidence (max probability)", fill=AXIS, font=font, anchor="mt")
    draw.text((left + size / 2, 14), f"{title}", fill=AXIS, font=font, anchor="mt")
    draw.text((left + size / 2, 34), f"ECE ({n} bins): {100 * ece:.2f} %, {sum(counts)} images", fill=AXIS, font=font, anchor="mt")
    label = Image.new("RGB", (120, 16), "white")
    ImageDraw.Draw(label).text((60, 8), "accuracy", fill=AXIS, font=font, anchor="mm")
    image.paste(label.rotate(90, expand=True), (8, int(top + size / 2 - 60)))
    for i, (colour, text) in enumerate(((BAR, "accuracy"), ((235, 160, 160), "gap to mean confidence"), (DIAGONAL, "perfect calibration"))):
        y = top + 8 + 16 * i
        draw.rectangle([left + 8, y, left + 20, y + 10], fill=colour)
        draw.text((left + 26, y + 5), text, fill=AXIS, font=small, anchor="lm")
    return image


def _short_count(count: int) -> str:
    """A bin's image count in at most 4 characters (the bins are 29 px wide)."""
    if count < 10_000:
        return str(count)
    return f"{count / 1000:.0f}k" if count < 1_000_000 else f"{count / 1e6:.0f}M"


# --------------------------------------------------------------------------- contact sheet


def contact_sheet(images: Sequence[np.ndarray], captions: Sequence[str], columns: int = 8, min_side: int = 96) -> Image.Image:
    """The images in order, scaled up (nearest) to at least ``min_side`` pixels, each with its caption below."""
    h, w = images[0].shape[:2]
    scale = max(1, -(-min_side // max(h, w)))
    tile_w, tile_h, text_h, gap = w * scale, h * scale, 28, 4
    cols = min(columns, len(images))
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * (tile_w + gap) + gap, rows * (tile_h + text_h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for k, (array, caption) in enumerate(zip(images, captions)):
        x = gap + (k % cols) * (tile_w + gap)
        y = gap + (k // cols) * (tile_h + text_h + gap)
        img = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).convert("RGB")
        sheet.paste(img.resize((tile_w, tile_h), Image.Resampling.NEAREST), (x, y))
        for line_no, line in enumerate(caption.split("\n")[:2]):
            draw.text((x + 1, y + tile_h + 1 + 13 * line_no), fit(draw, line, font, tile_w), fill=(0, 0, 0), font=font)
    return sheet


def fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
