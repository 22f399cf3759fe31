"""Printed characters rendered from the fonts that ship inside matplotlib (builtin ``glyphs`` and
``letters``): a second real image domain beside handwritten digits, with nothing downloaded.

matplotlib's wheel carries 22 outline faces that hold every character of 0-9, A-Z and a-z
(DejaVu Sans / Sans Mono / Serif and STIX General in four styles each, six Computer Modern
faces). Each (face, character) is drawn ``draws`` times, white on black like MNIST, with a small
random rotation, scale, shift and, for a third, bolder strokes; the generator is seeded by face, character and
draw, so the images are the same on every machine with the same matplotlib and FreeType.

The test split is by *face*: every fifth face (in the sorted order below) is held out, so test
accuracy measures recognition in typefaces never seen in training, not of augmented copies of
training images.
"""

from __future__ import annotations

import functools
import hashlib
import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from datasets_.objstore import DatasetError

FACES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmti10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmmi10.ttf",
)
TEST_EVERY = 5  # faces 0, 5, 10, 15, 20 are the test split
SIZE = 28
_CANVAS = 64  # drawn large, then reduced to SIZE with antialiasing


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _rng(face: str, char: str, draw: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"{face}|{ord(char)}|{draw}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


@functools.lru_cache(maxsize=1024)
def _font(font_path: Path, size: int) -> ImageFont.FreeTypeFont:
    # A face is drawn at about 20 sizes thousands of times; reading and parsing its file once per
    # size instead of once per image changes no pixel.
    return ImageFont.truetype(str(font_path), size)


def render(font_path: Path, char: str, rng: np.random.Generator) -> np.ndarray:
    """One SIZE x SIZE uint8 image of ``char``: centred by its ink box, then jittered."""
    scale = rng.uniform(0.62, 0.92)
    font = _font(font_path, int(_CANVAS * scale))
    canvas = Image.new("L", (_CANVAS * 2, _CANVAS * 2), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
    draw.text((_CANVAS - (left + right) / 2, _CANVAS - (top + bottom) / 2), char, fill=255, font=font)
    if rng.random() < 1 / 3:  # bolder strokes (thinning would erase the hairlines of serif faces)
        canvas = canvas.filter(ImageFilter.MaxFilter(3))
    dx, dy = rng.uniform(-0.08, 0.08, 2) * _CANVAS
    canvas = canvas.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR, translate=(dx, dy))
    half = _CANVAS // 2
    crop = canvas.crop((half, half, half + _CANVAS, half + _CANVAS))
    return np.asarray(crop.resize((SIZE, SIZE), Image.Resampling.LANCZOS), dtype=np.uint8)


def render_set(chars: str, draws: int) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Images, labels, class names and per-sample split ('train' / 'test', by face) of ``chars``."""
    root = font_dir()
    missing = [f for f in FACES if not (root / f).is_file()]
    if missing:
        raise DatasetError(
            f"matplotlib's font folder {root} lacks {', '.join(missing)}; the glyph datasets need matplotlib's "
            "bundled fonts"
        )
    images, labels, splits = [], [], []
    for f, face in enumerate(FACES):
        split = "test" if f % TEST_EVERY == 0 else "train"
        for label, char in enumerate(chars):
            for d in range(draws):
                images.append(render(root / face, char, _rng(face, char, d)))
                labels.append(label)
                splits.append(split)
    return np.stack(images), np.array(labels, dtype=np.int64), list(chars), np.array(splits)


def glyphs() -> tuple:
    """36 classes: the digits and capital letters, 12 draws per face (9,504 images); the arrays
    are read-only."""
    images, labels, classes, split = _glyph_set()
    return images, labels, list(classes), split


@functools.cache
def _glyph_set() -> tuple:
    # Kept for the life of the process (7 MB): builtins ``glyphs`` and ``glyphs-planted`` both
    # start from it, and rendering it takes most of a minute.
    images, labels, classes, split = render_set(string.digits + string.ascii_uppercase, draws=12)
    for a in (images, labels, split):
        a.setflags(write=False)
    return images, labels, tuple(classes), split


def letters() -> tuple:
    """26 classes: the lowercase letters, 8 draws per face (4,576 images)."""
    return render_set(string.ascii_lowercase, draws=8)
