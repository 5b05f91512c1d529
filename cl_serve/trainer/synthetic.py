"""Generated image classes for the offline demo and the tests (no download anywhere).

A class is a (shape, colour) pair: "red-disk", "blue-stripes-h", ... Each image draws the shape with random
position, size, colour jitter, background and pixel noise, so a class is learnable but not trivial.
`write_image_folder` writes such classes as an ImageFolder directory, the format `cl-serve add-task` reads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ["disk", "square", "triangle", "ring", "cross", "stripes-h", "stripes-v", "checker", "diagonal", "dots",
          "frame", "x"]
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
           "magenta": (210, 50, 200), "cyan": (40, 200, 210), "orange": (240, 130, 30), "white": (235, 235, 235)}


def class_names(n: int, offset: int = 0) -> list[str]:
    """n distinct class names, walking shapes fastest; `offset` skips the first ones (disjoint sets)."""
    colours = list(COLOURS)
    out = []
    for i in range(offset, offset + n):
        shape, colour = SHAPES[i % len(SHAPES)], colours[(i // len(SHAPES) + i) % len(colours)]
        out.append(f"{colour}-{shape}")
    if len(set(out)) != len(out):
        raise ValueError("too many synthetic classes requested")
    return out


def _mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + rng.uniform(-0.15, 0.15) * size, size / 2 + rng.uniform(-0.15, 0.15) * size
    r = size * rng.uniform(0.22, 0.34)
    dx, dy = xx - cx, yy - cy
    period = max(3.0, size / rng.uniform(4.5, 6.5))
    if shape == "disk":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "ring":
        d = np.sqrt(dx ** 2 + dy ** 2)
        return (d <= r) & (d >= r * 0.6)
    if shape == "cross":
        return ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r))
    if shape == "stripes-h":
        return (yy % period) < period / 2
    if shape == "stripes-v":
        return (xx % period) < period / 2
    if shape == "checker":
        return ((xx // period + yy // period) % 2) == 0
    if shape == "diagonal":
        return ((xx + yy) % (period * 1.4)) < period * 0.7
    if shape == "dots":
        return ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) <= (period / 3.2) ** 2
    if shape == "frame":
        return (np.maximum(np.abs(dx), np.abs(dy)) <= r) & (np.maximum(np.abs(dx), np.abs(dy)) >= r * 0.65)
    if shape == "x":
        return ((np.abs(dx - dy) <= r * 0.3) | (np.abs(dx + dy) <= r * 0.3)) & (np.abs(dx) <= r) & (np.abs(dy) <= r)
    raise ValueError(f"unknown shape {shape}")


def render(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One random image of class `name` ("<colour>-<shape>")."""
    colour, shape = name.split("-", 1)
    fg = np.clip(np.array(COLOURS[colour], np.float32) + rng.normal(0, 18, 3), 0, 255)
    bg = rng.uniform(0, 90, 3).astype(np.float32)
    img = np.empty((size, size, 3), np.float32)
    img[:] = bg
    img[_mask(shape, size, rng)] = fg
    img += rng.normal(0, 14, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def render_drawing(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One random line drawing of class `name`: the shape's outline in dark ink on light paper, no colour.

    A different domain from `render` (filled colour on a dark background): what a backbone pretrained on the
    coloured images has to adapt to. The part of the name before the shape is ignored ("drawing-disk"), so only the
    shape tells classes apart.
    """
    shape = name.split("-", 1)[1]
    m = _mask(shape, size, rng)
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    if rng.uniform() < 0.5:  # a thicker pen half of the time
        edge = edge | np.roll(edge, 1, 0) | np.roll(edge, 1, 1)
    paper, ink = rng.uniform(200, 250), rng.uniform(10, 70)
    img = np.where(edge, ink, paper).astype(np.float32) + rng.normal(0, 10, (size, size))
    return Image.fromarray(np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=2))


def write_image_folder(root: str | Path, names: list[str], per_class: int, size: int = 32, seed: int = 0,
                       style: str = "colour") -> Path:
    """Write root/<class>/<n>.png for every class name (`style` "colour": `render`, "drawing": `render_drawing`);
    returns root."""
    draw = {"colour": render, "drawing": render_drawing}[style]
    root = Path(root)
    for ci, name in enumerate(names):
        rng = np.random.default_rng([seed, ci, sum(map(ord, name))])
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(name, size, rng).save(d / f"{i:04d}.png")
    return root
