"""Charts drawn with PIL alone (matplotlib is not a dependency), in one place: the confusion matrix (the
TensorBoard handler's image), the reliability diagram (``eval --reliability``), the contact sheet of
images with captions (``suggest``) and the line chart with shaded spreads (``benchmarks.label_curve``)."""

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


# --------------------------------------------------------------------------- line chart (benchmarks.label_curve)

# Tableau's ten colours, the first eight: distinct for 8 series, also to most colour-blind readers with the markers
SERIES_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207))
MARKERS = ("circle", "square", "triangle", "diamond", "triangle_down", "hexagon", "pentagon", "triangle_side")
POLYGONS = {  # marker: (sides, rotation in degrees) of PIL's regular_polygon
    "square": (4, 0), "triangle": (3, 0), "diamond": (4, 45), "triangle_down": (3, 180), "hexagon": (6, 0), "pentagon": (5, 0), "triangle_side": (3, 90),
}
BAND_ALPHA = 56  # of 255: a series' band is its colour at this opacity over the white plot (overlapping bands blend)


def line_chart(
    x_labels: Sequence[str],
    series: dict[str, Sequence[float]],
    bands: dict[str, Sequence[tuple[float, float]]] | None = None,
    *,
    title: str,
    x_title: str,
    y_title: str,
    subtitle: str = "",
    footer: str = "",
) -> Image.Image:
    """One line with markers per series over categorical x positions (evenly spaced, in the given order),
    each with an optional shaded band (low, high) per point in its colour. A NaN value (or band) is a
    missing point: not drawn, and the line breaks there instead of falling to 0. Deterministic: the same
    input gives the same pixels (and PNG bytes)."""
    if len(series) > len(SERIES_COLOURS):
        raise ValueError(f"{len(series)} series: at most {len(SERIES_COLOURS)} have distinct colours")
    for name, values in series.items():
        if len(values) != len(x_labels) or (bands and name in bands and len(bands[name]) != len(x_labels)):
            raise ValueError(f"series {name!r}: one value (and band) per x position ({len(x_labels)}) expected")
    bands = bands or {}
    font, small = _font(13), _font(11)
    legend_w = 190
    left, right, top, bottom = 64, legend_w + 16, 58 if subtitle else 40, 66 if footer else 50
    plot_w, plot_h = 480, 320
    image = Image.new("RGB", (left + plot_w + right, top + plot_h + bottom), "white")
    draw = ImageDraw.Draw(image)
    lo, hi, step = _value_axis([v for vs in series.values() for v in vs] + [v for bs in bands.values() for b in bs for v in b])

    def px(i: float, value: float) -> tuple[float, float]:
        return left + (i + 0.5) * plot_w / max(len(x_labels), 1), top + (hi - value) / (hi - lo) * plot_h

    ticks = np.arange(lo, hi + step / 2, step)
    for t in ticks:
        y = px(0, t)[1]
        draw.line([(left, y), (left + plot_w, y)], fill=GRID)
        draw.text((left - 6, y), f"{t:g}", fill=AXIS, font=small, anchor="rm")
    for i, label in enumerate(x_labels):
        x = px(i, lo)[0]
        draw.line([(x, top + plot_h), (x, top + plot_h + 4)], fill=AXIS)
        draw.text((x, top + plot_h + 7), str(label), fill=AXIS, font=small, anchor="mt")

    for colour, name in zip(SERIES_COLOURS, series):
        if name not in bands:
            continue
        overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
        shade = ImageDraw.Draw(overlay)
        for run in _finite_runs([b[0] + b[1] for b in bands[name]]):
            upper = [px(i, max(bands[name][i])) for i in run]
            lower = [px(i, min(bands[name][i])) for i in reversed(run)]
            if len(run) == 1:  # a lone point: a short bar the width of a marker
                (x, y0), (_, y1) = upper[0], lower[0]
                shade.rectangle([x - 6, y0, x + 6, y1], fill=(*colour, BAND_ALPHA))
            else:
                shade.polygon(upper + lower, fill=(*colour, BAND_ALPHA))
        image.paste(Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB"))
    draw = ImageDraw.Draw(image)
    for colour, marker, values in zip(SERIES_COLOURS, MARKERS, series.values()):
        for run in _finite_runs(values):
            points = [px(i, values[i]) for i in run]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2, joint="curve")
            for x, y in points:
                _marker(draw, marker, x, y, colour)

    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=AXIS)
    draw.text((left + plot_w / 2, 12), title, fill=AXIS, font=font, anchor="mt")
    if subtitle:
        draw.text((left + plot_w / 2, 32), subtitle, fill=AXIS, font=small, anchor="mt")
    draw.text((left + plot_w / 2, top + plot_h + 26), x_title, fill=AXIS, font=font, anchor="mt")
    label = _rotated_text(y_title, font)
    image.paste(label, (8, int(top + plot_h / 2 - label.height / 2)))
    for k, (colour, marker, name) in enumerate(zip(SERIES_COLOURS, MARKERS, series)):
        x, y = left + plot_w + 16, top + 10 + 20 * k
        draw.line([(x, y), (x + 24, y)], fill=colour, width=2)
        _marker(draw, marker, x + 12, y, colour)
        draw.text((x + 32, y), fit(draw, name, small, legend_w - 40), fill=AXIS, font=small, anchor="lm")
    if footer:
        draw.text((8, image.height - 8), fit(draw, footer, small, image.width - 16), fill=(90, 90, 90), font=small, anchor="ld")
    return image


def _value_axis(values: Sequence[float]) -> tuple[float, float, float]:
    """(low, high, step) of the y axis: round steps (1, 2, 2.5 or 5 times a power of ten), 3 to 8 of them,
    covering every finite value with a little room; 0..100 when there is none."""
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return 0.0, 100.0, 20.0
    lo, hi = min(finite), max(finite)
    room = max((hi - lo) * 0.05, 0.5)
    lo, hi = lo - room, hi + room
    magnitude = 10.0 ** np.floor(np.log10((hi - lo) / 8))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if (hi - lo) / (m * magnitude) <= 8)
    return float(np.floor(lo / step) * step), float(np.ceil(hi / step) * step), float(step)


def _finite_runs(values: Sequence[float]) -> list[list[int]]:
    """Indices of the finite values, in runs of neighbours: a NaN splits the line."""
    runs: list[list[int]] = []
    for i, v in enumerate(values):
        if not np.isfinite(v):
            continue
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _marker(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, colour: tuple[int, int, int], r: float = 4.5) -> None:
    """A filled marker with a white edge, centred on (x, y)."""
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline="white")
        return
    sides, rotation = POLYGONS[shape]
    draw.regular_polygon((x, y, r * (1.6 if sides == 3 else 1.3)), sides, rotation=rotation, fill=colour, outline="white")


# --------------------------------------------------------------------------- CTAugment policy heatmap

POLICY_CELL = (30, 18)  # (width, height) of one bin's cell
POLICY_LINE, POLICY_EMPTY_TEXT = (205, 205, 205), (150, 150, 150)


def policy_heatmap(names: Sequence[str], grid: np.ndarray, title: str = "CTAugment policy") -> Image.Image:
    """CTAugment's learned policy: one row per op parameter (named on the left), one cell per magnitude bin,
    shaded from white (probability 0: the bin is never drawn) to dark blue at **the row's largest
    probability**, so a parameter with 6 bins reads like one with 17; each used cell shows its probability
    in percent. Cells past a parameter's last bin (NaN in ``grid``) are left as background, without a frame.
    Deterministic: the same input gives the same pixels (and PNG bytes)."""
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 2 or grid.shape[0] != len(names):
        raise ValueError(f"policy grid of shape {grid.shape} for {len(names)} parameter names: expected ({len(names)}, bins)")
    if np.any(grid[~np.isnan(grid)] < 0):
        raise ValueError("policy grid has negative probabilities: expected probabilities in [0, 1] (NaN past a parameter's bins)")
    cw, ch = POLICY_CELL
    font, small = _font(13), _font(10)
    labels = [_short(str(n)) for n in names]
    pad = 8
    left = pad + max([_text_size(small, s)[0] for s in labels] + [0]) + pad
    top, legend_h = 52, 44
    rows, bins = grid.shape
    image = Image.new("RGB", (left + bins * cw + pad, top + rows * ch + legend_h), "white")
    draw = ImageDraw.Draw(image)
    draw.text((image.width // 2, pad), title, fill=AXIS, font=font, anchor="mt")
    draw.text((left + bins * cw // 2, top - 20), "magnitude bin (low to high)", fill=AXIS, font=small, anchor="mb")
    for b in range(bins):
        draw.text((left + b * cw + cw // 2, top - 4), str(b), fill=AXIS, font=small, anchor="mb")
    for r, (label, row) in enumerate(zip(labels, grid)):
        y = top + r * ch
        draw.text((left - pad, y + ch // 2), label, fill=AXIS, font=small, anchor="rm")
        used = ~np.isnan(row)
        peak = float(row[used].max()) if used.any() else 0.0
        for b in np.flatnonzero(used):
            share = float(row[b]) / peak if peak > 0 else 0.0
            colour = tuple(int(v) for v in (LOW + (HIGH - LOW) * share).round())
            box = [left + b * cw, y, left + (b + 1) * cw - 1, y + ch - 1]
            draw.rectangle(box, fill=colour, outline=POLICY_LINE)
            if row[b] > 0:
                text = f"{100 * row[b]:.0f}" if row[b] >= 0.005 else "<1"
                draw.text((box[0] + cw // 2, y + ch // 2), text, fill=(255, 255, 255) if share > 0.5 else AXIS, font=small, anchor="mm")
    # legend: the shade scale, then what the numbers and blanks mean
    y = top + rows * ch + 10
    bar_w = 120
    for x in range(bar_w):
        colour = tuple(int(v) for v in (LOW + (HIGH - LOW) * x / (bar_w - 1)).round())
        draw.line([(left + x, y), (left + x, y + 10)], fill=colour)
    draw.rectangle([left, y, left + bar_w - 1, y + 10], outline=POLICY_LINE)
    draw.text((left - 4, y + 5), "0", fill=AXIS, font=small, anchor="rm")
    draw.text((left + bar_w + 4, y + 5), "row's max", fill=AXIS, font=small, anchor="lm")
    draw.text((left, y + 16), "numbers: probability of the bin (%); white: never drawn", fill=POLICY_EMPTY_TEXT, font=small, anchor="lt")
    return image
