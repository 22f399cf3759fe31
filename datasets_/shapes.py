"""Geometric shapes drawn with PIL (builtin ``shapes``): a downstream task far from both
pretraining sources of examples/role_of_data.yaml (handwritten digits, printed characters), made
procedurally so nothing is downloaded.

12 classes (:data:`CLASSES`), 250 images each, 28x28, white on black like the other builtins.
Each image is one shape at a random position, scale and rotation, drawn filled or as an outline
of random stroke width, among clutter (random line segments and dots), blurred a little and
overlaid with Gaussian noise. Several classes differ only in their vertex count (pentagon,
hexagon, octagon) or in where an outline crosses (ring vs circle), so at 28x28 with clutter the
task is hard for frozen features: full-data probes of role_of_data's supervised and SimCLR
models reach 0.54-0.62, off the ceiling where digits and letters are not (docs/results/pilots/role_of_data.md).

Each image's generator is seeded by (class, index), so the images are the same on every machine
with the same numpy and Pillow. The train/test split is by key hash, like the other builtins
without a split of their own.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = (
    "circle",
    "square",
    "triangle",
    "pentagon",
    "hexagon",
    "octagon",
    "star",
    "plus",
    "cross",
    "ring",
    "arrow",
    "crescent",
)
PER_CLASS = 250
SIZE = 28
_CANVAS = 84  # drawn at 3x, then reduced to SIZE with antialiasing
CLUTTER = (1, 3)  # line segments and dots per image, at least / at most
NOISE_SD = 12.0  # of the Gaussian pixel noise, in grey levels
SCALE = (0.3, 0.42)  # the shape's radius, as a share of the canvas


def _rng(label: int, index: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"shapes|{label}|{index}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _polygon(n: int, r: float, inner: float | None = None) -> list[tuple[float, float]]:
    """Vertices of a regular n-gon of radius r (a star when ``inner`` gives the inner radius)."""
    if inner is None:
        return [(r * math.cos(2 * math.pi * k / n), r * math.sin(2 * math.pi * k / n)) for k in range(n)]
    pts = []
    for k in range(2 * n):
        rk = r if k % 2 == 0 else inner
        pts.append((rk * math.cos(math.pi * k / n), rk * math.sin(math.pi * k / n)))
    return pts


def _outline(name: str, r: float) -> list[list[tuple[float, float]]]:
    """The shape ``name`` as closed polygons centred on 0 (circles as 48-gons)."""
    if name in ("circle", "ring"):
        outer = _polygon(48, r)
        return [outer, _polygon(48, 0.55 * r)] if name == "ring" else [outer]
    if name == "crescent":  # a disc less an offset disc, traced as one outline
        # the circles |p| = r and |p - (0.7r, 0)| = 0.9r meet at x = 0.486r, y = +-0.874r
        a, b = math.acos(0.486), math.atan2(0.874, -0.214)
        outer = [(r * math.cos(t), r * math.sin(t)) for t in np.linspace(a, 2 * math.pi - a, 36)]
        inner = [(0.7 * r + 0.9 * r * math.cos(t), 0.9 * r * math.sin(t)) for t in np.linspace(2 * math.pi - b, b, 24)]
        return [outer + inner]
    sides = {"square": 4, "triangle": 3, "pentagon": 5, "hexagon": 6, "octagon": 8}
    if name in sides:
        return [_polygon(sides[name], r)]
    if name == "star":
        return [_polygon(5, r, inner=0.42 * r)]
    w = 0.3 * r
    if name in ("plus", "cross"):
        quarter = [(-w, -r), (w, -r), (w, -w)]  # one arm's end and the corner after it; turned 4 times
        arm = [(x * q - y * p, x * p + y * q) for p, q in ((0, 1), (1, 0), (0, -1), (-1, 0)) for x, y in quarter]
        if name == "cross":  # the plus turned by 45 degrees, so a rotation range keeps them apart
            c, s = math.cos(math.pi / 4), math.sin(math.pi / 4)
            arm = [(x * c - y * s, x * s + y * c) for x, y in arm]
        return [arm]
    if name == "arrow":
        return [[(-r, -w), (0.2 * r, -w), (0.2 * r, -2 * w), (r, 0), (0.2 * r, 2 * w), (0.2 * r, w), (-r, w)]]
    raise ValueError(f"unknown shape {name!r}")


def render(name: str, rng: np.random.Generator) -> np.ndarray:
    """One SIZE x SIZE uint8 image of shape ``name``, its pose, style and clutter drawn from ``rng``."""
    img = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(CLUTTER[0], CLUTTER[1] + 1))):
        x0, y0, x1, y1 = rng.uniform(0, _CANVAS, 4)
        if rng.random() < 0.5:
            draw.line((x0, y0, x1, y1), fill=int(rng.integers(90, 200)), width=int(rng.integers(2, 5)))
        else:
            d = rng.uniform(3, 8)
            draw.ellipse((x0, y0, x0 + d, y0 + d), fill=int(rng.integers(90, 200)))
    r = rng.uniform(*SCALE) * _CANVAS
    cx, cy = rng.uniform(r + 2, _CANVAS - r - 2, 2)
    # plus and cross differ only by 45 degrees: their rotation stays within +-22 degrees
    angle = rng.uniform(-22, 22) if name in ("plus", "cross") else rng.uniform(0, 360)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    filled = name != "ring" and rng.random() < 0.5
    shade = int(rng.integers(170, 256))
    stroke = int(rng.integers(2, 6))
    for k, poly in enumerate(_outline(name, r)):
        pts = [(cx + x * c - y * s, cy + x * s + y * c) for x, y in poly]
        if filled:
            draw.polygon(pts, fill=shade if k == 0 else 0)
        else:
            draw.line([*pts, pts[0]], fill=shade, width=stroke, joint="curve")
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    small = np.asarray(img.resize((SIZE, SIZE), Image.Resampling.LANCZOS), dtype=np.float64)
    noisy = small + rng.normal(0.0, NOISE_SD, small.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def shapes() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images, labels and class names of the 12 shape classes, PER_CLASS images each (3,000)."""
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            images.append(render(name, _rng(label, i)))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64), list(CLASSES)
