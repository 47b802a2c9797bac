"""Line plots drawn with PIL: the suite plots loss curves and metrics without matplotlib."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

# Distinct on white, in the order series are drawn.
COLOURS = (
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (23, 190, 207),
    (188, 189, 34),
)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    size: tuple[int, int] = (640, 400),
    log_y: bool = False,
) -> Image.Image:
    """One line per ``series`` entry (name -> (xs, ys)), with axes, tick labels, a legend and
    ``title``; non-finite points are skipped. ``log_y`` plots log10 of positive values."""
    width, height = size
    left, right, top, bottom = 60, 150, 24, 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def transform(y: float) -> float:
        return math.log10(y) if log_y else y

    points = {
        name: [
            (float(x), transform(float(y)))
            for x, y in zip(xs, ys, strict=True)
            if math.isfinite(y) and (not log_y or y > 0)
        ]
        for name, (xs, ys) in series.items()
    }
    every = [point for line in points.values() for point in line]
    if not every:
        draw.text((left, top), title + " (no data)", fill="black")
        return image
    x_low, x_high = min(p[0] for p in every), max(p[0] for p in every)
    y_low, y_high = min(p[1] for p in every), max(p[1] for p in every)
    if x_high == x_low:
        x_high = x_low + 1
    if y_high == y_low:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    margin = 0.05 * (y_high - y_low)
    y_low, y_high = y_low - margin, y_high + margin
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x_low) / (x_high - x_low) * plot_w,
            top + (1 - (y - y_low) / (y_high - y_low)) * plot_h,
        )

    draw.rectangle((left, top, left + plot_w, top + plot_h), outline="black")
    for y in _ticks(y_low, y_high):
        _, pixel_y = to_pixel(x_low, y)
        label = f"{10**y:.3g}" if log_y else f"{y:.3g}"
        draw.line((left - 4, pixel_y, left, pixel_y), fill="black")
        draw.text((2, pixel_y - 6), label, fill="black")
    for x in _ticks(x_low, x_high):
        pixel_x, _ = to_pixel(x, y_low)
        draw.line((pixel_x, top + plot_h, pixel_x, top + plot_h + 4), fill="black")
        draw.text((pixel_x - 10, top + plot_h + 8), f"{x:.4g}", fill="black")
    draw.text((left, 4), title, fill="black")
    for index, (name, line) in enumerate(points.items()):
        colour = COLOURS[index % len(COLOURS)]
        pixels = [to_pixel(x, y) for x, y in line]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for x, y in pixels:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        legend_y = top + 14 * index
        draw.line(
            (width - right + 10, legend_y + 6, width - right + 30, legend_y + 6),
            fill=colour,
            width=2,
        )
        draw.text((width - right + 34, legend_y), name, fill="black")
    return image
