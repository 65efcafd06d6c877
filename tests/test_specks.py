"""The speck measure (evaluation/specks.py) on drawn images whose answer is known, and its rate on real MNIST."""

import numpy as np
import pytest

from data.mnist import load_mnist
from evaluation.specks import SPECK_MAX_AREA, detached_areas, speck_flags, speck_rate


def stroke() -> np.ndarray:
    """A vertical bar of 3 x 20 pixels at full ink: a "1"."""
    image = np.zeros((28, 28), np.uint8)
    image[4:24, 12:15] = 255
    return image


def with_blob(image: np.ndarray, rows: slice, cols: slice, level: int = 255) -> np.ndarray:
    image = image.copy()
    image[rows, cols] = level
    return image


def test_a_clean_stroke_has_no_detached_ink():
    assert detached_areas(stroke()).size == 0 and not speck_flags(stroke()[None])[0]


def test_a_small_dot_beside_the_stroke_is_a_speck_and_a_second_stroke_is_not():
    dot = with_blob(stroke(), slice(10, 12), slice(18, 20))  # 4 pixels, three columns away
    bar = with_blob(stroke(), slice(2, 4), slice(17, 27))  # 20 pixels: a "5"'s top bar
    assert detached_areas(dot).tolist() == [4] and detached_areas(bar).tolist() == [20]
    assert speck_flags(np.stack([dot, bar])).tolist() == [True, False]
    assert SPECK_MAX_AREA < 20


@pytest.mark.parametrize(
    ("bridge_level", "speck"),
    [(0, True), (20, True), (60, False), (255, False)],  # faint ink (>= 32) joins the dot to the stroke
)
def test_a_dot_joined_by_faint_ink_is_part_of_the_stroke(bridge_level, speck):
    image = with_blob(stroke(), slice(10, 12), slice(17, 19))
    image[10, 15:17] = bridge_level
    assert speck_flags(image[None])[0] == speck


def test_diagonal_neighbours_are_connected_and_too_faint_ink_is_no_speck():
    diagonal = with_blob(stroke(), slice(24, 25), slice(15, 16))  # touches the bar's corner only
    faint = with_blob(stroke(), slice(10, 12), slice(18, 20), level=100)  # below half ink: not ink
    assert not speck_flags(np.stack([diagonal, faint])).any()


def test_the_rate_on_real_test_digits_is_under_one_percent():
    rate = speck_rate(load_mnist(None).test_images)
    assert 0.005 < rate < 0.01, rate  # 0.82% when the rule was chosen (docs/evaluation.md)
