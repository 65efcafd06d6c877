"""Tests of data/morphometry.py against references it does not produce: rasterised bars of known
width and slant, Morpho-MNIST's published measures of MNIST's first training digit, the known
spread of MNIST's test set, and scikit-image's own pyramid_expand."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from skimage import transform

from data.mnist import load_mnist
from data.morphometry import MEASURE_VERSION, _upscale, measure_digits
from data.shapes import MEASURES
from tests.helpers import ROOT

COLUMN = {name: i for i, name in enumerate(MEASURES)}
TOP, BOTTOM = 4, 24  # the bars' rows: 20 pixels tall


def bar(width: int, degrees: float = 0.0) -> np.ndarray:
    """A bar ``width`` pixels wide and 20 tall, sheared so its top leans right by ``degrees``.

    Pixel (x, y), y the row pointing down, is ink when its centre satisfies
    |x - x_c - tan(a) * (y_c - y)| < width / 2. Upright, the bar's edges lie on pixel edges.
    """
    y, x = np.mgrid[0:28, 0:28] + 0.5
    x_c, y_c = 14.0 + (width % 2) / 2, (TOP + BOTTOM) / 2
    inside = np.abs(x - x_c - math.tan(math.radians(degrees)) * (y_c - y)) < width / 2
    return (255 * (inside & (y > TOP) & (y < BOTTOM))).astype(np.uint8)


def measures(image: np.ndarray) -> dict[str, float]:
    return dict(zip(MEASURES, measure_digits(image[None])[0].tolist()))


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_columns_and_version():
    assert MEASURES == ("area", "length", "thickness", "slant", "width", "height")
    assert isinstance(MEASURE_VERSION, int)


@pytest.mark.parametrize("width", [3, 4, 5])
def test_upright_bar(width):
    m = measures(bar(width))
    assert (bar(width) > 0).sum(axis=1)[TOP:BOTTOM].tolist() == [width] * (BOTTOM - TOP)
    # The half-range threshold cuts the upscaled edges where the original pixel edges were, and
    # the skeleton runs down the middle: its distance to the background is half the width, give
    # or take one 1/4-pixel step of the upscaled grid.
    assert m["thickness"] == pytest.approx(width, abs=0.3)
    assert abs(m["slant"]) < 0.1
    # The width is taken on the grey upscaled image, whose edges the bicubic spline (+-0.5 px)
    # and the Gaussian (sigma 1/3 px) spread out; trimming 1% of the mass per side does not
    # reach past those tails for a thin bar, so the width exceeds the bar's by up to ~1.5 px.
    assert width <= m["width"] <= width + 1.5
    assert m["height"] == pytest.approx(BOTTOM - TOP, abs=0.5)
    assert m["area"] == pytest.approx(width * (BOTTOM - TOP), rel=0.02)
    # The skeleton stops about half the width short of each end.
    assert BOTTOM - TOP - width - 1 <= m["length"] <= BOTTOM - TOP


def test_width_grows_with_the_bar():
    widths = [measures(bar(w))["width"] for w in (2, 3, 4, 5, 6)]
    assert widths == sorted(widths)


@pytest.mark.parametrize("degrees", [15.0, -15.0, 25.0, -25.0])
@pytest.mark.parametrize("width", [3, 4, 5])
def test_sheared_bar(width, degrees):
    image = bar(width, degrees)
    m, upright = measures(image), measures(bar(width))
    # Positive slant = the top leans right. Each row's ink starts on a whole pixel, so the
    # stroke's centre zigzags by up to +-0.5 px about the ideal line: allow 1.5 degrees.
    assert m["slant"] == pytest.approx(degrees, abs=1.5)
    # Slant-corrected, the width is the upright bar's; uncorrected it would grow by
    # 20 * tan(a) = 5.4 px (15 degrees) or 9.3 px (25 degrees). The zigzag adds up to ~0.5 px.
    assert upright["width"] <= m["width"] <= upright["width"] + 0.6
    assert m["height"] == pytest.approx(BOTTOM - TOP, abs=0.5)
    assert m["area"] == pytest.approx(width * (BOTTOM - TOP), rel=0.02)
    # Across the stroke the bar is w * cos(a) thick, less the staircase's inner corners, which
    # jut in by up to half a pixel on each side: between (w - 1) cos(a) and w cos(a).
    cos = math.cos(math.radians(degrees))
    assert (width - 1) * cos <= m["thickness"] <= width * cos


def test_mirror_image_negates_slant(mnist):
    for image in mnist.test_images[:20]:
        m, mirrored = measures(image), measures(np.ascontiguousarray(image[:, ::-1]))
        assert mirrored["slant"] == pytest.approx(-m["slant"], abs=1e-5)  # float32: ~2e-6 at 20 degrees
        for name in ("area", "width", "height"):
            assert mirrored[name] == pytest.approx(m[name], abs=1e-5)


def test_morpho_mnist_published_measures_of_first_training_digit(mnist):
    # Morpho-MNIST's released original/train-morpho.csv, row 0 (quoted in their
    # tests/test_measure.py). They used medial_axis and an older scikit-image; we use
    # skeletonize, so thickness differs by ~0.1 px (their current code gives 2.53) and length
    # is not compared: it depends on the skeleton's spurs (released 50.3, their current 47.7).
    m = measures(mnist.train_images[0])
    assert m["area"] == pytest.approx(107.3125, abs=1.0)
    assert m["thickness"] == pytest.approx(2.4607, abs=0.15)
    assert m["slant"] == pytest.approx(math.degrees(0.23107), abs=0.5)
    assert m["width"] == pytest.approx(14.5396, abs=0.15)
    assert m["height"] == pytest.approx(19.8491, abs=0.15)


def test_mnist_test_set_spread(mnist):
    rng = np.random.default_rng(0)
    images = mnist.test_images[rng.choice(len(mnist.test_images), 1500, replace=False)]
    m = measure_digits(images)
    assert not np.isnan(m).any()
    percentiles = {name: np.percentile(m[:, i], [5, 50, 95]) for name, i in COLUMN.items()}
    p5, median, p95 = percentiles["thickness"]
    assert 2.4 <= median <= 2.65 and 1.6 <= p5 <= 1.9 and 3.6 <= p95 <= 4.2
    # MNIST leans right: Morpho-MNIST's own measure_image gives 5/50/95% of -17.5/+5.0/+27.5
    # degrees on 1000 test digits, so the 95th percentile lies well beyond +20 degrees.
    p5, median, p95 = percentiles["slant"]
    assert -22 <= p5 <= -14 and 2 <= median <= 8 and 24 <= p95 <= 32
    assert 13.0 <= percentiles["width"][1] <= 14.0
    # MNIST scales each digit to fit 20x20, so most are 20 px tall, less the 2% trimmed.
    assert 19.0 <= percentiles["height"][1] <= 19.8


def test_upscale_is_pyramid_expand(mnist):
    images = np.concatenate([mnist.test_images[:40], bar(3, 25)[None], bar(4)[None]])
    expected = [np.floor(255 * transform.pyramid_expand(i, upscale=4, order=3, channel_axis=None)) for i in images]
    np.testing.assert_array_equal(_upscale(images), np.stack(expected))


def test_empty_image_gives_nan():
    blank = np.zeros((28, 28), np.uint8)
    rows = measure_digits(np.stack([blank, bar(3), blank]), workers=1)
    assert np.isnan(rows[[0, 2]]).all() and not np.isnan(rows[1]).any()


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((1, 28, 28), np.float32),
        np.zeros((1, 28, 28), np.int64),
        np.zeros((1, 28, 28), bool),
        [[[0] * 28] * 28],
    ],
)
def test_wrong_dtype_raises(images):
    with pytest.raises(ValueError, match="uint8"):
        measure_digits(images)


def test_wrong_shape_raises():
    with pytest.raises(ValueError, match="shape"):
        measure_digits(np.zeros((1, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        measure_digits(np.zeros((28, 28), np.uint8))


def test_workers_agree(mnist):
    images = mnist.test_images[:48]
    serial = measure_digits(images, workers=1)
    assert serial.dtype == np.float32 and serial.shape == (48, len(MEASURES))
    np.testing.assert_array_equal(measure_digits(images, workers=2, progress=True), serial)
    assert measure_digits(images[:0]).shape == (0, len(MEASURES))


def test_small_batches_are_measured_in_process(mnist, monkeypatch):
    """An evaluation's few hundred digits start no worker processes at all."""
    import multiprocessing

    def no_pool(*args, **kwargs):
        raise AssertionError("a pool was started")

    monkeypatch.setattr(multiprocessing, "get_context", no_pool)
    assert measure_digits(mnist.test_images[:500]).shape == (500, len(MEASURES))


def test_workers_are_not_forked_from_the_caller_even_without_a_script():
    """A forked worker shares the caller's memory, locks held by its other threads included (how an
    evaluation during training hung). Here the caller, a ``python -c`` without a script file, replaces
    the chunk function in its own memory: a worker forked from it would run the replacement and return
    NaN rows; a fork server's worker imports the module afresh and measures."""
    code = (
        "import numpy as np\n"
        "import data.morphometry as m\n"
        "def poisoned(chunk): return np.full((len(chunk), len(m.MEASURES)), np.nan, np.float32)\n"
        "poisoned.__qualname__ = poisoned.__name__ = '_measure_chunk'; poisoned.__module__ = m.__name__\n"
        "m._measure_chunk = poisoned\n"
        "images = np.zeros((64, 28, 28), np.uint8); images[:, 8:20, 12:16] = 255\n"
        "rows = m.measure_digits(images, workers=2)\n"
        "print(rows.shape, int(np.isnan(rows).any(axis=1).sum()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"(64, {len(MEASURES)}) 0"
