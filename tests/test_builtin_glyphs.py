"""The glyph builtins: printed characters rendered from matplotlib's fonts, split by typeface,
and the planted-duplicate source of examples/data_based.yaml."""

import io
import string

import numpy as np
import pytest
from PIL import Image

from datasets_.builtin import PLANTED_DIGIT, _digits, builtin_keys, hash_test_split, prepare_builtin
from datasets_.glyphs import FACES, TEST_EVERY, _rng, font_dir, render


def _decode(table) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("L")) for b in table.column("image").to_pylist()])


def test_rendering_is_seeded_and_draws_differ():
    path = font_dir() / FACES[0]
    a, b = render(path, "A", _rng(FACES[0], "A", 0)), render(path, "A", _rng(FACES[0], "A", 0))
    c = render(path, "A", _rng(FACES[0], "A", 1))
    assert a.shape == (28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.max() == 255 and (a > 0).mean() > 0.05  # ink on a black canvas
    assert a[0].max() < 128 and a[-1].max() < 128  # the glyph stays inside the frame


# Both tests read the session's builtin cache, which examples/limits.yaml and data_based.yaml use
# too: each conversion is made once per session (or kept between runs), not once more here.
@pytest.mark.timeout(120)
def test_letters_are_split_by_typeface():
    ds = prepare_builtin("letters")
    assert ds.classes == list(string.ascii_lowercase)
    test_faces = len(range(0, len(FACES), TEST_EVERY))
    assert ds.num_samples("test") == test_faces * 26 * 8
    assert ds.num_samples("train") == (len(FACES) - test_faces) * 26 * 8
    assert ds.class_counts("test") == [test_faces * 8] * 26
    # No test image is a training image: held-out typefaces, not augmented copies.
    train, test = _decode(ds.read_split("train", ["image"])), _decode(ds.read_split("test", ["image"]))
    seen = {x.tobytes() for x in train}
    assert not any(x.tobytes() in seen for x in test)
    assert prepare_builtin("letters").fingerprint == ds.fingerprint  # cached, not rebuilt


@pytest.mark.timeout(180)
def test_planted_source_class_is_the_digit_tasks_training_images():
    ds = prepare_builtin("glyphs-planted")
    assert ds.classes[:36] == list(string.digits + string.ascii_uppercase)
    assert ds.classes[36:] == [f"handwritten-{PLANTED_DIGIT}", "handwritten-3-or-8", "handwritten-mixed"]
    planted = 36
    counts = ds.class_counts("train")
    assert counts[37] > counts[36] and counts[38] == 7 * 16  # 3s and 8s; 16 of each digit but 7, 3, 8
    assert ds.class_counts("test")[36:] == [0, 0, 0]
    assert ds.class_counts("test")[planted] == 0  # source test = held-out typefaces only
    train = ds.read_split("train", ["label", "image"])
    mine = _decode(train.filter(np.asarray(train.column("label")) == planted))
    images, labels, _ = _digits()
    is_test = hash_test_split(builtin_keys("digits", len(labels)))
    sevens = labels == PLANTED_DIGIT
    assert len(mine) == int((sevens & ~is_test).sum()) > 100

    def big(x):
        return np.asarray(Image.fromarray(x).resize((28, 28), Image.Resampling.BILINEAR)).tobytes()

    assert {x.tobytes() for x in mine} == {big(x) for x in images[sevens & ~is_test]}
    assert not {x.tobytes() for x in mine} & {big(x) for x in images[sevens & is_test]}
